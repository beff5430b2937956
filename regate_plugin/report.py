"""`regate report`: what a run trained on, from the Trainer's own log history, beside what
``regate estimate --json RUN_DIR/regate_estimate.json`` predicted before training, when it was saved."""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

STATE_NAME = "trainer_state.json"
ESTIMATE_NAME = "regate_estimate.json"  # where `regate estimate --json` saves an estimate beside a run


@dataclass(frozen=True)
class RunLog:
    """Per logged step: the loss and ReGATE's token counts (sums since the previous entry)."""

    steps: list[int]
    loss: list[float]
    keep_ratio: list[float]
    supervised_total: list[int]
    supervised_kept: list[int]
    llm_tokens: list[int]
    padded_tokens: list[int]
    estimate: dict[str, Any] | None = None  # the saved ``regate estimate`` document, if any
    #: ``keep_ratio="auto"``: the ratio the latest cycle chose for its sparse steps, per entry (None: a fixed ratio)
    auto_keep_ratio: list[float] | None = None
    seconds_per_step: float | None = None  # the Trainer's train_runtime over the steps it ran, when it logged one


def find_state(run_dir: Path) -> Path:
    """The run's trainer_state.json: its own, else the one of its latest checkpoint."""
    run_dir = Path(run_dir)
    if (run_dir / STATE_NAME).is_file():
        return run_dir / STATE_NAME
    checkpoints = sorted(
        (p for p in run_dir.glob("checkpoint-*") if (p / STATE_NAME).is_file() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    if not checkpoints:
        raise FileNotFoundError(
            f"no {STATE_NAME} in {run_dir} or its checkpoint-* folders: pass the Trainer's output_dir "
            "(trainer.save_state() writes one at the end of training; every checkpoint holds one)"
        )
    return checkpoints[-1] / STATE_NAME


def read_run(run_dir: Path) -> RunLog:
    run_dir = Path(run_dir)
    history: list[dict[str, Any]] = json.loads(find_state(run_dir).read_text())["log_history"]
    entries = [e for e in history if "regate/supervised_total" in e]
    if not entries:
        raise ValueError(
            f"{find_state(run_dir)} has no regate/* metrics: was the run trained with "
            "regate_plugin.trainer.attach(trainer, engine)?"
        )

    def column(key: str) -> list[Any]:
        return [e.get(key, float("nan")) for e in entries]

    return RunLog(
        steps=[int(e["step"]) for e in entries],
        loss=column("loss"),
        keep_ratio=column("regate/keep_ratio"),
        supervised_total=column("regate/supervised_total"),
        supervised_kept=column("regate/supervised_kept"),
        llm_tokens=column("regate/llm_tokens"),
        padded_tokens=column("regate/padded_tokens"),
        estimate=json.loads((run_dir / ESTIMATE_NAME).read_text()) if (run_dir / ESTIMATE_NAME).is_file() else None,
        auto_keep_ratio=column("regate/auto_keep_ratio") if any("regate/auto_keep_ratio" in e for e in entries) else None,
        seconds_per_step=_seconds_per_step(history),
    )


def _seconds_per_step(history: list[dict[str, Any]]) -> float | None:
    """Wall time per optimizer step: the Trainer's last ``train_runtime`` over the steps trained. A
    resumed run's runtime covers only its last session, so there it understates the step time."""
    final = next((e for e in reversed(history) if "train_runtime" in e), None)
    return None if final is None else final["train_runtime"] / max(final["step"], 1)


def summary(run: RunLog) -> dict[str, Any]:
    kept, total = sum(run.supervised_kept), sum(run.supervised_total)
    llm, padded = sum(run.llm_tokens), sum(run.padded_tokens)
    facts = {
        "steps": run.steps[-1],
        "first_loss": run.loss[0],
        "last_loss": run.loss[-1],
        "supervised_kept": kept,
        "supervised_total": total,
        "supervised_share": kept / total if total else 1.0,
        "llm_tokens": llm,
        "padded_tokens": padded,
        "llm_share": llm / padded if padded else 1.0,
    }
    if run.auto_keep_ratio is not None:
        chosen = [r for r in run.auto_keep_ratio if r == r]  # entries before the metric existed are NaN
        facts["auto_keep_ratio"] = {"first": chosen[0], "last": chosen[-1], "min": min(chosen), "max": max(chosen)}
    if run.seconds_per_step is not None:
        facts["seconds_per_step"] = run.seconds_per_step
    if run.estimate is not None:
        facts["estimate"] = estimated(run.estimate, packing_only=all(r == 1.0 for r in run.keep_ratio))
    return facts


def estimated(report: dict[str, Any], packing_only: bool) -> dict[str, Any]:
    """The saved estimate's figures for the mode the run trained in (packed dense when every logged
    keep ratio is 1.0, else ReGATE), to set beside the achieved ones."""
    mode = "packed-dense" if packing_only else "regate"
    figures = report["modes"][mode]
    return {
        "mode": mode,
        "steps": report["steps"],
        "supervised_share": figures["supervised_share"],
        "llm_share": figures["llm_token_share"],
        "flops_share": figures["flops_share"],
        "ideal_speedup": figures["ideal_speedup"],
        "setup": {"batch_size": report["batch_size"], "sampler": report["sampler"], "model": report["model"]["name"]},
    }


def format_summary(facts: dict[str, Any]) -> str:
    guess = facts.get("estimate")

    def beside(key: str) -> str:
        return "" if guess is None else f"; estimated {guess[key]:.1%}"

    lines = [
        f"steps                 {facts['steps']}",
        f"loss                  {facts['first_loss']:.4f} (first logged) -> {facts['last_loss']:.4f} (last)",
        f"supervised tokens     {facts['supervised_kept']:,} trained of {facts['supervised_total']:,} "
        f"dense ({facts['supervised_share']:.1%}{beside('supervised_share')})",
        f"LLM tokens            {facts['llm_tokens']:,} processed vs {facts['padded_tokens']:,} in padded "
        f"batches ({facts['llm_share']:.1%}{beside('llm_share')})",
    ]
    if "auto_keep_ratio" in facts:
        auto = facts["auto_keep_ratio"]
        lines.append(f"auto keep ratio       {auto['first']:.3g} (first logged) -> {auto['last']:.3g} (last), "
                     f"between {auto['min']:.3g} and {auto['max']:.3g}")
    if "seconds_per_step" in facts:
        lines.append(f"step time             {facts['seconds_per_step']:.3g} s per optimizer step (measured: the "
                     "Trainer's train_runtime over the steps; a resumed run's counts its last session only)")
    if guess is not None:
        inputs = guess["setup"]
        lines.append(
            f"estimate ({ESTIMATE_NAME}, {guess['mode']}, {guess['steps']} steps, batch {inputs['batch_size']}, "
            f"{inputs['sampler']} batches, {inputs['model']}): {guess['flops_share']:.1%} of padded dense's LLM FLOPs, "
            f"ideal speedup {guess['ideal_speedup']:.2f}x"
        )
    return "\n".join(lines)


def plot(run: RunLog, path: Path) -> Path:
    """Loss, keep ratio and cumulative tokens over steps, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ratio, ax_tokens) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ax_loss.plot(run.steps, run.loss, color="tab:blue")
    ax_loss.set_ylabel("training loss")
    ax_ratio.step(run.steps, run.keep_ratio, where="pre", color="tab:orange", label="mean over the logged steps")
    if run.auto_keep_ratio is not None:
        ax_ratio.step(run.steps, run.auto_keep_ratio, where="post", color="tab:red",
                      label="auto: the cycle's choice for its sparse steps")
        ax_ratio.legend(loc="upper right", fontsize="small")
    ax_ratio.set_ylabel("keep ratio")
    ax_ratio.set_ylim(0, 1.05)
    for label, values, style in [
        ("supervised, dense-equivalent", run.supervised_total, "--"),
        ("supervised, trained", run.supervised_kept, "-"),
        ("LLM tokens, padded batches", run.padded_tokens, "--"),
        ("LLM tokens, processed", run.llm_tokens, "-"),
    ]:
        ax_tokens.plot(run.steps, list(accumulate(values)), style, label=label)
    ax_tokens.set_ylabel("cumulative tokens")
    ax_tokens.set_xlabel("optimizer step")
    ax_tokens.legend(loc="upper left", fontsize="small")
    for ax in (ax_loss, ax_ratio, ax_tokens):
        ax.grid(alpha=0.3)
    fig.suptitle("ReGATE run")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
