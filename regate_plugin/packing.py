"""Packing: the kept positions of a micro-batch as one padding-free row for varlen attention.

Kept positions keep their ORIGINAL position ids, so RoPE sees exactly what dense training sees;
``cu_seqlens`` marks where each sample's segment starts, and attention never crosses a boundary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .units import IGNORE_INDEX, Units


@dataclass(frozen=True)
class Packed:
    """Where the kept positions of a (B, L) micro-batch went in the packed row of length T.

    index: (T,) flat index b*L + j of every packed position, in row-major order.
    row, col: (T,) its batch row b and position j.
    position_ids: (1, T), or (C, 1, T) for multi-axis rope: original position ids.
    cu_seqlens: (S+1,) int32 segment boundaries, one segment per row with a kept position.
    max_seqlen: longest segment, a Python int (computed once per step, reused by every layer).
    targets: (T,) next-token label of kept supervised positions, IGNORE_INDEX elsewhere.
    unit_k: (T,) k-index of the unit at each packed position, -1 where there is none.
    loss_rows: (U,) packed positions whose loss is computed: the kept supervised units.
    """

    index: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    targets: torch.Tensor
    unit_k: torch.Tensor
    loss_rows: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.index.numel()

    def to(self, device: torch.device | str) -> "Packed":
        """The plan on ``device`` (copies start without waiting: the host side is planned already)."""
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


def trim_to_loss(keep_mask: torch.Tensor, units: Units, scored: torch.Tensor | None = None) -> torch.Tensor:
    """``keep_mask`` less every position no kept loss row (``scored``, default ``keep_mask``) attends
    to: per row, the positions after its last kept supervised position (a later turn whose answers
    were all elided, the final EOS), and so a whole row without any (no supervised unit, or all of
    them elided). Attention is causal, so the
    loss, its gradients and the kept units' hidden states are those of the untrimmed row (equal up
    to the kernels' rounding for another segment length).

    When no row keeps a loss row at all, the first real position stays: the decoder still runs on a
    one-token row, so every rank calls every layer (ZeRO-3 gathers, DDP's gradient hooks) and the
    zero loss still reaches every parameter.
    """
    if keep_mask.numel() == 0:
        return keep_mask
    columns = torch.arange(keep_mask.shape[1], device=keep_mask.device)
    scored = keep_mask if scored is None else scored & keep_mask
    last = torch.where(units.supervised & scored, columns, -1).amax(dim=1)
    trimmed = keep_mask & (columns[None, :] <= last[:, None])
    if not bool(trimmed.any()) and bool(keep_mask.any()):
        first = int(keep_mask.flatten().nonzero()[0])
        trimmed.view(-1)[first] = True
    return trimmed


def pack_plan(
    keep_mask: torch.Tensor,
    labels: torch.Tensor,
    units: Units,
    position_ids: torch.Tensor | None = None,
    scored: torch.Tensor | None = None,
) -> Packed:
    """Plan the packed row from a (B, L) keep mask; nothing is copied yet (see ``pack``).

    position_ids: (B, L) or (C, B, L); None means the dense default arange(L) in every row.
    scored: (B, L) positions whose loss is trained, default ``keep_mask`` (every kept unit); a
    narrower mask keeps the other units as input only (``ReGATEConfig.elision="loss"``).
    """
    batch, length = keep_mask.shape
    device = keep_mask.device
    row, col = keep_mask.nonzero(as_tuple=True)
    lengths = keep_mask.sum(dim=1)
    seg_lengths = lengths[lengths > 0]
    cu_seqlens = torch.nn.functional.pad(seg_lengths.cumsum(0), (1, 0)).to(torch.int32)
    max_seqlen = int(seg_lengths.max().item()) if seg_lengths.numel() else 0

    if position_ids is None:
        packed_pos = col.unsqueeze(0)
    elif position_ids.dim() == 2:
        packed_pos = position_ids[row, col].unsqueeze(0)
    elif position_ids.dim() == 3:
        packed_pos = position_ids[:, row, col].unsqueeze(1)
    else:
        raise ValueError(f"position_ids must be (B, L) or (C, B, L), got shape {tuple(position_ids.shape)}")

    next_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    scored = units.supervised & keep_mask if scored is None else units.supervised & keep_mask & scored
    targets = torch.where(scored, next_labels, torch.full_like(next_labels, IGNORE_INDEX))
    k_grid = torch.where(scored, units.supervised.long().cumsum(dim=1) - 1, torch.full_like(next_labels, -1))
    packed_targets = targets[row, col]
    return Packed(
        index=row * length + col,
        row=row,
        col=col,
        position_ids=packed_pos.to(device),
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
        targets=packed_targets,
        unit_k=k_grid[row, col],
        loss_rows=(packed_targets != IGNORE_INDEX).nonzero(as_tuple=True)[0],
    )


def pack(x: torch.Tensor, packed: Packed) -> torch.Tensor:
    """(B, L, ...) -> (1, T, ...): the kept positions of ``x`` as one row."""
    return x.flatten(0, 1)[packed.index].unsqueeze(0)


def unpack(x: torch.Tensor, packed: Packed, batch: int, length: int, fill: float = 0.0) -> torch.Tensor:
    """(1, T, ...) -> (B, L, ...): scatter packed positions back; elided and padded ones get ``fill``."""
    flat = x.new_full((batch * length, *x.shape[2:]), fill)
    flat[packed.index] = x[0]
    return flat.view(batch, length, *x.shape[2:])
