"""`regate demo`: the whole pipeline on a toy visual QA task, on a CPU, in a few minutes.

What it does, in order (everything built in code; nothing is downloaded):

1. Task (``demo_task``): pictures of 1-4 coloured shapes in one corner, five kinds of question, and
   templated answers whose few *image words* (colour, shape, count, corner) only the picture tells.
2. Language model: a tiny Llama is trained text-only on the task's text (pictures replaced by
   padding). It is the teacher, saved like any base LM, and the student's backbone.
3. Student: a tiny ``LlavaForConditionalGeneration``: the backbone above, a CLIP vision tower
   pre-trained on the pictures' attributes (the stand-in for a pre-trained CLIP) and a fresh
   projector, saved with its word-level tokenizer like any pretrained student.
4. Teacher pass: the tokenizer check, ``hf.HFScoringSource`` and ``score_dataset``, the calls that
   ``regate score --target hf`` makes, write the reference-loss cache.
5. Two fine-tuning runs from the same weights, same seed, same batches, same number of optimizer
   steps, both through the same HF ``Trainer`` + ``hf.enable`` + ``IndexedDataset`` /
   ``IndexedCollator`` / ``attach`` code:

   * dense:  ``ReGATEConfig(keep_ratio=1.0)``: every supervised token on every step (packed, so
     padding is removed as in the ReGATE run: the two runs differ only in elision);
   * regate: the paper's schedule scaled to the run length (see ``scaled_config``).

   The strategies are the built-in ones (a plugin installed under the ``regate`` entry-point group
   does not change the demo).
6. Held-out accuracy, every few steps (not counted in training seconds): teacher-forced argmax
   accuracy at the image-word positions of a fixed, balanced held-out set (a model that ignores the
   picture scores about chance, whatever words it guesses). Template words are not scored: the text alone
   predicts them.

The result: a table, ``demo.json`` and ``demo.png`` (``--out``), and the acceptance numbers of
``compare_curves``: ReGATE's share of dense's supervised tokens, both final accuracies, and the gap
between the two accuracy curves at equal supervised tokens.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import click
import numpy as np
import torch

from . import demo_task as task
from .config import ReGATEConfig
from .hookspecs import StepStats, hookimpl
from .schedule import sparse_step_count, token_share

# ---------------------------------------------------------------------------------------------
# sizes and settings
# ---------------------------------------------------------------------------------------------

DEFAULT_STEPS = 1600
THREADS = 1
BATCH_SIZE = 16
LEARNING_RATE = 2e-3
TRAIN_SAMPLES = 4096
EVAL_PER_TYPE = 96  # held-out samples per question type (5 types): 768 image words
EVAL_POINTS = 25  # held-out evaluations per run, besides the one before training
#: curves are compared after a trailing moving average over this many evaluations: one evaluation of a
#: model still training at a high learning rate moves by a few points from one point to the next
SMOOTHING = 3
PRETRAIN_STEPS = 250
PRETRAIN_BATCH = 64
PRETRAIN_SAMPLES = 4096
PRETRAIN_LR = 3e-3

VISION_STEPS = 250
VISION_BATCH = 64
VISION_LR = 3e-3

TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)

#: the paper's schedule (ReGATEConfig's defaults) and the run length it was set for
PAPER, PAPER_STEPS = ReGATEConfig(), 5000
TOKEN_SHARE_LIMIT = 0.62  # acceptance: ReGATE trains on at most this share of dense's tokens
ACCURACY_MARGIN = 0.01  # acceptance: final accuracy at least dense's minus one point
CURVE_TOLERANCE = 0.0  # acceptance: ReGATE's curve at or above dense's at equal supervised tokens
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
# acceptance numbers
# ---------------------------------------------------------------------------------------------


def _interp(curve: Sequence[dict[str, float]], tokens: np.ndarray) -> np.ndarray:
    xs = np.array([p["supervised_tokens"] for p in curve], dtype=np.float64)
    ys = np.array([p["val_accuracy"] for p in curve], dtype=np.float64)
    return np.interp(tokens, xs, ys)


def smoothed(curve: Sequence[dict[str, Any]], window: int = SMOOTHING) -> list[dict[str, Any]]:
    """The curve with each ``val_accuracy`` replaced by the mean of it and the ``window - 1`` before it."""
    accuracy = [p["val_accuracy"] for p in curve]
    return [{**p, "val_accuracy": float(np.mean(accuracy[max(0, i - window + 1): i + 1]))} for i, p in enumerate(curve)]


def compare_curves(dense_curve: Sequence[dict[str, float]], regate_curve: Sequence[dict[str, float]],
                   tolerance: float = CURVE_TOLERANCE, window: int = SMOOTHING) -> dict[str, Any]:
    """The acceptance numbers from two curves (lists of {step, supervised_tokens, val_accuracy},
    supervised tokens increasing, the last point the end of the run).

    token_share: ReGATE's supervised tokens / dense's at the end. final accuracies and their
    difference (raw, the last evaluation of each run). Curves: both smoothed (``smoothed(curve,
    window)``; window 1 compares the raw points), interpolated linearly in supervised tokens and
    compared at every point of either curve inside the range both cover, but for the shared start
    (both runs begin with the same model at 0 tokens): exact for piecewise-linear curves, whose
    difference is extreme at those points. ``min_gap`` is the smallest ReGATE - dense accuracy there;
    ``mean_gap`` the gap averaged over supervised tokens across that range.
    ``regate_tokens_to_dense_final``: the share of dense's tokens after which ReGATE's curve first
    reaches dense's final accuracy (None if it never does).
    """
    for name, curve in (("dense", dense_curve), ("regate", regate_curve)):
        if len(curve) < 2:
            raise ValueError(f"the {name} curve needs at least two points, has {len(curve)}")
        tokens = [p["supervised_tokens"] for p in curve]
        if any(b <= a for a, b in zip(tokens, tokens[1:])):
            raise ValueError(f"the {name} curve's supervised tokens must increase: {tokens}")
    dense_total, regate_total = dense_curve[-1]["supervised_tokens"], regate_curve[-1]["supervised_tokens"]
    dense_final, regate_final = dense_curve[-1]["val_accuracy"], regate_curve[-1]["val_accuracy"]
    low = max(dense_curve[0]["supervised_tokens"], regate_curve[0]["supervised_tokens"])
    high = min(dense_total, regate_total)
    grid = np.unique([p["supervised_tokens"] for p in (*dense_curve, *regate_curve) if low < p["supervised_tokens"] <= high])
    if grid.size == 0:
        raise ValueError(f"the curves share no supervised-token range beyond their start ({low:g})")
    dense_smooth, regate_smooth = smoothed(dense_curve, window), smoothed(regate_curve, window)
    gaps = _interp(regate_smooth, grid) - _interp(dense_smooth, grid)
    fine = np.linspace(low, high, 2001)
    mean_gap = float(np.mean(_interp(regate_smooth, fine) - _interp(dense_smooth, fine)))
    worst = int(np.argmin(gaps))
    reached = next((p["supervised_tokens"] for p in regate_curve if p["val_accuracy"] >= dense_final), None)
    token_share = regate_total / dense_total
    return {
        "token_share": token_share,
        "dense_final_accuracy": dense_final,
        "regate_final_accuracy": regate_final,
        "accuracy_difference": regate_final - dense_final,
        "curve_points_compared": int(grid.size),
        "curve_token_range": [float(low), float(high)],
        "min_gap": float(gaps[worst]),
        "min_gap_at_tokens": float(grid[worst]),
        "mean_gap": mean_gap,
        "curve_tolerance": tolerance,
        "curve_smoothing": window,
        "regate_tokens_to_dense_final": None if reached is None else reached / dense_total,
        "accept_token_share": token_share <= TOKEN_SHARE_LIMIT,
        "accept_accuracy": regate_final >= dense_final - ACCURACY_MARGIN - 1e-12,
        "accept_curve": bool(gaps[worst] >= -tolerance - 1e-12),
    }


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


def _configs(vocab: dict[str, int]):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vocab_size, pad_id, bos_id, eos_id, image_id = (len(vocab), vocab[task.PAD], vocab[task.BOS], vocab[task.EOS],
                                                    vocab[task.IMAGE])

    text = LlamaConfig(vocab_size=vocab_size, pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id,
                       tie_word_embeddings=False, **TEXT)
    vision = CLIPVisionConfig(image_size=task.IMAGE_SIZE, patch_size=task.PATCH, **VISION)
    llava = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                        image_seq_length=task.VISUAL_TOKENS, vision_feature_layer=-1,
                        vision_feature_select_strategy="default")
    return text, llava


def model_facts() -> dict[str, Any]:
    return {"text": dict(TEXT), "vision": {**VISION, "image_size": task.IMAGE_SIZE, "patch_size": task.PATCH},
            "visual_tokens": task.VISUAL_TOKENS, "vocab_size": len(task.vocabulary())}


def _lr(step: int, total: int, peak: float) -> float:
    return peak * min(1.0, (step + 1) / max(1, total // 20)) * 0.5 * (1 + math.cos(math.pi * step / total))


def _fit(parameters, batch_loss: Callable[[], torch.Tensor], steps: int, peak_lr: float, desc: str, progress: bool) -> None:
    """AdamW with warmup and cosine decay over ``steps`` steps of ``batch_loss()``."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(parameters, lr=peak_lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, steps, peak_lr)
        loss = batch_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()


def pretrain_backbone(corpus: task.VQADataset, text_config, steps: int, seed: int, progress: bool):
    """The language model trained text-only on the task's text: the teacher and the student's backbone."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(text_config)
    model.train()
    gen = torch.Generator().manual_seed(seed)

    def batch_loss() -> torch.Tensor:
        indices = torch.randint(0, len(corpus), (PRETRAIN_BATCH,), generator=gen).tolist()
        return model(**corpus.text_batch(indices)).loss

    _fit(model.parameters(), batch_loss, steps, PRETRAIN_LR, "text pre-training", progress)
    return model.eval()


def _attribute_labels(scene: task.Scene) -> dict[str, int]:
    return {"color": list(task.COLORS).index(scene.color), "shape": task.SHAPES.index(scene.shape),
            "count": scene.count - 1, "corner": 2 * task.VERTICAL.index(scene.vertical) + task.HORIZONTAL.index(scene.horizontal)}


def pretrain_vision(pictures: task.VQADataset, vision_config, steps: int, seed: int, progress: bool):
    """The vision tower, pre-trained on pictures with their attributes as labels (linear heads on the
    mean of its patch features): the stand-in for the pre-trained CLIP encoder LLaVA starts from."""
    from transformers import CLIPVisionModel

    torch.manual_seed(seed + 1)
    tower = CLIPVisionModel(vision_config)
    tower.train()
    hidden = vision_config.hidden_size
    heads = torch.nn.ModuleDict({"color": torch.nn.Linear(hidden, len(task.COLORS)),
                                 "shape": torch.nn.Linear(hidden, len(task.SHAPES)),
                                 "count": torch.nn.Linear(hidden, len(task.COUNTS)), "corner": torch.nn.Linear(hidden, 4)})
    labels = {name: torch.tensor([_attribute_labels(s)[name] for s in pictures.scenes]) for name in heads}
    gen = torch.Generator().manual_seed(seed + 1)

    def batch_loss() -> torch.Tensor:
        indices = torch.randint(0, len(pictures), (VISION_BATCH,), generator=gen)
        pixels = torch.stack([pictures.pixel_values(int(i)) for i in indices])
        pooled = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:].mean(1)
        return sum(torch.nn.functional.cross_entropy(head(pooled), labels[name][indices]) for name, head in heads.items())

    _fit([*tower.parameters(), *heads.parameters()], batch_loss, steps, VISION_LR, "vision pre-training", progress)
    return tower.eval()


def build_student(backbone, tower, llava_config, seed: int):
    """A Llava from the pre-trained backbone and vision tower, with a fresh projector."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed + 2)
    model = LlavaForConditionalGeneration(llava_config)
    model.model.language_model.load_state_dict(backbone.model.state_dict())
    model.lm_head.load_state_dict(backbone.lm_head.state_dict())
    model.model.vision_tower.load_state_dict(tower.state_dict())
    return model


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

    @hookimpl
    def regate_step_end(self, stats: StepStats) -> None:
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
    """Everything both runs share."""

    steps: int
    seed: int
    work: Path
    student_dir: Path
    train: task.VQADataset
    eval_batches: list[dict[str, torch.Tensor]]
    source: Any
    cache_dir: Path
    progress: bool


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


def train_run(name: str, config: ReGATEConfig, setup: Setup) -> dict[str, Any]:
    """Fine-tune a fresh copy of the student with ``config``, through the HF Trainer."""
    from transformers import LlavaForConditionalGeneration, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .engine import ReGATEEngine
    from .patches import hf
    from .plugins import build_plugin_manager
    from .refcache import RefCache
    from .trainer import IndexedCollator, IndexedDataset, attach

    torch.manual_seed(setup.seed)
    model = LlavaForConditionalGeneration.from_pretrained(setup.student_dir, dtype=torch.float32,
                                                          attn_implementation="sdpa")
    model.model.vision_tower.requires_grad_(False)  # frozen, as in LLaVA's fine-tuning stage
    counter = TokenCounter()
    pm = build_plugin_manager(load_entrypoints=False)
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
    every = max(1, setup.steps // EVAL_POINTS)
    curve = _callbacks_module()(name, counter, lambda: image_word_accuracy(model, setup.eval_batches),
                                every, setup.steps, setup.progress)
    trainer.add_callback(curve)
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    trainer.train()
    return {
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


def train_dataset(seed: int = 0, tokenizer: Any = None) -> task.VQADataset:
    """The training samples of ``regate demo --seed SEED``; with the default seed, what
    ``regate inspect WORK/refcache --target hf -- --dataset regate_plugin.demo:train_dataset ...`` decodes."""
    return task.VQADataset(task.generate(TRAIN_SAMPLES, np.random.default_rng([seed, 0])),
                           task.build_tokenizer() if tokenizer is None else tokenizer)


def prepare(steps: int, seed: int, work: Path, progress: bool) -> Setup:
    """Task, language-model pre-training, student, teacher pass: everything before the two runs."""
    from .patches import hf
    from .scoring import check_tokenizers, load_teacher, score_dataset

    tokenizer = task.build_tokenizer()
    vocab = tokenizer.get_vocab()
    text_config, llava_config = _configs(vocab)
    train = train_dataset(seed, tokenizer)
    held_out = task.VQADataset(task.generate_balanced(EVAL_PER_TYPE, np.random.default_rng([seed, 1])), tokenizer,
                               with_targets=True)
    corpus = task.VQADataset(task.generate(PRETRAIN_SAMPLES, np.random.default_rng([seed, 2])), tokenizer)

    backbone = pretrain_backbone(corpus, text_config, PRETRAIN_STEPS, seed, progress)
    tower = pretrain_vision(corpus, llava_config.vision_config, VISION_STEPS, seed, progress)
    teacher_dir, student_dir = work / "teacher", work / "student"
    backbone.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    student = build_student(backbone, tower, llava_config, seed)
    student.save_pretrained(student_dir)
    tokenizer.save_pretrained(student_dir)

    # the teacher pass, as `regate score --target hf --teacher teacher/ --out refcache/ -- ...` runs it
    source = hf.HFScoringSource(train, str(student_dir), dataset_id=f"regate-demo-seed{seed}", teacher=str(teacher_dir))
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


def format_table(result: dict[str, Any]) -> str:
    dense, regate = result["runs"]["dense"], result["runs"]["regate"]
    c = result["comparison"]

    def row(label: str, a: str, b: str) -> str:
        return f"{label:34s}{a:>14s}{b:>22s}"

    share = regate["supervised_tokens"] / dense["supervised_tokens"]
    llm_share = regate["llm_tokens"] / dense["llm_tokens"]
    lines = [
        row("", "dense", "regate"),
        row("optimizer steps", f"{dense['optimizer_steps']:,}", f"{regate['optimizer_steps']:,}"),
        row("supervised tokens trained", f"{dense['supervised_tokens']:,}", f"{regate['supervised_tokens']:,} ({share:.1%})"),
        row("LLM tokens processed", f"{dense['llm_tokens']:,}", f"{regate['llm_tokens']:,} ({llm_share:.1%})"),
        row("training seconds (no eval)", f"{dense['train_seconds']:.1f}", f"{regate['train_seconds']:.1f}"),
        row("held-out image-word accuracy", f"{dense['val_accuracy']:.3f}", f"{regate['val_accuracy']:.3f}"),
    ]
    for kind in task.KINDS:
        lines.append(row(f"  {kind}", f"{dense['val_accuracy_by_kind'][kind]:.3f}",
                         f"{regate['val_accuracy_by_kind'][kind]:.3f}"))
    reached = c["regate_tokens_to_dense_final"]
    lines += [
        "",
        f"accuracy: {result['accuracy_measure']}",
        f"at equal supervised tokens (curves averaged over {c['curve_smoothing']} evaluations; "
        f"{c['curve_points_compared']} points up to {c['curve_token_range'][1]:,.0f}): "
        f"regate - dense accuracy min {c['min_gap'] * 100:+.1f} points (at {c['min_gap_at_tokens']:,.0f} tokens), "
        f"mean {c['mean_gap'] * 100:+.1f} points",
        "regate reached dense's final accuracy " + (
            f"after {reached:.1%} of dense's supervised tokens" if reached is not None else "not within its run"),
        f"acceptance: tokens <= {TOKEN_SHARE_LIMIT:.0%} of dense [{'ok' if c['accept_token_share'] else 'FAIL'}], "
        f"final accuracy >= dense - {ACCURACY_MARGIN * 100:g} point [{'ok' if c['accept_accuracy'] else 'FAIL'}], "
        f"curve at or above dense's [{'ok' if c['accept_curve'] else 'FAIL'}]",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    """Accuracy against supervised tokens and against training seconds, both runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tokens, ax_seconds) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    window = result["comparison"]["curve_smoothing"]
    for name, color in (("dense", "tab:blue"), ("regate", "tab:orange")):
        curve = result["runs"][name]["curve"]
        raw = [p["val_accuracy"] for p in curve]
        mean = [p["val_accuracy"] for p in smoothed(curve, window)]
        for ax, x in ((ax_tokens, [p["supervised_tokens"] for p in curve]), (ax_seconds, [p["train_seconds"] for p in curve])):
            ax.plot(x, raw, "o", ms=3, alpha=0.45, color=color)
            ax.plot(x, mean, "-", color=color, label=f"{name} (dots: each evaluation; line: mean of {window})")
    ax_tokens.set_xlabel("supervised tokens trained")
    ax_seconds.set_xlabel("training seconds (evaluation excluded)")
    ax_tokens.set_ylabel("held-out image-word accuracy")
    for ax in (ax_tokens, ax_seconds):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(f"regate demo: {result['steps']} steps, seed {result['seed']} (teacher-forced accuracy on image words)")
    fig.tight_layout()
    from .atomic import write_atomic

    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path


def check_writable(out: Path) -> None:
    """Create ``out`` and write a file into it now, so a bad --out fails before minutes of training,
    not after them with the results lost."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise click.BadParameter(f"cannot write into {out} ({err.strerror or err}): give a folder you can write to",
                                 param_hint="--out") from err


@click.command("demo")
@click.option("--steps", type=click.IntRange(min=10), default=DEFAULT_STEPS, show_default=True,
              help="Optimizer steps of each run (dense and ReGATE); the schedule scales with it.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the data, the models and the batch order.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for demo.json and demo.png (created if missing).")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the teacher, the student, the reference cache (try `regate inspect WORK/refcache`) "
              "and the Trainer folders here; by default a temporary folder, removed at the end.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")
def command(steps: int, seed: int, out: Path | None, work: Path | None, progress: bool) -> None:
    """Train a tiny LLaVA dense and with ReGATE on a toy visual QA task, and compare.

    \b
    Everything is built on the spot, on the CPU (no GPU, no downloads; needs transformers):
      1. a picture-question-answer task drawn in code, whose answers are templates with a few
         words (colour, shape, count, corner) that only the picture tells;
      2. a tiny language model trained on the task's text: the teacher and the student's backbone;
      3. the teacher pass (what `regate score --target hf` runs);
      4. two Trainer runs with the same seed and steps: dense, and ReGATE with the paper's
         schedule scaled to --steps;
      5. a table of tokens, seconds and held-out accuracy on the image words, and with --out,
         demo.json and demo.png (accuracy against supervised tokens and training seconds).
    The default run takes about three minutes on two CPU cores.
    """
    missing = [name for name in ("transformers", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise click.ClickException(f"regate demo needs {' and '.join(missing)}: pip install 'regate-plugin[demo]'")
    if work is not None:
        if work.exists() and any(work.iterdir()):
            raise click.BadParameter(f"{work} is not empty; give a new or empty folder", param_hint="--work")
        work.mkdir(parents=True, exist_ok=True)
    if out is not None:
        check_writable(out)
    result = run_demo(steps, seed, progress, echo=click.echo, work=work)
    click.echo("")
    click.echo(format_table(result))
    if out is not None:
        from .atomic import write_atomic

        write_atomic(out / "demo.json", (json.dumps(result, indent=2) + "\n").encode())
        try:
            png = plot(result, out / "demo.png")
        except ImportError:
            png = None
        click.echo(f"wrote {out / 'demo.json'}" + (f" and {png}" if png else " (pip install matplotlib for demo.png)"))
