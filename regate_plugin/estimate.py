"""``regate estimate``: will ReGATE help this run? Token composition, padding and per-step LLM FLOPs
from the dataset alone, before any GPU time is spent.

The samples come through the target's own scoring source (``context(i)``: the sample as the
student's LLM sees it, every visual position holding ``identity.VISUAL_MARKER``), or from a ``regate
bench`` workload preset; only tokenization and visual-token counts are used: no teacher, no weights.
Per sample: visual tokens (the marked positions), supervised tokens (the engine's units: positions
whose next label is a target), and prompt tokens (the rest).

Batches: ``--steps`` micro-batches of ``--batch-size`` samples, drawn as a shuffling sampler does
(a fresh permutation each epoch, the last batch of an epoch short), or length-grouped (each
epoch's permutation sorted by length within mega-batches of ``GROUP_BATCHES`` micro-batches, as
transformers' ``group_by_length``), each right-padded to its longest sample. One micro-batch per
optimizer step: the schedule's share of dense steps, hence every share below, does not depend on
how many micro-batches a step accumulates.

Modes, per step (forward FLOPs from ``bench.cost``, the cost model ``regate bench`` uses):

* padded dense: every layer and the LM head over all B*L positions (upstream);
* packed dense: each sample's tokens up to its last supervised position (the engine trims the tail
  after it, e.g. the final EOS, and drops samples without one), one attention segment per sample;
  the LM head over the supervised positions;
* regate: on each step the schedule's keep ratio p (the ``regate_keep_ratio`` hook, as the engine
  asks it: ``schedule.keep_ratio_at`` unless a plugin replaces it); a sample with n
  supervised tokens keeps k = ceil(p*n) of them (``selection.keep_quota``), and its row is trimmed
  after its last kept one. Approximation: which units the scores keep is not known before training,
  so the estimate takes them as a uniformly random k of the n, and uses the expectation of the
  row length and of its square over where the last kept unit falls (exact for random scores);
  per-batch and adaptive selection are taken as per-sample quotas (the same totals up to rounding).

Activation memory scales with the tokens a step holds: its share is the largest step's tokens over
padded dense's largest step (logits excluded).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import click
import numpy as np
import pluggy
import torch

from .bench.cost import Shape, StepFlops, ideal_speedup, padded_step_flops, step_flops
from .config import ReGATEConfig
from .plugins import checked_keep_ratio, first_result, plugin_manager
from .identity import VISUAL_MARKER
from .report import ESTIMATE_NAME
from .selection import keep_quota
from .units import IGNORE_INDEX

LITTLE = 0.02  # elision removing less than this share of padded dense's FLOPs: "little time to gain"
GROUP_BATCHES = 50  # micro-batches per mega-batch of the length-grouped sampler (transformers' default)
GROUP_FLAGS = ("--group_by_length", "--group-by-length", "--group_by_modality_length", "--group-by-modality-length")


@dataclass(frozen=True)
class LLMModel:
    """The language model's widths and depth: what the cost model needs."""

    shape: Shape
    layers: int


def _preset(name: str, hidden: int, heads: int, kv_heads: int, intermediate: int, vocab: int, layers: int) -> LLMModel:
    return LLMModel(Shape(name, hidden, heads, kv_heads, intermediate, vocab), layers)


MODEL_PRESETS: dict[str, LLMModel] = {
    m.shape.name: m
    for m in (
        _preset("llava-1.5-7b", 4096, 32, 32, 11008, 32000, 32),  # Vicuna-7B v1.5
        _preset("llava-1.5-13b", 5120, 40, 40, 13824, 32000, 40),  # Vicuna-13B v1.5
        _preset("videollama2-7b", 4096, 32, 8, 14336, 32000, 32),  # Mistral-7B-Instruct v0.2
        _preset("qwen2-vl-7b", 3584, 28, 4, 18944, 152064, 28),
        _preset("qwen2.5-vl-7b", 3584, 28, 4, 18944, 152064, 28),
        _preset("qwen2.5-vl-3b", 2048, 16, 2, 11008, 151936, 36),
    )
}
TEXT_CONFIG_KEYS = ("text_config", "llm_config", "language_config")


def model_from_config(values: dict[str, Any], name: str) -> LLMModel:
    """The LLM of a ``config.json``: its own fields, or those of its text model (LLaVA-style configs)."""
    for key in TEXT_CONFIG_KEYS:
        if isinstance(values.get(key), dict):
            values = {**values[key], "vocab_size": values[key].get("vocab_size", values.get("vocab_size"))}
            break
    try:
        heads = int(values["num_attention_heads"])
        shape = Shape(name, int(values["hidden_size"]), heads, int(values.get("num_key_value_heads") or heads),
                      int(values["intermediate_size"]), int(values["vocab_size"]))
        return LLMModel(shape, int(values["num_hidden_layers"]))
    except (KeyError, TypeError) as err:
        raise ValueError(f"{name} lacks the LLM field {err}: give a decoder's config.json (hidden_size, "
                         "intermediate_size, num_hidden_layers, num_attention_heads, vocab_size)") from None


def resolve_model(value: str) -> LLMModel:
    """``--model``: a preset name, a folder holding ``config.json``, or a config file."""
    if value in MODEL_PRESETS:
        return MODEL_PRESETS[value]
    path = Path(value)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"--model {value!r} is neither a preset ({', '.join(MODEL_PRESETS)}) nor a config.json "
                         "or a folder holding one")
    return model_from_config(json.loads(path.read_text()), str(path))


# ---------------------------------------------------------------------------------------------
# the scan: token counts per sample, and the expected packed row at each keep ratio
# ---------------------------------------------------------------------------------------------


class ContextSource(Protocol):
    """What the estimate reads of a target's ``ScoringSource``."""

    def __len__(self) -> int: ...

    def context(self, index: int) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class Tokens:
    """Per sample: real, visual and supervised token counts; per keep ratio, the kept supervised
    tokens and the expected packed row length and squared length (0 for a sample the engine drops)."""

    length: np.ndarray
    visual: np.ndarray
    supervised: np.ndarray
    kept: dict[float, np.ndarray]
    row: dict[float, np.ndarray]
    row_squared: dict[float, np.ndarray]

    @property
    def prompt(self) -> np.ndarray:
        return self.length - self.visual - self.supervised


def expected_row(columns: np.ndarray, keep_ratio: float, input_elision: bool) -> tuple[int, float, float]:
    """(kept units, E[row length], E[row length^2]) of a sample whose supervised positions are
    ``columns`` (ascending), when k = ceil(p*n) of its n units are kept uniformly at random and the
    row is trimmed after the last kept one; with input elision the elided units before it leave too.

    The last kept unit is the j-th (1-based) with probability C(j-1, k-1) / C(n, k), j = k..n."""
    n = len(columns)
    k = int(keep_quota(torch.tensor([n]), keep_ratio))
    if n == 0:
        return 0, 0.0, 0.0
    j = np.arange(k, n + 1)
    rows = columns[j - 1].astype(np.float64) + 1.0 - ((j - k) if input_elision else 0)
    if k == n:
        return k, float(rows[0]), float(rows[0]) ** 2
    # log C(j-1, k-1) up to a constant: the ratio from j to j+1 is j / (j-k+1)
    log_weight = np.concatenate([[0.0], np.cumsum(np.log(j[:-1] / (j[:-1] - k + 1.0)))])
    weight = np.exp(log_weight - log_weight.max())
    weight /= weight.sum()
    return k, float(weight @ rows), float(weight @ rows**2)


def scan(source: ContextSource, keep_ratios: Sequence[float], input_elision: bool = True,
         progress: bool = True) -> Tokens:
    """Read every sample once through ``source.context``: counts, and each keep ratio's expected row."""
    from tqdm.auto import tqdm

    size = len(source)
    length, visual, supervised = (np.zeros(size, dtype=np.int64) for _ in range(3))
    kept = {p: np.zeros(size, dtype=np.int64) for p in keep_ratios}
    row = {p: np.zeros(size) for p in keep_ratios}
    row_squared = {p: np.zeros(size) for p in keep_ratios}
    for i in tqdm(range(size), desc="scanning samples", unit="sample", disable=not progress):
        ids, labels = source.context(i)
        columns = torch.nonzero(labels[1:] != IGNORE_INDEX).flatten().numpy()
        length[i], visual[i], supervised[i] = ids.numel(), int((ids == VISUAL_MARKER).sum()), columns.size
        for p in keep_ratios:
            kept[p][i], row[p][i], row_squared[p][i] = expected_row(columns, p, input_elision)
    return Tokens(length, visual, supervised, kept, row, row_squared)


# ---------------------------------------------------------------------------------------------
# batches and the per-step estimate
# ---------------------------------------------------------------------------------------------


def draw_batches(lengths: np.ndarray, batch_size: int, steps: int, seed: int = 0, grouped: bool = False) -> list[np.ndarray]:
    """``steps`` micro-batches of sample indices: a new permutation every epoch, cut in order (the
    last batch of an epoch short); ``grouped``: each permutation sorted by length, longest first,
    within mega-batches of ``GROUP_BATCHES`` micro-batches."""
    rng = np.random.default_rng(seed)
    batches: list[np.ndarray] = []
    while len(batches) < steps:
        order = rng.permutation(len(lengths))
        if grouped:
            size = GROUP_BATCHES * batch_size
            order = np.concatenate([m[np.argsort(-lengths[m], kind="stable")] for m in np.split(order, range(size, len(order), size))])
        batches.extend(order[k : k + batch_size] for k in range(0, len(order), batch_size))
    return batches[:steps]


@dataclass(frozen=True)
class StepEstimate:
    """One step of one mode: forward FLOPs by part, LLM tokens, supervised tokens kept of all."""

    flops: StepFlops
    llm_tokens: float
    supervised_kept: float
    supervised_total: int


def padded_step(tokens: Tokens, batch: np.ndarray, model: LLMModel) -> StepEstimate:
    """Upstream's step: the batch right-padded to its longest sample."""
    length = int(tokens.length[batch].max())
    flops = padded_step_flops(model.shape, model.layers, len(batch), length)
    supervised = int(tokens.supervised[batch].sum())
    return StepEstimate(flops, float(len(batch) * length), supervised, supervised)


def packed_step(tokens: Tokens, batch: np.ndarray, model: LLMModel, keep_ratio: float) -> StepEstimate:
    """The engine's step at ``keep_ratio``: expected packed row, one segment per sample, LM head over
    the kept supervised tokens. A batch with nothing to train still runs one token (``trim_to_loss``)."""
    row = float(tokens.row[keep_ratio][batch].sum())
    squares = float(tokens.row_squared[keep_ratio][batch].sum())
    row, squares = (row, squares) if row > 0 else (1.0, 1.0)
    kept = float(tokens.kept[keep_ratio][batch].sum())
    flops = step_flops(model.shape, model.layers, row, squares, kept)
    return StepEstimate(flops, row, kept, int(tokens.supervised[batch].sum()))


def _distribution(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)), "p90": float(np.percentile(values, 90))}


def _mode_summary(steps: list[StepEstimate], padded: list[StepEstimate]) -> dict[str, Any]:
    count = len(steps)
    parts = {part: sum(getattr(s.flops, part) for s in steps) / count for part in ("linear", "attention", "head")}
    total = sum(parts.values())
    padded_total = sum(s.flops.total for s in padded) / count
    return {
        "flops_per_step": {**parts, "total": total},
        "ideal_speedup": ideal_speedup(padded_total, total),
        "flops_share": total / padded_total,
        "llm_tokens_per_step": sum(s.llm_tokens for s in steps) / count,
        "llm_token_share": sum(s.llm_tokens for s in steps) / sum(s.llm_tokens for s in padded),
        "supervised_share": sum(s.supervised_kept for s in steps) / max(1, sum(s.supervised_total for s in steps)),
        "activation_memory_share": max(s.llm_tokens for s in steps) / max(s.llm_tokens for s in padded),
    }


def padding_share(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    """Share of a padded batch's positions that are padding, over ``batches``."""
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1.0 - sum(int(lengths[b].sum()) for b in batches) / padded


def schedule(config: ReGATEConfig, steps: int, pm: pluggy.PluginManager | None = None) -> list[float]:
    """The keep ratio of each of ``steps`` optimizer steps, asked of the ``regate_keep_ratio`` hook as
    the engine asks it (the built-in ``schedule.keep_ratio_at`` unless a plugin replaces it)."""
    pm = pm or plugin_manager()
    return [checked_keep_ratio(*first_result(pm, "regate_keep_ratio", step=step, config=config), step=step)
            for step in range(steps)]


def estimate(tokens: Tokens, model: LLMModel, config: ReGATEConfig, batch_size: int, steps: int,
             grouped: bool = False, seed: int = 0, pm: pluggy.PluginManager | None = None) -> dict[str, Any]:
    """The estimate's JSON document: token composition, padding, and the three modes over ``steps``
    steps of the schedule (see the module docstring); ``tokens`` scanned at every keep ratio of it."""
    random_batches = draw_batches(tokens.length, batch_size, steps, seed)
    grouped_batches = draw_batches(tokens.length, batch_size, steps, seed, grouped=True)
    batches = grouped_batches if grouped else random_batches
    ratios = schedule(config, steps, pm)
    padded = [padded_step(tokens, b, model) for b in batches]
    dense = [packed_step(tokens, b, model, 1.0) for b in batches]
    regate = [packed_step(tokens, b, model, p) for b, p in zip(batches, ratios)]
    llm = tokens.length
    return {
        "samples": int(len(llm)),
        "model": {"name": model.shape.name, "hidden": model.shape.hidden, "intermediate": model.shape.intermediate,
                  "layers": model.layers, "heads": model.shape.heads, "kv_heads": model.shape.kv_heads,
                  "vocab": model.shape.vocab},
        "batch_size": batch_size,
        "steps": steps,
        "seed": seed,
        "sampler": "length-grouped" if grouped else "random",
        "config": config.to_dict(),
        "sparse_steps": sum(p < 1.0 for p in ratios),
        "tokens_per_sample": {"visual": _distribution(tokens.visual), "prompt": _distribution(tokens.prompt),
                              "supervised": _distribution(tokens.supervised), "llm": _distribution(llm)},
        "supervised_share_of_llm_tokens": float(tokens.supervised.sum() / max(1, llm.sum())),
        "padding_share": {"random": padding_share(llm, random_batches), "length-grouped": padding_share(llm, grouped_batches)},
        "modes": {"padded-dense": _mode_summary(padded, padded), "packed-dense": _mode_summary(dense, padded),
                  "regate": _mode_summary(regate, padded)},
    }


def verdict(report: dict[str, Any]) -> str:
    """One line in plain words: what packing saves, what ReGATE adds on top, and why."""
    modes = report["modes"]
    packing = 1.0 - modes["packed-dense"]["flops_share"]
    if report["sparse_steps"] == 0:
        return (f"packing removes {packing:.0%} of the LLM's FLOPs; ReGATE elides nothing: none of the "
                f"{report['steps']} steps is sparse (warmup {report['config']['warmup']}): give --steps of your run")
    more = modes["packed-dense"]["flops_share"] - modes["regate"]["flops_share"]
    answers = report["supervised_share_of_llm_tokens"]
    line = (f"packing removes {packing:.0%} of the LLM's FLOPs; ReGATE at keep {_keep(report['config'])} "
            f"removes {more:.0%} more (answers are {answers:.0%} of tokens)")
    if more < LITTLE:
        line += ": little time to gain from elision here; its gain would be learning per token"
    return line


def _keep(config: dict[str, Any]) -> str:
    """The keep ratio as the estimate used it: ``auto`` decides during training, so it is estimated at
    its ceiling (``keep_max``, what the schedule's default answer gives), the most it can spend."""
    ratio = config["keep_ratio"]
    return f"{ratio:g}" if not isinstance(ratio, str) else f"auto (estimated at its ceiling --keep-max {config['keep_max']:g})"


def _flops(value: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} FLOP"


def format_estimate(report: dict[str, Any]) -> str:
    m, c = report["model"], report["config"]
    lines = [
        f"{report['samples']:,} samples; model {m['name']} (hidden {m['hidden']}, intermediate {m['intermediate']}, "
        f"{m['layers']} layers, {m['heads']} heads, {m['kv_heads']} kv heads, vocab {m['vocab']:,})",
        "tokens per sample   mean     p50      p90",
    ]
    for name, key in (("visual", "visual"), ("prompt", "prompt"), ("supervised", "supervised"), ("LLM (all)", "llm")):
        d = report["tokens_per_sample"][key]
        lines.append(f"  {name:<16}{d['mean']:8.1f} {d['p50']:8.1f} {d['p90']:8.1f}")
    pad = report["padding_share"]
    lines += [
        f"supervised share of LLM tokens: {report['supervised_share_of_llm_tokens']:.1%}",
        f"padding at micro-batch {report['batch_size']}: {pad['random']:.1%} of padded positions with random batches, "
        f"{pad['length-grouped']:.1%} length-grouped (the estimate uses {report['sampler']} batches)",
        f"schedule: {report['steps']} steps, {report['steps'] - report['sparse_steps']} dense + {report['sparse_steps']} "
        f"sparse at keep {_keep(c)} (warmup {c['warmup']}, cycle {c['cycle']}, {c['dense_steps']} dense)",
        "",
        "| mode | linear | attention | LM head | total per step | ideal speedup | LLM tokens/step | supervised trained "
        "| activation memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["modes"].items():
        f = r["flops_per_step"]
        lines.append(f"| {name} | {_flops(f['linear'])} | {_flops(f['attention'])} | {_flops(f['head'])} | "
                     f"{_flops(f['total'])} | {r['ideal_speedup']:.2f}x | {r['llm_tokens_per_step']:,.0f} | "
                     f"{r['supervised_share']:.1%} | {r['activation_memory_share']:.0%} |")
    lines += ["(forward FLOPs of the LLM; backward about twice as much in every mode)", f"verdict: {verdict(report)}"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# a `regate bench` workload as a dataset
# ---------------------------------------------------------------------------------------------


class WorkloadSource:
    """The samples of a ``regate bench`` workload preset (scale 1) as a scoring source's ``context``."""

    def __init__(self, preset: str, num_samples: int, seed: int = 0) -> None:
        from .bench.workloads import PRESETS, make_samples

        self.samples = make_samples(PRESETS[preset], num_samples, seed)

    def __len__(self) -> int:
        return len(self.samples)

    def context(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.samples[index]
        ids = sample.input_ids.clone()
        ids[sample.visual_start : sample.visual_start + sample.visual_tokens] = VISUAL_MARKER
        return ids, sample.labels


def uses_length_grouping(upstream_args: Sequence[str]) -> bool:
    """Whether the upstream arguments turn on a length-grouped sampler (``--group_by_length`` and
    LLaVA's ``--group_by_modality_length``, bare or followed by a true value)."""
    args = list(upstream_args)
    for i, arg in enumerate(args):
        flag, _, value = arg.partition("=")
        if flag in GROUP_FLAGS:
            value = value or (args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else "true")
            return value.lower() in ("true", "1", "yes")
    return False


def make_command(config_options: Callable[[Callable[..., Any]], Callable[..., Any]]) -> click.Command:
    """The ``estimate`` command, with ``regate train``'s ReGATE options (``cli.config_options``)."""
    from .bench.workloads import PRESETS as WORKLOADS

    @click.command("estimate", context_settings={"ignore_unknown_options": True, "help_option_names": ["-h", "--help"],
                                                 "max_content_width": 100})
    @click.option("--target", help="The codebase whose preprocessing builds the samples (see `regate targets`); "
                  "the arguments after -- are its upstream arguments.")
    @click.option("--workload", type=click.Choice(sorted(WORKLOADS)),
                  help="Instead of --target: a `regate bench` workload preset's synthetic samples (scale 1).")
    @click.option("--workload-samples", type=click.IntRange(min=1), default=4096, show_default=True,
                  help="With --workload: samples to draw.")
    @click.option("--model", default="llava-1.5-7b", show_default=True,
                  help=f"The LLM's widths: a config.json, a folder holding one, or a preset ({', '.join(MODEL_PRESETS)}).")
    @click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Micro-batch size per device.")
    @click.option("--steps", type=click.IntRange(min=1), help="Optimizer steps of the run [one epoch: samples / batch size].")
    @click.option("--sampler", type=click.Choice(["auto", "random", "length-grouped"]), default="auto", show_default=True,
                  help="How batches are drawn (padding depends on it); auto: length-grouped when the upstream "
                  "arguments after -- turn on group_by_length or group_by_modality_length (a config file's "
                  "settings are not read: pass --sampler).")
    @click.option("--seed", type=int, default=0, show_default=True, help="Seed of the batch order.")
    @click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
                  help=f"Also write the estimate here (as RUN_DIR/{ESTIMATE_NAME}, `regate report RUN_DIR` shows it).")
    @click.option("--progress/--no-progress", default=True, show_default=True)
    @config_options
    @click.argument("target_args", nargs=-1, type=click.UNPROCESSED)
    def command(target: str | None, workload: str | None, workload_samples: int, model: str, batch_size: int,
                steps: int | None, sampler: str, seed: int, json_path: Path | None, progress: bool,
                config: ReGATEConfig, target_args: tuple[str, ...]) -> None:
        """Estimate, from the dataset alone, what packing and ReGATE save per step.

        \b
        No teacher, no weights: the samples' tokenization and visual-token counts only, e.g.
          regate estimate --target hf --model my-llava/ --batch-size 16 -- \\
              --dataset my_data:build_train_dataset --student my-llava/
        Prints the token composition per sample, the padding at the micro-batch size, and the
        forward FLOPs per step (linear, attention, LM head) of padded dense, packed dense and
        ReGATE under the given schedule, with the ideal speedups and a verdict.
        """
        try:
            llm = resolve_model(model)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--model") from err
        if (target is None) == (workload is None):
            raise click.UsageError("give --target T (with its upstream arguments after --) or --workload PRESET")
        clock = [time.perf_counter()]

        def lap() -> float:
            clock.append(time.perf_counter())
            return clock[-1] - clock[-2]

        source = WorkloadSource(workload, workload_samples, seed) if workload else _source(target, list(target_args))
        seconds = {"source": lap()}
        steps = steps or math.ceil(len(source) / batch_size)
        tokens = scan(source, sorted({1.0, *schedule(config, steps)}), config.elision == "input", progress)
        seconds["scan"] = lap()
        grouped = sampler == "length-grouped" or (sampler == "auto" and uses_length_grouping(target_args))
        report = estimate(tokens, llm, config, batch_size, steps, grouped, seed)
        seconds["estimate"] = lap()
        report["dataset"] = f"workload {workload}" if workload else f"target {target}"
        report["verdict"] = verdict(report)
        report["seconds"] = seconds
        click.echo(format_estimate(report))
        click.echo(f"seconds: {seconds['source']:.1f} building the samples, {seconds['scan']:.1f} scanning them, "
                   f"{seconds['estimate']:.1f} estimating")
        if json_path is not None:
            from .atomic import write_atomic

            json_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(json_path, (json.dumps(report, indent=2) + "\n").encode())
            click.echo(f"wrote {json_path}")

    return command


def _source(name: str, target_args: list[str]) -> ContextSource:
    from .plugins import targets

    found = targets()
    if name not in found:
        raise click.BadParameter(f"unknown target {name!r}; installed: {', '.join(sorted(found)) or 'none'}",
                                 param_hint="--target")
    spec = found[name]
    if spec.scoring_source is None:
        raise click.ClickException(f"the {name} target has no scoring source to read its samples through: "
                                   "estimate with --target hf (your dataset as --dataset MOD:FN) or --workload")
    missing = spec.requirement()
    if missing:
        raise click.ClickException(f"the {name} target cannot run here: {missing}")
    return spec.scoring_source(target_args, "")
