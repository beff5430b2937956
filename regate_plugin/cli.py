"""The ``regate`` command line."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__
from .config import ATTN_BACKENDS, SELECTIONS, ConfigError, ReGATEConfig
from .plugins import targets
from .schedule import sparse_step_count

_HELP = {
    "keep_ratio": "Share of supervised tokens kept on sparse steps (p_keep).",
    "cycle": "Length C of a dense/sparse cycle, in optimizer steps.",
    "dense_steps": "Dense steps F at the start of every cycle (they refresh the EMA).",
    "warmup": "All-dense optimizer steps before the first cycle.",
    "ema_beta": "Decay of the EMA of the student's per-token loss.",
    "ref_weight": "lambda in the score d = EMA + lambda * reference loss.",
    "selection": "Keep the top share of each sample, or of the whole micro-batch.",
    "attn_backend": "Varlen attention backend (env REGATE_ATTN_BACKEND overrides).",
    "loss_chunk_rows": "LM-head rows evaluated at once.",
}
_CHOICES = {"selection": SELECTIONS, "attn_backend": ATTN_BACKENDS}


def config_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add one ``--option`` per ReGATEConfig field and pass the validated config as ``config``."""
    fields = dataclasses.fields(ReGATEConfig)

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        values = {f.name: kwargs.pop(f.name) for f in fields}
        try:
            kwargs["config"] = ReGATEConfig(**values)
        except ConfigError as err:
            raise click.BadParameter(str(err)) from err
        return command(**kwargs)

    for f in reversed(fields):
        kind = click.Choice(_CHOICES[f.name]) if f.name in _CHOICES else f.type
        kind = {"float": float, "int": int, "str": str}.get(kind, kind) if isinstance(kind, str) else kind
        option = click.option(
            "--" + f.name.replace("_", "-"), f.name, type=kind, default=f.default, show_default=True, help=_HELP[f.name]
        )
        wrapper = option(wrapper)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="regate")
def main() -> None:
    """ReGATE: train LLaVA-style models faster on fewer tokens.

    \b
    1. regate score  ...   text-only teacher pass, once: builds the reference-loss cache
    2. regate train  ...   your usual launch line, with ReGATE on
    Run `regate COMMAND --help` for the options of each command.
    """


@main.command("targets")
def list_targets() -> None:
    """List the codebases ReGATE can patch, and whether each is usable here."""
    found = targets()
    if not found:
        click.echo("no targets installed")
        return
    for name, target in sorted(found.items()):
        missing = target.requirement()
        status = "ready" if missing is None else f"unavailable: {missing}"
        click.echo(f"{name:14s} {target.summary}  [{status}]")


@main.command("schedule")
@click.option("--steps", type=click.IntRange(min=1), default=5000, show_default=True, help="Optimizer steps of the run.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@config_options
def show_schedule(steps: int, as_json: bool, config: ReGATEConfig) -> None:
    """Show the dense/sparse schedule of a run and the share of supervised tokens it trains on."""
    sparse = sparse_step_count(steps, config)
    share = (steps - sparse * (1.0 - config.keep_ratio)) / steps
    summary = {"steps": steps, "dense_steps": steps - sparse, "sparse_steps": sparse, "token_share": share}
    if as_json:
        click.echo(json.dumps({**summary, "config": config.to_dict()}, indent=2))
        return
    click.echo(
        f"{steps} steps: {steps - sparse} dense, {sparse} sparse at keep ratio {config.keep_ratio:g}\n"
        f"supervised tokens trained: {share:.1%} of dense training (before per-sample rounding up)"
    )


@main.command("report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), help="Where to write the plot [RUN_DIR/regate_report.png].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def report_command(run_dir: Path, png: Path | None, as_json: bool) -> None:
    """Summarise a Trainer run with ReGATE: loss, keep ratio and tokens trained, with a plot."""
    from . import report

    try:
        run = report.read_run(run_dir)
    except (FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    facts = report.summary(run)
    try:
        facts["plot"] = str(report.plot(run, png or run_dir / "regate_report.png"))
    except ImportError:
        facts["plot"] = None
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    click.echo(report.format_summary(facts))
    click.echo(f"plot                  {facts['plot']}" if facts["plot"] else "plot                  (pip install matplotlib)")
