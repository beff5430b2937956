"""Hook specifications of the ``regate`` plugin system.

Two kinds of plugins implement them:
  * target plugins (``patches/``) tell ReGATE how to patch one training codebase;
  * strategy plugins replace how units are scored, selected and scheduled, or observe each step.
Strategy hooks are ``firstresult``: a plugin of yours, registered under the entry-point group
``regate`` (or given to one engine: ``ReGATEEngine(..., pm=build_plugin_manager(extra=[plugin]))``),
runs before the built-in defaults (``regate_plugin.defaults``) and wins when it returns a value;
returning None defers to the next implementation. The engine checks every answer and names the
plugin that gave a wrong one; an implementation whose name is no hook below is an error at start,
and wrappers (``hookwrapper``/``wrapper``) on strategy hooks are refused.
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
    packing only); idempotent; it may take the keyword ``resume_without_state`` (``regate train
    --resume-without-regate-state``; a target without it refuses that flag). None for targets
    enabled from the user's own script;
    launch: runs the codebase's own training entry point in this process on its command-line
    arguments and an attention implementation (None: the target's default);
    scoring_source: builds the teacher pass's ``ScoringSource`` from the arguments after ``--`` of
    ``regate score`` and the teacher's path, with the target's own preprocessing; ``regate train``
    builds it too (teacher ``""``) from the upstream arguments, and checks ``--ref-cache`` against
    its ``expected()`` fingerprint fields before upstream loads any weight;
    details: further lines for ``regate targets`` (the hf target's classes, ranges and tests).
    """

    name: str
    summary: str
    requirement: Callable[[], str | None] = field(default=lambda: None)
    apply: Callable[["ReGATEConfig", str | None], None] | None = None
    launch: Callable[[list[str], str | None], None] | None = None
    scoring_source: Callable[[list[str], str], "ScoringSource"] | None = None
    details: tuple[str, ...] = ()


class TargetRefusal(ValueError):
    """A target refuses a setting of the codebase it patches that ReGATE cannot train with; the message
    says why and what to set instead (``regate`` shows it as one ``Error:`` line)."""


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
    """Return the share of supervised units to keep at optimizer step ``step``: a finite number in
    (0, 1], 1.0 = dense (every unit kept, no scoring)."""


@hookspec(firstresult=True)
def regate_score(
    ema: "torch.Tensor", ref: "torch.Tensor", config: "ReGATEConfig", learned: "torch.Tensor"
) -> "torch.Tensor | None":
    """Return one score per unit from its EMA student loss and reference loss (higher = keep): a
    float tensor of shape (n,) like ``ema``, without NaN. ``learned``: the share of the teacher's
    loss the student has removed on the unit's target word over recent samples
    (``words.WordProgress``; NaN where not known yet, and everywhere unless ``config.score`` is
    ``learnable``: the table is kept only for it). Implementations may omit arguments they do not use."""


@hookspec(firstresult=True)
def regate_select(
    scores: "torch.Tensor", units: "Units", keep_ratio: float, config: "ReGATEConfig"
) -> "torch.Tensor | None":
    """Return an (n,) bool tensor (0/1 integers pass): which of the micro-batch's ``units`` to keep.

    With ``config.selection`` ``"per_sample"`` or ``"adaptive"`` it keeps at least one unit of every
    sample that has units, as the method does; ``per_batch`` may leave a sample without any.
    """


@hookspec
def regate_rearm(model: "torch.nn.Module") -> str | None:
    """Put ReGATE's forward back on ``model`` (the unwrapped student) wherever a library replaced it
    since the target enabled it, e.g. Liger-Kernel, which the Trainer applies when training begins,
    at class or instance level. Called by ``trainer.attach`` and again when training begins; return
    what was put back, or None (also for a model that is not this target's)."""


@hookspec
def regate_step_end(stats: StepStats) -> None:
    """Observe the token counts of a finished optimizer step (logging, plots, alerts)."""
