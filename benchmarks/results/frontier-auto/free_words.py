"""The auto keep ratio on the demo task without its free words (``demo_task.ask(free_words=False)``:
each free slot always its first word, same scenes and pictures), beside the sweep's runs on the
task with them (``frontier.json`` here, same seeds and settings).

    OMP_NUM_THREADS=1 python benchmarks/results/frontier-auto/free_words.py --seeds 0 --out benchmarks/results/frontier-auto

writes ``free_words.json``: per seed, the no-free-words dense and auto runs' final accuracy, token
share and the auto run's per-cycle decisions, with the same seed's auto decisions from frontier.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

from regate_plugin.atomic import write_atomic
from regate_plugin.demo.frontier import SWEEP_EVAL_POINTS, arm_config, run_key
from regate_plugin.demo.runs import THREADS, _quiet, _threads, prepare, train_run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    path = args.out / "free_words.json"
    result = json.loads(path.read_text()) if path.exists() else {"steps": args.steps, "seeds": {}}
    sweep = json.loads((args.out / "frontier.json").read_text())["runs"]
    with _quiet(), _threads(THREADS):
        for seed in (int(s) for s in args.seeds.split(",")):
            if str(seed) in result["seeds"]:
                continue
            with tempfile.TemporaryDirectory(prefix=f"regate-no-free-{seed}-") as work:
                setup = replace(prepare(args.steps, seed, Path(work), False, free_words=False),
                                eval_points=SWEEP_EVAL_POINTS)
                runs = {arm: train_run(f"{arm}-no-free-words", arm_config(arm, 0.0 if arm == "auto" else 1.0, args.steps),
                                       setup) for arm in ("dense", "auto")}
            with_free = sweep.get(run_key("auto", 0.0, seed))
            result["seeds"][str(seed)] = {
                "without_free_words": {arm: {
                    "val_accuracy": run["val_accuracy"],
                    "supervised_share": run["supervised_tokens"] / run["supervised_tokens_dense_equivalent"],
                    **({"auto_decisions": run["auto_decisions"]} if arm == "auto" else {}),
                } for arm, run in runs.items()},
                "with_free_words_auto_decisions": None if with_free is None else with_free["auto_decisions"],
            }
            write_atomic(path, (json.dumps(result, indent=1) + "\n").encode())
            ratios = [d["keep_ratio"] for d in runs["auto"]["auto_decisions"]]
            share = result["seeds"][str(seed)]["without_free_words"]["auto"]["supervised_share"]
            print(f"seed {seed}: without free words dense {runs['dense']['val_accuracy']:.4f}, auto "
                  f"{runs['auto']['val_accuracy']:.4f} at {share:.1%}; ratios {ratios}", flush=True)


if __name__ == "__main__":
    main()
