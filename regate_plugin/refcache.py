"""The reference-loss cache on disk: reader (``RefCache``), writer (``RefCacheWriter``) and its progress.

ref[s, k] for every supervised unit of a dataset. What a cache was computed from (fingerprint,
per-sample digests, their messages) is ``identity``'s.

Layout of a finished cache directory::

    losses.f16    flat float16 reference losses, sample after sample (memory-mapped when read)
    offsets.i64   int64 (num_samples + 1,): units of sample s are losses[offsets[s]:offsets[s+1]]
    digests.u64   uint64 (num_samples,): each sample's ``identity.sample_digests`` (its context and
                  supervised target ids), so training can check every micro-batch against what was
                  scored (absent in a cache written without digests, whose fingerprint has an empty
                  ``samples`` field)
    meta.json     format version, sizes, SHA-256 of the files, and the fingerprint of the setup

The writer fills ``<cache>.partial/`` one shard (a contiguous range of samples) at a time, each
shard written under a temporary name and renamed when whole, so a killed run resumes where it
stopped. ``finalize`` assembles the cache in a temporary directory and renames it to its final
name: a directory under the final name is always complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .atomic import fsync_dir, write_atomic
from .identity import (  # the errors, Fingerprint and sha256_file stay importable from here, as before the split
    CacheMismatchError,
    CorruptCacheError,
    Fingerprint,
    RefCacheError,
    SampleDigests,
    sample_change,
    samples_fingerprint,
    sha256_file,
)

FORMAT = "regate-refcache"
VERSION = 3  # v2: per-sample digests; v3: the digests cover each sample's context, not only its targets
LOSSES_FILE = "losses.f16"
OFFSETS_FILE = "offsets.i64"
DIGESTS_FILE = "digests.u64"
META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"
FP16_MAX = float(np.finfo(np.float16).max)


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def to_fp16_losses(losses: Any, where: str) -> np.ndarray:
    """Reference losses as float16; NaN is refused, values above the fp16 range are clamped."""
    if isinstance(losses, torch.Tensor):
        losses = losses.detach().cpu().double()
    array = np.asarray(losses, dtype=np.float64)  # one rounding, straight to float16
    if array.ndim != 1:
        raise ValueError(f"{where}: losses must be 1-D, got shape {array.shape}")
    if np.isnan(array).any():
        raise ValueError(f"{where}: reference losses contain NaN; check the teacher's dtype and inputs")
    return np.clip(array, 0.0, FP16_MAX).astype(np.float16)


class RefCache:
    """A finished cache, read-only and memory-mapped: every rank and dataloader worker shares pages."""

    def __init__(
        self, path: Path, meta: dict[str, Any], losses: np.ndarray, offsets: np.ndarray, digests: np.ndarray | None
    ) -> None:
        self.path = path
        self.meta = meta
        self.fingerprint = Fingerprint.from_dict(meta["fingerprint"])
        self.losses = losses
        self.offsets = offsets
        self.digests = digests  # None: written without digests (synthetic caches); not checked per sample

    @classmethod
    def open(
        cls, path: str | os.PathLike, expect: Fingerprint | Mapping[str, Any] | None = None, verify: bool = True
    ) -> "RefCache":
        """Open and check a cache: sizes always, checksums when ``verify``, fingerprint when ``expect``."""
        path = Path(path)
        if not (path / META_FILE).is_file():
            hint = ""
            if path.with_name(path.name + ".partial").is_dir():
                hint = " A partial cache exists beside it: rerun the same `regate score` command to finish it."
            raise RefCacheError(f"no reference cache at {path} (missing {META_FILE}).{hint}")
        try:
            meta = json.loads((path / META_FILE).read_bytes())
        except (OSError, ValueError) as err:
            raise CorruptCacheError(f"{path / META_FILE} is unreadable ({err}): rebuild the cache with `regate score`")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
            found = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else (type(meta).__name__, None)
            if found[0] == FORMAT and isinstance(found[1], int) and found[1] < VERSION:
                raise CorruptCacheError(
                    f"{path} is a v{found[1]} cache from an older regate-plugin (this one reads v{VERSION}, whose "
                    "per-sample digests cover each sample's prompt and answer): rebuild it with `regate score`"
                )
            raise CorruptCacheError(f"{path} is not a {FORMAT} v{VERSION} cache (found {found[0]!r} v{found[1]!r})")
        try:
            num_samples, num_units = int(meta["num_samples"]), int(meta["num_units"])
            fingerprint = Fingerprint.from_dict(meta["fingerprint"])
            names = (LOSSES_FILE, OFFSETS_FILE, DIGESTS_FILE) if fingerprint.samples else (LOSSES_FILE, OFFSETS_FILE)
            recorded = {n: (int(meta["files"][n]["bytes"]), str(meta["files"][n]["sha256"])) for n in names}
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptCacheError(f"{path / META_FILE} lacks a valid field ({err!r}): rebuild the cache with `regate score`")
        expected_bytes = {LOSSES_FILE: 2 * num_units, OFFSETS_FILE: 8 * (num_samples + 1), DIGESTS_FILE: 8 * num_samples}
        expected_bytes = {name: expected_bytes[name] for name in names}
        for name, size in expected_bytes.items():
            file = path / name
            if not file.is_file():
                raise CorruptCacheError(f"{file} is missing: rebuild the cache with `regate score`")
            actual = file.stat().st_size
            if actual != size or recorded[name][0] != size:
                raise CorruptCacheError(
                    f"{file} has {actual} bytes, expected {size}: the file is truncated or from another cache; rebuild it"
                )
            if verify and sha256_file(file) != recorded[name][1]:
                raise CorruptCacheError(f"{file} does not match its SHA-256 in {META_FILE}: the file is corrupt; rebuild it")
        offsets = np.memmap(path / OFFSETS_FILE, dtype=np.int64, mode="r", shape=(num_samples + 1,))
        if offsets[0] != 0 or offsets[-1] != num_units or (np.diff(offsets) < 0).any():
            raise CorruptCacheError(f"{path / OFFSETS_FILE} is not a valid offset table: rebuild the cache")
        losses = np.memmap(path / LOSSES_FILE, dtype=np.float16, mode="r", shape=(num_units,)) if num_units else np.zeros(0, np.float16)
        digests = None
        if fingerprint.samples:
            digests = np.memmap(path / DIGESTS_FILE, dtype="<u8", mode="r", shape=(num_samples,)) if num_samples else np.zeros(0, "<u8")
            if verify and samples_fingerprint(digests) != fingerprint.samples:
                raise CorruptCacheError(f"{path / DIGESTS_FILE} does not match the fingerprint's samples field: rebuild the cache")
        cache = cls(path, meta, losses, offsets, digests)
        if expect is not None:
            diffs = cache.fingerprint.differences(expect)
            if diffs:
                raise CacheMismatchError(
                    f"reference cache {path} was built for a different setup:\n  "
                    + "\n  ".join(diffs)
                    + "\nRebuild it with `regate score` for this setup, or point --ref-cache at the matching cache."
                )
        return cache

    @property
    def num_samples(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_units(self) -> int:
        return len(self.losses)

    def offsets_tensor(self) -> torch.Tensor:
        return torch.from_numpy(np.array(self.offsets, dtype=np.int64))

    def counts(self) -> np.ndarray:
        """Units of every sample."""
        return np.diff(self.offsets)

    def differences(self, expected: Fingerprint | Mapping[str, Any], samples: SampleDigests) -> list[str]:
        """``fingerprint.differences(expected)``, a changed samples field told as the first changed
        sample of the scan ``samples`` and its cause (what the user can look at)."""
        differences = self.fingerprint.differences(expected)
        changed = self.sample_mismatch(samples)
        if changed is None:
            return differences
        return [d for d in differences if not d.startswith("samples:")] + [changed]

    def sample_mismatch(self, samples: SampleDigests) -> str | None:
        """The first sample of a dataset scan that differs from what was scored (None: all match)."""
        if len(samples.digests) != self.num_samples:
            return f"the dataset has {len(samples.digests)} samples, the reference cache {self.num_samples}"
        changed = samples.counts != self.counts()
        if self.digests is not None:
            changed |= np.asarray(self.digests) != samples.digests
        differ = np.flatnonzero(changed)
        if not differ.size:
            return None
        index = int(differ[0])
        return sample_change(index, int(samples.counts[index]), int(self.counts()[index]))

    def sample(self, index: int) -> np.ndarray:
        """Reference losses of sample ``index`` as float32."""
        return np.asarray(self.losses[self.offsets[index] : self.offsets[index + 1]], dtype=np.float32)

    def lookup(self, flat_index: torch.Tensor) -> torch.Tensor:
        """Reference losses at flat unit positions, as float32 on the CPU."""
        return torch.from_numpy(np.asarray(self.losses[flat_index.cpu().numpy()], dtype=np.float32))

    def all_losses(self) -> torch.Tensor:
        """Every reference loss as one float32 tensor (the EMA table's starting values)."""
        return torch.from_numpy(np.asarray(self.losses, dtype=np.float32))

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled (an enabled model's copy, a worker) by path: reopened and memory-mapped, not copied."""
        return RefCache.open, (str(self.path), None, False)


@dataclass(frozen=True)
class Shard:
    shard_id: int
    start: int
    stop: int


class RefCacheWriter:
    """Builds a cache shard by shard; resumable after a kill, safe for ranks writing disjoint shards."""

    def __init__(self, path: str | os.PathLike, fingerprint: Fingerprint, num_samples: int, shard_size: int = 1024) -> None:
        if num_samples < 0 or shard_size < 1:
            raise ValueError(f"num_samples must be >= 0 and shard_size >= 1, got {num_samples}, {shard_size}")
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.fingerprint = fingerprint
        self.num_samples = num_samples
        self.shard_size = shard_size
        if (self.path / META_FILE).exists():
            raise FileExistsError(f"a finished reference cache already exists at {self.path}; delete it or choose another --out")
        if self.path.exists():
            raise FileExistsError(f"{self.path} exists and is not a reference cache; choose another --out")
        progress = {
            "version": VERSION,
            "fingerprint": fingerprint.to_dict(),
            "num_samples": num_samples,
            "shard_size": shard_size,
        }
        self.partial.mkdir(parents=True, exist_ok=True)
        progress_file = self.partial / PROGRESS_FILE
        if progress_file.exists():
            differences = _progress_differences(_read_progress(progress_file), progress, fingerprint)
            if differences:
                raise CacheMismatchError(
                    f"{self.partial} holds a partial cache for another setup ({'; '.join(differences)}): rerun the "
                    f"original command to finish it, or delete {self.partial} to start over"
                )
        else:
            write_atomic(progress_file, _json_bytes(progress))

    @property
    def records_digests(self) -> bool:
        """Whether shards carry per-sample digests: exactly when the fingerprint has a samples field."""
        return bool(self.fingerprint.samples)

    def shards(self) -> list[Shard]:
        return [
            Shard(i, start, min(start + self.shard_size, self.num_samples))
            for i, start in enumerate(range(0, self.num_samples, self.shard_size))
        ]

    def _shard_file(self, shard_id: int) -> Path:
        return self.partial / f"shard-{shard_id:06d}.bin"

    def is_done(self, shard: Shard) -> bool:
        """True when the shard's file exists and reads back whole (checksum verified)."""
        try:
            self.read_shard(shard)
        except (OSError, CorruptCacheError):
            return False
        return True

    def pending(self, rank: int = 0, world_size: int = 1) -> list[Shard]:
        """Shards still to compute that belong to ``rank`` (shard_id mod world_size == rank)."""
        return [s for s in self.shards() if s.shard_id % world_size == rank and not self.is_done(s)]

    def write_shard(self, shard: Shard, per_sample: Sequence[Any], digests: Sequence[int] | None = None) -> None:
        """Store one shard: ``per_sample[i]`` holds the reference losses of sample ``shard.start + i``
        and ``digests[i]`` its ``identity.sample_digests`` value (required exactly when ``records_digests``)."""
        n = shard.stop - shard.start
        if len(per_sample) != n:
            raise ValueError(f"shard {shard.shard_id} covers {n} samples, got {len(per_sample)}")
        if (digests is not None) != self.records_digests:
            raise ValueError(
                "pass each sample's digest: the fingerprint has a samples field" if self.records_digests
                else "this cache records no digests (its fingerprint's samples field is empty): pass none"
            )
        digest_bytes = b""
        if digests is not None:
            if len(digests) != n:
                raise ValueError(f"shard {shard.shard_id} covers {n} samples, got {len(digests)} digests")
            digest_bytes = np.asarray(digests, dtype=np.uint64).astype("<u8").tobytes()
        arrays = [to_fp16_losses(x, f"sample {shard.start + i}") for i, x in enumerate(per_sample)]
        counts = np.array([a.size for a in arrays], dtype=np.int64)
        body = struct.pack("<qq", shard.start, shard.stop) + counts.tobytes() + digest_bytes + b"".join(a.tobytes() for a in arrays)
        write_atomic(self._shard_file(shard.shard_id), body + hashlib.sha256(body).digest())

    def read_shard(self, shard: Shard) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """(counts, digests or None, losses) of a written shard; CorruptCacheError if it does not check out."""
        data = self._shard_file(shard.shard_id).read_bytes()
        body, digest = data[:-32], data[-32:]
        n = shard.stop - shard.start
        losses_at = 16 + 8 * n + (8 * n if self.records_digests else 0)
        if len(data) < losses_at + 32 or hashlib.sha256(body).digest() != digest:
            raise CorruptCacheError(f"{self._shard_file(shard.shard_id)} is corrupt")
        start, stop = struct.unpack_from("<qq", body)
        counts = np.frombuffer(body, dtype=np.int64, count=n, offset=16)
        digests = np.frombuffer(body, dtype="<u8", count=n, offset=16 + 8 * n) if self.records_digests else None
        losses = np.frombuffer(body, dtype=np.float16, offset=losses_at)
        if (start, stop) != (shard.start, shard.stop) or losses.size != counts.sum():
            raise CorruptCacheError(f"{self._shard_file(shard.shard_id)} does not hold samples {shard.start}..{shard.stop - 1}")
        return counts, digests, losses

    def finalize(self) -> RefCache:
        """Merge all shards into the final cache (atomically) and remove the partial directory."""
        parts, missing = [], []
        for shard in self.shards():
            try:
                parts.append(self.read_shard(shard))
            except (OSError, CorruptCacheError):
                missing.append(shard.shard_id)
        if missing:
            more = "..." if len(missing) > 10 else ""
            raise RefCacheError(f"cannot finalize {self.path}: shards {missing[:10]}{more} are not written yet")
        counts = np.concatenate([c for c, _, _ in parts]) if parts else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        names = [LOSSES_FILE, OFFSETS_FILE]
        if self.records_digests:
            digests = np.concatenate([d for _, d, _ in parts]) if parts else np.zeros(0, "<u8")
            if samples_fingerprint(digests) != self.fingerprint.samples:
                raise RefCacheError(
                    f"cannot finalize {self.path}: the scored samples' digests do not match the fingerprint's samples "
                    "field (the dataset returned other samples while scoring than when the run started; it must "
                    f"return the same tokens every time): delete {self.partial} and rerun"
                )
            names.append(DIGESTS_FILE)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex}")
        tmp.mkdir()
        try:
            with open(tmp / LOSSES_FILE, "wb") as handle:
                for _, _, losses in parts:
                    handle.write(losses.tobytes())
                handle.flush()
                os.fsync(handle.fileno())
            write_atomic(tmp / OFFSETS_FILE, offsets.tobytes())
            if self.records_digests:
                write_atomic(tmp / DIGESTS_FILE, digests.tobytes())
            files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)} for name in names}
            meta = {
                "format": FORMAT,
                "version": VERSION,
                "num_samples": self.num_samples,
                "num_units": int(offsets[-1]),
                "fingerprint": self.fingerprint.to_dict(),
                "files": files,
            }
            write_atomic(tmp / META_FILE, _json_bytes(meta))
            os.rename(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(self.path.parent)
        shutil.rmtree(self.partial)
        return RefCache.open(self.path)


def _read_progress(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise CorruptCacheError(f"{path} is unreadable ({err}): delete {path.parent} to start over") from err
    if not isinstance(found, dict):
        raise CorruptCacheError(f"{path} is not a progress record: delete {path.parent} to start over")
    return found


def _progress_differences(found: dict[str, Any], progress: dict[str, Any], fingerprint: Fingerprint) -> list[str]:
    """One entry per setting in which a partial run differs from this one, named as the option is."""
    if found.get("version") != VERSION:
        return [f"it was written by another regate-plugin version (format v{found.get('version', 1)}, this one v{VERSION})"]
    differences = [
        f"{key}: partial run has {found.get(key)!r}, this run has {progress[key]!r}"
        for key in ("num_samples", "shard_size") if found.get(key) != progress[key]
    ]
    return differences + Fingerprint.from_dict(found.get("fingerprint", {})).differences(fingerprint, "partial run")


def write_cache(
    path: str | os.PathLike,
    fingerprint: Fingerprint,
    per_sample: Sequence[Any],
    shard_size: int = 1024,
    digests: Sequence[int] | None = None,
) -> RefCache:
    """Write a whole cache from in-memory per-sample losses (tests, small datasets); ``digests``
    (each sample's ``identity.sample_digests`` value) exactly when ``fingerprint.samples`` is set."""
    writer = RefCacheWriter(path, fingerprint, len(per_sample), shard_size)
    for shard in writer.pending():
        part = None if digests is None else digests[shard.start : shard.stop]
        writer.write_shard(shard, per_sample[shard.start : shard.stop], part)
    return writer.finalize()
