"""The llamafactory target through LLaMA-Factory's own entry points (its ``llamafactory-cli`` launcher and
``run_exp``), on a tiny LLaVA-1.5-HF and a sharegpt dataset registered in a local dataset_info.json.

All runs share one process, as ``regate train`` runs LLaMA-Factory in-process: the unpatched runs come
first (the ``upstream`` fixture), since ``apply`` patches LLaMA-Factory's classes for the process."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from regate_plugin.cli import main
from regate_plugin.refcache import RefCache, RefCacheError

import lf_assets as assets
from framework_runs import check_sparse_steps, two_rank_train

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
    """Run ``regate``, expect exit status 1 with one ``Error:`` message (no traceback), and return the output
    from it on (once training started, it may follow a progress bar's output on the same line)."""
    result = regate(*args)
    assert result.exit_code == 1 and result.output.count("Error:") == 1, (result.output, result.exception)
    assert "Traceback" not in result.output
    return result.output[result.output.index("Error:"):]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


@pytest.fixture(scope="module")
def upstream(work: Path) -> Path:
    """``llamafactory-cli train work/upstream.yaml``, unpatched (before any run applies ReGATE); and
    ``regate train --no-regate`` of the same, saving checkpoints without ReGATE state (a baseline's)."""
    from llamafactory.cli import main as llamafactory_cli

    yaml = train_yaml(work, "upstream")
    argv, sys.argv = sys.argv, ["llamafactory-cli", "train", str(yaml)]
    try:
        llamafactory_cli()
    finally:
        sys.argv = argv
    run_ok("train", "--target", "llamafactory", "--no-regate", "--",
           train_yaml(work, "no_regate", save_strategy="steps", save_steps=2))
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
    check_sparse_steps(assets.log_history(sparse), sparse / "checkpoint-4")


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
    """``regate train`` under torchrun (gloo, 2 ranks, one sample per rank and micro-batch): the same
    global batches as the one-process run, so the rank-summed counts of every step are its counts; and
    both ranks hold the same EMA table after every step, one that training moved."""
    rank0, rank1 = two_rank_train(["--target", "llamafactory", "--ref-cache", str(cache), *SPARSE, "--",
                                   str(train_yaml(work, "two_ranks", per_device_train_batch_size=1))],
                                  work / "two_ranks", work / "two_ranks_ema")
    counts = ("regate/keep_ratio", "regate/supervised_total", "regate/supervised_kept")
    assert [[e[k] for k in counts] for e in assets.log_history(work / "two_ranks")] == \
        [[e[k] for k in counts] for e in assets.log_history(sparse)]
    assert len(rank0) == 6 and rank0 == rank1
    assert len(set(rank0)) == 6  # every step changed the table


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


@pytest.mark.parametrize("mode", [["--packing-only"], ["--ref-cache"]], ids=["in_run", "before_launch"])
@pytest.mark.parametrize("setting", ["use_dft_loss=true", "use_eaft_loss=true", "use_asft_loss=true",
                                     "label_smoothing_factor=0.1"])
def test_losses_llamafactory_computes_itself_are_refused_by_name(work: Path, cache: Path, no_model_load, setting: str,
                                                                mode: list[str]) -> None:
    """They make the Trainer pop the labels (a compute_loss_func, a label smoother): ReGATE's forward would
    fall back to the dense one on every step. Refused before the model loads, by the pre-launch check
    and by the run's own argument parsing (what a rank of a launcher that skips the check meets)."""
    options = [*mode, cache] if mode == ["--ref-cache"] else mode
    message = refused("train", "--target", "llamafactory", *options, "--", train_yaml(work, "own_loss"), setting)
    name, value = setting.split("=")
    assert message.startswith(f"Error: {name}") and f"set {name}: {'false' if value == 'true' else 0}" in message


def test_resume_from_a_checkpoint_without_regate_state(work: Path, upstream: Path, cache: Path) -> None:
    """A baseline run's checkpoint: refused in one line that names the flag, then resumed with it (the EMA
    from the reference losses, the schedule at the resumed step)."""
    checkpoint = work / "no_regate" / "checkpoint-2"
    assert not (checkpoint / "regate_state.pt").exists()
    yaml = train_yaml(work, "switched_on", student=checkpoint, resume_from_checkpoint=str(checkpoint),
                      save_strategy="steps", save_steps=2)
    message = refused("train", "--target", "llamafactory", "--ref-cache", cache, *SPARSE, "--", yaml)
    assert f"resuming from {checkpoint}, which holds no regate_state.pt" in message
    assert "--resume-without-regate-state" in message and "attach(" in message

    run_ok("train", "--target", "llamafactory", "--ref-cache", cache, *SPARSE, "--resume-without-regate-state", "--", yaml)
    log = assets.log_history(work / "switched_on")
    assert [e["step"] for e in log] == [1, 2, 3, 4, 5, 6] and not any("regate/keep_ratio" in e for e in log[:2])
    assert [e["regate/keep_ratio"] for e in log[2:]] == [1.0, 0.5, 1.0, 0.5]  # optimizer steps 2-5 of the schedule
    state = torch.load(work / "switched_on" / "checkpoint-4" / "regate_state.pt", weights_only=True)
    reference, ema = RefCache.open(cache).all_losses(), state["ema"]["values"]
    moved = ema != reference  # two steps of four samples from the reference losses
    samples = torch.bucketize(moved.nonzero().flatten(), RefCache.open(cache).offsets_tensor(), right=True).unique()
    assert state["step"] == 4 and moved.any() and 0 < len(samples) <= 8


def test_ref_cache_run_tokenizes_the_dataset_once(work: Path, cache: Path, monkeypatch) -> None:
    """The pre-launch check's dataset (same arguments) is the run's: LLaMA-Factory preprocesses it once."""
    from llamafactory.data import loader

    calls = []
    preprocess = loader._get_preprocessed_dataset

    def counted(dataset, *args, **kwargs):
        calls.append(len(dataset))
        return preprocess(dataset, *args, **kwargs)

    monkeypatch.setattr(loader, "_get_preprocessed_dataset", counted)
    run_ok("train", "--target", "llamafactory", "--ref-cache", cache, *SPARSE, "--", train_yaml(work, "once", max_steps=2))
    assert calls == [16]
    assert [e["regate/keep_ratio"] for e in assets.log_history(work / "once")] == [1.0, 0.5]


@pytest.mark.parametrize(("schedule", "steps", "warning"), [
    (["--warmup", "2"], ["max_steps=2"], "none of this run's optimizer steps 1-2 is sparse"),
    (["--warmup", "3"], ["max_steps=-1", "num_train_epochs=1"], "none of this run's optimizer steps 1-4 is sparse"),
    (["--warmup", "2"], ["max_steps=-1", "num_train_epochs=1"], None),  # step 4 is sparse
], ids=["max_steps", "epochs", "reaches_sparse"])
def test_a_run_without_sparse_steps_says_so_at_start(work: Path, cache: Path, caplog, schedule: list[str],
                                                     steps: list[str], warning: str | None) -> None:
    """16 samples in batches of 2 x 2 accumulated: an epoch is 4 optimizer steps."""
    with caplog.at_level(logging.WARNING, logger="regate_plugin.trainer"):
        run_ok("train", "--target", "llamafactory", "--ref-cache", cache, "--cycle", "2", "--dense-steps", "1",
               "--keep-ratio", "0.5", *schedule, "--", train_yaml(work, "short"), *steps)
    said = [r.getMessage() for r in caplog.records if r.name == "regate_plugin.trainer" and "is sparse" in r.getMessage()]
    if warning is None:
        assert said == []
    else:
        assert len(said) == 1 and said[0].startswith(f"ReGATE: {warning}") and f"warmup {schedule[1]}," in said[0]


def test_a_run_that_bypasses_the_patched_trainer_is_an_error(work: Path, monkeypatch) -> None:
    """A LLaMA-Factory whose SFT workflow builds another trainer class trains dense: an error, not silence."""
    from llamafactory.train.sft import workflow
    from transformers import Seq2SeqTrainer

    class OtherTrainer(Seq2SeqTrainer):
        """Takes the arguments the SFT workflow gives CustomSeq2SeqTrainer; not a subclass of it."""

        def __init__(self, finetuning_args, processor, gen_kwargs=None, ref_model=None, **kwargs):
            super().__init__(processing_class=kwargs.pop("tokenizer"), **kwargs)

    monkeypatch.setattr(workflow, "CustomSeq2SeqTrainer", OtherTrainer)
    message = refused("train", "--target", "llamafactory", "--packing-only", "--",
                      train_yaml(work, "other_trainer", max_steps=1))
    assert "trained without ReGATE" in message and "CustomSeq2SeqTrainer never ran" in message
    assert assets.log_history(work / "other_trainer")  # it did train, dense


def test_sparse_steps_are_found_in_the_schedule_in_use(cache: Path) -> None:
    """The built-in schedule in closed form agrees with it step by step; a plugin's is asked."""
    from regate_plugin.config import ReGATEConfig
    from regate_plugin.engine import ReGATEEngine
    from regate_plugin.hookspecs import hookimpl
    from regate_plugin.plugins import build_plugin_manager
    from regate_plugin.schedule import keep_ratio_at
    from regate_plugin.trainer import reaches_sparse_step

    refcache = RefCache.open(cache)
    for warmup, cycle, dense, keep in [(0, 2, 1, 0.5), (3, 4, 2, 0.5), (5, 3, 3, 0.5), (2, 4, 1, 1.0)]:
        config = ReGATEConfig(warmup=warmup, cycle=cycle, dense_steps=dense, keep_ratio=keep)
        engine = ReGATEEngine(config, refcache)
        for start in range(12):
            for stop in range(start, 14):
                brute = any(keep_ratio_at(step, config) < 1 for step in range(start, stop))
                assert reaches_sparse_step(engine, start, stop) == brute, (config, start, stop)

    class SparseAtFive:
        @hookimpl
        def regate_keep_ratio(self, step):
            return 0.5 if step == 5 else 1.0

    engine = ReGATEEngine(ReGATEConfig(warmup=0, cycle=2, dense_steps=1), refcache,
                          pm=build_plugin_manager(load_entrypoints=False, extra=[SparseAtFive()]))
    assert not reaches_sparse_step(engine, 0, 5) and reaches_sparse_step(engine, 0, 6)
    assert not reaches_sparse_step(engine, 6, 100)
