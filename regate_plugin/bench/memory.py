"""Peak-memory probes of a mode's step: process RSS growth on a CPU (sampled by a thread, after the
heap is trimmed) and, on CUDA, the bytes the other, idle model instance holds."""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from typing import Any

import torch


def libc() -> Any | None:
    """glibc, for ``malloc_trim``; None off Linux or on another C library."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        library = ctypes.CDLL("libc.so.6")
        library.malloc_trim  # noqa: B018 (glibc only)
        return library
    except (OSError, AttributeError):
        return None


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RSSPeak:
    """Peak RSS growth of this process while the context is open, sampled by a thread."""

    def __init__(self, interval: float = 0.0005) -> None:
        self.interval = interval
        self.growth: int | None = None

    def __enter__(self) -> "RSSPeak":
        self._stop = threading.Event()
        self._base = _rss_bytes()
        self._peak = self._base

        def sample() -> None:
            while not self._stop.is_set():
                self._peak = max(self._peak, _rss_bytes())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.growth = self._peak - self._base


def cpu_memory_supported() -> bool:
    return libc() is not None and os.path.exists("/proc/self/statm")


def resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """What a model instance holds on CUDA between its steps: parameters, gradients, optimizer state."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        if p.grad is not None:
            total += p.grad.numel() * p.grad.element_size()
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.device.type == "cuda":
                total += value.numel() * value.element_size()
    return total
