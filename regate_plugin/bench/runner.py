"""The mode loop: trains a random LLaVA model for a few steps in every mode, interleaved, on the same
batches (see ``regate_plugin.bench`` for what is measured)."""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..attention import resolve_backend
from ..config import ReGATEConfig
from ..engine import ReGATEEngine
from ..refcache import Fingerprint, write_cache
from ..schedule import sparse_step_count
from ..units import find_units
from .cost import SHAPES, Shape, bf16_peak, padded_step_cost, plan_cost
from .host import engine_host_time
from .memory import RSSPeak, cpu_memory_supported, libc, resident_bytes
from .models import batch_embeddings, build_model
from .results import PACKED, PADDED, SPARSE_RATIOS, Measured, mode_result, schedule_result
from .timing import EngineTimer, synchronizer, train_step
from .workloads import LLAVA_665K, PRESETS, Batch, HostWorkload, make_batches, scaled

LEARNING_RATE = 1e-5
SCHEDULE_STEPS = 5000
CPU_SCALE, GPU_SCALE = 8.0, 1.0
CPU_STEPS, GPU_STEPS = 5, 10


@dataclass
class _Mode:
    """A mode's model, optimizer and (patched modes) engine, and what its steps measured."""

    model: Any
    optimizer: torch.optim.Optimizer
    measured: Measured
    engine: ReGATEEngine | None = None
    timer: EngineTimer | None = None


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
    device = embeds.device
    inputs = {
        "inputs_embeds": embeds,
        "attention_mask": batch.attention_mask.to(device),
        "labels": batch.labels.to(device),
    }
    if mode.engine is not None:
        inputs["sample_index"] = batch.sample_ids
    return train_step(mode.model, mode.optimizer, mode.engine, inputs, sync)


def run_benchmark(options: BenchOptions) -> dict[str, Any]:
    """Run the benchmark; returns the report (the ``--json`` document)."""
    from ..patches import hf

    opts = options.resolve()
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sync = synchronizer(device)
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

        modes = [_Mode(dense_model, dense_opt, Measured(PADDED, 1.0, patched=False))]
        engines = [(PACKED, 1.0, ReGATEEngine(ReGATEConfig(), None))]
        for ratio in SPARSE_RATIOS:
            config = ReGATEConfig(warmup=0, dense_steps=0, keep_ratio=ratio)
            engines.append((f"regate-{ratio:g}", ratio, ReGATEEngine(config, cache)))
        for name, ratio, engine in engines:
            modes.append(_Mode(packed_model, packed_opt, Measured(name, ratio, patched=True), engine,
                               EngineTimer(engine, sync)))

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
            resident = {id(m.model): resident_bytes(m.model, m.optimizer) for m in modes}
            for mode in modes:
                other = sum(v for k, v in resident.items() if k != id(mode.model))
                mode.measured.peak = mode.measured.peak - other if mode.measured.peak is not None else None
            memory_measure = "cuda max_memory_allocated over the mode's steps, less the idle model instance"
        elif cpu_memory_supported():
            memory_measure = "cpu: process RSS growth over one extra untimed step (sampled every 0.5 ms, heap trimmed first)"
            for mode in modes:
                embeds = batch_embeddings(batches[0], embedding, opts.seed, 0)
                if mode.engine is not None:
                    hf.enable(mode.model, mode.engine)
                libc().malloc_trim(0)  # freed heap pages go back to the OS, so the step's growth shows
                with RSSPeak() as rss:
                    _train_step(mode, embeds, batches[0], sync)
                mode.measured.peak = rss.growth
        else:
            memory_measure = "none (CPU peak memory needs Linux with glibc)"
            for mode in modes:
                mode.measured.peak = None

    peak = bf16_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    measured_modes = [mode.measured for mode in modes]
    results = [mode_result(m, measured_modes[0], peak) for m in measured_modes]
    results.append(schedule_result(measured_modes, opts.schedule_steps, peak))
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
        "step_seconds": {m.name: m.times for m in measured_modes},
        "step_cpu_seconds": None if device.type == "cuda" else {m.name: m.cpu_times for m in measured_modes},
    }


def _run_one(mode: _Mode, batch: Batch, index: int, embedding: torch.nn.Module, opts: BenchOptions, shape: Shape,
             sync: Callable[[], None], hf: Any, measured: bool, device: torch.device) -> None:
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
    record = mode.measured
    record.times.append(seconds)
    if not cuda:  # the CPU time of a GPU step is the host's, not the step's
        record.cpu_times.append(cpu_seconds)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        record.peak = peak if record.peak is None else max(record.peak, peak)
    if mode.engine is None:
        rows, length = batch.shape
        record.tokens.append(rows * length)
        record.costs.append(padded_step_cost(shape, opts.layers, rows, length))
        return
    packed = mode.timer.last_plan.host
    record.tokens.append(packed.num_tokens)
    record.costs.append(plan_cost(shape, opts.layers, packed))
    record.overhead.append(mode.timer.seconds)


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
