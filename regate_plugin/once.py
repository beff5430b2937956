"""Work done once per node under torchrun: local rank 0 computes, every rank of the node gets the result.

Fingerprints, sample digests, dataset scans and cache checksums read the same files on every rank;
under a launcher they are computed by each node's local rank 0 and shared in one collective. An
error there reaches every rank as the same exception with the same one-line message (no rank
waits in a collective that another left), raised on every rank, not only where it happened.
"""

from __future__ import annotations

import os
import pickle
from typing import Callable, TypeVar

import torch.distributed as dist

from .collectives import is_multi_rank

T = TypeVar("T")


class SharedError(RuntimeError):
    """An error on local rank 0 whose own exception cannot travel to the other ranks (not picklable)."""


def computed_once(compute: Callable[[], T]) -> T:
    """``compute()`` on each node's local rank 0, its result (or its error) on every rank of the node.

    A collective when a process group of several ranks is initialized: every rank must call it, in
    the same order; alone, it is ``compute()``. The result must pickle (``RefCache`` pickles by path).
    """
    if not is_multi_rank():
        return compute()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    outcome: tuple[bool, object] | None = None  # (ok, result or error): local rank 0's
    own_error: Exception | None = None
    if local_rank == 0:
        try:
            outcome = (True, _portable(compute()))
        except Exception as err:  # shared with every rank below, raised there and here alike
            own_error, outcome = err, (False, _portable_error(err))
    gathered: list[tuple[int, tuple[bool, object] | None]] = [(0, None)] * dist.get_world_size()
    dist.all_gather_object(gathered, (local_rank, outcome))
    leaders = [rank - local for rank, (local, _) in enumerate(gathered)]
    if any(leader < 0 or gathered[leader][0] != 0 for leader in leaders):
        raise SharedError(
            f"local ranks {[local for local, _ in gathered]} (LOCAL_RANK by global rank) do not number each node's "
            "ranks in a row from 0: launch with torchrun or deepspeed"
        )
    errors = [value for _, shared in gathered if shared is not None for ok, value in [shared] if not ok]
    if errors:
        if own_error is not None and str(errors[0]) == str(own_error):
            raise own_error  # this rank's own, with its traceback
        raise errors[0]  # type: ignore[misc]
    _, (_, result) = gathered[leaders[dist.get_rank()]]  # type: ignore[misc]
    return result  # type: ignore[return-value]


def _portable(value: T) -> T:
    """``value``, checked to pickle before the collective (a pickling error inside it would leave
    the other ranks waiting)."""
    pickle.dumps(value)
    return value


def _portable_error(err: Exception) -> Exception:
    """``err`` itself when it pickles and unpickles to the same message; else a SharedError saying the same."""
    try:
        copy = pickle.loads(pickle.dumps(err))
        if type(copy) is type(err) and str(copy) == str(err):
            return err
    except Exception:  # an exception class that does not round-trip: its type name and message travel
        pass
    return SharedError(f"{type(err).__name__}: {err}")
