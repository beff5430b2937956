"""`regate demo --arms ... --keep ...`: final accuracy against supervised-token share, per strategy.

Every seed is prepared once (data, pre-training, student, teacher pass) and shared by all its runs,
which go one after another in this process, dense first, then keep ratio by keep ratio. Each finished run is written to ``frontier.json`` at
once, so a killed sweep started again with the same settings goes on where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..atomic import write_atomic
from ..config import ReGATEConfig
from .. import demo_task as task
from ..hookspecs import hookimpl
from .runs import THREADS, Setup, _quiet, _threads, prepare, scaled_config, train_run

#: arm -> changes to the paper's scaled schedule (``random`` also scores by a seeded random draw;
#: ``loss-only`` is no strategy but a measurement: the paper's selection with elided words kept as input;
#: ``auto`` sets its own keep ratio per cycle, so it runs once per seed, whatever --keep says)
ARMS: dict[str, dict[str, Any]] = {
    "dense": {"keep_ratio": 1.0},
    "regate": {},
    "random": {},
    "ema-only": {"ref_weight": 0.0},
    "ref-only": {"score": "ref_only"},
    "learnable": {"score": "learnable"},
    "adaptive": {"selection": "adaptive"},
    "adaptive-learnable": {"selection": "adaptive", "score": "learnable"},
    "loss-only": {"elision": "loss"},
    "auto": {"keep_ratio": "auto"},
}
NEW_ARMS = ("learnable", "adaptive", "adaptive-learnable")
SWEEP_EVAL_POINTS = 10
#: seconds measured on this project's 2-core machine, for the estimate printed first
PREPARE_SECONDS, STEP_SECONDS, EVAL_SECONDS = 60.0, 0.035, 0.7
SHARE_LIMIT = 0.40  # acceptance: at most this share of dense's supervised tokens
ACCURACY_MARGIN = 0.01  # acceptance: within one point of dense's final accuracy


class RandomScore:
    """The ``random`` arm's score: uniform draws from a generator seeded by the run's seed, so the
    ablation is repeatable (a run of the demo, not a strategy for training: it has no saved state)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    @hookimpl
    def regate_score(self, ema: torch.Tensor, ref: torch.Tensor, config: ReGATEConfig) -> torch.Tensor:
        return torch.rand(ema.shape, generator=self.generator)


#: the keep-ratio field of an ``auto`` run's key
AUTO_KEY = "auto"


def run_key(arm: str, keep_ratio: float, seed: int) -> str:
    if arm == "auto":
        return f"{arm}|{AUTO_KEY}|{seed}"
    return f"{arm}|{1.0 if arm == 'dense' else keep_ratio:g}|{seed}"


def planned_runs(arms: Sequence[str], keeps: Sequence[float], seeds: Sequence[int]) -> list[tuple[str, float, int]]:
    """(arm, keep ratio, seed) of every run: dense of every seed (keep 1.0) first, then keep ratio by
    keep ratio in the given order, so a sweep stopped early has whole keep ratios over all seeds."""
    runs = [("dense", 1.0, seed) for seed in seeds if "dense" in arms]
    runs += [("auto", 0.0, seed) for seed in seeds if "auto" in arms]
    for keep in keeps:
        for seed in seeds:
            runs.extend((arm, keep, seed) for arm in arms if arm not in ("dense", "auto"))
    return runs


def estimate_seconds(runs: int, seeds: int, steps: int, eval_points: int) -> float:
    return seeds * PREPARE_SECONDS + runs * (steps * STEP_SECONDS + (eval_points + 1) * EVAL_SECONDS)


def arm_config(arm: str, keep_ratio: float, steps: int) -> ReGATEConfig:
    return scaled_config(steps).replace(**{"keep_ratio": keep_ratio, **ARMS[arm]})


def tokens_to_fraction(curve: Sequence[dict[str, Any]], target: float, dense_tokens: int) -> float | None:
    """Share of dense's supervised tokens after which ``curve`` first reaches ``target`` (None: never)."""
    reached = next((p["supervised_tokens"] for p in curve if p["val_accuracy"] >= target), None)
    return None if reached is None else reached / dense_tokens


def frontier_rows(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The schema's rows from the finished runs: share and accuracy relative to the same seed's dense."""
    rows = []
    for key, run in sorted(runs.items()):
        arm, keep, seed = key.split("|")
        dense = runs.get(run_key("dense", 1.0, int(seed)))
        if dense is None:
            continue
        target = 0.9 * dense["val_accuracy"]
        rows.append({
            "arm": arm, "keep_ratio": mean_sparse_ratio(run) if keep == AUTO_KEY else float(keep), "seed": int(seed),
            "supervised_share": run["supervised_tokens"] / dense["supervised_tokens"],
            "final_accuracy": run["val_accuracy"],
            "tokens_to_90pct_of_dense": tokens_to_fraction(run["curve"], target, dense["supervised_tokens"]),
        })
    return rows


def mean_sparse_ratio(run: dict[str, Any]) -> float:
    """An ``auto`` run's keep ratio: the mean over its sparse steps of the ratio each cycle chose."""
    steps = [ratio for ratio in run["step_keep_ratios"] if ratio < 1.0]
    return float(np.mean(steps)) if steps else 1.0


def acceptance(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per keep ratio at <= 40% of dense's tokens and new arm: the seeds where the paper's score ends
    more than a point below dense, and whether the new arm ends within a point on each of them."""
    final = {(r["arm"], r["keep_ratio"], r["seed"]): r for r in rows}
    dense = {r["seed"]: r["final_accuracy"] for r in rows if r["arm"] == "dense"}
    verdicts = []
    for keep in sorted({r["keep_ratio"] for r in rows if r["arm"] == "regate"}, reverse=True):
        paper = {s: final[("regate", keep, s)] for s in dense if ("regate", keep, s) in final}
        failing = [s for s, r in paper.items() if r["final_accuracy"] < dense[s] - ACCURACY_MARGIN - 1e-12]
        for arm in NEW_ARMS:
            mine = {s: final[(arm, keep, s)] for s in dense if (arm, keep, s) in final}
            if not mine:
                continue
            share = max(r["supervised_share"] for r in mine.values())
            within = [s for s in failing if s in mine and mine[s]["final_accuracy"] >= dense[s] - ACCURACY_MARGIN - 1e-12]
            verdicts.append({
                "arm": arm, "keep_ratio": keep, "max_supervised_share": share, "paper_fails_on_seeds": failing,
                "within_one_point_on": within,
                "accept": share <= SHARE_LIMIT and len(within) == len(failing) and all(s in mine for s in failing),
            })
    return verdicts


def format_frontier(rows: Sequence[dict[str, Any]]) -> str:
    """One line per (arm, keep): share, mean final accuracy, and each seed's points against dense."""
    dense = {r["seed"]: r["final_accuracy"] for r in rows if r["arm"] == "dense"}
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:  # auto's rows each hold their own mean ratio: one line, at their mean
        groups.setdefault((r["arm"], None if r["arm"] == "auto" else r["keep_ratio"]), []).append(r)
    groups = {(arm, float(f"{np.mean([r['keep_ratio'] for r in group]):.3g}") if keep is None else keep): group
              for (arm, keep), group in groups.items()}
    lines = [f"{'arm':20s}{'keep':>6s}{'share':>8s}{'accuracy':>10s}  points vs dense by seed"]
    for (arm, keep), group in sorted(groups.items(), key=lambda g: (-g[0][1], g[0][0])):
        group = sorted(group, key=lambda r: r["seed"])
        deltas = " ".join(f"{(r['final_accuracy'] - dense[r['seed']]) * 100:+5.1f}" for r in group)
        lines.append(f"{arm:20s}{keep:6g}{np.mean([r['supervised_share'] for r in group]):8.1%}"
                     f"{np.mean([r['final_accuracy'] for r in group]):10.3f}  {deltas}")
    return "\n".join(lines)


def plot_frontier(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Final accuracy against supervised-token share: one line per arm (seed means), dots per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    for i, arm in enumerate(arms):
        mine = [r for r in rows if r["arm"] == arm]
        # auto's rows each hold their own mean ratio: one point, the mean over seeds
        groups = [mine] if arm == "auto" else [[r for r in mine if r["keep_ratio"] == k]
                                                for k in sorted({r["keep_ratio"] for r in mine})]
        x = [np.mean([r["supervised_share"] for r in group]) for group in groups]
        y = [np.mean([r["final_accuracy"] for r in group]) for group in groups]
        color = f"C{i}"
        ax.plot([r["supervised_share"] for r in mine], [r["final_accuracy"] for r in mine], "o", ms=3, alpha=0.35, color=color)
        ax.plot(x, y, {"dense": "*", "auto": "D"}.get(arm, "-o"), ms=12 if arm == "dense" else 6, color=color, label=arm)
    ax.axvline(SHARE_LIMIT, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("supervised tokens trained, share of dense's")
    ax.set_ylabel("final held-out image-word accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    seeds = sorted({r["seed"] for r in rows})
    ax.set_title(f"regate demo frontier: {len(seeds)} seeds (dots), mean per keep ratio (lines)")
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path


def auto_ratio_course(run: dict[str, Any]) -> tuple[list[int], list[float]]:
    """An ``auto`` run's sparse steps and the ratio of each (the steps a cycle's choice applied to)."""
    steps = [step for step, ratio in enumerate(run["step_keep_ratios"]) if ratio < 1.0]
    return steps, [run["step_keep_ratios"][step] for step in steps]


def plot_auto_ratios(runs: dict[str, dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """The keep ratio ``auto`` chose along each seed's run (None without an auto run)."""
    autos = sorted(((int(key.split("|")[2]), run) for key, run in runs.items() if key.startswith("auto|")))
    if not autos:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for seed, run in autos:
        steps, ratios = auto_ratio_course(run)
        ax.plot(steps, ratios, ".", ms=2, label=f"seed {seed}: mean {mean_sparse_ratio(run):.3f}")
    config = arm_config("auto", 0.0, len(autos[0][1]["step_keep_ratios"]))
    ax.set_ylim(0, config.keep_max * 1.1)
    ax.set_xlabel("optimizer step (sparse steps)")
    ax.set_ylabel("keep ratio chosen")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, markerscale=4)
    ax.set_title(title or f"--keep-ratio auto within [{config.keep_min:g}, {config.keep_max:g}]")
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path


def load_runs(path: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The runs a previous sweep with the same settings finished (resume); none if it had others."""
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    if saved.get("settings") != settings:
        raise ValueError(f"{path} holds a sweep with other settings ({saved.get('settings')}): give another --out")
    return saved["runs"]


def run_frontier(arms: Sequence[str], keeps: Sequence[float], seeds: Sequence[int], steps: int, out: Path,
                 progress: bool = False, echo: Callable[[str], None] = print,
                 eval_points: int = SWEEP_EVAL_POINTS, variant: task.Variant = task.DEMO) -> dict[str, Any]:
    """Every planned run not yet in ``out/frontier.json``, seed by seed; the file is rewritten after each.
    ``variant``: another task of the demo's kind (recorded in the settings)."""
    settings = {"arms": list(arms), "keep": list(keeps), "seeds": list(seeds), "steps": steps, "eval_points": eval_points}
    if variant != task.DEMO:
        settings["task"] = {"free_words": variant.free_words, "question_types": list(variant.question_types)}
    path = out / "frontier.json"
    runs = load_runs(path, settings)
    plan = planned_runs(arms, keeps, seeds)
    todo = [r for r in plan if run_key(*r) not in runs]
    todo_seeds = sorted({seed for _, _, seed in todo})
    estimate = estimate_seconds(len(todo), len(todo_seeds), steps, eval_points)
    echo(f"frontier: {len(plan)} runs of {steps} steps ({len(plan) - len(todo)} done), {len(todo_seeds)} seed(s) to "
         f"prepare: estimated {estimate / 60:.0f} min of one idle core ({THREADS} thread; longer on a busy machine)")

    def save() -> dict[str, Any]:
        result = {"settings": settings, "rows": frontier_rows(runs), "runs": runs}
        write_atomic(path, (json.dumps(result, indent=1) + "\n").encode())
        return result

    result = save()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_quiet())
        stack.enter_context(_threads(THREADS))
        setups: dict[int, Setup] = {}
        for arm, keep, seed in todo:
            if seed not in setups:
                started = time.perf_counter()
                work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"regate-frontier-{seed}-")))
                setups[seed] = replace(prepare(steps, seed, work, progress, variant), eval_points=eval_points)
                echo(f"seed {seed}: prepared in {time.perf_counter() - started:.0f} s")
            started = time.perf_counter()
            key = run_key(arm, keep, seed)
            record = train_run(key.replace("|", "-"), arm_config(arm, keep, steps), setups[seed],
                               [RandomScore(seed)] if arm == "random" else ())
            runs[key] = record
            result = save()
            echo(f"  seed {seed} {arm:20s} keep {key.split('|')[1]:<5s} accuracy {record['val_accuracy']:.3f}  "
                 f"({time.perf_counter() - started:.0f} s)")
    return result
