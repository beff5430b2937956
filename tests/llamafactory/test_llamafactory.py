"""The llamafactory target through LLaMA-Factory's own entry points (its ``llamafactory-cli`` launcher and
``run_exp``), on a tiny LLaVA-1.5-HF and a sharegpt dataset registered in a local dataset_info.json.

All runs share one process, as ``regate train`` runs LLaMA-Factory in-process: the unpatched runs come
first (the ``upstream`` fixture), since ``apply`` patches LLaMA-Factory's classes for the process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from regate_plugin.cli import main
from regate_plugin.refcache import RefCache, RefCacheError

import lf_assets as assets

SPARSE = ["--keep-ratio", "0.5", "--warmup", "0", "--cycle", "2", "--dense-steps", "1"]  # odd steps sparse


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llamafactory")
    assets.build_student(root / "student")
    assets.build_teacher(root / "teacher")
    assets.build_dataset(root / "data")
    return root


def train_yaml(work: Path, name: str, **overrides) -> Path:
    """``work/name.yaml`` training into ``work/name``; overrides may replace the student and the data."""
    student, data = overrides.pop("student", work / "student"), overrides.pop("data", work / "data")
    return assets.write_yaml(work / f"{name}.yaml", assets.train_config(student, data, work / name, **overrides))


def regate(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def run_ok(*args: str) -> None:
    result = regate(*args)
    assert result.exit_code == 0, (result.output, result.exception)


def refused(*args: str) -> str:
    """Run ``regate``, expect exit status 1 with one ``Error:`` message (no traceback), and return it."""
    result = regate(*args)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(errors) == 1, (result.output, result.exception)
    assert "Traceback" not in result.output
    return result.output[result.output.index("Error:"):]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


@pytest.fixture(scope="module")
def upstream(work: Path) -> Path:
    """``llamafactory-cli train work/upstream.yaml``, unpatched (before any run applies ReGATE)."""
    from llamafactory.cli import main as llamafactory_cli

    yaml = train_yaml(work, "upstream")
    argv, sys.argv = sys.argv, ["llamafactory-cli", "train", str(yaml)]
    try:
        llamafactory_cli()
    finally:
        sys.argv = argv
    run_ok("train", "--target", "llamafactory", "--no-regate", "--", train_yaml(work, "no_regate"))
    return work / "upstream"


@pytest.fixture(scope="module")
def cache(work: Path, upstream: Path) -> Path:
    """The teacher pass through LLaMA-Factory's own template, mm plugin and dataset pipeline."""
    run_ok("score", "--target", "llamafactory", "--teacher", work / "teacher", "--out", work / "cache", "--no-progress",
           "--", train_yaml(work, "score"))
    return work / "cache"


@pytest.fixture(scope="module")
def sparse(work: Path, cache: Path) -> Path:
    """A ReGATE run with every other step sparse, checkpoints every 2 steps."""
    run_ok("train", "--target", "llamafactory", "--ref-cache", cache, *SPARSE, "--",
           train_yaml(work, "sparse"), "save_strategy=steps", "save_steps=2")
    return work / "sparse"


def test_no_regate_is_upstream_exactly(work: Path, upstream: Path) -> None:
    ours, theirs = assets.log_history(work / "no_regate"), assets.log_history(upstream)
    assert len(theirs) == 6
    assert [(e["loss"], e["grad_norm"]) for e in ours] == [(e["loss"], e["grad_norm"]) for e in theirs]
    assert not any(key.startswith("regate/") for e in ours for key in e)
    mine, base = weights(work / "no_regate"), weights(upstream)
    assert mine.keys() == base.keys() and all(torch.equal(mine[k], base[k]) for k in base)


def test_cache_is_built_from_llamafactory_samples(work: Path, cache: Path) -> None:
    """The teacher pass saw LLaMA-Factory's expanded visual tokens (4 per picture) and its cutoff_len."""
    from regate_plugin.patches.llamafactory import scoring_source

    fingerprint = RefCache.open(cache).fingerprint
    image_id = assets.build_tokenizer().convert_tokens_to_ids("<image>")
    assert fingerprint.visual_tokens == f"expanded in input_ids: {image_id}"
    assert fingerprint.max_length == 64 and fingerprint.dataset.startswith("llamafactory:tiny_vqa|template=llava|")
    source = scoring_source([str(work / "score.yaml")], "")
    ids, labels = source.text_only(0)
    record = source.dataset[0]
    assert record["input_ids"].count(image_id) == assets.VISUAL_TOKENS and image_id not in ids.tolist()
    assert labels.tolist() == record["labels"] and len(ids) == len(record["input_ids"])
    assert RefCache.open(cache).num_samples == 16


def test_keep_one_matches_upstream(work: Path, upstream: Path, cache: Path) -> None:
    """With LLaMA-Factory's gradient checkpointing on (its own checkpointing function) in our run only."""
    run_ok("train", "--target", "llamafactory", "--ref-cache", cache, "--keep-ratio", "1.0", "--warmup", "0", "--",
           train_yaml(work, "keep_one", gradient_checkpointing=True))
    ours, theirs = assets.log_history(work / "keep_one"), assets.log_history(upstream)
    assert [e["loss"] for e in ours] == pytest.approx([e["loss"] for e in theirs], abs=1e-5)
    assert all(e["regate/supervised_kept"] == e["regate/supervised_total"] > 0 for e in ours)
    assert all(e["regate/llm_tokens"] < e["regate/padded_tokens"] for e in ours)  # padding removed
    mine, base = weights(work / "keep_one"), weights(upstream)
    assert all(torch.allclose(mine[k], base[k], atol=1e-5) for k in base)


def test_sparse_steps_elide(sparse: Path) -> None:
    log = assets.log_history(sparse)
    dense, thin = log[0::2], log[1::2]
    assert [e["regate/keep_ratio"] for e in log] == [1.0, 0.5] * 3
    assert all(e["regate/supervised_kept"] == e["regate/supervised_total"] for e in dense)
    for e in thin:  # each sample keeps ceil(0.5 * its units): a little over half
        assert e["regate/supervised_total"] / 2 <= e["regate/supervised_kept"] < e["regate/supervised_total"]
        assert e["regate/llm_tokens"] < e["regate/padded_tokens"]
    assert (sparse / "checkpoint-4" / "regate_state.pt").is_file()


def test_resume_is_exact(work: Path, cache: Path, sparse: Path) -> None:
    """Resuming the sparse run at step 4 gives its steps 5-6 again (the model loaded from the checkpoint:
    transformers 5.x's Trainer does not convert Llava's saved key names when it resumes a full model)."""
    checkpoint = sparse / "checkpoint-4"
    run_ok("train", "--target", "llamafactory", "--ref-cache", cache, *SPARSE, "--",
           train_yaml(work, "resumed", student=checkpoint, resume_from_checkpoint=str(checkpoint)))
    resumed = assets.log_history(work / "resumed")  # steps 1-4 are the checkpoint's own log
    assert [e["step"] for e in resumed] == [1, 2, 3, 4, 5, 6]
    assert resumed[4:] == assets.log_history(sparse)[4:] and resumed[5]["regate/keep_ratio"] == 0.5
    mine, base = weights(work / "resumed"), weights(sparse)
    assert all(torch.equal(mine[k], base[k]) for k in base)


def test_torchrun_two_ranks(work: Path, cache: Path, sparse: Path) -> None:
    """``torchrun -m regate_plugin train`` (gloo, 2 ranks, one sample per rank and micro-batch): the same
    global batches as the one-process run, so the rank-summed counts of every step are its counts."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "regate_plugin",
               "train", "--target", "llamafactory", "--ref-cache", str(cache), *SPARSE, "--",
               str(train_yaml(work, "two_ranks", per_device_train_batch_size=1))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    counts = ("regate/keep_ratio", "regate/supervised_total", "regate/supervised_kept")
    assert [[e[k] for k in counts] for e in assets.log_history(work / "two_ranks")] == \
        [[e[k] for k in counts] for e in assets.log_history(sparse)]


def test_lora_runs_and_evaluates(work: Path, cache: Path) -> None:
    """LoRA, with LLaMA-Factory's evaluation every 3 steps (upstream's forward on samples without an index)."""
    run_ok("train", "--target", "llamafactory", "--ref-cache", cache, *SPARSE, "--",
           train_yaml(work, "lora", finetuning_type="lora", lora_target="q_proj,v_proj", lora_rank=4,
                      eval_dataset="tiny_vqa", eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=4))
    state = json.loads((work / "lora" / "trainer_state.json").read_text())
    evals = [e for e in state["log_history"] if "eval_loss" in e]
    assert [e["step"] for e in evals] == [3, 6] and all(torch.isfinite(torch.tensor(e["eval_loss"])) for e in evals)
    log = assets.log_history(work / "lora")
    assert len(log) == 6 and all(torch.isfinite(torch.tensor(e["loss"])) for e in log)
    assert all(e["regate/supervised_kept"] < e["regate/supervised_total"] for e in log[1::2])
    adapter = load_file(str(work / "lora" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in key for key in adapter)


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading the model fails the test: the refusals must come before it."""
    from llamafactory.train.sft import workflow

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(workflow, "load_model", load_model)


def test_missing_cache_refused(work: Path, upstream: Path, no_model_load) -> None:
    message = refused("train", "--target", "llamafactory", "--ref-cache", work / "nowhere", "--", train_yaml(work, "missing"))
    assert "nowhere" in message


def test_wrong_cache_refused(work: Path, cache: Path, no_model_load) -> None:
    """A cache built with another cutoff_len (LLaMA-Factory's truncation): the max_length field differs."""
    message = refused("train", "--target", "llamafactory", "--ref-cache", cache, "--", train_yaml(work, "wrong"), "cutoff_len=48")
    assert "max_length: cache has 64, this run has 48" in message


def test_stale_cache_refused(work: Path, cache: Path, no_model_load) -> None:
    """One answer edited after the teacher pass: the dataset field (file digest, probe) differs."""
    data = work / "data_edited"
    shutil.copytree(work / "data", data)
    records = json.loads((data / "tiny_vqa.json").read_text())
    records[5]["messages"][1]["content"] = records[5]["messages"][1]["content"].replace("picture", "shape")
    (data / "tiny_vqa.json").write_text(json.dumps(records))
    message = refused("train", "--target", "llamafactory", "--ref-cache", cache, "--", train_yaml(work, "stale", data=data))
    assert "dataset: cache has" in message and "|data=" in message


def test_run_checks_cache_before_model_load(work: Path, cache: Path, no_model_load) -> None:
    """Without the command line's check (a rank of a launcher that skips it), LLaMA-Factory's own run
    refuses the cache against the dataset it built, still before loading the model."""
    from llamafactory.train.tuner import run_exp

    from regate_plugin.config import ReGATEConfig
    from regate_plugin.patches import llamafactory as target

    target.apply(ReGATEConfig(), str(cache))
    with pytest.raises(RefCacheError, match="max_length: cache has 64, this run has 48"):
        run_exp(target._read_args([str(train_yaml(work, "in_run")), "cutoff_len=48"]))


@pytest.mark.parametrize("setting", ["packing=true", "neat_packing=true"])
def test_packing_refused_with_reason(work: Path, upstream: Path, no_model_load, setting: str) -> None:
    message = refused("train", "--target", "llamafactory", "--packing-only", "--", train_yaml(work, "packed"), setting)
    assert "sample index" in message and "set packing: false" in message
