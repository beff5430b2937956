"""The teacher pass: values, the CLI, torchrun, kill-and-resume, and refusals before any compute."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from regate_plugin import cli
from regate_plugin.refcache import CacheMismatchError, RefCache
from regate_plugin.scoring import load_teacher, score_dataset
from regate_plugin.units import IGNORE_INDEX

import score_assets
from score_assets import train_dataset, write_student_and_teacher
from tiny_hf import LLAVA_IMAGE_ID, PAD_ID

hf = pytest.importorskip("regate_plugin.patches.hf")
TESTS = Path(__file__).parent
CACHE_FILES = ("losses.f16", "offsets.i64", "meta.json")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_student_and_teacher(tmp_path_factory.mktemp("assets"))


def score_cli(out, student, teacher, *extra, dataset="score_assets:train_dataset"):
    return ["score", "--target", "hf", "--teacher", str(teacher), "--out", str(out), "--batch-size", "3",
            "--shard-size", "5", "--no-progress", *extra, "--", "--dataset", dataset, "--student", str(student),
            "--dataset-id", "tiny"]


def run_subprocess(args, **kwargs):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def cache_bytes(path):
    return {name: (Path(path) / name).read_bytes() for name in CACHE_FILES}


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory, assets):
    """One uninterrupted single-process run through the CLI."""
    student, teacher = assets
    out = tmp_path_factory.mktemp("ref") / "cache"
    result = CliRunner().invoke(cli.main, score_cli(out, student, teacher))
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 24 samples" in result.output
    return out


def test_cached_losses_equal_direct_teacher_computation(assets, reference_cache):
    student, teacher_dir = assets
    teacher = load_teacher(str(teacher_dir), torch.device("cpu"), torch.float32)
    cache = RefCache.open(reference_cache)
    for index, sample in enumerate(train_dataset()):
        # Direct: the sample alone, image placeholders replaced by the pad token, full logits.
        ids = sample["input_ids"].masked_fill(sample["input_ids"] == LLAVA_IMAGE_ID, PAD_ID)
        with torch.no_grad():
            logits = teacher(input_ids=ids[None]).logits[0]
        labels = sample["labels"]
        positions = (labels[1:] != IGNORE_INDEX).nonzero().flatten()
        direct = F.cross_entropy(logits[positions], labels[positions + 1], reduction="none")
        cached = torch.from_numpy(cache.sample(index))
        assert cached.shape == direct.shape
        torch.testing.assert_close(cached, direct, atol=2e-3, rtol=1e-3)  # float16 storage
    assert cache.num_units == sum(int((s["labels"][1:] != IGNORE_INDEX).sum()) for s in train_dataset())


def test_score_twice_says_complete_and_inspect_decodes_tokens(assets, reference_cache):
    student, teacher = assets
    again = CliRunner().invoke(cli.main, score_cli(reference_cache, student, teacher))
    assert again.exit_code == 0 and "already complete" in again.output
    result = CliRunner().invoke(cli.main, ["inspect", str(reference_cache), "--top", "3", "--json", "--target", "hf",
                                           "--", "--dataset", "score_assets:train_dataset", "--student", str(student),
                                           "--dataset-id", "tiny"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)
    cache = RefCache.open(reference_cache)
    assert facts["samples"] == 24 and facts["units"] == cache.num_units
    values = cache.all_losses()
    assert facts["ref_loss_mean"] == pytest.approx(values.mean().item(), rel=1e-5)
    high = facts["most_vision_dependent"]
    assert [u["ref_loss"] for u in high] == sorted(values.tolist(), reverse=True)[:3]
    sample = train_dataset()[high[0]["sample"]]
    target = sample["labels"][1:][sample["labels"][1:] != IGNORE_INDEX][high[0]["k"]]
    assert high[0]["token"] == f"w{int(target)}" or high[0]["token"] == "</s>"
    text = CliRunner().invoke(cli.main, ["inspect", str(reference_cache)]).output
    assert "ref loss" in text and "p50=" in text and "--target" in text


def test_torchrun_two_processes_write_the_same_cache(tmp_path, assets, reference_cache):
    student, teacher = assets
    out = tmp_path / "cache"
    proc = run_subprocess(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "regate_plugin", *score_cli(out, student, teacher)])
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert cache_bytes(out) == cache_bytes(reference_cache)


def test_sigkill_then_rerun_is_byte_identical_and_never_half_written(tmp_path, assets, reference_cache):
    student, teacher = assets
    out = tmp_path / "cache"
    args = ["-m", "regate_plugin", *score_cli(out, student, teacher, dataset="score_assets:slow_dataset")]
    proc = run_subprocess(args)
    partial = tmp_path / "cache.partial"
    deadline = time.monotonic() + 120
    while len(list(partial.glob("shard-*.bin"))) < 2:
        assert proc.poll() is None, "the teacher pass ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing under the final name
    done = sorted(p.name for p in partial.glob("shard-*.bin"))
    assert 2 <= len(done) < 5

    proc = run_subprocess(args)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert cache_bytes(out) == cache_bytes(reference_cache)
    assert not partial.exists()


def test_teacher_with_another_tokenizer_is_refused_before_any_compute(tmp_path):
    student, teacher = write_student_and_teacher(tmp_path, teacher_tokenizer_rename=77)
    out = tmp_path / "cache"
    result = CliRunner().invoke(cli.main, score_cli(out, student, teacher))
    assert result.exit_code != 0
    assert "another tokenizer" in str(result.exception)
    assert not out.exists() and not (tmp_path / "cache.partial").exists()


def test_changed_dataset_is_refused_before_any_compute(tmp_path, monkeypatch, assets, reference_cache):
    student, teacher = assets
    monkeypatch.setattr(score_assets, "NUM_SAMPLES", 20)  # the dataset changed since scoring
    result = CliRunner().invoke(cli.main, score_cli(reference_cache, student, teacher))
    assert isinstance(result.exception, CacheMismatchError) and "dataset: cache has 'tiny|n=24" in str(result.exception)
    source = hf.HFScoringSource(train_dataset(), str(student), "tiny")
    with pytest.raises(CacheMismatchError, match="dataset"):
        RefCache.open(reference_cache, expect=source.expected())
    monkeypatch.setattr(score_assets, "NUM_SAMPLES", 24)
    source = hf.HFScoringSource(train_dataset(), str(student), "tiny")
    RefCache.open(reference_cache, expect=source.expected())  # unchanged: accepted


def test_library_call_without_cli(tmp_path, assets, reference_cache):
    student, teacher_dir = assets
    source = hf.HFScoringSource(train_dataset(), str(student), "tiny", teacher=str(teacher_dir))
    teacher = load_teacher(str(teacher_dir), torch.device("cpu"), torch.float32)
    cache = score_dataset(source, teacher, tmp_path / "cache", batch_size=3, shard_size=5, progress=False)
    assert cache_bytes(cache.path) == cache_bytes(reference_cache)


def online_engine(student, teacher_dir):
    from regate_plugin import ReGATEConfig, ReGATEEngine
    from regate_plugin.scoring import OnlineRefCache

    source = hf.HFScoringSource(train_dataset(), str(student), "tiny")
    teacher = load_teacher(str(teacher_dir), torch.device("cpu"), torch.float32)
    config = ReGATEConfig(warmup=1, cycle=2, dense_steps=1, keep_ratio=0.5)
    return ReGATEEngine(config, OnlineRefCache(source, teacher, progress=False)), source


def test_online_cache_scores_on_first_sight_like_the_offline_pass(assets, reference_cache):
    from regate_plugin import ReGATEEngine
    from tiny_hf import collate

    student, teacher_dir = assets
    online, _ = online_engine(student, teacher_dir)
    offline = ReGATEEngine(online.config, RefCache.open(reference_cache))
    assert torch.equal(online.ema.offsets, offline.ema.offsets)
    assert torch.isnan(online.ema.values).all()
    data = train_dataset()
    for step, ids in enumerate([[0, 5, 7], [5, 11, 2], [0, 23, 7]]):
        batch = collate("llava", [data[i] for i in ids])
        plans = [e.plan(batch["labels"], batch["attention_mask"], torch.tensor(ids)) for e in (online, offline)]
        assert torch.equal(plans[0].unit_keep, plans[1].unit_keep)
        for engine, plan in zip((online, offline), plans):
            engine.record(plan, torch.full((int(plan.unit_keep.sum()),), 1.5))
            engine.end_step()
        seen = torch.cat([torch.arange(int(online.ema.offsets[s]), int(online.ema.offsets[s + 1])) for s in ids])
        torch.testing.assert_close(online.refcache.lookup(seen), offline.refcache.lookup(seen), atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(online.ema.values[seen], offline.ema.values[seen], atol=2e-3, rtol=1e-3)
    assert int((~torch.isnan(online.ema.values)).sum()) == sum(
        int(online.ema.counts(torch.tensor([s]))) for s in {0, 5, 7, 11, 2, 23}
    )


def _online_worker(rank, world, port, student, teacher_dir, out_dir):
    import torch.distributed as dist

    from tiny_hf import collate

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        engine, _ = online_engine(student, teacher_dir)
        data = train_dataset()
        steps = ([[1, 2], [3, 9]], [[3, 4], [10, 1]])[rank]  # sample 3 on both ranks, in different steps
        for ids in steps:
            batch = collate("llava", [data[i] for i in ids])
            plan = engine.plan(batch["labels"], batch["attention_mask"], torch.tensor(ids))
            engine.record(plan, torch.full((int(plan.unit_keep.sum()),), float(rank + 1)))
            engine.end_step()
        torch.save({"ema": engine.ema.values, "ref": engine.refcache.all_losses()}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_online_cache_shares_new_scores_across_ranks(tmp_path, assets):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    student, teacher_dir = assets
    mp.spawn(_online_worker, args=(2, port, str(student), str(teacher_dir), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    for key in ("ema", "ref"):  # bitwise, NaN (never seen) included
        assert ranks[0][key].numpy().tobytes() == ranks[1][key].numpy().tobytes()
    seen = ~torch.isnan(ranks[0]["ref"])
    assert torch.equal(seen, ~torch.isnan(ranks[0]["ema"]))
    engine, _ = online_engine(student, teacher_dir)
    expected = torch.zeros_like(seen)
    for s in (1, 2, 3, 9, 4, 10):
        expected[int(engine.ema.offsets[s]) : int(engine.ema.offsets[s + 1])] = True
    assert torch.equal(seen, expected)
