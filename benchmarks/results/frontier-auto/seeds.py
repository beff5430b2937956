"""Auto against fixed keep 0.25 over every seed of the given sweeps: per seed both against the same
dense run, then means, seeds more than a point below dense and the paired difference.

    cd benchmarks/results/frontier-auto && python seeds.py . seeds-4-7 seeds-8-11 fixed-0.25-seeds-0-3 fixed-0.25-seeds-4-7
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from regate_plugin.demo.frontier import frontier_rows

FIXED_KEEP = 0.25


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folders", nargs="+", type=Path)
    runs: dict = {}
    for folder in parser.parse_args().folders:
        runs.update(json.loads((folder / "frontier.json").read_text())["runs"])
    final = {(r["arm"], r["seed"]): r for r in frontier_rows(runs)
             if r["arm"] in ("dense", "auto") or (r["arm"] == "regate" and r["keep_ratio"] == FIXED_KEEP)}
    seeds = sorted(seed for arm, seed in final if arm == "dense" and ("auto", seed) in final and ("regate", seed) in final)
    points = {arm: np.array([100 * (final[arm, s]["final_accuracy"] - final["dense", s]["final_accuracy"]) for s in seeds])
              for arm in ("auto", "regate")}
    shares = {arm: np.array([final[arm, s]["supervised_share"] for s in seeds]) for arm in ("auto", "regate")}
    print("seed  auto (points, share)  fixed 0.25 (points, share)")
    for i, seed in enumerate(seeds):
        print(f"{seed:>4}  {points['auto'][i]:+6.2f} {shares['auto'][i]:6.1%}      "
              f"{points['regate'][i]:+6.2f} {shares['regate'][i]:6.1%}")
    for arm, name in (("auto", "auto"), ("regate", "fixed 0.25")):
        below = [s for s, p in zip(seeds, points[arm]) if p < -1]
        print(f"{name}: {points[arm].mean():+.2f} points at {shares[arm].mean():.1%} over {len(seeds)} seeds; "
              f"more than a point below dense on seeds {below}")
    paired = points["auto"] - points["regate"]
    print(f"auto minus fixed 0.25, seed by seed: {paired.mean():+.2f} points, standard error "
          f"{paired.std(ddof=1) / np.sqrt(len(seeds)):.2f}")


if __name__ == "__main__":
    main()
