"""Scores and selection: d = m + lambda*ref, then the top share of units per sample (or per batch)."""

from __future__ import annotations

import torch

from .units import Units


def difficulty_scores(ema: torch.Tensor, ref: torch.Tensor, ref_weight: float) -> torch.Tensor:
    """d[s,k] = m[s,k] + lambda * ref[s,k]: hard for the student, or needs the picture."""
    return ema + ref_weight * ref


def keep_quota(counts: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """ceil(p * n) units to keep, at least one where n > 0; exact for ratios like 0.7 * 10."""
    quota = torch.ceil(counts.double() * keep_ratio - 1e-9).long()
    return torch.where(counts > 0, quota.clamp(min=1), torch.zeros_like(quota)).minimum(counts)


def select_units(
    scores: torch.Tensor, units: Units, keep_ratio: float, per_batch: bool = False
) -> torch.Tensor:
    """(n,) bool: which units to keep.

    Highest score first; equal scores keep the earlier unit (lower row, then lower position), so
    the selection is a deterministic function of the scores.
    """
    n = len(units)
    if scores.shape != (n,):
        raise ValueError(f"scores must have shape ({n},) to match the units, got {tuple(scores.shape)}")
    if keep_ratio >= 1.0 or n == 0:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN: check the reference cache and the EMA table for non-finite values")
    # Units arrive row-major (row, then position). Stable sorts keep that order among equal keys.
    order = torch.sort(scores, descending=True, stable=True).indices
    if per_batch:
        rank = torch.empty(n, dtype=torch.long, device=scores.device)
        rank[order] = torch.arange(n, device=scores.device)
        quota = keep_quota(torch.tensor([n], device=scores.device), keep_ratio)
        return rank < quota
    order = order[torch.sort(units.row[order], stable=True).indices]
    starts = units.counts.cumsum(0) - units.counts
    rank = torch.empty(n, dtype=torch.long, device=scores.device)
    rank[order] = torch.arange(n, device=scores.device) - starts[units.row[order]]
    return rank < keep_quota(units.counts, keep_ratio)[units.row]


def keep_mask_for(attention_mask: torch.Tensor | None, units: Units, unit_keep: torch.Tensor) -> torch.Tensor:
    """(B, L) bool of positions fed to the LLM: every real position except elided units."""
    if attention_mask is None:
        keep = torch.ones_like(units.supervised)
    else:
        keep = attention_mask.bool().clone()
    dropped = ~unit_keep
    keep[units.row[dropped], units.col[dropped]] = False
    return keep
