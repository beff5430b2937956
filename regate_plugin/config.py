"""ReGATEConfig: the method's knobs with the paper's defaults, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

SELECTIONS = ("per_sample", "per_batch", "adaptive")
SCORES = ("paper", "ref_only", "learnable")
ELISIONS = ("input", "loss")
ATTN_BACKENDS = ("auto", "flash4", "flash", "torch", "sdpa")
AUTO = "auto"  # keep_ratio set per cycle by the controller of ``budget``


class ConfigError(ValueError):
    """A ReGATEConfig field holds a value outside its allowed range."""


@dataclass(frozen=True)
class ReGATEConfig:
    """Settings of one ReGATE run (defaults: arXiv 2507.21420).

    keep_ratio: share of supervised units kept on a sparse step (p_keep), or ``"auto"``: each cycle's
        dense steps set its sparse steps' ratio within [keep_min, keep_max] (``budget.KeepController``).
    keep_min, keep_max: the bounds of ``keep_ratio="auto"``.
    cycle: length C of a dense/sparse cycle, in optimizer steps.
    dense_steps: the first F steps of every cycle are dense (they refresh the EMA).
    warmup: optimizer steps that are all dense before the first cycle starts.
    ema_beta: decay of the student-loss EMA, m <- beta*m + (1-beta)*loss.
    ref_weight: lambda in the score d = m + lambda*ref.
    selection: ``per_sample`` keeps ceil(p*n_s) units of every sample; ``per_batch`` keeps
        ceil(p*N) units of the whole micro-batch, wherever they are; ``adaptive`` keeps ceil(p*N) in
        all, the best unit of every sample first, then the batch's best, at most
        ceil(adaptive_cap*p*n_s) of a sample (a sample with many high scores keeps more).
    adaptive_cap: the per-sample cap of ``adaptive``, as a multiple of the keep ratio.
    score: ``paper`` is d = m + lambda*ref; ``ref_only`` is d = ref; ``learnable`` discounts units
        whose target word the student still predicts as badly as the teacher over recent samples
        (see ``selection.learnable_scores`` and ``words.WordProgress``).
    irreducible_discount: factor of ``learnable`` on such a unit (1.0: no discount, the paper's score).
    elision: ``input`` (the paper's) removes elided units from the LLM's input, which is what saves
        compute; ``loss`` keeps them as input and drops only their loss term: no saving, a
        measurement of what the holes in the context cost the kept words.
    attn_backend: varlen attention backend; ``auto`` picks flash-attn-4 (Hopper/Blackwell), flash-attn,
        torch varlen, then SDPA.
    loss_chunk_rows: rows of the LM head evaluated at once, so long answers never hold all logits.
    """

    keep_ratio: float | str = 0.5
    cycle: int = 128
    dense_steps: int = 16
    warmup: int = 100
    ema_beta: float = 0.9
    ref_weight: float = 0.5
    selection: str = "per_sample"
    adaptive_cap: float = 3.0
    score: str = "paper"
    irreducible_discount: float = 0.25
    elision: str = "input"
    attn_backend: str = "auto"
    loss_chunk_rows: int = 4096
    keep_min: float = 0.1
    keep_max: float = 0.5

    def __post_init__(self) -> None:
        if self.keep_ratio != AUTO:
            _check_real("keep_ratio", self.keep_ratio, f"(0, 1] or {AUTO!r}", lambda v: 0.0 < v <= 1.0)
        _check_real("keep_min", self.keep_min, "(0, 1]", lambda v: 0.0 < v <= 1.0)
        _check_real("keep_max", self.keep_max, f"[keep_min={self.keep_min}, 1]", lambda v: self.keep_min <= v <= 1.0)
        _check_int("cycle", self.cycle, ">= 1", lambda v: v >= 1)
        _check_int("dense_steps", self.dense_steps, f"[0, cycle={self.cycle}]", lambda v: 0 <= v <= self.cycle)
        _check_int("warmup", self.warmup, ">= 0", lambda v: v >= 0)
        _check_real("ema_beta", self.ema_beta, "[0, 1)", lambda v: 0.0 <= v < 1.0)
        _check_real("ref_weight", self.ref_weight, ">= 0 and finite", lambda v: 0.0 <= v < math.inf)
        _check_choice("selection", self.selection, SELECTIONS)
        _check_real("adaptive_cap", self.adaptive_cap, ">= 1 and finite", lambda v: 1.0 <= v < math.inf)
        _check_choice("score", self.score, SCORES)
        _check_real("irreducible_discount", self.irreducible_discount, "[0, 1]", lambda v: 0.0 <= v <= 1.0)
        _check_choice("elision", self.elision, ELISIONS)
        _check_choice("attn_backend", self.attn_backend, ATTN_BACKENDS)
        _check_int("loss_chunk_rows", self.loss_chunk_rows, ">= 1", lambda v: v >= 1)

    @property
    def auto_keep(self) -> bool:
        """Whether the keep ratio is set per cycle (``keep_ratio="auto"``)."""
        return self.keep_ratio == AUTO

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ReGATEConfig":
        """Build from a mapping, refusing unknown keys (a typo must not silently fall back to a default)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown ReGATEConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)

    def replace(self, **changes: Any) -> "ReGATEConfig":
        return dataclasses.replace(self, **changes)


def _check_real(name: str, value: Any, allowed: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not ok(value):
        raise ConfigError(f"ReGATEConfig.{name} = {value!r} is out of range: allowed {allowed}")


def _check_int(name: str, value: Any, allowed: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
        raise ConfigError(f"ReGATEConfig.{name} = {value!r} is out of range: allowed integers {allowed}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"ReGATEConfig.{name} = {value!r} is not allowed: choose one of {list(choices)}")
