"""What a reference cache was computed from: the setup's fingerprint and every sample's digest.

A cache is only valid for the setup and the samples that produced it. ``Fingerprint`` names the
setup (dataset, tokenizer, teacher, visual layout, truncation); ``sample_digests`` names each
sample by what its reference losses depend on: the context the teacher read and the targets it
scored. Training recomputes both and refuses a cache whose record differs, naming what changed.

The canonical per-sample digest (cache format v3): BLAKE2b-64 (little-endian uint64) over

    int64 n | int64 context ids (n of them) | int64 supervised target ids

where the context is the sample's real tokens in order (attention mask 1; padding excluded, so
left and right padding give the same digest), each visual position holding ``VISUAL_MARKER`` in
place of its token id or feature, and the targets are ``labels[j + 1]`` at the sample's supervised
positions ``j`` (``units.find_units``). The scoring side computes it from the text-only sample
(``ScoringSource.context``), the training side from the micro-batch's input ids with its visual
positions marked by the caller (``ReGATEEngine.plan(..., context_ids=...)``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .units import Units

VISUAL_MARKER = -1  # a visual position's id in the canonical context (token ids are never negative)


class RefCacheError(RuntimeError):
    """A reference cache cannot be used; the message says why and what to do."""


class CorruptCacheError(RefCacheError):
    """Files are missing, truncated or do not match their recorded checksums."""


class CacheMismatchError(RefCacheError):
    """The cache was built for another dataset, tokenizer, teacher or layout than this run."""


@dataclass(frozen=True)
class Fingerprint:
    """What a cache was computed from; training refuses a cache whose fingerprint differs.

    dataset: the dataset's files, size and a probe of its samples (cheap to recompute when training
    starts); tokenizer: hash of the vocabulary and template; teacher: hash of the teacher's weights
    (or a hub id's snapshot commit); visual_tokens: the visual-token layout (e.g. ``"576"`` or
    ``"16f:1352"``); max_length: truncation length after the multimodal merge; samples:
    ``samples_fingerprint`` of every sample's digest (a full pass over the dataset, so training
    checks each micro-batch against the digests instead; empty: no digests recorded).
    """

    dataset: str
    tokenizer: str
    teacher: str
    visual_tokens: str
    max_length: int
    samples: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Fingerprint":
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in values]
        if missing:
            raise CorruptCacheError(f"fingerprint lacks {missing}")
        return cls(**{n: values[n] for n in names})

    def differences(self, expected: "Fingerprint | Mapping[str, Any]", mine: str = "cache") -> list[str]:
        """One line per differing field: 'field: cache has A, this run has B' (``mine`` names the
        recorded side). A mapping checks only the fields it names (a training run does not know
        the teacher, say)."""
        ours = self.to_dict()
        theirs = expected.to_dict() if isinstance(expected, Fingerprint) else dict(expected)
        unknown = sorted(set(theirs) - set(ours))
        if unknown:
            raise ValueError(f"unknown fingerprint field(s) {unknown}; fields: {sorted(ours)}")
        return [f"{k}: {mine} has {ours[k]!r}, this run has {v!r}" for k, v in theirs.items() if ours[k] != v]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(value: Any) -> str:
    """Stable hash of a JSON-able value (sorted keys), for building fingerprint fields."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def mark_visual(input_ids: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """The canonical context ids: ``input_ids`` with every visual position set to ``VISUAL_MARKER``."""
    return input_ids.long().masked_fill(visual.bool(), VISUAL_MARKER)


def sample_digests(
    context_ids: torch.Tensor, labels: torch.Tensor, units: Units, attention_mask: torch.Tensor | None = None
) -> np.ndarray:
    """(B,) uint64: each row's canonical digest (module docstring) of its real context ids and its
    supervised targets. ``units`` must come from ``find_units(labels, attention_mask)``."""
    if context_ids.shape != labels.shape:
        raise ValueError(f"context ids {tuple(context_ids.shape)} and labels {tuple(labels.shape)} differ in shape")
    real = np.ones(labels.shape, dtype=bool) if attention_mask is None else attention_mask.bool().numpy()
    context = context_ids.long().numpy()[real].astype("<i8", copy=False).tobytes()  # row-major: row after row
    context_ends = np.cumsum(real.sum(axis=1)) * 8
    targets = labels[units.row, units.col + 1].numpy().astype("<i8", copy=False).tobytes()
    target_ends = np.cumsum(units.counts.numpy()) * 8
    blocks, c, t = [], 0, 0
    for c_end, t_end in zip(context_ends.tolist(), target_ends.tolist()):
        data = ((c_end - c) // 8).to_bytes(8, "little", signed=True) + context[c:c_end] + targets[t:t_end]
        blocks.append(hashlib.blake2b(data, digest_size=8).digest())
        c, t = c_end, t_end
    return np.frombuffer(b"".join(blocks), dtype="<u8").astype(np.uint64)


def samples_fingerprint(digests: np.ndarray) -> str:
    """The fingerprint's ``samples`` field: a hash of every sample's digest, in order."""
    return hashlib.sha256(np.asarray(digests, dtype="<u8").tobytes()).hexdigest()[:16]


def sample_change(index: int, count: int, cached_count: int) -> str:
    """Why sample ``index`` no longer matches the cache: its supervised token count, or only its tokens."""
    if count != cached_count:
        return f"sample {index} has {count} supervised tokens but the reference cache holds {cached_count} (token count changed)"
    return (f"sample {index} has as many supervised tokens as the reference cache ({count}) but other token ids "
            "in its prompt or answer (tokens changed)")


@dataclass(frozen=True)
class SampleDigests:
    """Every sample's supervised token count and digest: what a scan of the dataset finds."""

    counts: np.ndarray  # int64 (num_samples,)
    digests: np.ndarray  # uint64 (num_samples,)

    @property
    def fingerprint(self) -> str:
        return samples_fingerprint(self.digests)
