"""The demo's runs: the task's data, the preparation shared by all runs (pre-training, student,
teacher pass), one fine-tuning run through the HF Trainer, and the default demo's two runs."""

from __future__ import annotations

import contextlib
import functools
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .. import demo_task as task
from ..config import ReGATEConfig
from ..hookspecs import StepStats, hookimpl
from ..schedule import sparse_step_count, token_share
from .models import PRETRAIN_SAMPLES, PRETRAIN_STEPS, VISION_STEPS, _configs, build_student, model_facts, pretrain_backbone, pretrain_vision
from .report import compare_curves

DEFAULT_STEPS = 1600
THREADS = 1
BATCH_SIZE = 16
LEARNING_RATE = 2e-3
TRAIN_SAMPLES = 4096
EVAL_PER_TYPE = 96  # held-out samples per question type (5 types): 768 image words
EVAL_POINTS = 25  # held-out evaluations per run, besides the one before training
#: the paper's schedule (ReGATEConfig's defaults) and the run length it was set for
PAPER, PAPER_STEPS = ReGATEConfig(), 5000
ACCURACY_MEASURE = (
    "teacher-forced argmax accuracy at the image-word positions (colour, shape, count, corner) of "
    f"{EVAL_PER_TYPE * len(task.QUESTION_TYPES)} held-out samples, balanced so that ignoring the picture scores about chance"
)


def scaled_config(steps: int) -> ReGATEConfig:
    """The paper's schedule (warmup 100, cycle 128, 16 dense, keep 0.5 over ~5000 steps) scaled to
    ``steps``: warmup 2% of the run, cycle steps/40, dense steps cycle/8."""
    cycle = max(2, round(steps / 40))
    return PAPER.replace(warmup=max(1, round(0.02 * steps)), cycle=cycle, dense_steps=max(1, round(cycle / 8)))


def schedule_facts(steps: int, config: ReGATEConfig) -> dict[str, Any]:
    sparse = sparse_step_count(steps, config)
    return {
        "warmup": config.warmup, "cycle": config.cycle, "dense_steps": config.dense_steps,
        "keep_ratio": config.keep_ratio, "ema_beta": config.ema_beta, "ref_weight": config.ref_weight,
        "steps": steps, "dense_steps_total": steps - sparse, "sparse_steps_total": sparse,
        "token_share_before_rounding": token_share(steps, config),
        "scaled_from": {"steps": PAPER_STEPS, "warmup": PAPER.warmup, "cycle": PAPER.cycle,
                        "dense_steps": PAPER.dense_steps, "keep_ratio": PAPER.keep_ratio},
    }


def format_schedule(facts: dict[str, Any]) -> str:
    return (
        f"schedule: the paper's (warmup {PAPER.warmup}, cycle {PAPER.cycle}, {PAPER.dense_steps} dense, "
        f"keep {PAPER.keep_ratio:g}, for ~{PAPER_STEPS} steps) scaled to {facts['steps']} steps: "
        f"warmup {facts['warmup']}, cycle {facts['cycle']}, dense_steps {facts['dense_steps']}, "
        f"keep_ratio {facts['keep_ratio']:g}\n"
        f"          {facts['dense_steps_total']} dense + {facts['sparse_steps_total']} sparse steps: "
        f"{facts['token_share_before_rounding']:.1%} of dense's supervised tokens before per-sample rounding up"
    )


# ---------------------------------------------------------------------------------------------
# held-out accuracy
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def image_word_accuracy(model, batches: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Teacher-forced argmax accuracy at image-word positions: overall and per kind of word."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(len(task.KINDS) + 1)
    total = torch.zeros(len(task.KINDS) + 1)
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"]).logits
        kind = batch["image_word"][:, :-1]
        hit = (logits[:, :-1].argmax(-1) == batch["input_ids"][:, 1:]) & (kind > 0)
        correct += torch.bincount(kind[hit], minlength=len(task.KINDS) + 1).float()
        total += torch.bincount(kind[kind > 0], minlength=len(task.KINDS) + 1).float()
    model.train(was_training)
    result = {"all": float(correct[1:].sum() / total[1:].sum())}
    result.update({name: float(correct[i + 1] / total[i + 1]) for i, name in enumerate(task.KINDS)})
    return result


# ---------------------------------------------------------------------------------------------
# one fine-tuning run
# ---------------------------------------------------------------------------------------------


class TokenCounter:
    """A ``regate_step_end`` observer (a pluggy plugin of the run's own plugin manager)."""

    def __init__(self) -> None:
        self.supervised_kept = self.supervised_total = self.llm_tokens = self.padded_tokens = 0
        self.keep_ratios: list[float] = []  # per optimizer step

    @hookimpl
    def regate_step_end(self, stats: StepStats) -> None:
        self.keep_ratios.append(stats.keep_ratio)
        self.supervised_kept += stats.supervised_kept
        self.supervised_total += stats.supervised_total
        self.llm_tokens += stats.llm_tokens
        self.padded_tokens += stats.padded_tokens


def _callbacks_module():
    from transformers import TrainerCallback

    class CurveCallback(TrainerCallback):
        """Evaluates every ``every`` steps (and before the first and after the last); keeps the
        curve, a progress bar, and the training clock, stopped while evaluating."""

        def __init__(self, name, counter, evaluate, every, steps, progress):
            from tqdm.auto import tqdm

            self.counter, self.evaluate, self.every, self.steps = counter, evaluate, every, steps
            self.curve: list[dict[str, Any]] = []
            self.train_seconds = 0.0
            self._since = None
            self.bar = tqdm(total=steps, desc=f"fine-tuning ({name})", unit="step", disable=not progress)

        def _point(self, step):
            scores = self.evaluate()
            self.curve.append({"step": step, "supervised_tokens": self.counter.supervised_kept,
                               "val_accuracy": scores["all"], "train_seconds": self.train_seconds,
                               "llm_tokens": self.counter.llm_tokens,
                               "val_accuracy_by_kind": {k: v for k, v in scores.items() if k != "all"}})
            self.bar.set_postfix(acc=f"{scores['all']:.3f}", tokens=f"{self.counter.supervised_kept:,}", refresh=False)

        def on_train_begin(self, args, state, control, **kwargs):
            self._point(0)
            self._since = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(1)
            step = state.global_step
            if step % self.every == 0 or step == self.steps:
                self.train_seconds += time.perf_counter() - self._since
                self._point(step)
                self._since = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return CurveCallback


@dataclass
class Setup:
    """Everything the runs of one seed share."""

    steps: int
    seed: int
    work: Path
    student_dir: Path
    train: task.VQADataset
    eval_batches: list[dict[str, torch.Tensor]]
    source: Any
    cache_dir: Path
    progress: bool
    eval_points: int = EVAL_POINTS


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    """Run torch on ``count`` threads: these models are so small that more threads only add
    synchronisation, and on a busy machine spinning threads slow every step down many times."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep transformers' and accelerate's console output down (our bars and others' warnings stay)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"(transformers|accelerate)(\.|$)")
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)
            if bars:
                hf_logging.enable_progress_bar()


def train_run(name: str, config: ReGATEConfig, setup: Setup, strategies: Sequence[object] = ()) -> dict[str, Any]:
    """Fine-tune a fresh copy of the student with ``config``, through the HF Trainer; ``strategies``:
    plugins of this run only, asked before the built-in ones."""
    from transformers import LlavaForConditionalGeneration, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from ..engine import ReGATEEngine
    from ..patches import hf
    from ..plugins import build_plugin_manager
    from ..refcache import RefCache
    from ..trainer import IndexedCollator, IndexedDataset, attach

    torch.manual_seed(setup.seed)
    model = LlavaForConditionalGeneration.from_pretrained(setup.student_dir, dtype=torch.float32,
                                                          attn_implementation="sdpa")
    model.model.vision_tower.requires_grad_(False)  # frozen, as in LLaVA's fine-tuning stage
    counter = TokenCounter()
    pm = build_plugin_manager(load_entrypoints=False, extra=strategies)
    pm.register(counter, name="regate-demo-counter")
    engine = ReGATEEngine(config, RefCache.open(setup.cache_dir, expect=setup.source.expected()), pm=pm)
    hf.enable(model, engine)
    args = TrainingArguments(
        output_dir=str(setup.work / f"run-{name}"), max_steps=setup.steps, per_device_train_batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE, lr_scheduler_type="cosine", warmup_steps=max(1, setup.steps // 20),
        weight_decay=0.0, seed=setup.seed, data_seed=setup.seed, save_strategy="no", logging_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, log_level="error", dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=IndexedDataset(setup.train),
                      data_collator=IndexedCollator(functools.partial(task.collate, pad_id=setup.train.pad_id)))
    attach(trainer, engine)
    every = max(1, setup.steps // setup.eval_points)
    curve = _callbacks_module()(name, counter, lambda: image_word_accuracy(model, setup.eval_batches),
                                every, setup.steps, setup.progress)
    trainer.add_callback(curve)
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    trainer.train()
    auto = {} if engine.budget is None else {"step_keep_ratios": counter.keep_ratios,
                                             "auto_decisions": engine.budget.decisions}
    return {
        **auto,
        "config": config.to_dict(),
        "optimizer_steps": setup.steps,
        "supervised_tokens": counter.supervised_kept,
        "supervised_tokens_dense_equivalent": counter.supervised_total,
        "llm_tokens": counter.llm_tokens,
        "padded_tokens": counter.padded_tokens,
        "train_seconds": curve.train_seconds,
        "val_accuracy": curve.curve[-1]["val_accuracy"],
        "val_accuracy_by_kind": curve.curve[-1]["val_accuracy_by_kind"],
        "curve": curve.curve,
    }


# ---------------------------------------------------------------------------------------------
# the demo
# ---------------------------------------------------------------------------------------------


def train_dataset(seed: int = 0, tokenizer: Any = None, variant: task.Variant = task.DEMO) -> task.VQADataset:
    """The training samples of ``regate demo --seed SEED``; with the default seed, what
    ``regate inspect WORK/refcache --target hf -- --dataset regate_plugin.demo:train_dataset ...`` decodes."""
    return task.VQADataset(task.generate(TRAIN_SAMPLES, np.random.default_rng([seed, 0]), variant),
                           task.build_tokenizer() if tokenizer is None else tokenizer)


def prepare(steps: int, seed: int, work: Path, progress: bool, variant: task.Variant = task.DEMO) -> Setup:
    """Task, language-model pre-training, student, teacher pass: everything before the two runs
    (``variant``: another task of the same kind, ``demo_task.Variant``)."""
    from ..patches import hf
    from ..scoring import check_tokenizers, load_teacher, score_dataset

    tokenizer = task.build_tokenizer()
    vocab = tokenizer.get_vocab()
    text_config, llava_config = _configs(vocab)
    train = train_dataset(seed, tokenizer, variant)
    held_out = task.VQADataset(task.generate_balanced(EVAL_PER_TYPE, np.random.default_rng([seed, 1]), variant),
                               tokenizer, with_targets=True)
    corpus = task.VQADataset(task.generate(PRETRAIN_SAMPLES, np.random.default_rng([seed, 2]), variant), tokenizer)

    backbone = pretrain_backbone(corpus, text_config, PRETRAIN_STEPS, seed, progress)
    tower = pretrain_vision(corpus, llava_config.vision_config, VISION_STEPS, seed, progress)
    teacher_dir, student_dir = work / "teacher", work / "student"
    backbone.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    student = build_student(backbone, tower, llava_config, seed)
    student.save_pretrained(student_dir)
    tokenizer.save_pretrained(student_dir)

    # the teacher pass, as `regate score --target hf --teacher teacher/ --out refcache/ -- ...` runs it
    dataset_id = f"regate-demo-seed{seed}" + (f"-{variant.name}" if variant.name else "")
    source = hf.HFScoringSource(train, str(student_dir), dataset_id=dataset_id, teacher=str(teacher_dir))
    cache_dir = work / "refcache"
    check_tokenizers(source.tokenizer_fingerprint, source.load_tokenizer(str(teacher_dir)), str(teacher_dir))
    score_dataset(source, load_teacher(str(teacher_dir), torch.device("cpu"), torch.float32), cache_dir,
                  batch_size=64, progress=progress)
    eval_batches = [task.collate([held_out[i] for i in range(k, min(k + 80, len(held_out)))], held_out.pad_id)
                    for k in range(0, len(held_out), 80)]
    return Setup(steps, seed, work, student_dir, train, eval_batches, source, cache_dir, progress)


def run_demo(steps: int = DEFAULT_STEPS, seed: int = 0, progress: bool = True, echo=print,
             work: Path | None = None) -> dict[str, Any]:
    """Both runs end to end; returns what ``demo.json`` holds."""
    started = time.perf_counter()
    regate_config = scaled_config(steps)
    dense_config = regate_config.replace(keep_ratio=1.0)
    schedule = schedule_facts(steps, regate_config)
    echo(format_schedule(schedule))
    echo("dense baseline: the same Trainer and hf.enable with ReGATEConfig(keep_ratio=1.0): every token, packed")
    with contextlib.ExitStack() as stack:
        stack.enter_context(_quiet())
        stack.enter_context(_threads(THREADS))
        if work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="regate-demo-")))
        setup = prepare(steps, seed, work, progress)
        prepared = time.perf_counter()
        runs = {"dense": train_run("dense", dense_config, setup), "regate": train_run("regate", regate_config, setup)}
    comparison = compare_curves(runs["dense"]["curve"], runs["regate"]["curve"])
    return {
        "seed": seed,
        "steps": steps,
        "batch_size": BATCH_SIZE,
        "learning_rate": LEARNING_RATE,
        "schedule": schedule,
        "dense_baseline": "the same Trainer and hf.enable with ReGATEConfig(keep_ratio=1.0) (packed, nothing elided)",
        "accuracy_measure": ACCURACY_MEASURE,
        "task": {"train_samples": TRAIN_SAMPLES, "held_out_samples": EVAL_PER_TYPE * len(task.QUESTION_TYPES),
                 "question_types": list(task.QUESTION_TYPES), "image_words": {k: list(v) for k, v in task.SLOTS.items()}},
        "model": model_facts(),
        "runs": runs,
        "comparison": comparison,
        "seconds": {"preparation": prepared - started, "total": time.perf_counter() - started},
    }
