"""What the targets that launch a fine-tuning framework's own SFT entry in-process share
(``llamafactory``, ``swift``): the state of one ``regate`` command, the refusal of a label smoother,
the reference cache checked against the framework's own samples before the model loads, the
trainer-init patch, and the check after the run that this patch ran.

Each framework target patches its own entry at least at three places: its argument parsing (the
refusals, before anything loads), the step before its model loads (the cache check), and its
trainer's ``__init__`` (``trainer_init``). State lives in the ``Invocation`` the target was built
with, never in module globals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from regate_plugin.config import ReGATEConfig
from regate_plugin.engine import ReGATEEngine
from regate_plugin.hookspecs import TargetRefusal
from regate_plugin.once import computed_once
from regate_plugin.refcache import RefCache
from regate_plugin.scoring import FingerprintedSource
from regate_plugin.wrappers import student

from . import hf


@dataclass
class Invocation:
    """What the steps of one ``regate`` command (pre-launch check, ``apply``, ``launch``) share, held by
    the target it was given (never module state): what the pre-launch check built and the arguments
    it was built from, and what the run did."""

    checked_args: tuple[str, ...] | None = None  # the arguments of checked
    checked: Any = None  # what the pre-launch check built from them (a dataset, parsed arguments), already checked
    launch_args: tuple[str, ...] | None = None
    in_use: Any = None  # what this launch took from the pre-launch check, until the run has used it
    applied: bool = False  # ReGATE's patches are bound to this invocation
    do_train: bool | None = None  # None: the framework never parsed its training arguments in this process
    trainer_patched: bool = False  # the patched trainer __init__ attached ReGATE

    def take_checked(self) -> Any:
        """What the pre-launch check built, once, if it was built from this launch's arguments; else None."""
        if self.checked is None or self.checked_args != self.launch_args:
            return None
        checked, self.checked = self.checked, None
        return checked


def label_smoothing_refusal(training_args: Any, how_to_unset: str) -> str | None:
    """Why a label smoother cannot train with ReGATE (the Trainer pops the labels), or None."""
    factor = getattr(training_args, "label_smoothing_factor", 0.0) or 0.0
    if factor > 0:
        return (f"label_smoothing_factor {factor:g} makes the Trainer smooth the loss itself, without the labels "
                f"ReGATE trains on, so it would silently train dense: set {how_to_unset}")
    return None


def check_cache(ref_cache: str, source: Callable[[], FingerprintedSource]) -> None:
    """The cache against the fields of the framework's own samples (``source().expected()``), on each
    node's local rank 0 once; a mismatch is one ``RefCacheError`` line on every rank."""
    computed_once(lambda: RefCache.open(ref_cache, expect=source().expected()))


def trainer_init(config: ReGATEConfig, ref_cache: str | None, resume_without_state: bool, invocation: Invocation,
                 prepare: Callable[[Any], None] | None = None) -> Callable[..., None]:
    """A trainer ``__init__`` replacement (for ``upstream.wrap``): upstream's, then, for a training run,
    ``prepare(trainer)`` (the framework's own settings ReGATE resolves), sample indices through the
    training dataset and collator (evaluation batches pass through), ``hf.enable`` on the student
    inside its wrappers, and ReGATE's callback, resuming where the Trainer resumes."""

    def init(self, original, *args, **kwargs):
        from regate_plugin.trainer import IndexedCollator, IndexedDataset, attach

        original(self, *args, **kwargs)
        if self.train_dataset is None:  # evaluation or prediction only: upstream's code
            return
        if prepare is not None:
            prepare(self)
        engine = ReGATEEngine(config, None if ref_cache is None else computed_once(lambda: RefCache.open(ref_cache)))
        hf.enable(student(self.model), engine)
        self.train_dataset = IndexedDataset(self.train_dataset)
        self.data_collator = IndexedCollator(self.data_collator)
        resume = self.args.resume_from_checkpoint  # a path, set by the arguments or found by the framework
        attach(self, engine, resume if isinstance(resume, str) else None, resume_without_state=resume_without_state)
        invocation.trainer_patched = True

    return init


def check_trainer_ran(invocation: Invocation, framework: str, trainer: str, fix: str) -> None:
    """After the framework's run: a training run with ReGATE applied whose patched trainer never ran
    trained dense, silently; that is an error naming the likely cause (``fix``)."""
    if invocation.applied and invocation.do_train is not False and not invocation.trainer_patched:
        raise TargetRefusal(f"{framework} trained without ReGATE: its patched {trainer} never ran in this process "
                            f"({fix})")
