"""The ``regate`` command line."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import shlex
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__
from .attention import BackendUnavailable, UnsupportedAttention
from .collectives import close_process_group
from .config import ATTN_BACKENDS, AUTO, ELISIONS, SCORES, SELECTIONS, ConfigError, ReGATEConfig
from .engine import BatchError, BypassError
from .hookspecs import TargetRefusal
from .plugins import PluginError, targets
from .refcache import RefCache, RefCacheError
from .schedule import sparse_ceiling, sparse_step_count, token_share

_HELP = {
    "keep_ratio": "Share of supervised tokens kept on sparse steps (p_keep), or auto: each cycle's dense steps "
    "set it within --keep-min/--keep-max, lower while the tokens elided keep up with the kept ones.",
    "cycle": "Length C of a dense/sparse cycle, in optimizer steps.",
    "dense_steps": "Dense steps F at the start of every cycle (they refresh the EMA).",
    "warmup": "All-dense optimizer steps before the first cycle.",
    "ema_beta": "Decay of the EMA of the student's per-token loss.",
    "ref_weight": "lambda in the score d = EMA + lambda * reference loss.",
    "selection": "Keep the top share of each sample, of the whole micro-batch, or adaptive: a batch budget "
    "with one unit per sample at least and a cap.",
    "adaptive_cap": "Adaptive selection: a sample keeps at most ceil(cap * keep ratio * its units).",
    "score": "paper: EMA + lambda * ref; ref_only: ref; learnable: paper's, discounting words the student "
    "still predicts as badly as the teacher.",
    "irreducible_discount": "learnable score: factor on units whose target word the student predicts as badly as the teacher.",
    "elision": "input: elided tokens leave the LLM's input (saves compute); loss: they stay as input, only "
    "their loss goes (no saving; measures what the holes in the context cost).",
    "attn_backend": "Varlen attention backend (env REGATE_ATTN_BACKEND overrides).",
    "loss_chunk_rows": "LM-head rows evaluated at once.",
    "keep_min": "--keep-ratio auto: the least keep ratio it may choose.",
    "keep_max": "--keep-ratio auto: the most keep ratio it may choose (and its first).",
}
_CHOICES = {"selection": SELECTIONS, "score": SCORES, "elision": ELISIONS, "attn_backend": ATTN_BACKENDS}


class KeepRatio(click.ParamType):
    """A keep ratio: a number, or ``auto`` (ReGATEConfig checks the range)."""

    name = "RATIO|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float | str:
        if isinstance(value, (int, float)) or value == AUTO:
            return value
        try:
            return float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor {AUTO!r}", param, ctx)


_TYPES: dict[str, click.ParamType] = {"keep_ratio": KeepRatio()}


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
        kind = click.Choice(_CHOICES[f.name]) if f.name in _CHOICES else _TYPES.get(f.name, f.type)
        kind = {"float": float, "int": int, "str": str}.get(kind, kind) if isinstance(kind, str) else kind
        option = click.option(
            "--" + f.name.replace("_", "-"), f.name, type=kind, default=f.default, show_default=True, help=_HELP[f.name]
        )
        wrapper = option(wrapper)
    return wrapper


# ReGATE's own refusals: each message says what is wrong and what to do, so the CLI shows just that.
REFUSALS = (RefCacheError, BatchError, BypassError, PluginError, UnsupportedAttention, BackendUnavailable, TargetRefusal)


class _Group(click.Group):
    """Ends ReGATE's own refusals as one ``Error:`` line and exit status 1. Their message names the
    cause and the fix; raised from deep inside upstream's Trainer (a batch that does not fit the
    cache), a traceback through upstream's code would bury it."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except REFUSALS as err:
            raise click.ClickException(str(err)) from err


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="regate")
@click.option("--local_rank", "--local-rank", "local_rank", type=int, hidden=True,
              help="Set by the deepspeed launcher before the command; kept in $LOCAL_RANK.")
def main(local_rank: int | None) -> None:
    """ReGATE: train LLaVA-style models faster on fewer tokens.

    \b
    1. regate score  ...   text-only teacher pass, once: builds the reference-loss cache
    2. regate train  ...   your usual launch line, with ReGATE on
    Run `regate COMMAND --help` for the options of each command.
    """
    if local_rank is not None:
        os.environ["LOCAL_RANK"] = str(local_rank)


WIDTH = 100  # `regate targets` fits a terminal this wide


@main.command("targets")
def list_targets() -> None:
    """List the codebases ReGATE can patch, and whether each is usable here."""
    found = targets()
    if not found:
        click.echo("no targets installed")
        return
    indent = " " * 15
    for name, target in sorted(found.items()):
        missing = target.requirement()
        status = "ready" if missing is None else f"unavailable: {missing}"
        click.echo(textwrap.fill(target.summary, WIDTH, initial_indent=f"{name:14s} ", subsequent_indent=indent,
                                 break_on_hyphens=False))
        click.echo(textwrap.fill(f"[{status}]", WIDTH, initial_indent=indent, subsequent_indent=indent + " ",
                                 break_on_hyphens=False))
        for line in target.details:
            click.echo(textwrap.fill(line, WIDTH, initial_indent="  ", subsequent_indent="    ", break_on_hyphens=False))


@main.command("schedule")
@click.option("--steps", type=click.IntRange(min=1), default=5000, show_default=True, help="Optimizer steps of the run.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@config_options
def show_schedule(steps: int, as_json: bool, config: ReGATEConfig) -> None:
    """Show the dense/sparse schedule of a run and the share of supervised tokens it trains on."""
    sparse = sparse_step_count(steps, config)
    share = token_share(steps, config)
    summary = {"steps": steps, "dense_steps": steps - sparse, "sparse_steps": sparse, "token_share": share}
    if as_json:
        click.echo(json.dumps({**summary, "config": config.to_dict()}, indent=2))
        return
    if config.auto_keep:
        click.echo(
            f"{steps} steps: {steps - sparse} dense, {sparse} sparse at keep ratio auto (each cycle's, within "
            f"{config.keep_min:g}-{config.keep_max:g})\nsupervised tokens trained: at most {share:.1%} of dense training "
            f"(at keep {sparse_ceiling(config):g} throughout; before per-sample rounding up)"
        )
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


@main.command("score", context_settings={"ignore_unknown_options": True})
@click.option("--target", required=True, help="The codebase whose preprocessing builds the samples (see `regate targets`).")
@click.option("--teacher", required=True, help="The student's language model before multimodal training: a folder, "
              "or a hub id (org/name) already in the local Hugging Face cache.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Cache folder to create.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--shard-size", type=click.IntRange(min=1), default=1024, show_default=True, help="Samples per resumable shard.")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="Teacher precision; auto: bf16 on GPU, fp32 on CPU.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.argument("target_args", nargs=-1, type=click.UNPROCESSED)
def score_command(target: str, teacher: str, out: Path, batch_size: int, shard_size: int, dtype: str,
                  progress: bool, target_args: tuple[str, ...]) -> None:
    """Run the text-only teacher pass once and write the reference-loss cache.

    \b
    Arguments after `--` go to the target, e.g. for transformers' own classes:
      regate score --target hf --teacher base-lm/ --out refcache/ -- \\
          --dataset my_data:build_train_dataset --student my-llava/
    Under torchrun every rank scores its own shards and rank 0 merges them. Interrupted? Run the
    same command again: finished shards are kept. Every check (teacher, --out, the dataset against
    a finished or partial cache, tokenizers) comes before the teacher loads.
    """
    import torch

    from .refcache import RefCacheWriter
    from .scoring import (
        TokenizerMismatch, check_complete, check_tokenizers, existing_cache, init_distributed, load_teacher, score_dataset,
    )
    from .teacher import TeacherError, resolve_teacher

    spec = _target(target)
    if spec.scoring_source is None:
        raise click.ClickException(f"the {target} target has no teacher pass")
    try:
        teacher_dir = str(resolve_teacher(teacher))
        finished = existing_cache(out)
        source = spec.scoring_source(list(target_args), teacher)
        if finished is not None:
            check_complete(finished, source)
            click.echo(f"{out} is already complete for this setup: {finished.num_samples} samples, {finished.num_units} units")
            return
        check_tokenizers(source.tokenizer_fingerprint, source.load_tokenizer(teacher_dir), teacher)
    except (TeacherError, TokenizerMismatch) as err:
        raise click.ClickException(str(err)) from err
    rank, world, device = init_distributed()
    writer = RefCacheWriter(out, source.fingerprint, len(source), shard_size)  # refuses a partial run of another setup
    done, total = len(writer.shards()) - len(writer.pending()), len(writer.shards())
    if done and rank == 0:
        click.echo(f"resuming: {done} of {total} shards done")
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
        dtype, torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    cache = score_dataset(source, load_teacher(teacher_dir, device, torch_dtype), out, batch_size, shard_size, progress)
    if cache is not None:
        click.echo(f"wrote {out}: {cache.num_samples} samples, {cache.num_units} supervised units")
    close_process_group()


def _target(name: str):
    found = targets()
    if name not in found:
        raise click.BadParameter(f"unknown target {name!r}; installed: {', '.join(sorted(found)) or 'none'}", param_hint="--target")
    missing = found[name].requirement()
    if missing:
        raise click.ClickException(f"the {name} target cannot run here: {missing}")
    return found[name]


@main.command("inspect", context_settings={"ignore_unknown_options": True})
@click.argument("cache_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--target", help="Decode the extreme tokens through this target's samples (arguments after --).")
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True, help="Tokens to show at each end.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.argument("target_args", nargs=-1, type=click.UNPROCESSED)
def inspect_command(cache_dir: Path, target: str | None, top: int, as_json: bool,
                    target_args: tuple[str, ...]) -> None:
    """Check a reference cache: sizes, loss statistics, fingerprint, and the most and least
    vision-dependent answer tokens (the text alone predicts them worst and best)."""
    from . import cacheinfo
    from .refcache import RefCache, RefCacheError

    try:
        cache = RefCache.open(cache_dir)
    except RefCacheError as err:
        raise click.ClickException(str(err)) from err
    facts = cacheinfo.statistics(cache)
    if target:
        source = _target(target).scoring_source(list(target_args), "")
        expected = {k: v for k, v in source.fingerprint.to_dict().items() if k != "teacher"}
        differences = cache.differences(expected, source.samples)
        if differences:
            raise click.ClickException("the cache was built for another setup:\n  " + "\n  ".join(differences))
        high, low = cacheinfo.extreme_units(cache, top)
        facts["most_vision_dependent"] = [cacheinfo.describe_unit(cache, i, source, source.decode) for i in high]
        facts["least_vision_dependent"] = [cacheinfo.describe_unit(cache, i, source, source.decode) for i in low]
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    click.echo(f"cache        {facts['path']}")
    click.echo(f"samples      {facts['samples']:,} ({facts['samples_without_units']:,} without supervised tokens)")
    click.echo(f"units        {facts['units']:,} ({facts['units_per_sample_mean']:.1f} per sample)")
    pct = "  ".join(f"p{p}={v:.3f}" for p, v in facts["ref_loss_percentiles"].items())
    click.echo(f"ref loss     mean {facts['ref_loss_mean']:.3f}  {pct}")
    for key, value in facts["fingerprint"].items():
        click.echo(f"  {key:15s}{value}")
    for title, key in (("most vision-dependent", "most_vision_dependent"), ("least vision-dependent", "least_vision_dependent")):
        if key in facts:
            click.echo(f"{title} (highest/lowest reference loss):")
            for u in facts[key]:
                click.echo(f"  {u['ref_loss']:7.3f}  sample {u['sample']:>7} k={u['k']:<4} ...{u['context']!r} -> {u['token']!r}")
    if not target:
        click.echo("(add --target T -- <target args> to see the most and least vision-dependent tokens as text)")


@main.command("train", context_settings={"ignore_unknown_options": True})
@click.option("--target", required=True, help="The codebase to patch and launch (see `regate targets`).")
@click.option("--regate/--no-regate", "enabled", default=True, show_default=True,
              help="--no-regate runs upstream unchanged: the A/B baseline.")
@click.option("--ref-cache", type=click.Path(path_type=Path), help="Reference cache from `regate score`.")
@click.option("--packing-only", is_flag=True, help="Remove padding by packing, elide nothing (needs no cache).")
@click.option("--attn-implementation", help="Upstream attention for unpacked forwards [flash_attention_2 if "
              "flash-attn is installed, else sdpa].")
@click.option("--resume-without-regate-state", "resume_without_state", is_flag=True,
              help="Resume from a checkpoint saved without ReGATE (a baseline's): the EMA starts from the reference "
              "losses, the schedule at the resumed step.")
@click.option("--dry-run", is_flag=True, help="Print the resolved configuration and command, and exit.")
@config_options
@click.argument("target_args", nargs=-1, type=click.UNPROCESSED)
def train_command(target: str, enabled: bool, ref_cache: Path | None, packing_only: bool,
                  attn_implementation: str | None, resume_without_state: bool, dry_run: bool, config: ReGATEConfig,
                  target_args: tuple[str, ...]) -> None:
    """Run the target's own training with ReGATE, in this process (under deepspeed or torchrun too).

    \b
    Arguments after `--` are the upstream training arguments, unchanged:
      deepspeed $(command -v regate) train --target llava --ref-cache refcache/ -- \\
          --deepspeed scripts/zero3.json --model_name_or_path lmsys/vicuna-7b-v1.5 ...
    """
    spec = targets().get(target) if dry_run else None
    spec = spec or _target(target)
    if spec.launch is None:
        raise click.ClickException(f"the {target} target is enabled from your own script (hf.enable and attach), not "
                                   "launched: see docs/targets/hf.md, or `regate score --target hf` for its teacher pass")
    if enabled and not packing_only and ref_cache is None:
        raise click.UsageError("--regate needs --ref-cache (from `regate score`), or --packing-only")
    if resume_without_state and not enabled:
        raise click.UsageError("--resume-without-regate-state starts ReGATE on a checkpoint: drop it with --no-regate")
    if resume_without_state and "resume_without_state" not in inspect.signature(spec.apply).parameters:
        raise click.UsageError(f"the {target} target cannot resume without ReGATE state: drop --resume-without-regate-state")
    mode = "upstream (no ReGATE)" if not enabled else "packing only" if packing_only else "ReGATE"
    if dry_run:
        missing = spec.requirement()
        if missing is not None:
            click.echo(f"note: the {target} target is not installed here ({missing}); the real run would stop", err=True)
        status = "n/a" if ref_cache is None else "complete" if (ref_cache / "meta.json").is_file() else (
            "partial (rerun regate score)" if ref_cache.with_name(ref_cache.name + ".partial").is_dir() else "missing")
        resolved = {
            "target": target, "mode": mode, "config": config.to_dict() if enabled else None,
            "target_installed": "yes" if missing is None else f"no: {missing}",
            "ref_cache": str(ref_cache) if ref_cache else None, "ref_cache_status": status,
            "attn_implementation": upstream_attention(target, attn_implementation),
            "packed_attention": packed_attention(config) if enabled else None,
            "launcher": {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k in os.environ},
            "command": shlex.join([sys.argv[0], *sys.argv[1:]]),
            "upstream_args": shlex.join(target_args),
        }
        click.echo(json.dumps(resolved, indent=2))
        return
    if enabled and not packing_only:
        check_ref_cache(spec, ref_cache, list(target_args))
    if enabled:
        options = {"resume_without_state": True} if resume_without_state else {}  # targets without it keep working
        spec.apply(config, None if packing_only else str(ref_cache), **options)
    spec.launch(list(target_args), attn_implementation)
    close_process_group()


# Framework targets whose own arguments choose the attention of unpacked forwards (their launch refuses
# --attn-implementation): where the setting is read from.
FRAMEWORK_ATTENTION = {
    "llamafactory": "flash_attn in the YAML (LLaMA-Factory's own setting)",
    "swift": "--attn_impl among ms-swift's arguments",
}


def upstream_attention(target: str, requested: str | None) -> str:
    """The attention implementation upstream's own (unpacked) forwards will use, as the launch resolves it
    (a framework target: where its own setting is read from)."""
    if target in FRAMEWORK_ATTENTION:
        where = FRAMEWORK_ATTENTION[target]
        return f"refused: --attn-implementation does not apply here, set {where.split(' (')[0]}" if requested else where
    from regate_plugin.patches.upstream import resolved_attn_implementation

    return resolved_attn_implementation(requested)


def packed_attention(config: ReGATEConfig) -> str:
    """The varlen backend the packed forwards will run on this machine (bf16 on a GPU), and why."""
    import torch

    from .attention import AUTO_ORDER, BACKEND_ENV, why_unavailable

    forced_by = f"${BACKEND_ENV}" if os.environ.get(BACKEND_ENV) else "--attn-backend"
    choice = os.environ.get(BACKEND_ENV) or config.attn_backend
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice != "auto":
        reason = why_unavailable(choice, device, torch.bfloat16)
        return f"{choice} (from {forced_by})" + (f"; cannot run here: {reason}" if reason else "")
    if device.type != "cuda":
        return f"auto: sdpa here (no CUDA device); on a GPU the first of {', '.join(AUTO_ORDER)} that is installed"
    usable = [b for b in AUTO_ORDER if why_unavailable(b, device, torch.bfloat16) is None]
    return f"auto: {usable[0] if usable else 'sdpa (no varlen kernel installed: pip install regate-plugin[flash])'}"


def check_ref_cache(spec: Any, ref_cache: Path, target_args: list[str]) -> None:
    """Open the cache (present, whole, checksums) and compare it with the fingerprint fields this
    run's upstream arguments give cheaply (``source.expected()``: data files and a probe, tokenizer,
    visual tokens, max length), before upstream loads any weight: a wrong cache costs seconds, not
    minutes of model loading. The Trainer checks it again against the dataset and model it built."""
    RefCache.open(ref_cache, verify=False)  # a missing or truncated cache: refused before reading any data
    expected = None if spec.scoring_source is None else spec.scoring_source(target_args, "").expected()
    RefCache.open(ref_cache, expect=expected)


def _register_commands() -> None:
    from . import bench, demo, estimate

    main.add_command(bench.command)
    main.add_command(demo.command)
    main.add_command(estimate.make_command(config_options))


_register_commands()
