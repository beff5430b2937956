"""The swift target through ms-swift's own SFT entry (``swift.pipelines.sft_main``, what ``swift sft`` runs),
on a tiny LLaVA-1.5-HF (model type and template ``llava1_5_hf``) and a local jsonl dataset with pictures.

All runs share one process, as ``regate train`` runs ms-swift in-process: the unpatched runs come first
(the ``upstream`` fixture), since ``apply`` patches ms-swift's classes for the process. ms-swift's
gradient checkpointing is on by default, in every run here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from regate_plugin.cli import main
from regate_plugin.refcache import RefCache, RefCacheError

import swift_assets as assets
from framework_runs import check_sparse_steps, two_rank_train

SPARSE = ["--keep-ratio", "0.5", "--warmup", "0", "--cycle", "2", "--dense-steps", "1"]  # odd steps sparse


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("swift")
    assets.build_student(root / "student")
    assets.build_teacher(root / "teacher")
    assets.build_dataset(root / "data")
    return root


def sft(work: Path, name: str, **overrides) -> list[str]:
    """``swift sft`` arguments training into ``work/name``, a checkpoint every 2 steps; overrides may
    replace the student (``model``) and the data (``dataset``)."""
    overrides = {"save_strategy": "steps", "save_steps": 2, **overrides}
    student, data = overrides.pop("model", work / "student"), overrides.pop("dataset", work / "data" / "tiny_vqa.jsonl")
    return assets.sft_args(student, data, work / name, **overrides)


def regate(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def run_ok(*args) -> None:
    result = regate(*args)
    assert result.exit_code == 0, (result.output[-1500:], result.exception)


def refused(*args) -> str:
    """Run ``regate``, expect exit status 1 with one ``Error:`` message (no traceback), and return the output
    from it on."""
    result = regate(*args)
    assert result.exit_code == 1 and result.output.count("Error:") == 1, (result.output[-3000:], result.exception)
    assert "Traceback" not in result.output
    return result.output[result.output.index("Error:"):]


def final(out: Path) -> Path:
    return out / "checkpoint-6"


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(final(out) / "model.safetensors"))


@pytest.fixture(scope="module")
def upstream(work: Path) -> Path:
    """ms-swift's own ``sft_main``, unpatched (before any run applies ReGATE); and ``regate train --no-regate``
    of the same arguments, into another folder."""
    from swift.pipelines import sft_main

    sft_main(sft(work, "upstream"))
    run_ok("train", "--target", "swift", "--no-regate", "--", *sft(work, "no_regate"))
    return work / "upstream"


@pytest.fixture(scope="module")
def cache(work: Path, upstream: Path) -> Path:
    """The teacher pass through ms-swift's own dataset loading and template."""
    run_ok("score", "--target", "swift", "--teacher", work / "teacher", "--out", work / "cache", "--no-progress",
           "--", *sft(work, "score"))
    return work / "cache"


@pytest.fixture(scope="module")
def sparse(work: Path, cache: Path) -> Path:
    """A ReGATE run with every other step sparse, checkpoints every 2 steps."""
    run_ok("train", "--target", "swift", "--ref-cache", cache, *SPARSE, "--", *sft(work, "sparse"))
    return work / "sparse"


def test_no_regate_is_upstream_exactly(work: Path, upstream: Path) -> None:
    ours, theirs = assets.log_history(final(work / "no_regate")), assets.log_history(final(upstream))
    assert len(theirs) == 6
    assert [(e["loss"], e["grad_norm"]) for e in ours] == [(e["loss"], e["grad_norm"]) for e in theirs]
    assert not any(key.startswith("regate/") for e in ours for key in e)
    mine, base = weights(work / "no_regate"), weights(upstream)
    assert mine.keys() == base.keys() and all(torch.equal(mine[k], base[k]) for k in base)


def test_cache_is_built_from_swift_samples(work: Path, cache: Path) -> None:
    """The teacher pass saw ms-swift's template encoding: its expanded visual tokens (4 per picture) and
    its max_length; the text-only view pads exactly those."""
    from regate_plugin.patches.swift import parse, scoring_source

    fingerprint = RefCache.open(cache).fingerprint
    image_id = assets.build_tokenizer().convert_tokens_to_ids("<image>")
    assert fingerprint.visual_tokens == f"expanded in input_ids: {image_id}"
    assert fingerprint.max_length == 64 and fingerprint.dataset.startswith("swift:")
    assert "template=llava1_5_hf|" in fingerprint.dataset
    source = scoring_source(sft(work, "probe"), "")
    ids, labels = source.text_only(0)
    args = parse(sft(work, "probe"))
    template = args.get_template(args.get_model_processor(load_model=False)[1])
    template.set_mode("train")
    encoded = template.encode(args.load_dataset()[0][0])  # ms-swift's own encoding of sample 0
    assert encoded["input_ids"].count(image_id) == assets.VISUAL_TOKENS and image_id not in ids.tolist()
    assert labels.tolist() == encoded["labels"] and len(ids) == len(encoded["input_ids"])
    assert RefCache.open(cache).num_samples == 16


def test_keep_one_matches_upstream(work: Path, upstream: Path, cache: Path) -> None:
    run_ok("train", "--target", "swift", "--ref-cache", cache, "--keep-ratio", "1.0", "--warmup", "0", "--",
           *sft(work, "keep_one"))
    assert json.loads((work / "keep_one" / "args.json").read_text())["gradient_checkpointing"] is True
    ours, theirs = assets.log_history(final(work / "keep_one")), assets.log_history(final(upstream))
    assert [e["loss"] for e in ours] == pytest.approx([e["loss"] for e in theirs], abs=1e-5)
    assert [e["grad_norm"] for e in ours] == pytest.approx([e["grad_norm"] for e in theirs], abs=1e-5)
    assert all(e["regate/supervised_kept"] == e["regate/supervised_total"] > 0 for e in ours)
    assert all(e["regate/llm_tokens"] < e["regate/padded_tokens"] for e in ours)  # padding removed
    mine, base = weights(work / "keep_one"), weights(upstream)
    assert all(torch.allclose(mine[k], base[k], atol=1e-5) for k in base)


def test_a_template_merging_before_the_forward_leaves_it_to_the_model(work: Path, upstream: Path, cache: Path,
                                                                      monkeypatch) -> None:
    """ms-swift's Qwen2-VL and InternVL-HF templates merge the visual features into ``inputs_embeds`` in a hook
    before the forward and drop the input ids. A ReGATE training forward gets the batch as collated instead,
    and the model merges the pictures itself: still ms-swift's own run within 1e-5, while evaluation
    forwards keep ms-swift's hook."""
    from swift.template.templates.llava import LlavaHfTemplate

    hooked = []

    def merged_before_forward(self, model, inputs):  # as Qwen2VLTemplate._post_encode, minus the pictures
        hooked.append(model.training)
        return {"inputs_embeds": model.get_input_embeddings()(inputs["input_ids"])}

    monkeypatch.setattr(LlavaHfTemplate, "_post_encode", merged_before_forward, raising=False)
    data = work / "data" / "tiny_vqa.jsonl"
    run_ok("train", "--target", "swift", "--ref-cache", cache, "--keep-ratio", "1.0", "--warmup", "0", "--",
           *sft(work, "merged", val_dataset=data, eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=4))
    ours, theirs = assets.log_history(final(work / "merged")), assets.log_history(final(upstream))
    assert [e["loss"] for e in ours] == pytest.approx([e["loss"] for e in theirs], abs=1e-5)
    assert hooked and not any(hooked)  # evaluation only


def test_sparse_steps_elide(sparse: Path) -> None:
    check_sparse_steps(assets.log_history(final(sparse)), sparse / "checkpoint-4")


def test_resume_is_exact(work: Path, cache: Path, sparse: Path) -> None:
    """Resuming the sparse run at step 4 gives its steps 5-6 again (the model loaded from the checkpoint:
    transformers 5.x's Trainer does not convert Llava's saved key names when it resumes a full model)."""
    checkpoint = sparse / "checkpoint-4"
    run_ok("train", "--target", "swift", "--ref-cache", cache, *SPARSE, "--",
           *sft(work, "resumed", model=checkpoint, resume_from_checkpoint=checkpoint))
    resumed = assets.log_history(final(work / "resumed"))  # steps 1-4 are the checkpoint's own log
    assert [e["step"] for e in resumed] == [1, 2, 3, 4, 5, 6]
    assert resumed[4:] == assets.log_history(final(sparse))[4:] and resumed[5]["regate/keep_ratio"] == 0.5
    mine, base = weights(work / "resumed"), weights(sparse)
    assert all(torch.equal(mine[k], base[k]) for k in base)


def test_lora_runs_and_evaluates(work: Path, cache: Path) -> None:
    """LoRA, with ms-swift's evaluation every 3 steps (upstream's forward on samples without an index)."""
    data = work / "data" / "tiny_vqa.jsonl"
    run_ok("train", "--target", "swift", "--ref-cache", cache, *SPARSE, "--",
           *sft(work, "lora", tuner_type="lora", target_modules=["q_proj", "v_proj"], lora_rank=4, lora_alpha=8,
                val_dataset=data, eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=4))
    state = json.loads((final(work / "lora") / "trainer_state.json").read_text())
    evals = [e for e in state["log_history"] if "eval_loss" in e]
    assert [e["step"] for e in evals] == [3, 6] and all(torch.isfinite(torch.tensor(e["eval_loss"])) for e in evals)
    log = assets.log_history(final(work / "lora"))
    assert len(log) == 6 and all(torch.isfinite(torch.tensor(e["loss"])) for e in log)
    assert all(e["regate/supervised_kept"] < e["regate/supervised_total"] for e in log[1::2])
    adapter = load_file(str(final(work / "lora") / "adapter_model.safetensors"))
    assert adapter and all("lora_" in key for key in adapter)


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading the model fails the test: the refusals must come before it (the processor alone may load)."""
    from swift.arguments.base_args import base_args

    load = base_args.get_model_processor

    def get_model_processor(*args, **kwargs):
        if kwargs.get("load_model", True):
            raise AssertionError("the model was loaded before the refusal")
        return load(*args, **kwargs)

    monkeypatch.setattr(base_args, "get_model_processor", get_model_processor)


def test_missing_cache_refused(work: Path, upstream: Path, no_model_load) -> None:
    message = refused("train", "--target", "swift", "--ref-cache", work / "nowhere", "--", *sft(work, "missing"))
    assert "nowhere" in message


def test_wrong_cache_refused(work: Path, cache: Path, no_model_load) -> None:
    """A cache built with another max_length (ms-swift's truncation): the max_length field differs."""
    message = refused("train", "--target", "swift", "--ref-cache", cache, "--", *sft(work, "wrong", max_length=48))
    assert "max_length: cache has 64, this run has 48" in message


def test_stale_cache_refused(work: Path, cache: Path, no_model_load) -> None:
    """One answer edited after the teacher pass: the dataset field (file digest, probe) differs."""
    lines = (work / "data" / "tiny_vqa.jsonl").read_text().splitlines()
    lines[5] = lines[5].replace("picture", "shape")
    edited = work / "data" / "edited.jsonl"
    edited.write_text("\n".join(lines) + "\n")
    message = refused("train", "--target", "swift", "--ref-cache", cache, "--", *sft(work, "stale", dataset=edited))
    assert "dataset: cache has" in message and "|data=" in message


def test_run_checks_cache_before_model_load(work: Path, cache: Path, no_model_load) -> None:
    """Without the command line's check (a rank of a launcher that skips it), ms-swift's own run refuses
    the cache against the samples its template encodes, still before loading the model."""
    from swift.pipelines import sft_main

    from regate_plugin.config import ReGATEConfig
    from regate_plugin.patches import swift as target

    target.apply(ReGATEConfig(), str(cache))
    with pytest.raises(RefCacheError, match="max_length: cache has 64, this run has 48"):
        sft_main(sft(work, "in_run", max_length=48))


REFUSED = {  # setting -> what the message tells to do
    "packing": (["--packing", "true", "--attn_impl", "flash_attn"], "set --packing false"),
    "padding_free": (["--padding_free", "true", "--attn_impl", "flash_attn"], "set --padding_free false"),
    "sequence_parallel": (["--sequence_parallel_size", "2"], "set --sequence_parallel_size 1"),
    "streaming": (["--streaming", "true"], "set --streaming false"),
    "task_type": (["--task_type", "seq_cls", "--num_labels", "2"], "set --task_type causal_lm"),
    "loss_type": (["--loss_type", "dft"], "remove --loss_type"),
    "loss_scale": (["--loss_scale", "last_round"], "set --loss_scale default"),
    "dft_loss": (["--enable_dft_loss", "true"], "set --enable_dft_loss false"),
    "channel_loss": (["--enable_channel_loss", "true"], "set --enable_channel_loss false"),
    "label_smoothing": (["--label_smoothing_factor", "0.1"], "set --label_smoothing_factor 0"),
    "logits_to_keep": (["--use_logits_to_keep", "true"], "remove --use_logits_to_keep"),
    "group_by_length": (["--group_by_length", "true"], "set --group_by_length false"),
    "split_truncation": (["--truncation_strategy", "split"], "set --truncation_strategy right"),
}


@pytest.mark.parametrize("mode", ["--packing-only", "--ref-cache"], ids=["in_run", "before_launch"])
@pytest.mark.parametrize("setting", sorted(REFUSED))
def test_settings_refused_by_name_before_the_model_loads(work: Path, cache: Path, no_model_load, setting: str,
                                                         mode: str) -> None:
    """Refused by the pre-launch check (``--ref-cache``) and by the run's own argument parsing (what a rank
    of a launcher that skips the check meets, and ``--packing-only``), in one line naming the fix."""
    extra, fix = REFUSED[setting]
    options = [mode, cache] if mode == "--ref-cache" else [mode]
    message = refused("train", "--target", "swift", *options, "--", *sft(work, "refused"), *extra)
    assert fix in message and message.count("\n") == 1


def test_attention_is_swift_own_setting(work: Path, upstream: Path, no_model_load) -> None:
    message = refused("train", "--target", "swift", "--packing-only", "--attn-implementation", "sdpa", "--",
                      *sft(work, "attention"))
    assert message.startswith("Error: --attn-implementation does not apply to ms-swift: pass --attn_impl")


def test_resume_from_a_checkpoint_without_regate_state(work: Path, upstream: Path, cache: Path) -> None:
    """A baseline run's checkpoint: refused in one line that names the flag, then resumed with it."""
    checkpoint = work / "no_regate" / "checkpoint-2"
    assert not (checkpoint / "regate_state.pt").exists()
    args = sft(work, "switched_on", model=checkpoint, resume_from_checkpoint=checkpoint)
    message = refused("train", "--target", "swift", "--ref-cache", cache, *SPARSE, "--", *args)
    assert f"resuming from {checkpoint}, which holds no regate_state.pt" in message
    assert "--resume-without-regate-state" in message

    run_ok("train", "--target", "swift", "--ref-cache", cache, *SPARSE, "--resume-without-regate-state", "--", *args)
    log = assets.log_history(final(work / "switched_on"))
    assert [e["step"] for e in log] == [1, 2, 3, 4, 5, 6] and not any("regate/keep_ratio" in e for e in log[:2])
    assert [e["regate/keep_ratio"] for e in log[2:]] == [1.0, 0.5, 1.0, 0.5]  # optimizer steps 2-5 of the schedule


def test_ref_cache_run_loads_the_dataset_once(work: Path, cache: Path, monkeypatch) -> None:
    """The pre-launch check's parsed arguments and datasets (same arguments) are the run's."""
    from swift.arguments import SftArguments

    calls = []
    load = SftArguments.load_dataset

    def counted(self):
        calls.append(self.output_dir)
        return load(self)

    monkeypatch.setattr(SftArguments, "load_dataset", counted)
    run_ok("train", "--target", "swift", "--ref-cache", cache, *SPARSE, "--", *sft(work, "once", max_steps=2))
    assert calls == [str(work / "once")]
    assert [e["regate/keep_ratio"] for e in assets.log_history(work / "once" / "checkpoint-2")] == [1.0, 0.5]


def test_a_run_that_bypasses_the_patched_trainer_is_an_error(work: Path, monkeypatch) -> None:
    """An ms-swift whose SFT pipeline builds another trainer class trains dense: an error, not silence."""
    from swift.trainers import TrainerFactory
    from swift.trainers.mixin import DataLoaderMixin, SwiftMixin
    from transformers import Seq2SeqTrainer

    other = type("OtherTrainer", (SwiftMixin, DataLoaderMixin, Seq2SeqTrainer), {})  # not swift's Seq2SeqTrainer
    monkeypatch.setattr(TrainerFactory, "get_trainer_cls", staticmethod(lambda args: other))
    message = refused("train", "--target", "swift", "--packing-only", "--", *sft(work, "other_trainer", max_steps=2))
    assert "trained without ReGATE" in message and "Seq2SeqTrainer.__init__ never ran" in message
    assert (work / "other_trainer" / "checkpoint-2").is_dir()  # it did train, dense


def test_torchrun_two_ranks(work: Path, cache: Path, sparse: Path) -> None:
    """``regate train`` under torchrun (gloo, 2 ranks, one sample per rank and micro-batch, accumulation 2):
    the same global batches as the one-process run with 2 samples per micro-batch, so the rank-summed
    counts of every step are its counts; both ranks hold the same EMA table after every step."""
    rank0, rank1 = two_rank_train(["--target", "swift", "--ref-cache", str(cache), *SPARSE, "--",
                                   *sft(work, "two_ranks", per_device_train_batch_size=1)],
                                  work / "two_ranks", work / "two_ranks_ema")
    counts = ("regate/keep_ratio", "regate/supervised_total", "regate/supervised_kept")
    assert [[e[k] for k in counts] for e in assets.log_history(final(work / "two_ranks"))] == \
        [[e[k] for k in counts] for e in assets.log_history(final(sparse))]
    assert len(rank0) == 6 and rank0 == rank1
    assert len(set(rank0)) == 6  # every step changed the table
