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
from regate_plugin.demo.frontier import auto_ratio_course, mean_sparse_ratio

HERE = Path(__file__).parent


def task_rows(folder: Path) -> list[dict]:
    runs = json.loads((folder / "frontier.json").read_text())["runs"]
    seeds = sorted(int(key.split("|")[2]) for key in runs if key.startswith("dense|"))
    rows = []
    for seed in seeds:
        dense, fixed, auto = (runs.get(f"{arm}|{seed}") for arm in ("dense|1", "regate|0.1", "auto|auto"))
        rows.append({
            "seed": seed, "dense": dense["val_accuracy"],
            "fixed_points": None if fixed is None else 100 * (fixed["val_accuracy"] - dense["val_accuracy"]),
            "auto_points": 100 * (auto["val_accuracy"] - dense["val_accuracy"]),
            "auto_share": auto["supervised_tokens"] / dense["supervised_tokens"],
            "auto_mean_ratio": mean_sparse_ratio(auto), "course": auto_ratio_course(auto),
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
