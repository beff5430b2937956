"""The llava target on LLaVA's real code (llava-torch 1.2.2.post1, transformers 4.37) with tiny local assets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import llava_assets
from regate_plugin.refcache import RefCache
from regate_plugin.schedule import keep_ratio_at
from regate_plugin.config import ReGATEConfig
from regate_plugin.units import IGNORE_INDEX

SCHEDULE = ["--warmup", "4", "--cycle", "6", "--dense-steps", "2", "--keep-ratio", "0.5"]
STEPS = 20


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return llava_assets.build(tmp_path_factory.mktemp("assets"))


# torch >= 2.6 loads weights-only by default; resuming must work without this escape hatch
ENV = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
RECORDER = Path(__file__).with_name("record_losses.py")


def regate(*args, cwd):
    done = subprocess.run([sys.executable, "-m", "regate_plugin", *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def recorded_train(losses_json, *args, cwd):
    """`regate train ARGS` through record_losses.py: every step's exact loss in ``losses_json``."""
    done = subprocess.run([sys.executable, str(RECORDER), str(losses_json), "train", "--target", "llava", *args],
                          cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads(Path(losses_json).read_text())


def without(args, flag):
    """Command-line ``args`` less ``flag`` and its value."""
    at = args.index(flag)
    return args[:at] + args[at + 2 :]


def history(output_dir, key):
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return {e["step"]: e[key] for e in state["log_history"] if key in e}


@pytest.fixture(scope="module")
def cache(tmp_path_factory, assets):
    """The teacher pass on the training run's own arguments, less --output_dir (score needs none)."""
    root = tmp_path_factory.mktemp("score")
    regate("score", "--target", "llava", "--teacher", str(assets["llm"]), "--out", str(root / "cache"), "--shard-size", "7",
           "--no-progress", "--", *without(llava_assets.llava_args(assets, root / "unused"), "--output_dir"), cwd=root)
    return root / "cache"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, assets, cache):
    """An uninterrupted ReGATE run of STEPS steps (checkpoints at 10 and 20) and its exact losses."""
    root = tmp_path_factory.mktemp("full")
    losses = recorded_train(root / "losses.json", "--regate", "--ref-cache", str(cache), *SCHEDULE, "--",
                            *llava_assets.llava_args(assets, root / "run", steps=STEPS), cwd=root)
    return root / "run", losses


def test_score_arguments_need_no_output_dir(assets):
    """Upstream's TrainingArguments require --output_dir; the teacher pass reads only the sample arguments,
    and the same with the training run's full command line (--bf16, --output_dir ...)."""
    from regate_plugin.patches.llava import LlavaScoringSource

    args = llava_assets.llava_args(assets, Path("unused"))
    alone = LlavaScoringSource(without(args, "--output_dir"), "")
    assert alone.expected() == LlavaScoringSource(args, "").expected()
    assert alone.expected()["max_length"] == 128


def test_cache_equals_teacher_on_independently_spliced_samples(assets, cache):
    """Reference: LLaVA's tokenization, then the image placeholder (-200) replaced by hand with
    4 pad tokens (28/14 squared) and truncated to model_max_length; the teacher run on each alone."""
    import copy

    import transformers
    from llava import conversation
    from llava.train import train as llava_train

    tokenizer = transformers.AutoTokenizer.from_pretrained(assets["llm"], model_max_length=128, padding_side="right", use_fast=False)
    tokenizer.pad_token = tokenizer.unk_token
    conversation.default_conversation = conversation.conv_templates["v1"]
    teacher = transformers.LlamaForCausalLM.from_pretrained(assets["llm"]).eval()
    data_args = type("DataArgs", (), {"is_multimodal": True, "mm_use_im_start_end": False})
    stored = RefCache.open(cache)
    for index, record in enumerate(json.loads(Path(assets["data"]).read_text())):
        sample = llava_train.preprocess(
            llava_train.preprocess_multimodal(copy.deepcopy([record["conversations"]]), data_args), tokenizer, has_image=True
        )
        ids, labels = sample["input_ids"][0].tolist(), sample["labels"][0].tolist()
        at = ids.index(-200)
        ids = (ids[:at] + [tokenizer.pad_token_id] * 4 + ids[at + 1 :])[:128]
        labels = (labels[:at] + [IGNORE_INDEX] * 4 + labels[at + 1 :])[:128]
        labels = torch.tensor(labels)
        with torch.no_grad():
            logits = teacher(input_ids=torch.tensor([ids])).logits[0]
        positions = (labels[1:] != IGNORE_INDEX).nonzero().flatten()
        direct = F.cross_entropy(logits[positions], labels[positions + 1], reduction="none")
        torch.testing.assert_close(torch.from_numpy(stored.sample(index)), direct, atol=2e-3, rtol=1e-3)
    assert stored.num_units > 200


def test_regate_train_runs_upstream_train_with_the_schedule_and_checkpoints(full_run, cache):
    out, _ = full_run
    ratios = history(out, "regate/keep_ratio")
    kept, total = history(out, "regate/supervised_kept"), history(out, "regate/supervised_total")
    config = ReGATEConfig(warmup=4, cycle=6, dense_steps=2, keep_ratio=0.5)
    assert sorted(ratios) == list(range(1, STEPS + 1))
    for step, ratio in ratios.items():
        assert ratio == keep_ratio_at(step - 1, config)
        if ratio == 1.0:
            assert kept[step] == total[step]
        else:
            assert total[step] / 2 <= kept[step] < total[step]  # ceil(p * n) per sample
    losses = history(out, "loss")
    assert sum(losses[s] for s in range(16, 21)) < sum(losses[s] for s in range(1, 6))
    for step in (10, 20):
        state = torch.load(out / f"checkpoint-{step}" / "regate_state.pt", weights_only=True)
        assert state["step"] == step and state["ema"]["values"].numel() == RefCache.open(cache).num_units


def test_keep_ratio_one_reproduces_upstream_losses(tmp_path, assets, cache):
    losses = {}
    for name, flags in (("upstream", ["--no-regate"]), ("dense", ["--ref-cache", str(cache), "--keep-ratio", "1.0"])):
        losses[name] = recorded_train(tmp_path / f"{name}.json", *flags, "--",
                                      *llava_assets.llava_args(assets, tmp_path / name, steps=STEPS), cwd=tmp_path)
    assert len(losses["upstream"]) == len(losses["dense"]) == STEPS
    for step, (expected, got) in enumerate(zip(losses["upstream"], losses["dense"])):
        assert got == pytest.approx(expected, abs=1e-5), step
    assert "regate/keep_ratio" not in (tmp_path / "upstream" / "trainer_state.json").read_text()
    dense_history = tmp_path / "dense"
    assert sum(history(dense_history, "regate/llm_tokens").values()) < sum(history(dense_history, "regate/padded_tokens").values())


def test_cache_for_another_dataset_is_refused_before_training(tmp_path, assets, cache):
    """As the user sees it: one `Error:` line with the differing fields, no traceback, no Trainer."""
    records = json.loads(Path(assets["data"]).read_text())
    changed = tmp_path / "data.json"
    changed.write_text(json.dumps(records[:-1]))
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "regate_plugin", "train", "--target", "llava", "--ref-cache", str(cache),
                           "--", *llava_assets.llava_args(assets, out, steps=2, **{"--data_path": str(changed)})],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    error = done.stderr[done.stderr.index("Error: "):]  # after transformers' import-time warnings
    assert error.startswith(f"Error: reference cache {cache} was built for a different setup:\n  dataset: cache has ")
    assert error.endswith("point --ref-cache at the matching cache.\n") and "Traceback" not in done.stderr
    assert not out.exists()  # the Trainer, which creates it, was never built


def test_cache_is_checked_before_upstream_loads_any_weight(tmp_path, assets, cache, monkeypatch):
    from click.testing import CliRunner
    from llava.train import train as llava_train

    from regate_plugin import cli

    def upstream_train(*args, **kwargs):
        raise AssertionError("upstream's train() started: it loads the weights")

    monkeypatch.setattr(llava_train, "train", upstream_train)
    args = llava_assets.llava_args(assets, tmp_path / "run", steps=2, **{"--model_max_length": "96"})
    result = CliRunner().invoke(cli.main, ["train", "--target", "llava", "--ref-cache", str(cache), "--", *args])
    assert result.exit_code == 1 and result.output.startswith(f"Error: reference cache {cache} was built for a different setup")
    assert "max_length: cache has 128, this run has 96" in result.output
    result = CliRunner().invoke(cli.main, ["train", "--target", "llava", "--ref-cache", str(tmp_path / "none"), "--", *args])
    assert result.exit_code == 1 and result.output == f"Error: no reference cache at {tmp_path / 'none'} (missing meta.json).\n"


def test_resume_without_torch_force_no_weights_only_load(tmp_path, assets, cache, full_run):
    """Transformers 4.36-4.37 read rng_state.pth weights-only under torch >= 2.6 and fail on its numpy
    state; regate train resumes (upstream's train() resumes from the last checkpoint of --output_dir)
    and continues exactly as the uninterrupted run."""
    import torch

    out = tmp_path / "run"
    first = recorded_train(tmp_path / "first.json", "--regate", "--ref-cache", str(cache), *SCHEDULE, "--",
                           *llava_assets.llava_args(assets, out, steps=10), cwd=tmp_path)
    resumed = recorded_train(tmp_path / "resumed.json", "--regate", "--ref-cache", str(cache), *SCHEDULE, "--",
                             *llava_assets.llava_args(assets, out, steps=STEPS), cwd=tmp_path)
    full_out, full_losses = full_run
    assert len(first) == len(resumed) == 10
    assert first + resumed == pytest.approx(full_losses, abs=1e-6)
    assert history(out, "regate/keep_ratio") == history(full_out, "regate/keep_ratio")
    state = torch.load(out / f"checkpoint-{STEPS}" / "regate_state.pt", weights_only=True)
    expected = torch.load(full_out / f"checkpoint-{STEPS}" / "regate_state.pt", weights_only=True)
    assert state["step"] == STEPS and torch.allclose(state["ema"]["values"], expected["ema"]["values"], atol=1e-6)
