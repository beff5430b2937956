"""The runner: trains a random LLaVA model for a few steps in every mode, interleaved, and times the
engine's host work at a dataset's scale (see ``regate_plugin.bench`` for what is measured)."""

from __future__ import annotations

import ctypes
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..attention import resolve_backend
from ..config import ReGATEConfig
from ..engine import ReGATEEngine
from ..refcache import Fingerprint, RefCache, write_cache
from ..schedule import sparse_step_count, token_share
from ..units import find_units
from .cost import (
    ESTIMATE_LAYERS,
    REFERENCE_PEAK,
    SHAPES,
    Shape,
    bf16_peak,
    ideal_speedup,
    mfu,
    padded_step_cost,
    step_cost,
    training_flops,
)
from .workloads import BOS_ID, EOS_ID, LLAVA_665K, PAD_ID, PRESETS, Batch, HostWorkload, host_batch, make_batches, scaled

EMBED_STD = 0.02  # LlamaConfig.initializer_range: the scale of the embedding rows at init
LEARNING_RATE = 1e-5
SCHEDULE_STEPS = 5000
CPU_SCALE, GPU_SCALE = 8.0, 1.0
CPU_STEPS, GPU_STEPS = 5, 10
HOST_MICRO_BATCHES = 12  # timed micro-batches of the host measurement, after 2 untimed ones

PADDED = "padded-dense"
PACKED = "packed-dense"
SCHEDULE = "regate-schedule"
SPARSE_RATIOS = (0.25, 0.5, 0.75)
MODES = (PADDED, PACKED) + tuple(f"regate-{r:g}" for r in SPARSE_RATIOS)
RESULT_FIELDS = (
    "mode",
    "keep_ratio",
    "step_seconds_median",
    "mfu",
    "peak_memory_bytes",
    "llm_tokens_per_step",
    "ideal_speedup",
    "measured_speedup",
    "step_cpu_seconds_median",
    "cpu_time_speedup",
    "overhead_share",
)


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
    cpu_times: list[float] = field(default_factory=list)
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
    host_samples: int = LLAVA_665K.samples
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
            host_samples=self.host_samples,
            progress=self.progress,
        )


def _train_step(mode: _Mode, embeds: torch.Tensor, batch: Batch, sync: Callable[[], None]) -> tuple[float, float]:
    """One full training step: its wall time and the process's CPU time (all threads) over it."""
    device = embeds.device
    inputs = {
        "inputs_embeds": embeds,
        "attention_mask": batch.attention_mask.to(device),
        "labels": batch.labels.to(device),
    }
    if mode.engine is not None:
        inputs["sample_index"] = batch.sample_ids
    sync()
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = mode.model(**inputs).loss
    loss.backward()
    mode.optimizer.step()
    mode.optimizer.zero_grad(set_to_none=True)
    if mode.engine is not None:
        mode.engine.end_step()
    sync()
    return time.perf_counter() - start, time.process_time() - cpu_start


def run_benchmark(options: BenchOptions) -> dict[str, Any]:
    """Run the benchmark; returns the report (the ``--json`` document)."""
    from ..patches import hf

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

    peak = bf16_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    results = [_result(mode, modes[0], peak) for mode in modes]
    results.append(_schedule_result(modes, opts.schedule_steps, peak))
    host = None
    if opts.host_samples:
        workload = HostWorkload(LLAVA_665K.name, opts.host_samples, LLAVA_665K.units, LLAVA_665K.batch, LLAVA_665K.length)
        host = engine_host_time(workload, device, peak, opts.seed)
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
        "bf16_peak_flops": peak,
        "peak_memory_measure": memory_measure,
        "schedule": {
            "steps": opts.schedule_steps,
            "dense_steps": opts.schedule_steps - sparse,
            "sparse_steps": sparse,
            "config": sched_config.to_dict(),
        },
        "results": results,
        "engine_host": host,
        "step_seconds": {mode.name: mode.times for mode in modes},
        "step_cpu_seconds": None if device.type == "cuda" else {mode.name: mode.cpu_times for mode in modes},
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
    seconds, cpu_seconds = _train_step(mode, embeds, batch, sync)
    if not measured:
        return
    mode.times.append(seconds)
    if not cuda:  # the CPU time of a GPU step is the host's, not the step's
        mode.cpu_times.append(cpu_seconds)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        mode.peak = peak if mode.peak is None else max(mode.peak, peak)
    if mode.engine is None:
        rows, length = batch.shape
        mode.tokens.append(rows * length)
        mode.costs.append(padded_step_cost(shape, opts.layers, rows, length))
        return
    packed = mode.timer.last_plan.host
    segments = packed.cu_seqlens.diff().tolist()
    mode.tokens.append(packed.num_tokens)
    mode.costs.append(step_cost(shape, opts.layers, packed.num_tokens, segments, packed.loss_rows.numel()))
    mode.overhead.append(mode.timer.seconds)


def _result(mode: _Mode, padded: _Mode, peak: float | None) -> dict[str, Any]:
    median = statistics.median(mode.times)
    cuda = not mode.cpu_times
    return {
        "mode": mode.name,
        "keep_ratio": mode.keep_ratio,
        "step_seconds_median": median,
        "mfu": mfu(training_flops(statistics.fmean(mode.costs)), median, peak),
        "peak_memory_bytes": mode.peak,
        "llm_tokens_per_step": statistics.fmean(mode.tokens),
        "ideal_speedup": ideal_speedup(sum(padded.costs), sum(mode.costs)),
        "measured_speedup": statistics.median(padded.times) / median,
        "step_cpu_seconds_median": None if cuda else statistics.median(mode.cpu_times),
        "cpu_time_speedup": None if cuda else statistics.median(padded.cpu_times) / statistics.median(mode.cpu_times),
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
    cpu = [r.get("step_cpu_seconds_median") for r in (dense, sparse, padded)]
    cpu_seconds = None if None in cpu else mix(cpu[0], cpu[1])
    utilizations = [r.get("mfu") for r in (dense, sparse)]
    utilization = None if None in utilizations else mix(  # FLOPs done over time taken, both schedule-weighted
        dense["mfu"] * dense["step_seconds_median"], sparse["mfu"] * sparse["step_seconds_median"]
    ) / seconds
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
        "mfu": utilization,
        "peak_memory_bytes": None if None in peaks else max(peaks),
        "llm_tokens_per_step": mix(dense["llm_tokens_per_step"], sparse["llm_tokens_per_step"]),
        "ideal_speedup": 1.0 / inverse_ideal,
        "measured_speedup": padded["step_seconds_median"] / seconds,
        "step_cpu_seconds_median": cpu_seconds,
        "cpu_time_speedup": None if cpu_seconds is None else padded["step_cpu_seconds_median"] / cpu_seconds,
        "overhead_share": engine_seconds / seconds,
    }


def _schedule_result(modes: list[_Mode], num_steps: int, peak: float | None) -> dict[str, Any]:
    config = ReGATEConfig()
    by_name = {m.name: _result(m, modes[0], peak) for m in modes}
    return schedule_weighted(by_name[PACKED], by_name[f"regate-{config.keep_ratio:g}"], num_steps, config, by_name[PADDED])


def synthetic_cache(workload: HostWorkload, seed: int) -> RefCache:
    """An in-memory reference cache of ``workload``'s size (random fp16 losses, ``units`` per sample),
    read through the same ``RefCache`` methods as a memory-mapped one."""
    losses = (np.random.default_rng([seed, 3]).random(workload.samples * workload.units, dtype=np.float32) * 6)
    offsets = np.arange(workload.samples + 1, dtype=np.int64) * workload.units
    fingerprint = Fingerprint(dataset=f"bench:{workload.name}", tokenizer="bench", teacher="random",
                              visual_tokens="576", max_length=workload.length)
    return RefCache(Path(workload.name), {"fingerprint": fingerprint.to_dict()}, losses.astype(np.float16), offsets, None)


def engine_host_time(workload: HostWorkload, device: torch.device, peak: float | None, seed: int = 0,
                     micro_batches: int = HOST_MICRO_BATCHES, keep_ratio: float = 0.5) -> dict[str, Any]:
    """The engine's host time per micro-batch at ``workload``'s scale, on sparse steps at ``keep_ratio``
    (scores, selection and EMA updates all run), one micro-batch per optimizer step (so every
    micro-batch also pays a whole ``end_step``), against a 7b-width step's time at the bf16 peak.

    Labels and mask start on ``device`` as a training step gets them, and the losses the engine
    records are on ``device``; the device is synchronized around each call. Measured with one
    intra-op thread, as torchrun runs every rank (OMP_NUM_THREADS=1): the CPU time of this thread
    (``time.thread_time``, which a busy machine's preemption does not inflate) decides the share;
    wall time is reported beside it. The step estimate: ``ESTIMATE_LAYERS`` 7b-width layers and the
    LM head over that micro-batch's packed row, forward and backward, at the device's peak (no GPU:
    an H100 SXM's), i.e. the shortest such a step can take."""
    sync = _synchronizer(device)
    cache = synthetic_cache(workload, seed)
    engine = ReGATEEngine(ReGATEConfig(warmup=0, dense_steps=0, keep_ratio=keep_ratio), cache)
    shape = SHAPES["7b-width"]
    peak_name, reference_peak = (torch.cuda.get_device_name(device), peak) if peak else REFERENCE_PEAK
    calls = ("plan", "record", "end_step")
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    wall: list[float] = []
    estimates = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for index in range(micro_batches + 2):
            labels, mask, ids = (t.to(device) for t in host_batch(workload, index, seed))
            losses = None
            spent = {}
            wall_start = time.perf_counter()
            for name in calls:
                sync()
                cpu_start = time.thread_time()
                if name == "plan":
                    plan = engine.plan(labels, mask, ids)
                elif name == "record":
                    engine.record(plan, losses)
                else:
                    engine.end_step()
                sync()
                spent[name] = time.thread_time() - cpu_start
                if name == "plan":  # the model's part, untimed: one loss per kept unit, on the device
                    wall_paused = time.perf_counter()
                    losses = torch.rand(plan.host.loss_rows.numel(), device=device)
                    wall_start += time.perf_counter() - wall_paused
            if index < 2:
                continue
            wall.append(time.perf_counter() - wall_start)
            for name in calls:
                cpu[name].append(spent[name])
            host = plan.host
            forward = step_cost(shape, ESTIMATE_LAYERS, host.num_tokens, host.cu_seqlens.diff().tolist(),
                                host.loss_rows.numel())
            estimates.append(training_flops(forward) / reference_peak)
    finally:
        torch.set_num_threads(threads)
    median = statistics.median([sum(values) for values in zip(*cpu.values())])
    estimate = statistics.median(estimates)
    return {
        "workload": {"name": workload.name, "samples": workload.samples, "units_per_sample": workload.units,
                     "batch": workload.batch, "length": workload.length, "keep_ratio": keep_ratio},
        "micro_batches": micro_batches,
        "torch_threads": 1,
        "host_seconds_median": median,
        "parts_seconds_median": {name: statistics.median(values) for name, values in cpu.items()},
        "wall_seconds_median": statistics.median(wall),
        "step_estimate_seconds": estimate,
        "step_estimate": f"{ESTIMATE_LAYERS} 7b-width layers + LM head, forward and backward, at the bf16 peak of "
                         f"{peak_name} ({reference_peak / 1e12:.0f} TFLOP/s)",
        "share": median / estimate,
    }


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
