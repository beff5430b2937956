"""`regate demo`: the command."""

from __future__ import annotations

import importlib.util
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from .frontier import ARMS, acceptance, format_frontier, plot_auto_ratios, plot_frontier, run_frontier
from .report import format_table, plot
from .. import demo_task as task
from .runs import DEFAULT_STEPS


def _arms(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    arms = [a.strip() for a in value.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or "dense" not in arms:
        raise click.BadParameter(f"{value!r}: choose among {','.join(ARMS)}, dense included (the reference)")
    return arms


def _keeps(ctx: click.Context, param: click.Parameter, value: str) -> list[float]:
    try:
        keeps = [float(k) for k in value.split(",")]
    except ValueError:
        keeps = []
    if not keeps or not all(0.0 < k < 1.0 for k in keeps):
        raise click.BadParameter(f"{value!r}: give comma-separated keep ratios, each in (0, 1), e.g. 0.5,0.25,0.1")
    return keeps


def run_sweep(arms: list[str], keeps: list[float], seeds: list[int], steps: int, out: Path, progress: bool,
              variant: task.Variant = task.DEMO) -> None:
    """The frontier sweep, then its table, its acceptance verdicts and frontier.png."""
    try:
        result = run_frontier(arms, keeps, seeds, steps, out, progress, echo=click.echo, variant=variant)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    click.echo("")
    click.echo(format_frontier(result["rows"]))
    for v in acceptance(result["rows"]):
        click.echo(f"acceptance {v['arm']} keep {v['keep_ratio']:g}: share <= {v['max_supervised_share']:.1%}, paper's "
                   f"score > 1 point below dense on seeds {v['paper_fails_on_seeds']}, {v['arm']} within a point on "
                   f"{v['within_one_point_on']} [{'ok' if v['accept'] else 'FAIL'}]")
    try:
        pngs = [plot_frontier(result["rows"], out / "frontier.png"), plot_auto_ratios(result["runs"], out / "auto_ratios.png")]
    except ImportError:
        pngs = []
    click.echo(f"wrote {out / 'frontier.json'}" + (" and " + ", ".join(str(p) for p in pngs if p) if pngs
                                                    else " (pip install matplotlib for frontier.png)"))


def _question_types(value: str | None) -> tuple[str, ...] | None:
    """--question-types as the task checks it (an unknown type, or none: one usage error); None: all."""
    if value is None:
        return None
    try:
        return task.Variant(question_types=tuple(t.strip() for t in value.split(",") if t.strip())).question_types
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--question-types") from err


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
@click.option("--steps", type=click.IntRange(min=10), default=None,
              help=f"Optimizer steps of each run; the schedule scales with it (shorter sweeps end before dense "
              f"has learned every kind of image word).  [default: {DEFAULT_STEPS}]")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the data, the models and the batch order.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for demo.png, demo.json and report.txt (created if missing)  "
              "[default: ./regate-demo-<date>-<time>; with --arms: required].")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the teacher, the student, the reference cache (try `regate inspect WORK/refcache`) "
              "and the Trainer folders here; by default a temporary folder, removed at the end.")
@click.option("--arms", callback=_arms, help="Sweep these strategies (comma-separated, of "
              f"{','.join(ARMS)}) at every --keep, over --seeds, into --out/frontier.json and frontier.png.")
@click.option("--keep", callback=_keeps, default="0.5,0.25,0.1", show_default=True,
              help="With --arms: keep ratios of the sparse steps (comma-separated, each in (0, 1)).")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --arms: seeds SEED..SEED+N-1 (--seed, default 0), each prepared once and shared by its runs.")
@click.option("--question-types", callback=lambda ctx, param, value: _question_types(value), default=None,
              help=f"With --arms: a task of only these question types (comma-separated, of "
              f"{','.join(task.QUESTION_TYPES)})  [default: all]")
@click.option("--free-words/--no-free-words", default=True, show_default=True,
              help="With --arms: --no-free-words gives every free slot its first word (the text then predicts it).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")
def command(steps: int | None, seed: int, out: Path | None, work: Path | None, arms: list[str] | None,
            keep: list[float], seeds: int, question_types: tuple[str, ...] | None, free_words: bool,
            progress: bool) -> None:
    """Train a tiny LLaVA dense and with ReGATE on a toy visual QA task, and compare.

    \b
    Everything is built on the spot, on the CPU (no GPU, no downloads; needs transformers):
      1. a picture-question-answer task drawn in code, whose answers are templates with a few
         words (colour, shape, count, corner) that only the picture tells;
      2. a tiny language model trained on the task's text: the teacher and the student's backbone;
      3. the teacher pass (what `regate score --target hf` runs);
      4. two Trainer runs with the same seed and steps: dense, and ReGATE with the paper's
         schedule scaled to --steps;
      5. a table of tokens, seconds and held-out accuracy on the image words, written with
         demo.png (accuracy against supervised tokens and training seconds) and demo.json into
         --out, by default a new folder ./regate-demo-<date>-<time>, named at the end.
    The default run took 4-8 minutes on two CPU cores shared with other jobs (measured: 4 min 13 s, and
    7 min 51 s at load average 5).

    With --arms, the frontier instead: final accuracy against the share of dense's supervised
    tokens for every arm and keep ratio (dense; regate, the paper's; random, ema-only, ref-only: its
    ablations; learnable, adaptive, adaptive-learnable: ReGATEConfig's score and selection
    variants; loss-only: the paper's selection with the elided words kept as input, which
    measures what the holes in the context cost). Finished runs are saved as they end; the same
    command again resumes.
    """
    missing = [name for name in ("transformers", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise click.ClickException(f"regate demo needs {' and '.join(missing)}: pip install 'regate-plugin[demo]'")
    if work is not None:
        if work.exists() and any(work.iterdir()):
            raise click.BadParameter(f"{work} is not empty; give a new or empty folder", param_hint="--work")
        work.mkdir(parents=True, exist_ok=True)
    variant = task.Variant(free_words, question_types or task.QUESTION_TYPES)
    if arms is not None:
        if out is None or work is not None:
            raise click.UsageError("--arms writes --out/frontier.json and resumes from it: give --out (and no --work)")
        check_writable(out)
        run_sweep(arms, keep, list(range(seed, seed + seeds)), steps or DEFAULT_STEPS, out, progress, variant)
        return
    if variant != task.DEMO:
        raise click.UsageError("--question-types and --no-free-words change the task of a sweep: use them with --arms")
    out = out or Path(time.strftime("regate-demo-%Y%m%d-%H%M%S"))
    check_writable(out)
    steps = steps or DEFAULT_STEPS
    from .. import demo  # through the package, where tests replace run_demo

    result = demo.run_demo(steps, seed, progress, echo=click.echo, work=work)
    report = text_report(result)
    click.echo("")
    click.echo(report)
    write_results(result, report, out)


def text_report(result: dict[str, Any]) -> str:
    """The table, and why a shortened run can fail the acceptance, which is set for the default length."""
    table = format_table(result)
    c = result["comparison"]
    passed = c["accept_token_share"] and c["accept_accuracy"] and c["accept_curve"]
    if passed or result["steps"] >= DEFAULT_STEPS:
        return table
    return (f"{table}\n(the acceptance is set for the default {DEFAULT_STEPS:,} steps: a {result['steps']:,}-step run "
            "ends before dense has learned every kind of image word, so FAIL is expected here)")


def write_results(result: dict[str, Any], report: str, out: Path) -> None:
    """demo.json, report.txt and demo.png into ``out``, and one line that names the folder."""
    from ..atomic import write_atomic

    write_atomic(out / "demo.json", (json.dumps(result, indent=2) + "\n").encode())
    write_atomic(out / "report.txt", (report + "\n").encode())
    try:
        png = plot(result, out / "demo.png")
    except ImportError:
        png = None
    picture = "demo.png (the picture), " if png else ""
    click.echo(f"results in {out}/: {picture}demo.json, report.txt"
               + ("" if png else " (pip install matplotlib for demo.png)"))
