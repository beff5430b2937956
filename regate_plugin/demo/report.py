"""Curves and report: the acceptance numbers of two accuracy curves, the demo's table and plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import demo_task as task

#: curves are compared after a trailing moving average over this many evaluations: one evaluation of a
#: model still training at a high learning rate moves by a few points from one point to the next
SMOOTHING = 3
TOKEN_SHARE_LIMIT = 0.62  # acceptance: ReGATE trains on at most this share of dense's tokens
ACCURACY_MARGIN = 0.01  # acceptance: final accuracy at least dense's minus one point
CURVE_TOLERANCE = 0.0  # acceptance: ReGATE's curve at or above dense's at equal supervised tokens


def _interp(curve: Sequence[dict[str, float]], tokens: np.ndarray) -> np.ndarray:
    xs = np.array([p["supervised_tokens"] for p in curve], dtype=np.float64)
    ys = np.array([p["val_accuracy"] for p in curve], dtype=np.float64)
    return np.interp(tokens, xs, ys)


def smoothed(curve: Sequence[dict[str, Any]], window: int = SMOOTHING) -> list[dict[str, Any]]:
    """The curve with each ``val_accuracy`` replaced by the mean of it and the ``window - 1`` before it."""
    accuracy = [p["val_accuracy"] for p in curve]
    return [{**p, "val_accuracy": float(np.mean(accuracy[max(0, i - window + 1): i + 1]))} for i, p in enumerate(curve)]


def compare_curves(dense_curve: Sequence[dict[str, float]], regate_curve: Sequence[dict[str, float]],
                   tolerance: float = CURVE_TOLERANCE, window: int = SMOOTHING) -> dict[str, Any]:
    """The acceptance numbers from two curves (lists of {step, supervised_tokens, val_accuracy},
    supervised tokens increasing, the last point the end of the run).

    token_share: ReGATE's supervised tokens / dense's at the end. final accuracies and their
    difference (raw, the last evaluation of each run). Curves: both smoothed (``smoothed(curve,
    window)``; window 1 compares the raw points), interpolated linearly in supervised tokens and
    compared at every point of either curve inside the range both cover, but for the shared start
    (both runs begin with the same model at 0 tokens): exact for piecewise-linear curves, whose
    difference is extreme at those points. ``min_gap`` is the smallest ReGATE - dense accuracy there;
    ``mean_gap`` the gap averaged over supervised tokens across that range.
    ``regate_tokens_to_dense_final``: the share of dense's tokens after which ReGATE's curve first
    reaches dense's final accuracy (None if it never does).
    """
    for name, curve in (("dense", dense_curve), ("regate", regate_curve)):
        if len(curve) < 2:
            raise ValueError(f"the {name} curve needs at least two points, has {len(curve)}")
        tokens = [p["supervised_tokens"] for p in curve]
        if any(b <= a for a, b in zip(tokens, tokens[1:])):
            raise ValueError(f"the {name} curve's supervised tokens must increase: {tokens}")
    dense_total, regate_total = dense_curve[-1]["supervised_tokens"], regate_curve[-1]["supervised_tokens"]
    dense_final, regate_final = dense_curve[-1]["val_accuracy"], regate_curve[-1]["val_accuracy"]
    low = max(dense_curve[0]["supervised_tokens"], regate_curve[0]["supervised_tokens"])
    high = min(dense_total, regate_total)
    grid = np.unique([p["supervised_tokens"] for p in (*dense_curve, *regate_curve) if low < p["supervised_tokens"] <= high])
    if grid.size == 0:
        raise ValueError(f"the curves share no supervised-token range beyond their start ({low:g})")
    dense_smooth, regate_smooth = smoothed(dense_curve, window), smoothed(regate_curve, window)
    gaps = _interp(regate_smooth, grid) - _interp(dense_smooth, grid)
    fine = np.linspace(low, high, 2001)
    mean_gap = float(np.mean(_interp(regate_smooth, fine) - _interp(dense_smooth, fine)))
    worst = int(np.argmin(gaps))
    reached = next((p["supervised_tokens"] for p in regate_curve if p["val_accuracy"] >= dense_final), None)
    token_share = regate_total / dense_total
    return {
        "token_share": token_share,
        "dense_final_accuracy": dense_final,
        "regate_final_accuracy": regate_final,
        "accuracy_difference": regate_final - dense_final,
        "curve_points_compared": int(grid.size),
        "curve_token_range": [float(low), float(high)],
        "min_gap": float(gaps[worst]),
        "min_gap_at_tokens": float(grid[worst]),
        "mean_gap": mean_gap,
        "curve_tolerance": tolerance,
        "curve_smoothing": window,
        "regate_tokens_to_dense_final": None if reached is None else reached / dense_total,
        "accept_token_share": token_share <= TOKEN_SHARE_LIMIT,
        "accept_accuracy": regate_final >= dense_final - ACCURACY_MARGIN - 1e-12,
        "accept_curve": bool(gaps[worst] >= -tolerance - 1e-12),
    }


def format_table(result: dict[str, Any]) -> str:
    dense, regate = result["runs"]["dense"], result["runs"]["regate"]
    c = result["comparison"]

    def row(label: str, a: str, b: str) -> str:
        return f"{label:34s}{a:>14s}{b:>22s}"

    share = regate["supervised_tokens"] / dense["supervised_tokens"]
    llm_share = regate["llm_tokens"] / dense["llm_tokens"]
    lines = [
        row("", "dense", "regate"),
        row("optimizer steps", f"{dense['optimizer_steps']:,}", f"{regate['optimizer_steps']:,}"),
        row("supervised tokens trained", f"{dense['supervised_tokens']:,}", f"{regate['supervised_tokens']:,} ({share:.1%})"),
        row("LLM tokens processed", f"{dense['llm_tokens']:,}", f"{regate['llm_tokens']:,} ({llm_share:.1%})"),
        row("training seconds (no eval)", f"{dense['train_seconds']:.1f}", f"{regate['train_seconds']:.1f}"),
        row("held-out image-word accuracy", f"{dense['val_accuracy']:.3f}", f"{regate['val_accuracy']:.3f}"),
    ]
    for kind in task.KINDS:
        lines.append(row(f"  {kind}", f"{dense['val_accuracy_by_kind'][kind]:.3f}",
                         f"{regate['val_accuracy_by_kind'][kind]:.3f}"))
    reached = c["regate_tokens_to_dense_final"]
    lines += [
        "",
        f"accuracy: {result['accuracy_measure']}",
        f"at equal supervised tokens (curves averaged over {c['curve_smoothing']} evaluations; "
        f"{c['curve_points_compared']} points up to {c['curve_token_range'][1]:,.0f}): "
        f"regate - dense accuracy min {c['min_gap'] * 100:+.1f} points (at {c['min_gap_at_tokens']:,.0f} tokens), "
        f"mean {c['mean_gap'] * 100:+.1f} points",
        "regate reached dense's final accuracy " + (
            f"after {reached:.1%} of dense's supervised tokens" if reached is not None else "not within its run"),
        acceptance_line(c),
    ]
    return "\n".join(lines)


def acceptance_line(comparison: dict[str, Any]) -> str:
    """The three acceptance checks of ``compare_curves``, each marked ok or FAIL."""
    def mark(key: str) -> str:
        return "ok" if comparison[key] else "FAIL"

    return (f"acceptance: tokens <= {TOKEN_SHARE_LIMIT:.0%} of dense [{mark('accept_token_share')}], "
            f"final accuracy >= dense - {ACCURACY_MARGIN * 100:g} point [{mark('accept_accuracy')}], "
            f"curve at or above dense's [{mark('accept_curve')}]")


def headline(result: dict[str, Any]) -> str:
    """What the picture must say without its legend: ReGATE's token share and the acceptance result."""
    c = result["comparison"]
    verdict = "passed" if c["accept_token_share"] and c["accept_accuracy"] and c["accept_curve"] else "FAILED"
    return (f"ReGATE trained on {c['token_share']:.1%} of dense's supervised tokens; final accuracy "
            f"{c['regate_final_accuracy']:.3f} vs dense {c['dense_final_accuracy']:.3f}\n"
            f"acceptance {verdict}: {acceptance_line(c).removeprefix('acceptance: ')}")


def plot(result: dict[str, Any], path: Path) -> Path:
    """Accuracy against supervised tokens and against training seconds, both runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig, (ax_tokens, ax_seconds) = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
    window = result["comparison"]["curve_smoothing"]
    for name, color in (("dense", "tab:blue"), ("regate", "tab:orange")):
        curve = result["runs"][name]["curve"]
        raw = [p["val_accuracy"] for p in curve]
        mean = [p["val_accuracy"] for p in smoothed(curve, window)]
        for ax, x in ((ax_tokens, [p["supervised_tokens"] for p in curve]), (ax_seconds, [p["train_seconds"] for p in curve])):
            ax.plot(x, raw, "o", ms=3, alpha=0.45, color=color)
            ax.plot(x, mean, "-", color=color, label=f"{name} (dots: each evaluation; line: mean of {window})")
    ax_tokens.set_xlabel("supervised tokens trained")
    ax_seconds.set_xlabel("training seconds (evaluation excluded)")
    ax_tokens.set_ylabel("held-out image-word accuracy")
    thousands = FuncFormatter(lambda value, _: f"{value:,.0f}")
    for ax in (ax_tokens, ax_seconds):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        ax.xaxis.set_major_formatter(thousands)
        ax.xaxis.set_major_locator(MaxNLocator(6))  # room for the separators
    fig.suptitle(f"regate demo: {result['steps']:,} steps, seed {result['seed']} (teacher-forced accuracy on image words)\n"
                 + headline(result))
    fig.tight_layout()
    from ..atomic import write_atomic

    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path
