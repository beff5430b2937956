"""Which teacher `regate score` loads, and its fingerprint by content.

A local folder is fingerprinted by the SHA-256 of its weight files and config.json: a retrained
teacher of the same shape gives another fingerprint. A Trainer checkpoint folder's optimizer,
scheduler, scaler and RNG states and its training arguments are not weights and not part of it.
Hashing 15 GB takes a while, so each file's digest is remembered in a small on-disk memo keyed by
(resolved path, size, mtime_ns, inode, device, ctime_ns): a file is taken to be unchanged only when
it is the same file on disk, untouched since it was hashed. A copy over the old folder that keeps
modification times (``cp -p``, ``rsync -a``, ``tar x``) writes data or a new inode, and either sets
the ctime, which no user call can put back. The memo lives in ``$REGATE_CACHE_HOME`` (default
``$XDG_CACHE_HOME/regate``, else ``~/.cache/regate``). A hub id (``org/name``) is fingerprinted by
the commit of its snapshot in the local Hugging Face cache, read offline.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

from .atomic import write_atomic
from .identity import sha256_file, sha256_json

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
# What a Trainer / DeepSpeed checkpoint folder holds besides the weights with a weight suffix: training
# state, not the model (its rng_state*.pth files have no weight suffix).
TRAINING_STATE_FILES = ("optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "rng_state*.pt",
                        "training_args.bin", "*optim_states.pt")
MEMO_FILE = "file-digests.json"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class TeacherError(ValueError):
    """The --teacher argument names no usable model; the message says what to pass instead."""


def is_hub_id(name: str) -> bool:
    """``org/name`` as the Hugging Face hub spells it (not ``./x``, ``x/`` or an absolute path)."""
    return _HUB_ID.fullmatch(name) is not None and ".." not in name


def hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of ``repo_id``'s main revision in the Hugging Face cache (no network);
    None when it was never downloaded. ``$HF_HUB_CACHE`` is read at call time."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=os.environ.get("HF_HUB_CACHE"))
    return Path(found).parent if isinstance(found, str) else None


def resolve_teacher(teacher: str) -> Path:
    """The folder to load the teacher from: ``teacher`` itself, or a hub id's cached snapshot.

    Refuses at once (TeacherError) what cannot be a teacher, before anything is loaded: a path that
    does not exist (a typo like ``./base-lm``), a folder without config.json or weights, a hub id the
    hub cannot provide (or, with HF_HUB_OFFLINE set, one that was never downloaded).
    """
    path = Path(teacher).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() or not _weight_files(path):
            raise TeacherError(
                f"--teacher {teacher}: the folder holds no config.json and weight files "
                f"({', '.join('*' + s for s in WEIGHT_SUFFIXES)}); pass the language model's own folder"
            )
        return path
    if not is_hub_id(teacher):
        raise TeacherError(f"--teacher {teacher}: no such folder, and not a hub id (org/name); check the path")
    return hub_snapshot(teacher) or download_snapshot(teacher)


def download_snapshot(repo_id: str) -> Path:
    """Download a hub id that is not in the local cache (as loading it would), or refuse in one line."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise TeacherError(
            f"--teacher {repo_id}: no such folder, the hub id is not in the local Hugging Face cache and "
            f"HF_HUB_OFFLINE is set: download it first (huggingface-cli download {repo_id}) or pass its folder"
        )
    from huggingface_hub import snapshot_download

    print(f"downloading the teacher {repo_id} from the Hugging Face hub", flush=True)
    try:
        return Path(snapshot_download(repo_id, cache_dir=os.environ.get("HF_HUB_CACHE")))
    except Exception as err:  # not found, gated, no network: the hub's own error, on one line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TeacherError(f"--teacher {repo_id}: no such folder, and the hub cannot provide it ({reason})") from err


def teacher_fingerprint(teacher: str) -> str:
    """``org/name@commit`` for a hub id; otherwise a hash of the folder's weight files' and config.json's
    names, sizes and SHA-256 (digests remembered in the memo, so a large teacher is read once)."""
    folder = resolve_teacher(teacher)
    if not Path(teacher).expanduser().is_dir():
        return f"{teacher}@{folder.name}"
    files = sorted([folder / "config.json", *_weight_files(folder)])
    memo = _load_memo()
    entries = [(f.name, f.stat().st_size, file_digest(f, memo)) for f in files]
    return sha256_json(entries)[:16]


def file_digest(path: Path, memo: dict[str, Any]) -> str:
    """SHA-256 of a file, from the memo when its ``_identity`` (path, size, mtime, inode, device,
    ctime) is unchanged; a newly computed digest is written back to the memo (and its file, at
    once: a killed run keeps it)."""
    resolved = path.resolve()
    identity = _identity(resolved.stat())
    key = str(resolved)
    known = memo.get(key)
    if isinstance(known, dict) and {k: known.get(k) for k in identity} == identity:
        return str(known["sha256"])
    digest = sha256_file(resolved)
    memo[key] = {**identity, "sha256": digest}
    _save_memo(memo)
    return digest


def _identity(stat: os.stat_result) -> dict[str, int]:
    """What the memo compares besides the path: the same inode on the same device, untouched
    (ctime moves on every write, rename onto it or utime, and cannot be set back)."""
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino, "device": stat.st_dev,
            "ctime_ns": stat.st_ctime_ns}


def _memo_path() -> Path:
    home = os.environ.get("REGATE_CACHE_HOME")
    if home:
        return Path(home).expanduser() / MEMO_FILE
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "regate" / MEMO_FILE


def _weight_files(folder: Path) -> list[Path]:
    """The folder's weight files: its ``WEIGHT_SUFFIXES`` files less a checkpoint's training state."""
    return [
        p for p in folder.iterdir()
        if p.suffix in WEIGHT_SUFFIXES and p.is_file() and not any(fnmatch.fnmatch(p.name, n) for n in TRAINING_STATE_FILES)
    ]


def _load_memo() -> dict[str, Any]:
    try:
        memo = json.loads(_memo_path().read_bytes())
    except (OSError, ValueError):  # absent or damaged: start afresh, it is only a memo
        return {}
    return memo if isinstance(memo, dict) else {}


def _save_memo(memo: dict[str, Any]) -> None:
    path = _memo_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(memo, indent=1, sort_keys=True).encode())
    except OSError as err:
        warnings.warn(f"cannot write the file-digest memo {path} ({err}): large teachers will be hashed again next time")
