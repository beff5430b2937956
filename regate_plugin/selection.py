"""Scores and selection: d = m + lambda*ref, then the top share of units per sample (or per batch).

Beyond the paper: ``learnable_scores`` discounts units whose target word the student has not
learned anywhere, and ``select_adaptive`` spreads one micro-batch budget over its samples by score.
"""

from __future__ import annotations

import torch

from .units import Units


def difficulty_scores(ema: torch.Tensor, ref: torch.Tensor, ref_weight: float) -> torch.Tensor:
    """d[s,k] = m[s,k] + lambda * ref[s,k]: hard for the student, or needs the picture."""
    return ema + ref_weight * ref


#: a word "sits at the teacher's loss" while the student has removed less than this share of it, either way
STUCK_WITHIN = 0.25


def learnable_scores(ema: torch.Tensor, ref: torch.Tensor, learned: torch.Tensor, ref_weight: float,
                     discount: float) -> torch.Tensor:
    """m + lambda*ref, times ``discount`` on units whose target word the student, over all recent
    samples, still predicts exactly as badly as the text-only teacher (|learned| < STUCK_WITHIN;
    ``learned`` from ``words.WordProgress``).

    Both signals are high on a word nothing predicts (one of several interchangeable phrasings):
    the teacher cannot, and the student never will, so the paper's score gives it the slots of words
    that need the picture. A unit's own EMA cannot tell the two apart before the student has learned
    (both sit at the teacher's loss) and a sample returns once an epoch; its word can, over every
    sample at once. The discount keeps the paper's order among stuck units (all of them at the
    start) and among learning ones; a stuck unit only yields to a word the student is learning. A
    word the student got worse at (learned <= -STUCK_WITHIN) is not discounted. No second teacher
    pass: the word sums come from the losses training computes anyway.
    """
    stuck = (learned < STUCK_WITHIN) & (learned > -STUCK_WITHIN)  # NaN (unseen word): not stuck
    return torch.where(stuck, discount, 1.0) * difficulty_scores(ema, ref, ref_weight)


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
    order, rank = rank_in_sample(scores, units)
    if per_batch:
        keep = torch.zeros(n, dtype=torch.bool, device=scores.device)
        keep[order[: int(keep_quota(torch.tensor([n]), keep_ratio))]] = True
        return keep
    return rank < keep_quota(units.counts, keep_ratio)[units.row]


def rank_in_sample(scores: torch.Tensor, units: Units) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch order, rank of each unit within its sample): highest score first, ties to the earlier
    unit, as ``select_units``; the batch order is a permutation of the units in that order."""
    n = len(units)
    order = torch.sort(scores, descending=True, stable=True).indices
    by_row = order[torch.sort(units.row[order], stable=True).indices]
    starts = units.counts.cumsum(0) - units.counts
    rank = torch.empty(n, dtype=torch.long, device=scores.device)
    rank[by_row] = torch.arange(n, device=scores.device) - starts[units.row[by_row]]
    return order, rank


def select_adaptive(scores: torch.Tensor, units: Units, keep_ratio: float, cap: float) -> torch.Tensor:
    """(n,) bool: ceil(p*N) units of the micro-batch (at least one per sample with units), allocated
    by score: every sample's best unit, then the batch's best of the rest, at most
    ceil(cap*p*n_s) units of a sample. A sample with several picture-dependent words keeps more of
    them; one with none gives its slots away. Deterministic: ties as ``select_units``."""
    n = len(units)
    if keep_ratio >= 1.0 or n == 0:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN: check the reference cache and the EMA table for non-finite values")
    order, rank = rank_in_sample(scores, units)
    floor = rank == 0
    samples = int((units.counts > 0).sum())
    budget = max(samples, int(keep_quota(torch.tensor([n]), keep_ratio)))
    # greedy in batch order, skipping full samples == the best (budget - samples) of the units under their cap
    under_cap = rank < keep_quota(units.counts, min(1.0, cap * keep_ratio))[units.row]
    extra = order[(under_cap & ~floor)[order]][: budget - samples]
    keep = floor.clone()
    keep[extra] = True
    return keep


def keep_mask_for(attention_mask: torch.Tensor | None, units: Units, unit_keep: torch.Tensor) -> torch.Tensor:
    """(B, L) bool of positions fed to the LLM: every real position except elided units."""
    if attention_mask is None:
        keep = torch.ones_like(units.supervised)
    else:
        keep = attention_mask.bool().clone()
    dropped = ~unit_keep
    keep[units.row[dropped], units.col[dropped]] = False
    return keep
