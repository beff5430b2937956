"""The built-in strategies: the method as the paper states it. Registered last, so plugins win."""

from __future__ import annotations

import torch

from .config import ReGATEConfig
from .hookspecs import hookimpl
from .schedule import keep_ratio_at
from .selection import difficulty_scores, select_units
from .units import Units


@hookimpl(trylast=True)
def regate_keep_ratio(step: int, config: ReGATEConfig) -> float:
    return keep_ratio_at(step, config)


@hookimpl(trylast=True)
def regate_score(ema: torch.Tensor, ref: torch.Tensor, config: ReGATEConfig) -> torch.Tensor:
    return difficulty_scores(ema, ref, config.ref_weight)


@hookimpl(trylast=True)
def regate_select(scores: torch.Tensor, units: Units, keep_ratio: float, config: ReGATEConfig) -> torch.Tensor:
    return select_units(scores, units, keep_ratio, per_batch=config.selection == "per_batch")
