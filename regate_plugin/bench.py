"""``regate bench``: step time of padded dense, packed dense and ReGATE training, in one process.

What it measures
----------------
A random LLaVA model (``LlavaForConditionalGeneration`` built from configs; nothing downloaded) is
trained for a few full steps (forward, backward, AdamW step, ``engine.end_step()``) in every mode,
interleaved: after ``--warmup-steps`` rounds, each of ``--steps`` rounds runs one step of every mode
on the same batch (the order rotates by one mode per round, so no mode always follows the same one).
The batch goes in as ``inputs_embeds``: text positions are the model's own embedding rows, visual
positions random vectors of the same scale standing in for projected visual features (the vision
tower is bypassed, as it costs the same in every mode).

Modes:
  padded-dense      the model as upstream trains it: padded (B, L) batch, transformers' sdpa, logits
                    and loss over all B*L positions. A separate model instance, never ``hf.enable``-d
                    (its class's forward is wrapped once the other instance is enabled; with no
                    engine attached the wrapper calls the upstream forward unchanged).
  packed-dense      ``hf.enable(model, ReGATEEngine(ReGATEConfig(), None))``: padding removed, every
                    token kept, varlen attention over the packed row.
  regate-0.25/0.5/0.75
                    ``hf.enable`` with an engine over a synthetic reference cache (random losses, one
                    entry per supervised token of every sample), warmup=0 and dense_steps=0, so every
                    step keeps that share of each sample's supervised tokens.
  regate-schedule   not run: the schedule-weighted average of packed-dense (dense steps) and
                    regate-0.5 (sparse steps) over ``--schedule-steps`` steps with the paper's
                    defaults ``ReGATEConfig()`` (5000 steps: 724 dense, 4276 sparse), counted with
                    ``regate_plugin.schedule.sparse_step_count``. Its ``keep_ratio`` is the share of
                    supervised tokens such a run trains on (0.5724 for 5000 steps).

The patched modes share one model instance and one optimizer (``hf.enable`` switches the engine
between steps); the padded mode has its own, built from the same seed, so all start from identical
weights. Weights then drift by a few AdamW steps (lr 1e-5), which does not change the work a step does.

Workload presets (lengths in tokens at ``--scale 1``; ``U[a, b]`` uniform, ``logU[a, b]`` log-uniform,
i.e. short answers more frequent, as in VQA-heavy data; integer lengths, bounds included)::

    preset            visual  prefix  turns   instruction/turn  answer/turn     batch
    llava-1.5         576     35      U[1,4]  U[10,40]          logU[5,150]     16
    videollama2-16f   1352    6       1       U[15,40]          U[3,30]         4
    long-answer       576     35      1       U[8,20]           U[150,400]      8

  llava-1.5: LLaVA-1.5 finetuning on llava_v1_5_mix665k: 576 CLIP-L/336 patch tokens, the Vicuna v1
    system prompt and role marker as prefix, multi-turn VQA/conversation; batch 16 per device as in
    upstream's finetune.sh (per_device_train_batch_size 16).
  videollama2-16f: VideoLLaMA2 with 16 frames (1352 visual tokens after the STC connector), short
    video QA; batch 4 per device.
  long-answer: detailed-caption data (one short prompt, a 150-400 token description); batch 8.

A sample is laid out as ``[prefix][visual][instruction_1][answer_1]...[instruction_n][answer_n]``:
the prefix starts with BOS, every answer ends with EOS, and labels equal the input ids on answer
tokens only (-100 on prefix, visual and instruction tokens), so a sample has exactly
``sum(answer lengths)`` supervised tokens. ``--scale s`` divides every drawn length (and the visual
and prefix counts) by ``s``: ``max(1, round(n / s))``; default 8 on CPU (llava-1.5 samples of ~100
tokens), 1 on GPU. Lengths come from ``numpy.random.default_rng([seed, 0])`` and token ids from
``default_rng([seed, 1])``, so a seed fixes the lengths whatever the vocabulary.

Model shapes (``--layers`` decoder layers, default 2; Llama decoder, untied LM head)::

    shape      hidden  heads  kv heads  intermediate  vocab   dtype
    tiny       128     4      2         352           1024    fp32 on CPU, bf16 on GPU
    7b-width   4096    32     32        11008         32000   (Llama-7B widths)

Ideal speedup (cost model, token counts only)
---------------------------------------------
Forward FLOPs of one decoder layer over a step whose LLM row(s) hold ``T`` tokens in attention
segments of lengths ``l_i`` (hidden ``h``, intermediate ``I``, ``h_kv = kv_heads * h / heads``)::

    linear(T)    = 2 * T * (2*h*h + 2*h*h_kv + 3*h*I)     # q, o; k, v (GQA); gate, up, down
    attention(l) = 2 * 2 * h * sum(l_i ** 2)              # q k^T and p v, full square both times
    cost         = linear(T) + attention(l)

padded dense: ``T = B * L`` and ``sum(l_i**2) = B * L**2`` (every row is attended in full);
packed/ReGATE: ``T`` = the packed row length, ``l_i`` = each sample's kept tokens (``cu_seqlens``).
``ideal_speedup = cost(padded dense) / cost(mode)``, summed over the measured steps. Layer count,
backward (about twice forward) and the causal mask (a constant share for both) cancel. Not counted:
the LM head (upstream: all B*L positions; ReGATE: only kept supervised ones), embeddings, the
optimizer and the engine's own work. With few layers the LM head is a sizeable share of a padded
step, so the measured speedup can exceed the ideal one.

Figures per mode
----------------
step_seconds_median  median wall time of one step (``time.perf_counter``; CUDA synchronized)
peak_memory_bytes    CUDA: ``torch.cuda.max_memory_allocated`` over the mode's measured steps (reset
                     before each), less what the other, idle model instance holds (its parameters
                     and optimizer state): the peak this mode would have alone. CPU: growth of the
                     process RSS over one extra untimed step per mode (batch 0), sampled every
                     0.5 ms, after ``malloc_trim(0)`` has handed freed heap pages back to the OS
                     (Linux + glibc; None elsewhere). Rougher than the CUDA figure (about +-10%
                     between runs). The JSON's ``peak_memory_measure`` says which.
llm_tokens_per_step  tokens the decoder layers process, mean over measured steps: B*L padded, the
                     packed row length T otherwise
ideal_speedup        the cost model above, relative to padded-dense
measured_speedup     padded-dense median step time / this mode's
overhead_share       time inside ``engine.plan``, ``engine.record`` and ``engine.end_step`` (units,
                     scores, selection, packing plan, EMA) / step time, summed over measured steps;
                     CUDA synchronized around those calls. None for padded-dense (no engine).

Besides ``results``, the JSON holds the run's settings, the attention backend, what the peak memory
measures, the schedule's step counts, and ``step_seconds``: every measured step time per mode, in
order, to judge the noise behind the medians.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import click
import numpy as np
import torch

from .attention import resolve_backend
from .config import ReGATEConfig
from .engine import ReGATEEngine
from .refcache import Fingerprint, write_cache
from .schedule import sparse_step_count, token_share
from .units import IGNORE_INDEX, find_units

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
FIRST_TEXT_ID = 3
EMBED_STD = 0.02  # LlamaConfig.initializer_range: the scale of the embedding rows at init
LEARNING_RATE = 1e-5
SCHEDULE_STEPS = 5000
CPU_SCALE, GPU_SCALE = 8.0, 1.0
CPU_STEPS, GPU_STEPS = 5, 10
NOISE_RATIO = 1.5  # slowest / fastest measured step of a mode above which the run is flagged as noisy

PADDED = "padded-dense"
PACKED = "packed-dense"
SCHEDULE = "regate-schedule"
SPARSE_RATIOS = (0.25, 0.5, 0.75)
MODES = (PADDED, PACKED) + tuple(f"regate-{r:g}" for r in SPARSE_RATIOS)
RESULT_FIELDS = (
    "mode",
    "keep_ratio",
    "step_seconds_median",
    "peak_memory_bytes",
    "llm_tokens_per_step",
    "ideal_speedup",
    "measured_speedup",
    "overhead_share",
)


# ---------------------------------------------------------------------------------------------
# workloads
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """Sequence composition of one workload, lengths in tokens at scale 1 (bounds included)."""

    name: str
    batch_size: int
    visual_tokens: int
    prefix_tokens: int
    turns: tuple[int, int]
    instruction: tuple[int, int]
    answer: tuple[int, int]
    answer_distribution: str  # "uniform" or "loguniform"
    summary: str


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("llava-1.5", 16, 576, 35, (1, 4), (10, 40), (5, 150), "loguniform",
               "LLaVA-1.5 mix665k: 576 visual tokens, 1-4 turns, short and long answers"),
        Preset("videollama2-16f", 4, 1352, 6, (1, 1), (15, 40), (3, 30), "uniform",
               "VideoLLaMA2 16 frames: 1352 visual tokens, one short QA turn"),
        Preset("long-answer", 8, 576, 35, (1, 1), (8, 20), (150, 400), "uniform",
               "detailed captions: 576 visual tokens, one short prompt, a 150-400 token answer"),
    )
}


@dataclass(frozen=True)
class Sample:
    """One synthetic training sample: ``[prefix][visual][instr_1][answer_1]...`` as token ids."""

    input_ids: torch.Tensor  # (L,) int64
    labels: torch.Tensor  # (L,) int64: input ids on answer tokens, -100 elsewhere
    visual_start: int
    visual_tokens: int
    instruction_lengths: tuple[int, ...]
    answer_lengths: tuple[int, ...]

    @property
    def length(self) -> int:
        return self.input_ids.numel()

    @property
    def supervised_tokens(self) -> int:
        return sum(self.answer_lengths)


@dataclass(frozen=True)
class Batch:
    """A right-padded micro-batch of samples ``sample_ids`` (their indices in the whole workload)."""

    input_ids: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L) int64
    visual_mask: torch.Tensor  # (B, L) bool
    sample_ids: torch.Tensor  # (B,) int64
    lengths: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    @property
    def real_tokens(self) -> int:
        return sum(self.lengths)


def scaled(n: int, scale: float) -> int:
    """A length at ``scale``: ``max(1, round(n / scale))``."""
    return max(1, round(n / scale))


def _draw(rng: np.random.Generator, bounds: tuple[int, int], distribution: str = "uniform") -> int:
    lo, hi = bounds
    if distribution == "loguniform":
        return min(hi, max(lo, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))))))
    return int(rng.integers(lo, hi + 1))


def make_samples(preset: Preset, num_samples: int, seed: int = 0, scale: float = 1.0, vocab_size: int = 1024) -> list[Sample]:
    """``num_samples`` samples of ``preset``, reproducible for ``seed`` (see the module docstring)."""
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    if vocab_size < FIRST_TEXT_ID + 2:
        raise ValueError(f"vocab_size {vocab_size} is too small")
    lengths_rng = np.random.default_rng([seed, 0])
    ids_rng = np.random.default_rng([seed, 1])
    image_id = vocab_size - 1
    visual = scaled(preset.visual_tokens, scale)
    prefix = scaled(preset.prefix_tokens, scale)

    def text(n: int) -> list[int]:
        return ids_rng.integers(FIRST_TEXT_ID, image_id, size=n).tolist()

    samples = []
    for _ in range(num_samples):
        turns = _draw(lengths_rng, preset.turns)
        instructions, answers = [], []
        for _turn in range(turns):
            instructions.append(scaled(_draw(lengths_rng, preset.instruction), scale))
            answers.append(scaled(_draw(lengths_rng, preset.answer, preset.answer_distribution), scale))
        ids = [BOS_ID] + text(prefix - 1) + [image_id] * visual
        labels = [IGNORE_INDEX] * len(ids)
        for n_instr, n_answer in zip(instructions, answers):
            answer = text(n_answer - 1) + [EOS_ID]
            ids += text(n_instr) + answer
            labels += [IGNORE_INDEX] * n_instr + answer
        samples.append(
            Sample(
                torch.tensor(ids, dtype=torch.long),
                torch.tensor(labels, dtype=torch.long),
                visual_start=prefix,
                visual_tokens=visual,
                instruction_lengths=tuple(instructions),
                answer_lengths=tuple(answers),
            )
        )
    return samples


def collate(samples: Sequence[Sample], first_sample_id: int = 0) -> Batch:
    """Right-pad ``samples`` into a batch; sample ``i`` gets index ``first_sample_id + i``."""
    batch, length = len(samples), max(s.length for s in samples)
    input_ids = torch.full((batch, length), PAD_ID, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((batch, length), dtype=torch.long)
    visual = torch.zeros((batch, length), dtype=torch.bool)
    for b, s in enumerate(samples):
        input_ids[b, : s.length] = s.input_ids
        labels[b, : s.length] = s.labels
        mask[b, : s.length] = 1
        visual[b, s.visual_start : s.visual_start + s.visual_tokens] = True
    ids = torch.arange(first_sample_id, first_sample_id + batch, dtype=torch.long)
    return Batch(input_ids, labels, mask, visual, ids, tuple(s.length for s in samples))


def make_batches(
    preset: Preset, batch_size: int, num_batches: int, seed: int = 0, scale: float = 1.0, vocab_size: int = 1024
) -> tuple[list[Sample], list[Batch]]:
    """The workload: ``num_batches * batch_size`` samples, and the batches in order."""
    samples = make_samples(preset, num_batches * batch_size, seed, scale, vocab_size)
    batches = [collate(samples[i : i + batch_size], i) for i in range(0, len(samples), batch_size)]
    return samples, batches


# ---------------------------------------------------------------------------------------------
# model shapes and the cost model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    @property
    def kv_hidden(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("tiny", 128, 4, 2, 352, 1024),
        Shape("7b-width", 4096, 32, 32, 11008, 32000),
    )
}


def linear_flops(shape: Shape, tokens: int) -> float:
    """Forward FLOPs of one layer's projections: 2*T*(2*h*h + 2*h*h_kv + 3*h*I)."""
    h = shape.hidden
    return 2.0 * tokens * (2 * h * h + 2 * h * shape.kv_hidden + 3 * h * shape.intermediate)


def attention_flops(shape: Shape, segment_lengths: Sequence[int]) -> float:
    """Forward FLOPs of one layer's attention: 2*2*h*sum(l_i^2)."""
    return 4.0 * shape.hidden * float(sum(int(n) ** 2 for n in segment_lengths))


def layer_cost(shape: Shape, tokens: int, segment_lengths: Sequence[int]) -> float:
    return linear_flops(shape, tokens) + attention_flops(shape, segment_lengths)


def padded_cost(shape: Shape, batch: int, length: int) -> float:
    """Padded dense: B*L tokens, every row attended in full (B segments of length L)."""
    return layer_cost(shape, batch * length, [length] * batch)


def ideal_speedup(baseline: float, cost: float) -> float:
    """cost(padded dense) / cost(mode), each from ``padded_cost`` or ``layer_cost``."""
    return baseline / cost


# ---------------------------------------------------------------------------------------------
# measurement helpers
# ---------------------------------------------------------------------------------------------


class EngineTimer:
    """Wraps ``plan``, ``record`` and ``end_step`` on an engine instance and times them."""

    def __init__(self, engine: ReGATEEngine, sync: Callable[[], None]) -> None:
        self.engine = engine
        self.sync = sync
        self.seconds = 0.0
        self.last_plan = None
        self.last_stats = None
        for name in ("plan", "record", "end_step"):
            setattr(engine, name, self._wrap(name, getattr(engine, name)))

    def _wrap(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            start = time.perf_counter()
            result = method(*args, **kwargs)
            self.sync()
            self.seconds += time.perf_counter() - start
            if name == "plan":
                self.last_plan = result
            elif name == "end_step":
                self.last_stats = result
            return result

        return timed

    def reset(self) -> None:
        self.seconds = 0.0
        self.last_plan = None
        self.last_stats = None


def _libc() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RSSPeak:
    """Peak RSS growth of this process while the context is open, sampled by a thread."""

    def __init__(self, interval: float = 0.0005) -> None:
        self.interval = interval
        self.growth: int | None = None

    def __enter__(self) -> "RSSPeak":
        self._stop = threading.Event()
        self._base = _rss_bytes()
        self._peak = self._base

        def sample() -> None:
            while not self._stop.is_set():
                self._peak = max(self._peak, _rss_bytes())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.growth = self._peak - self._base


def cpu_memory_supported() -> bool:
    return _libc() is not None and os.path.exists("/proc/self/statm")


def _resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        if p.grad is not None:
            total += p.grad.numel() * p.grad.element_size()
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.device.type == "cuda":
                total += value.numel() * value.element_size()
    return total


# ---------------------------------------------------------------------------------------------
# models and modes
# ---------------------------------------------------------------------------------------------


def build_model(shape: Shape, layers: int, max_positions: int, device: torch.device, dtype: torch.dtype, seed: int):
    """A random LlavaForConditionalGeneration (tiny CLIP tower, never used), sdpa, train mode."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(4096, max_positions),
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        attention_dropout=0.0,
        initializer_range=EMBED_STD,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=shape.vocab - 1,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)
    model.to(device)
    model.train()
    return model


def batch_embeddings(batch: Batch, embedding: torch.nn.Module, seed: int, index: int) -> torch.Tensor:
    """(B, L, h) inputs_embeds: embedding rows on text, random N(0, EMBED_STD) on visual positions."""
    weight = embedding.weight
    gen = torch.Generator(device=weight.device).manual_seed(seed * 1_000_003 + index)
    with torch.no_grad():
        text = embedding(batch.input_ids.to(weight.device))
        noise = torch.randn(text.shape, generator=gen, device=weight.device, dtype=torch.float32) * EMBED_STD
        visual = batch.visual_mask.to(weight.device).unsqueeze(-1)
        return torch.where(visual, noise.to(weight.dtype), text)


@dataclass
class _Mode:
    name: str
    keep_ratio: float
    model: Any
    optimizer: torch.optim.Optimizer
    engine: ReGATEEngine | None = None
    timer: EngineTimer | None = None
    times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    costs: list[float] = field(default_factory=list)
    overhead: list[float] = field(default_factory=list)
    peak: int | None = None


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass(frozen=True)
class BenchOptions:
    """Everything ``run_benchmark`` needs; None fields get the device's defaults (see ``resolve``)."""

    preset: str = "llava-1.5"
    shape: str | None = None
    layers: int = 2
    batch_size: int | None = None
    steps: int | None = None
    warmup_steps: int = 2
    scale: float | None = None
    device: str | None = None
    seed: int = 0
    schedule_steps: int = SCHEDULE_STEPS
    progress: bool = True

    def resolve(self) -> "BenchOptions":
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        gpu = torch.device(device).type == "cuda"
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}: choose one of {sorted(PRESETS)}")
        shape = self.shape or ("7b-width" if gpu else "tiny")
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}: choose one of {sorted(SHAPES)}")
        return BenchOptions(
            preset=self.preset,
            shape=shape,
            layers=self.layers,
            batch_size=self.batch_size or PRESETS[self.preset].batch_size,
            steps=self.steps or (GPU_STEPS if gpu else CPU_STEPS),
            warmup_steps=self.warmup_steps,
            scale=self.scale or (GPU_SCALE if gpu else CPU_SCALE),
            device=device,
            seed=self.seed,
            schedule_steps=self.schedule_steps,
            progress=self.progress,
        )


def _train_step(mode: _Mode, embeds: torch.Tensor, batch: Batch, sync: Callable[[], None]) -> float:
    device = embeds.device
    inputs = {
        "inputs_embeds": embeds,
        "attention_mask": batch.attention_mask.to(device),
        "labels": batch.labels.to(device),
    }
    if mode.engine is not None:
        inputs["sample_index"] = batch.sample_ids
    sync()
    start = time.perf_counter()
    loss = mode.model(**inputs).loss
    loss.backward()
    mode.optimizer.step()
    mode.optimizer.zero_grad(set_to_none=True)
    if mode.engine is not None:
        mode.engine.end_step()
    sync()
    return time.perf_counter() - start


def run_benchmark(options: BenchOptions) -> dict[str, Any]:
    """Run the benchmark; returns the report (the ``--json`` document)."""
    from .patches import hf

    opts = options.resolve()
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sync = _synchronizer(device)
    preset, shape = PRESETS[opts.preset], SHAPES[opts.shape]
    samples, batches = make_batches(preset, opts.batch_size, opts.steps, opts.seed, opts.scale, shape.vocab)
    max_len = max(s.length for s in samples)
    backend = resolve_backend(ReGATEConfig().attn_backend, device, dtype)

    dense_model = build_model(shape, opts.layers, max_len, device, dtype, opts.seed)
    packed_model = build_model(shape, opts.layers, max_len, device, dtype, opts.seed)
    dense_opt = torch.optim.AdamW(dense_model.parameters(), lr=LEARNING_RATE)
    packed_opt = torch.optim.AdamW(packed_model.parameters(), lr=LEARNING_RATE)
    embedding = dense_model.get_input_embeddings()

    counts = [int(find_units(s.labels[None]).counts[0]) for s in samples]
    gen = torch.Generator().manual_seed(opts.seed)
    with tempfile.TemporaryDirectory(prefix="regate-bench-") as tmp:
        fingerprint = Fingerprint(
            dataset=f"bench:{preset.name}:seed={opts.seed}:scale={opts.scale:g}",
            tokenizer="bench",
            teacher="random",
            visual_tokens=str(scaled(preset.visual_tokens, opts.scale)),
            max_length=max_len,
        )
        cache = write_cache(Path(tmp) / "refcache", fingerprint, [torch.rand(n, generator=gen) * 6 for n in counts])

        modes = [_Mode(PADDED, 1.0, dense_model, dense_opt)]
        engines = [(PACKED, 1.0, ReGATEEngine(ReGATEConfig(), None))]
        for ratio in SPARSE_RATIOS:
            config = ReGATEConfig(warmup=0, dense_steps=0, keep_ratio=ratio)
            engines.append((f"regate-{ratio:g}", ratio, ReGATEEngine(config, cache)))
        for name, ratio, engine in engines:
            modes.append(_Mode(name, ratio, packed_model, packed_opt, engine, EngineTimer(engine, sync)))

        rounds = opts.warmup_steps + opts.steps
        bar = _progress(rounds, opts.progress)
        for r in range(rounds):
            index = r % len(batches)
            batch = batches[index]
            measured = r >= opts.warmup_steps
            for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
                _run_one(mode, batch, index, embedding, opts, shape, sync, hf, measured, device)
            bar.update(1)
        bar.close()

        if device.type == "cuda":
            resident = {id(m.model): _resident_bytes(m.model, m.optimizer) for m in modes}
            for mode in modes:
                other = sum(v for k, v in resident.items() if k != id(mode.model))
                mode.peak = mode.peak - other if mode.peak is not None else None
            memory_measure = "cuda max_memory_allocated over the mode's steps, less the idle model instance"
        elif cpu_memory_supported():
            memory_measure = "cpu: process RSS growth over one extra untimed step (sampled every 0.5 ms, heap trimmed first)"
            for mode in modes:
                embeds = batch_embeddings(batches[0], embedding, opts.seed, 0)
                if mode.engine is not None:
                    hf.enable(mode.model, mode.engine)
                _libc().malloc_trim(0)  # freed heap pages go back to the OS, so the step's growth shows
                with RSSPeak() as rss:
                    _train_step(mode, embeds, batches[0], sync)
                mode.peak = rss.growth
        else:
            memory_measure = "none (CPU peak memory needs Linux with glibc)"
            for mode in modes:
                mode.peak = None

    results = [_result(mode, modes[0]) for mode in modes]
    results.append(_schedule_result(modes, opts.schedule_steps))
    sched_config = ReGATEConfig()
    sparse = sparse_step_count(opts.schedule_steps, sched_config)
    return {
        "device": _device_name(device),
        "preset": preset.name,
        "shape": shape.name,
        "scale": opts.scale,
        "layers": opts.layers,
        "batch_size": opts.batch_size,
        "steps": opts.steps,
        "warmup_steps": opts.warmup_steps,
        "seed": opts.seed,
        "dtype": str(dtype).replace("torch.", ""),
        "attention_backend": backend,
        "peak_memory_measure": memory_measure,
        "schedule": {
            "steps": opts.schedule_steps,
            "dense_steps": opts.schedule_steps - sparse,
            "sparse_steps": sparse,
            "config": sched_config.to_dict(),
        },
        "results": results,
        "step_seconds": {mode.name: mode.times for mode in modes},
    }


def _run_one(mode, batch, index, embedding, opts, shape, sync, hf, measured, device) -> None:
    embeds = batch_embeddings(batch, embedding, opts.seed, index)
    if mode.engine is not None:
        hf.enable(mode.model, mode.engine)
        mode.timer.reset()
    cuda = device.type == "cuda"
    if cuda and measured:
        sync()
        torch.cuda.reset_peak_memory_stats(device)
    seconds = _train_step(mode, embeds, batch, sync)
    if not measured:
        return
    mode.times.append(seconds)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        mode.peak = peak if mode.peak is None else max(mode.peak, peak)
    if mode.engine is None:
        rows, length = batch.shape
        mode.tokens.append(rows * length)
        mode.costs.append(padded_cost(shape, rows, length))
        return
    packed = mode.timer.last_plan.packed
    segments = packed.cu_seqlens.diff().tolist()
    mode.tokens.append(packed.num_tokens)
    mode.costs.append(layer_cost(shape, packed.num_tokens, segments))
    mode.overhead.append(mode.timer.seconds)


def _result(mode: _Mode, padded: _Mode) -> dict[str, Any]:
    median = statistics.median(mode.times)
    return {
        "mode": mode.name,
        "keep_ratio": mode.keep_ratio,
        "step_seconds_median": median,
        "peak_memory_bytes": mode.peak,
        "llm_tokens_per_step": statistics.fmean(mode.tokens),
        "ideal_speedup": ideal_speedup(sum(padded.costs), sum(mode.costs)),
        "measured_speedup": statistics.median(padded.times) / median,
        "overhead_share": None if mode.engine is None else sum(mode.overhead) / sum(mode.times),
    }


def schedule_weighted(dense: dict[str, Any], sparse: dict[str, Any], num_steps: int, config: ReGATEConfig, padded: dict[str, Any]) -> dict[str, Any]:
    """The figures of a ``num_steps`` run under ``config``: dense steps cost ``dense``'s, sparse ``sparse``'s.

    Each argument is a result dict (``RESULT_FIELDS``); ``padded`` is the padded-dense one.
    """
    n_sparse = sparse_step_count(num_steps, config)
    n_dense = num_steps - n_sparse

    def mix(a: float, b: float) -> float:
        return (n_dense * a + n_sparse * b) / num_steps

    seconds = mix(dense["step_seconds_median"], sparse["step_seconds_median"])
    # cost(mode) = cost(padded) / ideal, averaged over the run's steps
    inverse_ideal = mix(1.0 / dense["ideal_speedup"], 1.0 / sparse["ideal_speedup"])
    engine_seconds = mix(
        dense["overhead_share"] * dense["step_seconds_median"], sparse["overhead_share"] * sparse["step_seconds_median"]
    )
    peaks = [r["peak_memory_bytes"] for r in (dense, sparse)]
    return {
        "mode": SCHEDULE,
        "keep_ratio": token_share(num_steps, config),
        "step_seconds_median": seconds,
        "peak_memory_bytes": None if None in peaks else max(peaks),
        "llm_tokens_per_step": mix(dense["llm_tokens_per_step"], sparse["llm_tokens_per_step"]),
        "ideal_speedup": 1.0 / inverse_ideal,
        "measured_speedup": padded["step_seconds_median"] / seconds,
        "overhead_share": engine_seconds / seconds,
    }


def _schedule_result(modes: list[_Mode], num_steps: int) -> dict[str, Any]:
    config = ReGATEConfig()
    by_name = {m.name: _result(m, modes[0]) for m in modes}
    return schedule_weighted(by_name[PACKED], by_name[f"regate-{config.keep_ratio:g}"], num_steps, config, by_name[PADDED])


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="rounds (one step per mode)", unit="round", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------


def format_table(report: dict[str, Any]) -> str:
    """The results as a markdown table."""
    lines = [
        "| mode | keep | step ms (median) | peak MiB | LLM tokens/step | ideal speedup | measured speedup | engine overhead |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        peak = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.1f}"
        overhead = "-" if r["overhead_share"] is None else f"{r['overhead_share']:.1%}"
        lines.append(
            f"| {r['mode']} | {r['keep_ratio']:.3g} | {r['step_seconds_median'] * 1e3:.1f} | {peak} | "
            f"{r['llm_tokens_per_step']:.0f} | {r['ideal_speedup']:.2f}x | {r['measured_speedup']:.2f}x | {overhead} |"
        )
    return "\n".join(lines)


def noisy_modes(report: dict[str, Any]) -> list[str]:
    """Modes whose slowest measured step took over NOISE_RATIO times their fastest."""
    return [m for m, t in report["step_seconds"].items() if t and max(t) > NOISE_RATIO * min(t)]


def format_header(report: dict[str, Any]) -> str:
    return (
        f"device {report['device']}, {report['dtype']}; preset {report['preset']}, batch {report['batch_size']}, "
        f"scale {report['scale']:g}; shape {report['shape']}, {report['layers']} layers; "
        f"{report['steps']} measured steps per mode after {report['warmup_steps']} warm-up"
    )


def format_footer(report: dict[str, Any]) -> str:
    s = report["schedule"]
    backend = report["attention_backend"]
    what = {"sdpa": "one SDPA call per sample, a Python loop", "flash": "flash-attn varlen", "torch": "torch varlen_attn"}
    return (
        f"attention backend (packed modes): {backend} ({what.get(backend, backend)}); "
        "padded-dense: transformers' sdpa with a padding mask\n"
        f"regate-schedule: {s['steps']} steps with ReGATEConfig() defaults: {s['dense_steps']} dense at "
        f"packed-dense cost, {s['sparse_steps']} sparse at regate-{s['config']['keep_ratio']:g} cost\n"
        f"peak memory: {report['peak_memory_measure']}"
    )


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="llava-1.5", show_default=True,
              help="Workload: sequence composition and batch size (see `python -m pydoc regate_plugin.bench`).")
@click.option("--shape", type=click.Choice(list(SHAPES)), default=None,
              help="Model widths: tiny (hidden 128, GQA) or 7b-width (Llama-7B widths). [default: 7b-width on CUDA, tiny on CPU]")
@click.option("--layers", type=click.IntRange(min=1), default=2, show_default=True, help="Decoder layers of the model.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Samples per step. [default: the preset's: 16, 4 or 8]")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help=f"Measured steps per mode (also the number of distinct batches). [default: {CPU_STEPS} on CPU, {GPU_STEPS} on CUDA]")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=2, show_default=True, help="Unmeasured steps per mode first.")
@click.option("--scale", type=click.FloatRange(min=1.0), default=None,
              help=f"Divide every sequence length by this. [default: {CPU_SCALE:g} on CPU, {GPU_SCALE:g} on CUDA]")
@click.option("--device", type=str, default=None, help="torch device. [default: cuda if available, else cpu]")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the lengths, token ids and weights.")
@click.option("--schedule-steps", type=click.IntRange(min=1), default=SCHEDULE_STEPS, show_default=True,
              help="Run length for the schedule-weighted regate-schedule row.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the full results to this JSON file.")
def command(json_path: Path | None, **kwargs: Any) -> None:
    """Time training steps: padded dense vs packed dense vs ReGATE, on a random LLaVA model.

    Every mode runs full training steps (forward, backward, AdamW) on the same synthetic batches in
    one process, interleaved. Modes: padded-dense (upstream), packed-dense (padding removed),
    regate-0.25/0.5/0.75 (every step sparse at that keep ratio), and regate-schedule (the paper's
    dense/sparse schedule, weighted from the measured packed-dense and regate-0.5 steps).

    Reported per mode: median step time, peak memory, tokens through the LLM per step, the ideal
    speedup from a FLOP cost model of token counts, the measured speedup over padded-dense, and
    the share of step time spent in ReGATE's own bookkeeping (units, selection, packing, EMA).
    """
    options = BenchOptions(**kwargs)
    try:
        resolved = options.resolve()
    except ValueError as err:
        raise click.BadParameter(str(err)) from err
    if torch.device(resolved.device).type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available here", param_hint="--device")
    gpu = torch.device(resolved.device).type == "cuda"
    origin = "" if kwargs["scale"] else f" ({'CUDA' if gpu else 'CPU'} default)"
    click.echo(f"scale {resolved.scale:g}{origin}: every sequence length divided by {resolved.scale:g}")
    report = run_benchmark(options)
    click.echo(format_header(report))
    click.echo(format_table(report))
    click.echo(format_footer(report))
    noisy = noisy_modes(report)
    if noisy:
        click.echo(
            f"warning: step times of {', '.join(noisy)} vary by more than {NOISE_RATIO:g}x between repetitions "
            "(a busy machine?): rerun, or raise --steps"
        )
    if json_path is not None:
        from .atomic import write_atomic

        json_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(json_path, (json.dumps(report, indent=2) + "\n").encode())
        click.echo(f"wrote {json_path}")
