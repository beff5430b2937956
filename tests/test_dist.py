"""Several ranks (CPU, gloo): identical EMA everywhere, N ranks == 1 rank with accumulation,
DeepSpeed ZeRO-2/3, a rank killed mid-run, and the host memory of the tables."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from regate_plugin.refcache import Fingerprint, write_cache
from regate_plugin.units import find_units
from dist_worker import by_step
from tiny_hf import EOS_ID, collate, tiny_model, tiny_samples

TESTS = Path(__file__).parent
WORKER = TESTS / "dist_worker.py"
STEPS, SAVE = 8, 4
ZERO = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
        "zero_force_ds_cpu_optimizer": False}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Random reference losses, but on the answers' eos the untrained student's own: the student
    predicts it exactly as badly as the 'teacher', which the learnable score discounts."""
    gen = torch.Generator().manual_seed(0)
    student, losses = tiny_model("llava", seed=0), []
    for sample in tiny_samples("llava", 16, seed=3):
        batch = collate("llava", [sample])
        units = find_units(batch["labels"])
        targets = batch["labels"][0, units.col + 1]
        with torch.no_grad():
            logits = student(**{k: v for k, v in batch.items() if k != "labels"}).logits[0, units.col]
        own = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        losses.append(torch.where(targets == EOS_ID, own, torch.rand(len(targets), generator=gen) * 5))
    path = tmp_path_factory.mktemp("cache") / "cache"
    write_cache(path, Fingerprint("tiny16", "t", "m", "16", 64), losses)
    return path


def launch(out, cache, *args, ranks=2, wait=True):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else [sys.executable]
    proc = subprocess.Popen([*prefix, str(WORKER), "--cache", str(cache), "--out", str(out), "--steps", str(STEPS),
                             "--save-steps", str(SAVE), *args], env=env, cwd=out.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    if not wait:
        return proc
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("two") / "out"
    return out, launch(out, cache)


def test_two_ranks_equal_one_rank_with_accumulation(tmp_path, cache, two_ranks):
    out, records = two_ranks
    assert records[0]["digests"] == records[1]["digests"]  # identical tables after every step
    assert len(records[0]["digests"]) == STEPS
    single = launch(tmp_path / "one", cache, "--accumulation", "2", ranks=1)
    assert by_step(single) == by_step(records)  # same samples, same kept units, every step
    torch.testing.assert_close(torch.load(tmp_path / "one" / "ema0.pt"), torch.load(out / "ema0.pt"), atol=1e-5, rtol=0)
    assert torch.equal(torch.load(out / "ema0.pt"), torch.load(out / "ema1.pt"))
    # the word table decided: the paper's score keeps other units on the sparse steps (3-5, 7)
    paper = by_step(launch(tmp_path / "paper", cache, "--accumulation", "2", "--score", "paper", ranks=1))
    learnable = by_step(single)
    changed = [step for step in learnable if learnable[step] != paper[step]]
    assert changed == [3, 4, 5, 7]


def zero_config(tmp_path, stage):
    config = dict(ZERO, zero_optimization={"stage": stage, **({"stage3_gather_16bit_weights_on_model_save": True} if stage == 3 else {})})
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps(config))
    return path


def test_auto_keep_ratio_two_ranks_decide_as_one_rank_with_accumulation(tmp_path, cache):
    """keep_ratio="auto": every rank and the single rank choose the same ratio every cycle."""
    args = ("--keep-ratio", "auto", "--steps", "12", "--save-steps", "12")
    records = launch(tmp_path / "two", cache, *args)
    single = launch(tmp_path / "one", cache, *args, "--accumulation", "2", ranks=1)
    assert by_step(single) == by_step(records)  # same kept units every step, so the same ratios
    decisions = [r["auto_decisions"] for r in (*records, *single)]
    assert decisions[0] == decisions[1]  # bit for bit across ranks
    assert [d["step"] for d in decisions[0]] == [2, 6, 10]
    assert [d["keep_ratio"] for d in decisions[0]] == [d["keep_ratio"] for d in decisions[2]]
    assert None not in (decisions[0][-1]["shed_kept"], decisions[0][-1]["shed_elided"])  # the last cycle measured
    for mine, theirs in zip(decisions[0], decisions[2]):
        for key in ("shed_kept", "shed_elided"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-5)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_checkpoints_once_and_resumes_exactly(tmp_path, cache, stage):
    pytest.importorskip("deepspeed")
    config = zero_config(tmp_path, stage)
    # A tiny LM-head chunk gives the ranks different numbers of chunks: under ZeRO-3 they must still
    # call the partitioned LM head equally often, or the collective gathers deadlock.
    full = launch(tmp_path / "full", cache, "--deepspeed", str(config), "--loss-chunk-rows", "3")
    assert full[0]["digests"] == full[1]["digests"]
    assert all(r["lm_head_partitioned"] == (stage == 3) for r in full)
    states = sorted(p.relative_to(tmp_path / "full") for p in (tmp_path / "full").rglob("regate_state*"))
    assert states == [Path(f"run/checkpoint-{SAVE}/regate_state.pt"), Path(f"run/checkpoint-{STEPS}/regate_state.pt")]

    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "run").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(tmp_path / "full" / "run" / f"checkpoint-{SAVE}"), str(resumed_dir / "run")], check=True)
    resumed = launch(resumed_dir, cache, "--deepspeed", str(config), "--loss-chunk-rows", "3",
                     "--resume", str(resumed_dir / "run" / f"checkpoint-{SAVE}"))
    for before, after in zip(full, resumed):
        assert [s for s in before["selections"] if s[0] >= SAVE] == after["selections"]
        assert before["digests"][SAVE:] == after["digests"]


def test_killed_rank_restarts_from_checkpoint_exactly(tmp_path, cache, two_ranks):
    reference_dir, reference = two_ranks
    out = tmp_path / "out"
    proc = launch(out, cache, "--step-sleep", "0.6", wait=False)
    saved = out / "run" / f"checkpoint-{SAVE}" / "regate_state.pt"
    deadline = time.monotonic() + 600
    while not saved.exists():
        assert proc.poll() is None, proc.stdout.read()[-6000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2
    os.kill(int(ranks[1]), signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert not (out / "rank0.json").exists() and not (out / "run" / f"checkpoint-{STEPS}").exists()

    restarted = launch(out, cache, "--resume", str(out / "run" / f"checkpoint-{SAVE}"))
    for before, after in zip(reference, restarted):
        assert [s for s in before["selections"] if s[0] >= SAVE] == after["selections"]
        assert before["digests"][SAVE:] == after["digests"]
    assert torch.equal(torch.load(reference_dir / "ema0.pt"), torch.load(out / "ema0.pt"))


MEMORY_PROBE = r"""
import sys, torch
from regate_plugin import ReGATEConfig, ReGATEEngine, RefCache

def status(field):  # kB in /proc/self/status
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field + ":"))

cache = RefCache.open(sys.argv[1], verify=False)
anon, file = status("RssAnon"), status("RssFile")
engine = ReGATEEngine(ReGATEConfig(), cache)
# Private memory (a copy per rank) vs pages of the memory-mapped cache (shared by every process).
print(type(cache.losses).__name__, engine.ema.values.dtype, engine.ema.values.nbytes,
      status("RssAnon") - anon, status("RssFile") - file)
"""


def test_host_memory_of_a_llava_sized_table(tmp_path):
    """665k samples x 150 units: the EMA table (float32) fits in 0.5 GB per rank, and building it
    copies the memory-mapped reference cache no further."""
    samples, units = 665_000, 150
    path = tmp_path / "cache"
    values = np.random.default_rng(0).random(units * 10).astype(np.float16)
    write_cache(path, Fingerprint("mix665k", "t", "m", "576", 2048), [values[(i % 10) * units : (i % 10 + 1) * units] for i in range(samples)],
                shard_size=100_000)
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path)], capture_output=True, text=True, timeout=600, check=True)
    kind, dtype, table_bytes, private, shared = done.stdout.split()
    assert kind == "memmap" and dtype == "torch.float32"
    assert int(table_bytes) == samples * units * 4 <= 0.5e9
    assert int(private) <= 0.5e9, f"building the engine took {int(private) / 1e9:.2f} GB of private memory"
    assert int(shared) <= (path / "losses.f16").stat().st_size + 50e6  # the mapped cache, nothing more
    print(f"EMA table {int(table_bytes) / 1e9:.3f} GB; private memory +{int(private) / 1e9:.3f} GB, "
          f"mapped cache pages +{int(shared) / 1e9:.3f} GB (shared)")
