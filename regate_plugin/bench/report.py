"""The report: the results as a markdown table with its header and footer, and the noise check."""

from __future__ import annotations

from typing import Any

NOISE_RATIO = 1.5  # slowest / fastest measured step of a mode above which the run is flagged as noisy
HOST_BUDGET = 0.01  # the engine's host time per micro-batch may take at most this share of the step estimate
BACKEND_NAMES = {
    "sdpa": "one SDPA call per sample, a Python loop",
    "flash4": "flash-attn-4 varlen",
    "flash": "flash-attn varlen",
    "torch": "torch varlen_attn",
}


def format_table(report: dict[str, Any]) -> str:
    """The results as a markdown table; MFU beside the step time where the device's peak is known."""
    lines = [
        "| mode | keep | step ms (median) | MFU | peak MiB | LLM tokens/step | ideal speedup | measured speedup "
        "| CPU-time speedup | engine overhead |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        peak = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.1f}"
        overhead = "-" if r["overhead_share"] is None else f"{r['overhead_share']:.1%}"
        utilization = "-" if r.get("mfu") is None else f"{r['mfu']:.1%}"
        cpu = "-" if r.get("cpu_time_speedup") is None else f"{r['cpu_time_speedup']:.2f}x"
        lines.append(
            f"| {r['mode']} | {r['keep_ratio']:.3g} | {r['step_seconds_median'] * 1e3:.1f} | {utilization} | {peak} | "
            f"{r['llm_tokens_per_step']:.0f} | {r['ideal_speedup']:.2f}x | {r['measured_speedup']:.2f}x | {cpu} | {overhead} |"
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
    peak = report.get("bf16_peak_flops")
    utilization = (f"MFU: model FLOPs (cost model, x3 for backward) per second over the bf16 peak, "
                   f"{peak / 1e12:.0f} TFLOP/s" if peak else "MFU: - (no known bf16 peak for this device)")
    return (
        f"attention backend (packed modes): {backend} ({BACKEND_NAMES.get(backend, backend)}); "
        "padded-dense: transformers' sdpa with a padding mask\n"
        f"regate-schedule: {s['steps']} steps with ReGATEConfig() defaults: {s['dense_steps']} dense at "
        f"packed-dense cost, {s['sparse_steps']} sparse at regate-{s['config']['keep_ratio']:g} cost\n"
        f"{utilization}\n"
        f"peak memory: {report['peak_memory_measure']}"
    )


def format_host(host: dict[str, Any]) -> str:
    """The engine's host time per micro-batch at dataset scale, and its share of the step estimate."""
    w, parts = host["workload"], host["parts_seconds_median"]
    split = ", ".join(f"{name} {seconds * 1e3:.2f}" for name, seconds in parts.items())
    line = (
        f"engine host time per micro-batch at {w['name']} scale ({w['samples']} samples x {w['units_per_sample']} units, "
        f"batch {w['batch']} x {w['length']}, keep {w['keep_ratio']:g}, {host['torch_threads']} thread): "
        f"{host['host_seconds_median'] * 1e3:.2f} ms CPU (median of {host['micro_batches']}: {split} ms; wall "
        f"{host['wall_seconds_median'] * 1e3:.2f} ms) = {host['share']:.2%} of a "
        f"{host['step_estimate_seconds'] * 1e3:.0f} ms step ({host['step_estimate']})"
    )
    if host["share"] > HOST_BUDGET:
        line += f"\nwarning: above the {HOST_BUDGET:.0%} budget"
    return line
