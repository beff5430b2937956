"""What the framework targets' tests (tests/llamafactory, tests/swift) check the same way: the log of a
run whose odd steps are sparse, and `regate train` under torchrun (gloo, 2 ranks) with each rank's
EMA table digested after every optimizer step."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

EMA_DIGESTS = """
import hashlib, os, sys
from regate_plugin import cli
from regate_plugin.engine import ReGATEEngine

end_step = ReGATEEngine.end_step


def recorded(self, *args, **kwargs):  # the EMA table of this rank after every optimizer step
    stats = end_step(self, *args, **kwargs)
    with open(os.environ["EMA_DIGESTS"] + "." + os.environ["RANK"], "a") as log:
        log.write(hashlib.sha256(self.ema.values.numpy().tobytes()).hexdigest() + "\\n")
    return stats


ReGATEEngine.end_step = recorded
cli.main(sys.argv[1:], prog_name="regate")
"""


def check_sparse_steps(log: list[dict[str, Any]], checkpoint: Path) -> None:
    """Six logged steps, dense and sparse in turn (keep 0.5), and ReGATE's state in ``checkpoint``."""
    dense, thin = log[0::2], log[1::2]
    assert [e["regate/keep_ratio"] for e in log] == [1.0, 0.5] * 3
    assert all(e["regate/supervised_kept"] == e["regate/supervised_total"] for e in dense)
    for e in thin:  # each sample keeps ceil(0.5 * its units): a little over half
        assert e["regate/supervised_total"] / 2 <= e["regate/supervised_kept"] < e["regate/supervised_total"]
        assert e["regate/llm_tokens"] < e["regate/padded_tokens"]
    assert (checkpoint / "regate_state.pt").is_file()


def two_rank_train(train_args: list[str], output_dir: Path, digests: Path) -> tuple[list[str], list[str]]:
    """``regate train TRAIN_ARGS`` (training into ``output_dir``) on 2 gloo ranks; each rank's EMA digests,
    one per optimizer step.

    One rerun when a rank dies of SIGABRT: seen once in five LLaMA-Factory suite runs on 2 busy cores,
    rank 1 aborting after training had written its model card (as LLaMA-Factory tears down the process
    group; not reproduced in 4 runs of the test alone); the rerun's
    results (from an emptied output_dir: no resuming) are the ones checked, so every assertion holds of
    one whole run."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
               sys.executable, "-c", EMA_DIGESTS, "train", *train_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EMA_DIGESTS": str(digests)}
    for _ in range(2):
        shutil.rmtree(output_dir, ignore_errors=True)
        for rank in (0, 1):
            Path(f"{digests}.{rank}").unlink(missing_ok=True)
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        if done.returncode == 0 or "SIGABRT" not in done.stderr:
            break
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (Path(f"{digests}.{rank}").read_text().split() for rank in (0, 1))
    return rank0, rank1
