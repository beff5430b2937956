"""The llava target on LLaVA's real code (llava-torch 1.2.2.post1, transformers 4.37) with tiny local assets."""

import json
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


def regate(*args, cwd):
    done = subprocess.run([sys.executable, "-m", "regate_plugin", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def history(output_dir, key):
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return {e["step"]: e[key] for e in state["log_history"] if key in e}


@pytest.fixture(scope="module")
def cache(tmp_path_factory, assets):
    root = tmp_path_factory.mktemp("score")
    regate("score", "--target", "llava", "--teacher", str(assets["llm"]), "--out", str(root / "cache"), "--shard-size", "7",
           "--no-progress", "--", *llava_assets.llava_args(assets, root / "unused"), cwd=root)
    return root / "cache"


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


def test_regate_train_runs_upstream_train_with_the_schedule_and_checkpoints(tmp_path, assets, cache):
    out = tmp_path / "run"
    regate("train", "--target", "llava", "--regate", "--ref-cache", str(cache), *SCHEDULE, "--",
           *llava_assets.llava_args(assets, out, steps=STEPS), cwd=tmp_path)
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
    recorder = Path(__file__).with_name("record_losses.py")
    losses = {}
    for name, flags in (("upstream", ["--no-regate"]), ("dense", ["--ref-cache", str(cache), "--keep-ratio", "1.0"])):
        done = subprocess.run([sys.executable, str(recorder), str(tmp_path / f"{name}.json"), "train", "--target", "llava",
                               *flags, "--", *llava_assets.llava_args(assets, tmp_path / name, steps=STEPS)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-5000:]
        losses[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert len(losses["upstream"]) == len(losses["dense"]) == STEPS
    for step, (expected, got) in enumerate(zip(losses["upstream"], losses["dense"])):
        assert got == pytest.approx(expected, abs=1e-5), step
    assert "regate/keep_ratio" not in (tmp_path / "upstream" / "trainer_state.json").read_text()
    dense_history = tmp_path / "dense"
    assert sum(history(dense_history, "regate/llm_tokens").values()) < sum(history(dense_history, "regate/padded_tokens").values())


def test_cache_for_another_dataset_is_refused_before_training(tmp_path, assets, cache):
    records = json.loads(Path(assets["data"]).read_text())
    changed = tmp_path / "data.json"
    changed.write_text(json.dumps(records[:-1]))
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "regate_plugin", "train", "--target", "llava", "--ref-cache", str(cache),
                           "--", *llava_assets.llava_args(assets, out, steps=2, **{"--data_path": str(changed)})],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "was built for a different setup" in done.stderr and "dataset: cache has" in done.stderr
    assert not list(out.glob("checkpoint-*"))
