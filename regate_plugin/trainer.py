"""Glue for the Hugging Face Trainer (used by every target): sample indices in, metrics and state out.

    train_dataset = IndexedDataset(train_dataset)       # each sample carries its dataset index
    data_collator = IndexedCollator(data_collator)      # ... into the batch as ``sample_index``
    trainer = Trainer(..., train_dataset=train_dataset, data_collator=data_collator)
    attach(trainer, engine)                             # schedule, logging, checkpoints
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from .engine import SAMPLE_INDEX_KEY, ReGATEEngine
from .atomic import write_atomic
from .collectives import collective_device, is_multi_rank
from .hookspecs import TargetRefusal
from . import defaults
from .plugins import checked_keep_ratio, first_result, warn_on_plugin_change
from .config import ReGATEConfig
from .schedule import sparse_ceiling, sparse_step_count
from .wrappers import student

logger = logging.getLogger(__name__)
STATE_FILE = "regate_state.pt"
METRICS = ("supervised_total", "supervised_kept", "llm_tokens", "padded_tokens")


class IndexedDataset(torch.utils.data.Dataset):
    """Wraps a map-style dataset of dict samples; sample ``i`` gains ``sample_index = i``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if not isinstance(item, Mapping):
            raise TypeError(f"IndexedDataset needs samples that are dicts, sample {index} is a {type(item).__name__}")
        return {**item, SAMPLE_INDEX_KEY: index}


class IndexedCollator:
    """Wraps a collator: strips ``sample_index`` from the features, stacks it into the batch.

    Features without any index (an evaluation or prediction set, which the Trainer collates with the
    same collator) go to the wrapped collator unchanged; a batch with only some indexed is an error.
    """

    def __init__(self, collator: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.collator = collator

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        missing = [i for i, f in enumerate(features) if SAMPLE_INDEX_KEY not in f]
        if len(missing) == len(features):
            return self.collator(list(features))
        if missing:
            raise KeyError(
                f"features {missing} carry no {SAMPLE_INDEX_KEY!r}: wrap the dataset in IndexedDataset, and "
                "with a datasets.Dataset set remove_unused_columns=False"
            )
        indices = [int(f[SAMPLE_INDEX_KEY]) for f in features]
        batch = self.collator([{k: v for k, v in f.items() if k != SAMPLE_INDEX_KEY} for f in features])
        batch[SAMPLE_INDEX_KEY] = torch.tensor(indices, dtype=torch.long)
        return batch


class ReGATECallback(TrainerCallback):
    """Feeds the optimizer step to the schedule, ends each step in the engine, logs, saves, restores.

    It counts each step's training micro-batches, so the engine can stop a run in which some did not
    take the packed forward (``BypassError``); ``trainer`` is where it looks for the likely cause."""

    def __init__(self, engine: ReGATEEngine, resume_from: str | None = None, resume_without_state: bool = False,
                 trainer: Any = None) -> None:
        self.engine = engine
        self.resume_from = resume_from
        self.resume_without_state = resume_without_state
        self.trainer = trainer
        self._micro_batches = 0  # of the current optimizer step, before its last one
        self.pending: dict[str, float] = {}  # metrics for the Trainer's next training log entry
        self._interval = {name: 0 for name in METRICS}
        self._ratios: list[float] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:  # the Trainer applies Liger-Kernel in train(), after attach()
            rearm(self.engine, model)
        if state.global_step > 0:
            checkpoint = Path(self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
            if self.resume_without_state and not (checkpoint / STATE_FILE).is_file():
                logger.warning("resuming from %s, which holds no %s: the EMA starts from the reference losses and the "
                               "schedule at step %d", checkpoint, STATE_FILE, state.global_step)
                self.engine.step = state.global_step
            else:
                load_state(self.engine, checkpoint)
            if self.engine.step != state.global_step:
                raise RuntimeError(
                    f"{checkpoint / STATE_FILE} is at step {self.engine.step} but the Trainer resumes at step "
                    f"{state.global_step}: pass the checkpoint you resume from as attach(..., resume_from=PATH)"
                )
        warn_if_never_sparse(self.engine, state.global_step, state.max_steps)

    def on_step_begin(self, args, state, control, **kwargs):
        self.engine.step = state.global_step

    def on_substep_end(self, args, state, control, **kwargs):
        self._micro_batches += 1

    def on_step_end(self, args, state, control, model=None, **kwargs):
        micro_batches, self._micro_batches = self._micro_batches + 1, 0
        stats = self.engine.end_step(micro_batches=micro_batches,
                                     likely_causes=lambda: likely_bypass_causes(self.trainer, model))
        for name in METRICS:
            self._interval[name] += getattr(stats, name)
        self._ratios.append(stats.keep_ratio)
        if control.should_log:  # sums since the last log entry, over all ranks
            totals = _sum_across_ranks([self._interval[name] for name in METRICS])
            self.pending = {f"regate/{name}": value for name, value in zip(METRICS, totals)}
            self.pending["regate/keep_ratio"] = sum(self._ratios) / len(self._ratios)
            if self.engine.budget is not None:  # keep_ratio="auto": the ratio its latest cycle chose for the sparse steps
                self.pending["regate/auto_keep_ratio"] = self.engine.budget.ratio
            self._interval = {name: 0 for name in METRICS}
            self._ratios = []

    def on_save(self, args, state, control, **kwargs):
        # Where the Trainer writes its checkpoint files: every node's first process with
        # save_on_each_node (nodes without a shared filesystem resume from their own copy).
        if args.should_save:
            save_state(self.engine, Path(args.output_dir) / f"checkpoint-{state.global_step}")


def attach(trainer: Any, engine: ReGATEEngine, resume_from: str | None = None, *,
           resume_without_state: bool = False) -> ReGATECallback:
    """Add ReGATE's callback to ``trainer``; its metrics join the Trainer's own training log entries,
    so every reporter (console, TensorBoard, W&B, ``trainer_state.json``) sees them beside the loss.
    ``resume_without_state``: resuming from a checkpoint without ReGATE's state (a baseline's) starts
    the EMA from the reference losses and the schedule at the resumed step, instead of an error.

    Before any step, the trainer's settings are checked (``check_composition``: what ReGATE cannot
    train with is refused by name) and ReGATE's forward is put back where a library replaced it."""
    check_composition(trainer)
    rearm(engine, trainer.model)
    if hasattr(trainer, "_set_signature_columns_if_needed"):
        # the columns the model's forward takes, read now, with ``sample_index`` in its signature: a forward
        # a library sets when training begins (Liger-Kernel's) would drop the index with remove_unused_columns
        trainer._set_signature_columns_if_needed()
    callback = ReGATECallback(engine, resume_from, resume_without_state, trainer)
    trainer.add_callback(callback)
    trainer_log = trainer.log

    def log(logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and callback.pending:
            logs.update(callback.pending)
            callback.pending = {}
        trainer_log(logs, *args, **kwargs)

    trainer.log = log
    return callback


def check_composition(trainer: Any) -> None:
    """Refuse, by name and before step 1, the Trainer settings ReGATE cannot honour.

    * label smoothing and a ``compute_loss_func``: the Trainer takes the labels from the batch and
      computes the loss from full logits, so the model never sees the labels it elides by;
    * ``torch_compile`` or a compiled model: the packed row changes shape every step;
    * several GPUs without a distributed launcher: ``nn.DataParallel`` runs replicas in threads.
    """
    args = trainer.args
    smoothing = getattr(args, "label_smoothing_factor", 0.0)
    if smoothing:
        raise TargetRefusal(
            f"label_smoothing_factor={smoothing}: the Trainer would take the labels away from ReGATE's packed forward "
            "and smooth full logits it never computes; set label_smoothing_factor=0 or train without ReGATE"
        )
    if getattr(trainer, "compute_loss_func", None) is not None:
        name = getattr(trainer.compute_loss_func, "__qualname__", type(trainer.compute_loss_func).__name__)
        raise TargetRefusal(
            f"compute_loss_func={name}: the Trainer would compute the loss from full logits without ReGATE; "
            "ReGATE's loss is the mean over kept tokens: remove compute_loss_func or train without ReGATE"
        )
    loss_type = getattr(args, "loss_type", None)
    if loss_type not in (None, "nll"):
        raise TargetRefusal(
            f"loss_type={loss_type!r}: ReGATE's loss is the token cross-entropy over kept tokens and would replace it; "
            "set loss_type='nll' or train without ReGATE"
        )
    if getattr(args, "torch_compile", False) or hasattr(trainer.model, "_orig_mod"):
        what = "torch_compile=True" if getattr(args, "torch_compile", False) else "a torch.compile'd model"
        raise TargetRefusal(
            f"{what}: ReGATE's packed row changes length every step, which a compiled model recompiles for; "
            "train without torch_compile (and pass the model uncompiled)"
        )
    gpus = getattr(args, "n_gpu", 1)
    if gpus > 1 or isinstance(trainer.model, torch.nn.DataParallel):
        raise TargetRefusal(
            f"{gpus} GPUs in one process: the Trainer would use nn.DataParallel, whose threads ReGATE does not "
            f"support; launch one process per GPU instead: torchrun --nproc_per_node {gpus} your_train_script.py ..."
        )


def rearm(engine: ReGATEEngine, model: torch.nn.Module) -> None:
    """Ask the targets to put ReGATE's forward back on ``model`` (under its wrappers) wherever a
    library replaced it since the target enabled it; logs what was."""
    for done in engine.pm.hook.regate_rearm(model=student(model)):
        if done:
            logger.info("ReGATE's forward put back on %s: %s", type(student(model)).__name__, done)


def likely_bypass_causes(trainer: Any, model: torch.nn.Module | None) -> str:
    """What in ``trainer`` and ``model`` can send a training micro-batch around the packed forward,
    with the fix, as the tail of ``BypassError``'s one line."""
    causes = []
    if trainer is not None and getattr(trainer, "label_smoother", None) is not None:
        causes.append("a label smoother (label_smoothing_factor > 0) takes the labels from the batch: set it to 0")
    if trainer is not None and getattr(trainer, "compute_loss_func", None) is not None:
        causes.append("a compute_loss_func takes the labels from the batch: remove it")
    if model is not None:
        inner = student(model)
        forward = inner.__dict__.get("_old_forward", inner.__dict__.get("forward"))
        if forward is not None and getattr(getattr(forward, "__func__", forward), "_regate_original", None) is None:
            causes.append("a forward set on the model after ReGATE was enabled hides it (e.g. a Liger-Kernel patch "
                          "applied after training began): apply it before hf.enable, or call hf.enable again after it")
        elif getattr(type(inner).forward, "_regate_original", None) is None:
            causes.append(f"{type(inner).__name__}'s own forward replaced the patched one (a subclass, or a class "
                          "patch applied after training began): call hf.enable again after it")
    if not causes:
        causes.append("a custom compute_loss or training_step may call the model without labels or in eval mode")
    return ". Likely: " + "; ".join(causes)


def save_state(engine: ReGATEEngine, checkpoint: Path) -> Path:
    """Write the engine's state (EMA table, step, config) into a checkpoint folder, atomically."""
    checkpoint.mkdir(parents=True, exist_ok=True)
    path = checkpoint / STATE_FILE
    state = engine.state_dict()
    write_atomic(path, lambda handle: torch.save(state, handle))
    return path


class MissingReGATEState(TargetRefusal, FileNotFoundError):
    """A resumed checkpoint holds no ReGATE state; ``regate`` shows it as one ``Error:`` line."""


def load_state(engine: ReGATEEngine, checkpoint: Path) -> None:
    """Restore the engine from a checkpoint folder saved with ReGATE on, with the same settings."""
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise MissingReGATEState(
            f"resuming from {checkpoint}, which holds no {STATE_FILE} (saved without ReGATE?): resume from a checkpoint "
            "saved with ReGATE on, or start ReGATE here with --resume-without-regate-state (attach(..., "
            "resume_without_state=True)): EMA from the reference losses, schedule from the resumed step"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    # a setting added after the state was saved counts as its default: such a run trained with it
    saved = {**ReGATEConfig().to_dict(), **state["config"]}
    current = engine.config.to_dict()
    changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v and k != "attn_backend"}
    if changed:
        raise TargetRefusal(
            f"{path} was saved with different ReGATE settings {changed} (saved, now): resume with the same settings"
        )
    warn_on_plugin_change(state.get("plugins"), engine.pm, str(path))
    engine.load_state_dict(state)


def warn_if_never_sparse(engine: ReGATEEngine, start: int, stop: int) -> None:
    """Warn when optimizer steps ``start``..``stop-1`` hold no sparse step: the run would pay for ReGATE
    and train dense throughout. Not for a run that set keep ratio 1 (dense on purpose, e.g. a baseline)."""
    config = engine.config
    built_in = all(impl.plugin is defaults for impl in engine.pm.hook.regate_keep_ratio.get_hookimpls())
    on_purpose = built_in and not config.auto_keep and config.keep_ratio >= 1.0
    if engine.packing_only or stop <= start or on_purpose or reaches_sparse_step(engine, start, stop):
        return
    logger.warning(
        "ReGATE: none of this run's optimizer steps %d-%d is sparse (warmup %d, then %d dense steps of every %d-step "
        "cycle, keep ratio %s): it trains dense throughout; lower --warmup, or train longer",
        start + 1, stop, config.warmup, config.dense_steps, config.cycle,
        config.keep_ratio if config.auto_keep else f"{config.keep_ratio:g}",
    )


def reaches_sparse_step(engine: ReGATEEngine, start: int, stop: int) -> bool:
    """Whether the schedule in use keeps less than everything on a step in ``start``..``stop-1``: the
    built-in one in closed form, a plugin's asked step by step up to its first sparse step."""
    config = engine.config
    if all(impl.plugin is defaults for impl in engine.pm.hook.regate_keep_ratio.get_hookimpls()):
        return sparse_ceiling(config) < 1.0 and sparse_step_count(stop, config) > sparse_step_count(start, config)
    for step in range(start, stop):
        ratio, source = first_result(engine.pm, "regate_keep_ratio", step=step, config=config)
        if checked_keep_ratio(ratio, source, step) < 1.0:
            return True
    return False


def _sum_across_ranks(values: list[int]) -> list[int]:
    if not is_multi_rank():
        return values
    total = torch.tensor(values, dtype=torch.int64, device=collective_device())
    dist.all_reduce(total)
    return total.tolist()
