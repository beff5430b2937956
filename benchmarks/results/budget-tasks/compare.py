"""The auto keep ratio on tasks where elision is safe and where it is not: one table and one picture
from the sweeps' frontier.json files (each made by `regate demo --arms dense,regate,auto --keep 0.1 ...`).

    python benchmarks/results/budget-tasks/compare.py benchmarks/results/budget-tasks/{demo,no-free-words,color-shape,count-where}

A task's *elision harm* is how far the paper's score at the fixed keep 0.1 ends below dense (mean
over seeds); the auto run's *mean ratio* is the mean over its sparse steps of the ratio its cycles
chose. Writes compare.md and compare.png beside this file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from regate_plugin.atomic import write_atomic
from regate_plugin.demo.frontier import auto_ratio_course, frontier_rows, run_key

HERE = Path(__file__).parent
FIXED_KEEP = 0.1


def task_rows(folder: Path) -> list[dict]:
    """Per seed: fixed keep 0.1 and auto against the same seed's dense run (points), auto's share of
    dense's supervised tokens, its mean sparse ratio and its ratio per step."""
    runs = json.loads((folder / "frontier.json").read_text())["runs"]
    final = {(r["arm"], r["seed"]): r for r in frontier_rows(runs)
             if r["arm"] in ("dense", "auto") or (r["arm"] == "regate" and r["keep_ratio"] == FIXED_KEEP)}
    rows = []
    for seed in sorted(seed for arm, seed in final if arm == "dense"):
        missing = [arm for arm in ("regate", "auto") if (arm, seed) not in final]
        if missing:
            raise SystemExit(f"{folder}: seed {seed} has no {' or '.join(missing)} run; make it with "
                             f"regate demo --arms dense,regate,auto --keep {FIXED_KEEP} --out {folder}")
        dense, fixed, auto = (final[arm, seed] for arm in ("dense", "regate", "auto"))
        rows.append({
            "seed": seed,
            "fixed_points": 100 * (fixed["final_accuracy"] - dense["final_accuracy"]),
            "auto_points": 100 * (auto["final_accuracy"] - dense["final_accuracy"]),
            "auto_share": auto["supervised_share"], "auto_mean_ratio": auto["keep_ratio"],
            "course": auto_ratio_course(runs[run_key("auto", 0.0, seed)]),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args()
    tasks = {folder.name: task_rows(folder) for folder in args.folders}
    lines = ["| task | seeds | fixed 0.1 vs dense (points, per seed) | mean | auto vs dense (points) | auto share | auto mean ratio |",
             "|---|---|---|---|---|---|---|"]
    for name, rows in tasks.items():
        fixed = [r["fixed_points"] for r in rows]
        lines.append(f"| {name} | {','.join(str(r['seed']) for r in rows)} | "
                     f"{' / '.join(f'{p:+.2f}' for p in fixed)} | {np.mean(fixed):+.2f} | "
                     f"{' / '.join('%+.2f' % r['auto_points'] for r in rows)} | "
                     f"{np.mean([r['auto_share'] for r in rows]):.1%} | "
                     f"{' / '.join('%.3f' % r['auto_mean_ratio'] for r in rows)} |")
    table = "\n".join(lines) + "\n"
    write_atomic(HERE / "compare.md", table.encode())
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (name, rows) in enumerate(tasks.items()):
        steps = rows[0]["course"][0]
        mean = np.mean([r["course"][1] for r in rows], axis=0)
        harm = np.mean([r["fixed_points"] for r in rows])
        ax.plot(steps, mean, "-", color=f"C{i}", lw=1.5, label=f"{name}: fixed 0.1 {harm:+.1f} points vs dense")
        for r in rows:
            ax.plot(*r["course"], ".", ms=1, color=f"C{i}", alpha=0.3)
    ax.set_xlabel("optimizer step (sparse steps)")
    ax.set_ylabel("keep ratio auto chose")
    ax.set_title("--keep-ratio auto, same defaults on every task: seed mean (line), seeds (dots)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(HERE / "compare.png", lambda f: fig.savefig(f, format="png", dpi=110))
    print(f"wrote {HERE / 'compare.md'} and {HERE / 'compare.png'}")


if __name__ == "__main__":
    main()
