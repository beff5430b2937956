"""Small helpers for the collectives ReGATE runs itself, and for ending a distributed process cleanly."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def is_multi_rank(group: Any = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def collective_device(group: Any = None) -> torch.device:
    """Where a collective's tensors must live: CUDA for NCCL, the CPU for gloo."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def close_process_group() -> None:
    """End the process group before the interpreter exits.

    gloo finishes each collective on a worker thread that frees the collective's tensors just after
    ``wait()`` returns, and needs the GIL to do so. If the interpreter is already finalizing (the last
    collective, say the Trainer's own, came moments before exit), that thread dies inside a destructor
    and the process aborts after a finished run ("terminate called without an active exception"),
    failing the torchrun job. The barrier's wait releases the GIL while those threads catch up.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
