"""The student-difficulty EMA table m[s, k], flat on the host and identical on every rank.

Units of sample ``s`` live at ``offsets[s] .. offsets[s+1]-1``. Losses computed during an optimizer
step are recorded, then committed together at the step's end: on several ranks every rank gathers
every rank's (flat index, loss) pairs and applies them in rank order, so all tables stay equal and
a run with N ranks updates exactly as one rank with N-fold gradient accumulation.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from .collectives import collective_device, is_multi_rank


class EMATable:
    """m <- beta*m + (1-beta)*loss per unit; float32 (4 bytes a unit: 665k x 150 units = 0.4 GB)."""

    def __init__(
        self, initial: torch.Tensor, offsets: torch.Tensor, beta: float, exchange_inits: bool = False, copy: bool = True
    ) -> None:
        offsets = torch.as_tensor(offsets, dtype=torch.int64).cpu()
        if offsets.dim() != 1 or offsets.numel() < 1 or offsets[0] != 0 or (offsets.diff() < 0).any():
            raise ValueError("offsets must be a non-decreasing 1-D int64 tensor starting at 0")
        if initial.dim() != 1 or initial.numel() != int(offsets[-1]):
            raise ValueError(f"initial values have {initial.numel()} entries, offsets describe {int(offsets[-1])}")
        values = torch.as_tensor(initial).detach()
        converted = values.to(device="cpu", dtype=torch.float32)
        # copy=False takes ownership of a fresh tensor: no second 0.4 GB copy for a 665k-sample table.
        self.values = converted.clone() if copy and converted.data_ptr() == values.data_ptr() else converted
        self.offsets = offsets
        self.beta = float(beta)
        self.exchange_inits = exchange_inits  # starting values arrive during training (online cache)
        self._pending_index: list[torch.Tensor] = []
        self._pending_loss: list[torch.Tensor] = []
        self._pending_init: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def num_samples(self) -> int:
        return self.offsets.numel() - 1

    def counts(self, sample_ids: torch.Tensor) -> torch.Tensor:
        """Units stored for each sample."""
        sample_ids = sample_ids.cpu()
        return self.offsets[sample_ids + 1] - self.offsets[sample_ids]

    def flat_index(self, sample_ids: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Flat position of unit (sample_ids[i], k[i]); the caller has checked k < counts."""
        return self.offsets[sample_ids.cpu()] + k.cpu()

    def lookup(self, flat_index: torch.Tensor) -> torch.Tensor:
        return self.values[flat_index]

    def record(self, flat_index: torch.Tensor, losses: torch.Tensor) -> None:
        """Queue this micro-batch's per-unit losses; applied by ``commit`` at the step's end."""
        if flat_index.shape != losses.shape:
            raise ValueError(f"{flat_index.numel()} indices but {losses.numel()} losses")
        self._pending_index.append(flat_index.detach().to("cpu", torch.int64))
        self._pending_loss.append(losses.detach().to("cpu", torch.float32))

    def initialize(self, flat_index: torch.Tensor, values: torch.Tensor) -> None:
        """Set starting values of units that have none yet (NaN), now and, at commit, on every rank."""
        unset = torch.isnan(self.values[flat_index])
        self.values[flat_index[unset]] = values[unset].to(torch.float32)
        self._pending_init.append((flat_index.cpu(), values.cpu().to(torch.float32)))

    def commit(self, group: Any = None,
               observe: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exchange the step's queued starting values and updates across ranks, apply them in rank
        order, and return the starting values gathered (for the online cache of every rank).
        ``observe(index, losses, values_before)``: sees every rank's updates, in rank order, before
        they apply (the auto keep ratio's measurement)."""
        init_index, init_values = _concat([i for i, _ in self._pending_init], [v for _, v in self._pending_init])
        index, loss = _concat(self._pending_index, self._pending_loss)
        self._pending_index.clear()
        self._pending_loss.clear()
        self._pending_init.clear()
        if is_multi_rank(group):
            if self.exchange_inits:
                init_index, init_values = all_gather_updates(init_index, init_values, group=group)
            index, loss = all_gather_updates(index, loss, group=group)
        unset = torch.isnan(self.values[init_index])
        self.values[init_index[unset]] = init_values[unset]
        if observe is not None:
            observe(index, loss, self.values[index])
        self.apply(index, loss)
        return init_index, init_values

    def apply(self, flat_index: torch.Tensor, losses: torch.Tensor) -> None:
        """Apply updates in order; a unit listed twice is updated twice. Non-finite losses are skipped."""
        finite = torch.isfinite(losses)
        flat_index, losses = flat_index[finite], losses[finite]
        if flat_index.numel() == 0:
            return
        # Occurrence number of each index (0 for its first appearance, 1 for the second, ...): each
        # round updates every index at most once, so duplicates apply sequentially and deterministically.
        order = torch.sort(flat_index, stable=True).indices
        sorted_index = flat_index[order]
        new_run = torch.ones_like(sorted_index, dtype=torch.bool)
        new_run[1:] = sorted_index[1:] != sorted_index[:-1]
        positions = torch.arange(sorted_index.numel())
        run_start = torch.cummax(torch.where(new_run, positions, torch.zeros_like(positions)), dim=0).values
        occurrence = torch.empty_like(positions)
        occurrence[order] = positions - run_start
        for round_ in range(int(occurrence.max()) + 1):
            pick = occurrence == round_
            idx = flat_index[pick]
            self.values[idx] = self.beta * self.values[idx] + (1.0 - self.beta) * losses[pick]

    def state_dict(self) -> dict[str, Any]:
        if self._pending_index or self._pending_init:
            raise RuntimeError("EMATable.state_dict() called with uncommitted updates: call commit() first")
        return {"values": self.values.clone(), "offsets": self.offsets.clone(), "beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        offsets = torch.as_tensor(state["offsets"], dtype=torch.int64)
        if not torch.equal(offsets, self.offsets):
            raise ValueError(
                "the saved EMA table was built for a different dataset layout "
                f"({offsets.numel() - 1} samples, {int(offsets[-1])} units) than this run's "
                f"({self.num_samples} samples, {int(self.offsets[-1])} units): resume with the same dataset and cache"
            )
        self.values = torch.as_tensor(state["values"]).to(torch.float32).clone()
        self.beta = float(state["beta"])
        self._pending_index.clear()
        self._pending_loss.clear()
        self._pending_init.clear()


def _concat(indices: list[torch.Tensor], values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if not indices:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float32)
    return torch.cat(indices), torch.cat(values)


def all_gather_updates(index: torch.Tensor, *values: torch.Tensor, group: Any = None) -> tuple[torch.Tensor, ...]:
    """Every rank's (index, value, ...) rows, concatenated in rank order, on every rank: one collective
    for any number of float value columns.

    Moves data on the device the process group's backend needs (CUDA for NCCL, CPU for gloo).
    """
    device = collective_device(group)
    world = dist.get_world_size(group)
    size = torch.tensor([index.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes_list = [int(s.item()) for s in sizes]
    longest = max(sizes_list)
    # One buffer holds them all: each float32 value is carried bit-for-bit inside an int64 slot.
    payload = torch.zeros(1 + len(values), longest, dtype=torch.int64, device=device)
    payload[0, : index.numel()] = index.to(device)
    for row, value in enumerate(values, start=1):
        payload[row, : value.numel()] = value.to(torch.float32).view(torch.int32).to(torch.int64).to(device)
    gathered = [torch.empty_like(payload) for _ in range(world)]
    dist.all_gather(gathered, payload, group=group)
    columns = [buf.cpu()[:, :n] for buf, n in zip(gathered, sizes_list)]
    index = torch.cat([c[0] for c in columns])
    return (index, *(torch.cat([c[row].to(torch.int32).view(torch.float32) for c in columns]) for row in range(1, 1 + len(values))))
