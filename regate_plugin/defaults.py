"""The built-in strategies: the method as the paper states it, and the ``score``/``selection``
variants of ReGATEConfig (the paper's stay the default). Registered last, so plugins win."""

from __future__ import annotations

import torch

from .config import ReGATEConfig
from .hookspecs import hookimpl
from .schedule import keep_ratio_at
from .selection import difficulty_scores, learnable_scores, select_adaptive, select_units
from .units import Units


@hookimpl(trylast=True)
def regate_keep_ratio(step: int, config: ReGATEConfig) -> float:
    return keep_ratio_at(step, config)


@hookimpl(trylast=True)
def regate_score(ema: torch.Tensor, ref: torch.Tensor, config: ReGATEConfig, learned: torch.Tensor) -> torch.Tensor:
    if config.score == "ref_only":
        return ref.clone()
    if config.score == "learnable":
        return learnable_scores(ema, ref, learned, config.ref_weight, config.irreducible_discount)
    return difficulty_scores(ema, ref, config.ref_weight)


@hookimpl(trylast=True)
def regate_select(scores: torch.Tensor, units: Units, keep_ratio: float, config: ReGATEConfig) -> torch.Tensor:
    if config.selection == "adaptive":
        return select_adaptive(scores, units, keep_ratio, config.adaptive_cap)
    return select_units(scores, units, keep_ratio, per_batch=config.selection == "per_batch")
