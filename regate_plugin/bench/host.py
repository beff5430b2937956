"""The engine's host time per micro-batch at a dataset's scale (LLaVA-665k by default), against the
shortest 7b-width step over the same micro-batch (see ``regate_plugin.bench``)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ReGATEConfig
from ..engine import ReGATEEngine
from ..refcache import Fingerprint, RefCache
from .cost import ESTIMATE_LAYERS, REFERENCE_PEAK, SHAPES, plan_cost, training_flops
from .timing import synchronizer
from .workloads import HostWorkload, host_batch

HOST_MICRO_BATCHES = 12  # timed micro-batches of the host measurement, after 2 untimed ones


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
    sync = synchronizer(device)
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
            estimates.append(training_flops(plan_cost(shape, ESTIMATE_LAYERS, plan.host)) / reference_peak)
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
