"""Glue for the Hugging Face Trainer (used by every target): sample indices in, metrics and state out.

    train_dataset = IndexedDataset(train_dataset)       # each sample carries its dataset index
    data_collator = IndexedCollator(data_collator)      # ... into the batch as ``sample_index``
    trainer = Trainer(..., train_dataset=train_dataset, data_collator=data_collator)
    attach(trainer, engine)                             # schedule, logging, checkpoints
"""

from __future__ import annotations

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
from .plugins import warn_on_plugin_change

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
    """Feeds the optimizer step to the schedule, ends each step in the engine, logs, saves, restores."""

    def __init__(self, engine: ReGATEEngine, resume_from: str | None = None) -> None:
        self.engine = engine
        self.resume_from = resume_from
        self.pending: dict[str, float] = {}  # metrics for the Trainer's next training log entry
        self._interval = {name: 0 for name in METRICS}
        self._ratios: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            return
        checkpoint = Path(self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        load_state(self.engine, checkpoint)
        if self.engine.step != state.global_step:
            raise RuntimeError(
                f"{checkpoint / STATE_FILE} is at step {self.engine.step} but the Trainer resumes at step "
                f"{state.global_step}: pass the checkpoint you resume from as attach(..., resume_from=PATH)"
            )

    def on_step_begin(self, args, state, control, **kwargs):
        self.engine.step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        stats = self.engine.end_step()
        for name in METRICS:
            self._interval[name] += getattr(stats, name)
        self._ratios.append(stats.keep_ratio)
        if control.should_log:  # sums since the last log entry, over all ranks
            totals = _sum_across_ranks([self._interval[name] for name in METRICS])
            self.pending = {f"regate/{name}": value for name, value in zip(METRICS, totals)}
            self.pending["regate/keep_ratio"] = sum(self._ratios) / len(self._ratios)
            self._interval = {name: 0 for name in METRICS}
            self._ratios = []

    def on_save(self, args, state, control, **kwargs):
        # Where the Trainer writes its checkpoint files: every node's first process with
        # save_on_each_node (nodes without a shared filesystem resume from their own copy).
        if args.should_save:
            save_state(self.engine, Path(args.output_dir) / f"checkpoint-{state.global_step}")


def attach(trainer: Any, engine: ReGATEEngine, resume_from: str | None = None) -> ReGATECallback:
    """Add ReGATE's callback to ``trainer``; its metrics join the Trainer's own training log entries,
    so every reporter (console, TensorBoard, W&B, ``trainer_state.json``) sees them beside the loss."""
    callback = ReGATECallback(engine, resume_from)
    trainer.add_callback(callback)
    trainer_log = trainer.log

    def log(logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and callback.pending:
            logs.update(callback.pending)
            callback.pending = {}
        trainer_log(logs, *args, **kwargs)

    trainer.log = log
    return callback


def save_state(engine: ReGATEEngine, checkpoint: Path) -> Path:
    """Write the engine's state (EMA table, step, config) into a checkpoint folder, atomically."""
    checkpoint.mkdir(parents=True, exist_ok=True)
    path = checkpoint / STATE_FILE
    state = engine.state_dict()
    write_atomic(path, lambda handle: torch.save(state, handle))
    return path


def load_state(engine: ReGATEEngine, checkpoint: Path) -> None:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"resuming from {checkpoint}, which holds no {STATE_FILE}: it was not saved with ReGATE on, "
            "or it is not the checkpoint being resumed (pass attach(..., resume_from=PATH))"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state["config"]
    current = engine.config.to_dict()
    changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v and k != "attn_backend"}
    if changed:
        raise ValueError(
            f"{path} was saved with different ReGATE settings {changed} (saved, now): resume with the same settings"
        )
    warn_on_plugin_change(state.get("plugins"), engine.pm, str(path))
    engine.load_state_dict(state)


def _sum_across_ranks(values: list[int]) -> list[int]:
    if not is_multi_rank():
        return values
    total = torch.tensor(values, dtype=torch.int64, device=collective_device())
    dist.all_reduce(total)
    return total.tolist()
