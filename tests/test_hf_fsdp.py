"""FSDP2 (torch ``fully_shard``, as accelerate's FSDP2 applies it) on CPU with gloo: two sharded
ranks select the same units and end with the same EMA as one process with gradient accumulation 2.

accelerate itself enables FSDP only on accelerator devices (its MULTI_CPU state has no FSDP plugin),
so on the CPU the worker shards the model with ``fully_shard`` directly and runs the steps itself."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from regate_plugin.refcache import Fingerprint, write_cache
from regate_plugin.units import find_units
from dist_worker import by_step
from tiny_hf import tiny_samples

TESTS = Path(__file__).parent
STEPS = 6


def run(out, cache, ranks):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else [sys.executable]
    done = subprocess.run([*prefix, str(TESTS / "fsdp_worker.py"), "--cache", str(cache), "--out", str(out),
                           "--steps", str(STEPS)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def test_fsdp2_two_ranks_equal_one_rank_with_accumulation(tmp_path):
    gen = torch.Generator().manual_seed(0)
    counts = [int(find_units(s["labels"][None]).counts[0]) for s in tiny_samples("llava", 16, seed=3)]
    cache = write_cache(tmp_path / "cache", Fingerprint("tiny16", "t", "m", "16", 64),
                        [torch.rand(n, generator=gen) * 5 for n in counts]).path
    sharded = run(tmp_path / "two", cache, ranks=2)
    single = run(tmp_path / "one", cache, ranks=1)
    assert all(r["sharded"] for r in sharded) and not single[0]["sharded"]
    assert sharded[0]["digests"] == sharded[1]["digests"]  # identical EMA tables on both ranks, every step
    assert by_step(single) == by_step(sharded)  # same samples, same kept units, every step
    assert any(not all(keep) for _, _, keep in single[0]["selections"])  # sparse steps happened
    ema_two, ema_one = torch.load(tmp_path / "two" / "ema0.pt"), torch.load(tmp_path / "one" / "ema0.pt")
    assert ema_one.abs().sum() > 0
    torch.testing.assert_close(ema_two, ema_one, atol=1e-5, rtol=0)
