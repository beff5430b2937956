"""``regate bench``: the click command over the runner and the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import torch

from .cost import SHAPES
from .report import NOISE_RATIO, format_footer, format_header, format_host, format_table, noisy_modes
from .runner import CPU_SCALE, CPU_STEPS, GPU_SCALE, GPU_STEPS, SCHEDULE_STEPS, BenchOptions, run_benchmark
from .workloads import LLAVA_665K, PRESETS


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
@click.option("--host-samples", type=click.IntRange(min=0), default=LLAVA_665K.samples, show_default=True,
              help=f"Samples of the synthetic reference cache the engine's host time per micro-batch is measured "
                   f"at ({LLAVA_665K.units} units each, batch {LLAVA_665K.batch} x {LLAVA_665K.length}); 0 skips it.")
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
    the share of step time spent in ReGATE's own bookkeeping (units, selection, packing, EMA), and
    MFU on a GPU. Then the engine's host time per micro-batch at LLaVA-665k scale, against a
    7b-width step.
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
    if report["engine_host"] is not None:
        click.echo(format_host(report["engine_host"]))
    noisy = noisy_modes(report)
    if noisy:
        click.echo(
            f"warning: step times of {', '.join(noisy)} vary by more than {NOISE_RATIO:g}x between repetitions "
            "(a busy machine?): rerun, or raise --steps"
        )
    if json_path is not None:
        from ..atomic import write_atomic

        json_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(json_path, (json.dumps(report, indent=2) + "\n").encode())
        click.echo(f"wrote {json_path}")

