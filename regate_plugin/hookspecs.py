"""Hook specifications of the ``regate`` plugin system.

Two kinds of plugins implement them:
  * target plugins (``patches/``) tell ReGATE how to patch one training codebase;
  * strategy plugins replace how units are scored, selected and scheduled, or observe each step.
Strategy hooks are ``firstresult``: a plugin of yours, registered under the entry-point group
``regate``, runs before the built-in defaults (``regate_plugin.defaults``) and wins when it
returns a value; returning None defers to the next implementation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    import torch

    from .config import ReGATEConfig
    from .scoring import ScoringSource
    from .units import Units

PROJECT = "regate"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class Target:
    """A codebase ReGATE can patch.

    name: the ``--target`` value; summary: one line for ``regate targets``;
    requirement: None when the codebase and its versions are importable here, else what to install;
    apply: patches the codebase in this process for a config and a reference-cache path (None:
    packing only); idempotent. None for targets enabled from the user's own script;
    launch: runs the codebase's own training entry point in this process on its command-line
    arguments and an attention implementation (None: the target's default);
    scoring_source: builds the teacher pass's ``ScoringSource`` from the arguments after ``--`` of
    ``regate score`` and the teacher's path, with the target's own preprocessing.
    """

    name: str
    summary: str
    requirement: Callable[[], str | None] = field(default=lambda: None)
    apply: Callable[["ReGATEConfig", str | None], None] | None = None
    launch: Callable[[list[str], str | None], None] | None = None
    scoring_source: Callable[[list[str], str], "ScoringSource"] | None = None


@dataclass(frozen=True)
class StepStats:
    """Token counts of one optimizer step on this rank (all micro-batches)."""

    step: int
    keep_ratio: float
    supervised_total: int
    supervised_kept: int
    llm_tokens: int
    padded_tokens: int


@hookspec
def regate_targets() -> list[Target]:
    """Return the targets this plugin provides."""


@hookspec(firstresult=True)
def regate_keep_ratio(step: int, config: "ReGATEConfig") -> float | None:
    """Return the share of supervised units to keep at optimizer step ``step`` (1.0 = dense)."""


@hookspec(firstresult=True)
def regate_score(ema: "torch.Tensor", ref: "torch.Tensor", config: "ReGATEConfig") -> "torch.Tensor | None":
    """Return one score per unit from its EMA student loss and reference loss (higher = keep)."""


@hookspec(firstresult=True)
def regate_select(
    scores: "torch.Tensor", units: "Units", keep_ratio: float, config: "ReGATEConfig"
) -> "torch.Tensor | None":
    """Return an (n,) bool tensor: which of the micro-batch's ``units`` to keep."""


@hookspec
def regate_step_end(stats: StepStats) -> None:
    """Observe the token counts of a finished optimizer step (logging, plots, alerts)."""
