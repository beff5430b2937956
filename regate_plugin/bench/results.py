"""A mode's figures from its measured steps, and the schedule-weighted row (see ``regate_plugin.bench``)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from ..config import ReGATEConfig
from ..schedule import sparse_step_count, token_share
from .cost import ideal_speedup, mfu, training_flops

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


@dataclass
class Measured:
    """What one mode's measured steps gave, step by step (CPU times on a CPU only; engine
    overhead only for the patched modes)."""

    name: str
    keep_ratio: float
    patched: bool
    times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    costs: list[float] = field(default_factory=list)
    overhead: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    peak: int | None = None


def mode_result(mode: Measured, padded: Measured, peak: float | None) -> dict[str, Any]:
    """The ``RESULT_FIELDS`` of a mode, relative to ``padded``; ``peak``: the device's bf16 FLOP/s."""
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
        "overhead_share": sum(mode.overhead) / sum(mode.times) if mode.patched else None,
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


def schedule_result(measured: list[Measured], num_steps: int, peak: float | None) -> dict[str, Any]:
    """The regate-schedule row: ``ReGATEConfig()``'s run of ``num_steps`` steps from the packed-dense
    and regate-<keep_ratio> measurements (``measured[0]`` is padded-dense)."""
    config = ReGATEConfig()
    by_name = {m.name: mode_result(m, measured[0], peak) for m in measured}
    return schedule_weighted(by_name[PACKED], by_name[f"regate-{config.keep_ratio:g}"], num_steps, config, by_name[PADDED])
