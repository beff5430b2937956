"""The teacher pass: values, the CLI, torchrun, kill-and-resume, and refusals before any compute."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from transformers import LlamaForCausalLM

from regate_plugin import BatchError, ReGATEConfig, ReGATEEngine, cli
from regate_plugin.refcache import CacheMismatchError, RefCache, RefCacheWriter
from regate_plugin.scoring import load_teacher, score_dataset
from regate_plugin.teacher import teacher_fingerprint
from regate_plugin.units import IGNORE_INDEX

import score_assets
from score_assets import train_dataset, write_student_and_teacher
from tiny_hf import LLAVA_IMAGE_ID, PAD_ID, TEXT_HI, TEXT_LO, collate, tiny_samples

hf = pytest.importorskip("regate_plugin.patches.hf")
TESTS = Path(__file__).parent
CACHE_FILES = ("losses.f16", "offsets.i64", "meta.json")


@pytest.fixture(scope="module", autouse=True)
def digest_memo_home(tmp_path_factory):
    """The teacher's file-digest memo goes to a test folder, not ~/.cache (subprocesses inherit it)."""
    with pytest.MonkeyPatch.context() as patch:
        home = tmp_path_factory.mktemp("regate-cache-home")
        patch.setenv("REGATE_CACHE_HOME", str(home))
        yield home


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


def one_error_line(result):
    """A CLI refusal: one `Error:` line, the last of the output, and no traceback."""
    assert "Traceback" not in result.output
    last = result.output.rstrip().splitlines()[-1]
    assert last.startswith("Error: ") and sum(line.startswith("Error:") for line in result.output.splitlines()) == 1
    return last


@pytest.fixture
def no_teacher_load(monkeypatch):
    """Every refusal must come before the teacher loads."""

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the check")

    monkeypatch.setattr("regate_plugin.scoring.load_teacher", refuse)


@pytest.fixture
def no_dataset(monkeypatch):
    """Refusals about --teacher and --out come before the dataset is even built."""

    def refuse():
        raise AssertionError("the dataset was built before the check")

    monkeypatch.setattr(score_assets, "train_dataset", refuse)


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
    assert f"resuming: {len(done)} of 5 shards done" in output
    assert cache_bytes(out) == cache_bytes(reference_cache)
    assert not partial.exists()


def test_teacher_with_another_tokenizer_is_refused_before_any_compute(tmp_path):
    student, teacher = write_student_and_teacher(tmp_path, teacher_tokenizer_rename=77)
    out = tmp_path / "cache"
    result = CliRunner().invoke(cli.main, score_cli(out, student, teacher))
    assert result.exit_code == 1
    assert one_error_line(result).startswith("Error: the teacher at") and "another tokenizer" in result.output
    assert not out.exists() and not (tmp_path / "cache.partial").exists()


def test_changed_dataset_is_refused_before_any_compute(tmp_path, monkeypatch, assets, reference_cache):
    student, teacher = assets
    monkeypatch.setattr(score_assets, "NUM_SAMPLES", 20)  # the dataset changed since scoring
    result = CliRunner().invoke(cli.main, score_cli(reference_cache, student, teacher))
    assert result.exit_code == 1 and "dataset: cache has 'tiny|n=24" in one_error_line(result)
    assert "the dataset has 20 samples, the reference cache 24" in result.output
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


def context_of(student, batch):
    """The batch's context ids as the hf target's training forward computes them (the student's config)."""
    from transformers import AutoConfig

    return hf.context_ids(AutoConfig.from_pretrained(student), batch["input_ids"])


def online_engine(student, teacher_dir):
    from regate_plugin import ReGATEConfig, ReGATEEngine
    from regate_plugin.scoring import OnlineRefCache

    source = hf.HFScoringSource(train_dataset(), str(student), "tiny")
    teacher = load_teacher(str(teacher_dir), torch.device("cpu"), torch.float32)
    config = ReGATEConfig(warmup=1, cycle=2, dense_steps=1, keep_ratio=0.5)
    return ReGATEEngine(config, OnlineRefCache(source, teacher)), source


def test_online_cache_scores_on_first_sight_like_the_offline_pass(assets, reference_cache):
    from regate_plugin import ReGATEEngine
    from tiny_hf import collate

    student, teacher_dir = assets
    online, _ = online_engine(student, teacher_dir)
    offline = ReGATEEngine(online.config, RefCache.open(reference_cache))
    assert torch.equal(online.ema.offsets, offline.ema.offsets)
    assert np.array_equal(online.refcache.digests, offline.refcache.digests)  # checked per micro-batch alike
    assert torch.isnan(online.ema.values).all()
    data = train_dataset()
    for step, ids in enumerate([[0, 5, 7], [5, 11, 2], [0, 23, 7]]):
        batch = collate("llava", [data[i] for i in ids])
        plans = [e.plan(batch["labels"], batch["attention_mask"], torch.tensor(ids), context_ids=context_of(student, batch))
                 for e in (online, offline)]
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
            plan = engine.plan(batch["labels"], batch["attention_mask"], torch.tensor(ids),
                               context_ids=context_of(student, batch))
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


def test_cache_records_a_digest_of_every_samples_context_and_targets(reference_cache):
    """8 bytes a sample: BLAKE2b of the token count, the input ids with each image placeholder as -1,
    then the supervised target ids (labels[j + 1] where supervised), all int64 little-endian."""
    cache = RefCache.open(reference_cache)
    expected = []
    for sample in train_dataset():
        ids = sample["input_ids"]
        context = [-1 if int(t) == LLAVA_IMAGE_ID else int(t) for t in ids]
        assert -1 in context
        targets = [int(t) for t in sample["labels"][1:] if t != IGNORE_INDEX]
        data = b"".join(v.to_bytes(8, "little", signed=True) for v in [len(context), *context, *targets])
        expected.append(int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little"))
    assert cache.digests.tolist() == expected
    data = (reference_cache / "digests.u64").read_bytes()
    meta = json.loads((reference_cache / "meta.json").read_text())
    assert meta["files"]["digests.u64"] == {"bytes": 8 * 24, "sha256": hashlib.sha256(data).hexdigest()}
    assert meta["fingerprint"]["samples"] == hashlib.sha256(data).hexdigest()[:16]


def retrain(teacher_dir, out_dir):
    """The same architecture, dtype and file sizes, other weights: a retrained teacher on disk."""
    model = LlamaForCausalLM.from_pretrained(teacher_dir)
    with torch.no_grad():
        model.model.norm.weight.add_(0.25)
    model.save_pretrained(out_dir)
    score_assets.tokenizer().save_pretrained(out_dir)


def test_retrained_teacher_of_the_same_shape_is_refused(tmp_path, assets, reference_cache, no_teacher_load):
    student, teacher = assets
    retrained = tmp_path / "teacher"
    retrain(teacher, retrained)
    sizes = lambda folder: sorted((p.name, p.stat().st_size) for p in folder.iterdir())  # noqa: E731
    assert sizes(retrained) == sizes(teacher)  # names and sizes alone cannot tell them apart
    assert teacher_fingerprint(str(retrained)) != teacher_fingerprint(str(teacher))
    result = CliRunner().invoke(cli.main, score_cli(reference_cache, student, retrained))
    assert result.exit_code == 1 and "already complete" not in result.output
    line = one_error_line(result)
    recorded = RefCache.open(reference_cache).fingerprint.teacher
    assert f"teacher: cache has {recorded!r}, this run has {teacher_fingerprint(str(retrained))!r}" in line
    assert line.endswith("use a new --out or delete it")


NUM_BIG = 80  # more samples than the dataset field's probe reads (64)
UNPROBED = sorted(set(range(NUM_BIG)) - {round(i * (NUM_BIG - 1) / 63) for i in range(64)})


@pytest.fixture(scope="module")
def big_cache(tmp_path_factory, assets):
    student, teacher = assets
    out = tmp_path_factory.mktemp("big") / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(score_assets, "NUM_SAMPLES", NUM_BIG)
        result = CliRunner().invoke(cli.main, score_cli(out, student, teacher))
    assert result.exit_code == 0, result.output
    return out


def edited_dataset(index, keep_count, prompt=False):
    """The big cache's samples with one answer token of sample ``index`` replaced (same count of
    supervised tokens), or its first answer token made unsupervised (one fewer), or (``prompt``)
    the prompt token just before its answer replaced, the answer unchanged."""
    data = tiny_samples("llava", NUM_BIG, seed=5)
    sample = data[index]
    answer = (sample["labels"] != IGNORE_INDEX).nonzero().flatten()
    if prompt:
        j = int(answer[0]) - 1
        assert sample["labels"][j] == IGNORE_INDEX and TEXT_LO <= sample["input_ids"][j] < TEXT_HI
        sample["input_ids"][j] = TEXT_LO + (int(sample["input_ids"][j]) - TEXT_LO + 1) % (TEXT_HI - TEXT_LO)
    elif keep_count:
        j = int(answer[-2])  # an answer word, not the EOS
        other = TEXT_LO + (int(sample["labels"][j]) - TEXT_LO + 1) % (TEXT_HI - TEXT_LO)
        sample["labels"][j] = sample["input_ids"][j] = other
    else:
        sample["labels"][int(answer[0])] = IGNORE_INDEX
    return data


def refusals(monkeypatch, student, teacher, cache, data, index):
    """What `regate inspect --target`, `regate score` and the training engine say about ``data``."""
    monkeypatch.setattr(score_assets, "train_dataset", lambda: data)
    inspect = CliRunner().invoke(cli.main, ["inspect", str(cache), "--target", "hf", "--", "--dataset",
                                            "score_assets:train_dataset", "--student", str(student), "--dataset-id", "tiny"])
    assert inspect.exit_code == 1
    score = CliRunner().invoke(cli.main, score_cli(cache, student, teacher))
    engine = ReGATEEngine(ReGATEConfig(), RefCache.open(cache))
    others = [i for i in range(3) if i != index]
    fine = collate("llava", [data[i] for i in others])
    engine.plan(fine["labels"], fine["attention_mask"], torch.tensor(others), context_ids=context_of(student, fine))
    batch = collate("llava", [data[i] for i in [*others, index]])
    with pytest.raises(BatchError) as refused:
        engine.plan(batch["labels"], batch["attention_mask"], torch.tensor([*others, index]),
                    context_ids=context_of(student, batch))
    return inspect.output, one_error_line(score), str(refused.value)


def assert_tokens_change_refused(monkeypatch, student, teacher, big_cache, data, index):
    """Sample ``index`` of ``data`` kept its supervised token count but not its tokens: the start-up probe
    cannot see it; the samples check, inspect, score and training refuse it by name, in one line."""
    source = hf.HFScoringSource(data, str(student), "tiny")
    RefCache.open(big_cache, expect=source.expected())  # the start-up probe cannot see it: the engine must
    with pytest.raises(CacheMismatchError, match="samples: cache has"):
        RefCache.open(big_cache, expect={**source.expected(), "samples": source.fingerprint.samples})
    count = int(RefCache.open(big_cache).counts()[index])
    cause = (f"sample {index} has as many supervised tokens as the reference cache ({count}) but other token ids in "
             "its prompt or answer (tokens changed)")
    inspect, score, training = refusals(monkeypatch, student, teacher, big_cache, data, index)
    assert cause in inspect
    assert cause in score and score.endswith("use a new --out or delete it")
    assert training.startswith(cause + " in this micro-batch") and "\n" not in training


def test_a_changed_sample_the_probe_misses_is_refused_by_open_inspect_score_and_training(
    monkeypatch, assets, big_cache, no_teacher_load
):
    student, teacher = assets
    index = UNPROBED[-1]
    data = edited_dataset(index, keep_count=True)
    assert_tokens_change_refused(monkeypatch, student, teacher, big_cache, data, index)


def test_a_changed_prompt_with_the_same_answer_is_refused_by_name(monkeypatch, assets, big_cache, no_teacher_load):
    """The reference losses were computed from the whole context: a prompt edited after scoring, the
    answer kept, leaves them stale. Refused by the samples check, inspect, score and training alike."""
    student, teacher = assets
    index = UNPROBED[-3]
    data = edited_dataset(index, keep_count=True, prompt=True)
    original = tiny_samples("llava", NUM_BIG, seed=5)[index]
    assert torch.equal(data[index]["labels"], original["labels"])
    assert not torch.equal(data[index]["input_ids"], original["input_ids"])
    assert_tokens_change_refused(monkeypatch, student, teacher, big_cache, data, index)


def test_a_changed_token_count_is_named_as_such(monkeypatch, assets, big_cache, no_teacher_load):
    student, teacher = assets
    index = UNPROBED[-2]
    count = int(RefCache.open(big_cache).counts()[index])
    data = edited_dataset(index, keep_count=False)
    cause = f"sample {index} has {count - 1} supervised tokens but the reference cache holds {count} (token count changed)"
    inspect, score, training = refusals(monkeypatch, student, teacher, big_cache, data, index)
    assert cause in inspect and cause in score
    assert training.startswith(cause + " in this micro-batch")


@pytest.mark.parametrize(
    "teacher, says",
    [
        ("./base-lm", "no such folder, and not a hub id (org/name); check the path"),
        ("base-org/base-lm", "the hub id is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"),
        ("empty", "the folder holds no config.json and weight files"),
    ],
)
def test_teacher_that_is_no_model_is_refused_at_once(tmp_path, monkeypatch, assets, no_dataset, no_teacher_load, teacher, says):
    student, _ = assets
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli.main, score_cli(tmp_path / "cache", student, teacher))
    assert result.exit_code == 1
    line = one_error_line(result)
    assert line.startswith(f"Error: --teacher {teacher}: ") and says in line
    assert not (tmp_path / "cache").exists() and not (tmp_path / "cache.partial").exists()


def flip_losses_byte(out):
    data = bytearray((out / "losses.f16").read_bytes())
    data[len(data) // 2] ^= 0x10
    (out / "losses.f16").write_bytes(bytes(data))


def older_version(out):
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "version": 1}))


def not_a_cache(out):
    shutil.rmtree(out)
    out.mkdir()
    (out / "notes.txt").write_text("mine")


@pytest.mark.parametrize("damage, says", [(flip_losses_byte, "SHA-256"), (older_version, "v1 cache from an older"),
                                          (not_a_cache, "exists and is not a reference cache")])
def test_out_holding_a_corrupt_old_or_foreign_folder_says_use_a_new_out(
    tmp_path, assets, reference_cache, no_dataset, no_teacher_load, damage, says
):
    student, teacher = assets
    out = tmp_path / "cache"
    shutil.copytree(reference_cache, out)
    damage(out)
    result = CliRunner().invoke(cli.main, score_cli(out, student, teacher))
    assert result.exit_code == 1
    line = one_error_line(result)
    assert line.startswith(f"Error: --out {out} ") and says in line and line.endswith("use a new --out or delete it")


def test_partial_run_with_another_shard_size_is_named_then_resumed(tmp_path, monkeypatch, assets, reference_cache):
    student, teacher = assets
    out = tmp_path / "cache"
    source = hf.HFScoringSource(train_dataset(), str(student), "tiny", teacher=str(teacher))
    scored = RefCache.open(reference_cache)
    writer = RefCacheWriter(out, source.fingerprint, len(source), shard_size=5)
    first = writer.shards()[0]
    writer.write_shard(first, [scored.sample(i) for i in range(first.start, first.stop)], scored.digests[first.start : first.stop])
    with monkeypatch.context() as patch:
        patch.setattr("regate_plugin.scoring.load_teacher", lambda *a: pytest.fail("the teacher loaded"))
        result = CliRunner().invoke(cli.main, score_cli(out, student, teacher, "--shard-size", "7"))
    line = one_error_line(result)
    assert "shard_size: partial run has 5, this run has 7" in line and "rerun the original command to finish it" in line
    result = CliRunner().invoke(cli.main, score_cli(out, student, teacher))
    assert result.exit_code == 0, result.output
    assert "resuming: 1 of 5 shards done" in result.output
    assert cache_bytes(out) == cache_bytes(reference_cache)


def test_hf_training_forward_checks_each_samples_context_against_the_cache(assets, reference_cache):
    """Through the hf target's training forward (left padding, another batch order than scoring): the
    scored samples train; the same batch with one prompt token of a sample edited, its answer kept,
    is refused naming that sample, before any layer runs."""
    from transformers import LlavaForConditionalGeneration

    from regate_plugin.engine import SAMPLE_INDEX_KEY

    student, _ = assets
    model = LlavaForConditionalGeneration.from_pretrained(student).train()
    hf.enable(model, ReGATEEngine(ReGATEConfig(warmup=0, dense_steps=0, keep_ratio=0.5), RefCache.open(reference_cache)))
    data = train_dataset()
    ids = [17, 3, 9]
    batch = collate("llava", [data[i] for i in ids], padding_side="left")
    assert (batch["attention_mask"][:, 0] == 0).any()
    loss = model(**batch, **{SAMPLE_INDEX_KEY: torch.tensor(ids)}).loss
    assert torch.isfinite(loss)
    edited = [dict(sample) for sample in (data[i] for i in ids)]
    answer = int((edited[1]["labels"] != IGNORE_INDEX).nonzero()[0])
    prompt = edited[1]["input_ids"].clone()
    prompt[answer - 1] = TEXT_LO + (int(prompt[answer - 1]) - TEXT_LO + 1) % (TEXT_HI - TEXT_LO)
    edited[1]["input_ids"] = prompt
    with pytest.raises(BatchError, match=r"^sample 3 has as many supervised tokens as the reference cache \(\d+\) but "
                                         r"other token ids in its prompt or answer \(tokens changed\) in this micro-batch"):
        model(**collate("llava", edited, padding_side="left"), **{SAMPLE_INDEX_KEY: torch.tensor(ids)})
