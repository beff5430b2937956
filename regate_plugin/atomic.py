"""Atomic file writes: a reader sees the old file or the whole new one, never half of it."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Iterable


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | Iterable[bytes] | Callable[[BinaryIO], None]) -> None:
    """Write to a unique temporary name beside ``path``, fsync, then rename over it.

    ``data`` is bytes, an iterable of byte blocks, or a function that writes into the open file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                for block in [data] if isinstance(data, bytes) else data:
                    handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
