"""Supervised units: the (sample, k) pairs that ReGATE scores and selects.

Position ``j`` of a row is supervised when its next-token label ``labels[j+1]`` is not IGNORE_INDEX
and both ``j`` and ``j+1`` are real (attention mask 1). ``k`` counts supervised positions of a row
in order. A kept unit keeps input position ``j`` and its loss term for target ``labels[j+1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Units:
    """Supervised units of a (B, L) micro-batch, in row-major order.

    supervised: (B, L) bool, True at supervised positions j.
    row, col, k: (n,) int64 batch row, position j and k-index of each unit.
    counts: (B,) int64 number of units n_s of each row.
    """

    supervised: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    k: torch.Tensor
    counts: torch.Tensor

    def __len__(self) -> int:
        return self.row.numel()


def supervised_mask(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) bool: position j is supervised when labels[j+1] is a real target."""
    if labels.dim() != 2:
        raise ValueError(f"labels must be (batch, length), got shape {tuple(labels.shape)}")
    has_target = labels[:, 1:] != IGNORE_INDEX
    if attention_mask is not None:
        if attention_mask.shape != labels.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from labels shape {tuple(labels.shape)}"
            )
        real = attention_mask.bool()
        has_target = has_target & real[:, 1:] & real[:, :-1]
    return torch.nn.functional.pad(has_target, (0, 1), value=False)


def find_units(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Units:
    """Every supervised unit of the micro-batch with its row, position and k-index."""
    supervised = supervised_mask(labels, attention_mask)
    k_grid = supervised.long().cumsum(dim=1) - 1
    row, col = supervised.nonzero(as_tuple=True)
    return Units(
        supervised=supervised,
        row=row,
        col=col,
        k=k_grid[row, col],
        counts=supervised.sum(dim=1),
    )
