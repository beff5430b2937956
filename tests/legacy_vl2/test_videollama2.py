"""The videollama2 target on VideoLLaMA2's real code (a checkout of main in $REGATE_VIDEOLLAMA2_SRC;
transformers 4.40-4.42) with tiny local assets: a Qwen2 + SigLIP + stc_connector_v35 run and a
Mistral + CLIP + stc_connector run, as VideoLLaMA2.1-7B-16F and VideoLLaMA2-7B, scaled down."""

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import vl2_assets

from regate_plugin.config import ReGATEConfig
from regate_plugin.engine import SAMPLE_INDEX_KEY
from regate_plugin.refcache import RefCache
from regate_plugin.schedule import keep_ratio_at
from regate_plugin.units import IGNORE_INDEX

pytestmark = pytest.mark.usefixtures("videollama2_src")
HERE = Path(__file__).parent
SCHEDULE = ["--warmup", "4", "--cycle", "6", "--dense-steps", "2", "--keep-ratio", "0.5"]
STEPS = 20
VARIANTS = sorted(vl2_assets.VARIANTS)
BROKEN = 9  # the sample whose video file cannot be read
# Visual tokens per image or video, by the connector formulas (the target runs the connector itself):
# stc_connector (T//2+1)*(S//2+1)^2, stc_connector_v35 (T//2)*(S//2)^2; T = 4 frames, S = patches per side.
VISUAL = {"qwen2": (4 // 2) * (5 // 2) ** 2, "mistral": (4 // 2 + 1) * (4 // 2 + 1) ** 2}
# One thread: the models are tiny, and OpenMP threads only add start-up and contention here. Without
# TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD: torch >= 2.6 loads weights-only by default, and resuming must work so.
ENV = {**{k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory, videollama2_src):
    return vl2_assets.build(tmp_path_factory.mktemp("assets"))


def run(*args, cwd, check=True):
    """A command run from the VideoLLaMA2 checkout, as users launch upstream."""
    done = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def regate_train(out_json, *args, cwd):
    """`regate train ...` through run_regate.py, which records every step's exact loss."""
    return run(HERE / "run_regate.py", out_json, "train", "--target", "videollama2", *args, cwd=cwd)


def history(output_dir, key):
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return {e["step"]: e[key] for e in state["log_history"] if key in e}


@pytest.fixture(scope="module")
def caches(tmp_path_factory, assets, videollama2_src):
    root = tmp_path_factory.mktemp("score")
    found = {}
    for variant in VARIANTS:
        found[variant] = root / f"cache-{variant}"
        run("-m", "regate_plugin", "score", "--target", "videollama2", "--teacher", assets[variant], "--out", found[variant],
            "--shard-size", "7", "--no-progress", "--", *vl2_assets.upstream_args(assets, variant, root / "unused"),
            cwd=videollama2_src)
    return found


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory, assets, caches, videollama2_src):
    """``full_runs(variant)``: an uninterrupted ReGATE run of STEPS steps (checkpoints at 10 and 20) and
    its exact losses, run on first use."""
    done = {}

    def get(variant):
        if variant not in done:
            root = tmp_path_factory.mktemp(f"full-{variant}")
            regate_train(root / "losses.json", "--regate", "--ref-cache", caches[variant], *SCHEDULE, "--",
                         *vl2_assets.upstream_args(assets, variant, root / "run", steps=STEPS), cwd=videollama2_src)
            done[variant] = root / "run", json.loads((root / "losses.json").read_text())
        return done[variant]

    return get


def tokenizer_for(assets, variant):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(assets[variant], model_max_length=vl2_assets.MAX_LENGTH,
                                                           padding_side="right", use_fast=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def data_args(assets, variant, **extra):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(assets[vl2_assets.VARIANTS[variant]["tower"]])
    size = {"siglip": 70, "clip": 56}[vl2_assets.VARIANTS[variant]["tower"]]
    return SimpleNamespace(data_path=[str(assets["data"])], data_folder=str(assets["folder"]), is_multimodal=True,
                           is_pretraining=False, num_frames=vl2_assets.FRAMES, image_aspect_ratio="pad",
                           image_processor=processor, video_processor=processor, image_size=size, **extra)


def upstream_collator(tokenizer):
    """Upstream's collator, unpatched even after apply() ran in this process."""
    from videollama2.train import DataCollatorForSupervisedDataset

    call = DataCollatorForSupervisedDataset.__call__
    return getattr(call, "_regate_original", call).__get__(DataCollatorForSupervisedDataset(tokenizer=tokenizer))


def test_connector_token_counts_follow_the_formulas():
    from regate_plugin.patches.videollama2 import VisualLayout, connector_tokens

    for side in (4, 5, 24, 27):
        for frames in (2, 3, 4, 8, 16):
            assert connector_tokens("stc_connector", frames, side * side, 8, 16) == (frames // 2 + 1) * (side // 2 + 1) ** 2
            assert connector_tokens("stc_connector_v35", frames, side * side, 8, 16) == (frames // 2) * (side // 2) ** 2
            assert connector_tokens("stp_connector", frames, side * side, 8, 16) == (frames // 2) * (side // 2) ** 2
            assert connector_tokens("mlp2x_gelu", frames, side * side, 8, 16) == side * side
    # The 7B recipes, with the towers' and language models' real sizes.
    clip = SimpleNamespace(image_size=336, patch_size=14, hidden_size=1024, model_type="clip_vision_model")
    siglip = SimpleNamespace(image_size=384, patch_size=14, hidden_size=1152, model_type="siglip_vision_model")
    assert VisualLayout("stc_connector", 8, clip, "patch", 4096).tokens == 845
    assert VisualLayout("stc_connector_v35", 16, siglip, "patch", 3584).tokens == 1352
    assert VisualLayout("stc_connector_v35", 16, siglip, "patch", 3584).describe().startswith("16f:1352 ")
    with pytest.raises(ValueError, match="MAX_FRAMES"):
        VisualLayout("stc_connector", 33, clip, "patch", 4096)


@pytest.mark.parametrize("variant", VARIANTS)
def test_text_only_samples_match_the_students_merge_on_decoded_videos(assets, variant):
    """The real model, as train() builds it: upstream's dataset decodes every video and image, the
    vision tower and connector run, and upstream's merge gives the labels and the length the student
    trains on; the teacher's text-only sample must match them position by position."""
    from regate_plugin.patches import videollama2 as target
    from videollama2.model import VLLMConfigs, VLLMs
    from videollama2.train import LazySupervisedDataset

    spec = vl2_assets.VARIANTS[variant]
    config = VLLMConfigs[spec["model_type"]].from_pretrained(assets[variant])
    config._attn_implementation = "eager"
    model = VLLMs[spec["model_type"]].from_pretrained(assets[variant], config=config).eval()
    model.get_model().initialize_vision_modules(model_args=SimpleNamespace(
        vision_tower=str(assets[spec["tower"]]), mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        pretrain_mm_mlp_adapter=str(assets[f"{variant}-projector"]), mm_projector_type=spec["projector"]))
    model.config.num_frames = vl2_assets.FRAMES
    tower = model.get_vision_tower()
    layout = target.VisualLayout(spec["projector"], model.num_frames(), tower.config, tower.select_feature, config.hidden_size)
    assert layout.tokens == VISUAL[variant]

    tokenizer = tokenizer_for(assets, variant)
    args = data_args(assets, variant)
    dataset = LazySupervisedDataset(data_path=args.data_path, tokenizer=tokenizer, data_args=args)
    collate = upstream_collator(tokenizer)
    text_only = target._TextOnly(tokenizer, args, layout.tokens)
    with torch.no_grad():
        for index in range(len(dataset)):
            if index == BROKEN:
                continue
            item = dataset[index]
            batch = collate([{k: v for k, v in item.items() if k != SAMPLE_INDEX_KEY}])
            _, mask, _, embeds, labels = model.prepare_inputs_labels_for_multimodal(
                batch["input_ids"], batch["attention_mask"], None, batch["labels"], batch["images"])
            ids, text_labels = text_only.sample(dataset.list_data_dict[index])
            assert torch.equal(text_labels, labels[0]), index
            assert ids.shape[0] == embeds.shape[1] == int(mask.sum()), index
            # Every non-visual position holds the embedding of the text-only sample's token there.
            visual = torch.zeros(ids.shape[0], dtype=torch.bool)
            placeholder = (batch["input_ids"][0] < 0).nonzero().flatten()
            for start in placeholder.tolist():
                visual[start : start + layout.tokens] = True
            assert int(visual.sum()) == layout.tokens * len(placeholder)
            torch.testing.assert_close(embeds[0][~visual], model.get_model().embed_tokens(ids[~visual]), rtol=0, atol=0)
            assert (ids[visual] == tokenizer.pad_token_id).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_cache_equals_teacher_on_independently_spliced_samples(assets, caches, variant):
    """Reference: upstream's tokenization, truncated to model_max_length as the collator does, then the
    modal placeholder replaced by hand with the formula's count of pad tokens; the teacher on each alone."""
    import transformers
    from videollama2.train import preprocess, preprocess_multimodal

    tokenizer = tokenizer_for(assets, variant)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(assets[variant]).eval()
    args = data_args(assets, variant)
    stored = RefCache.open(caches[variant])
    for index, record in enumerate(json.loads(Path(assets["data"]).read_text())):
        modal = "<image>" if "image" in record else "<video>" if "video" in record else None
        sources = copy.deepcopy([record["conversations"]])
        if modal:
            sources = preprocess_multimodal(sources, args, modal)
        sample = preprocess(sources, tokenizer, modal_token=modal)
        ids = sample["input_ids"][0].tolist()[: vl2_assets.MAX_LENGTH]
        labels = sample["labels"][0].tolist()[: vl2_assets.MAX_LENGTH]
        if modal:
            at = ids.index(-200 if modal == "<image>" else -201)
            ids = ids[:at] + [tokenizer.pad_token_id] * VISUAL[variant] + ids[at + 1 :]
            labels = labels[:at] + [IGNORE_INDEX] * VISUAL[variant] + labels[at + 1 :]
        labels = torch.tensor(labels)
        with torch.no_grad():
            logits = teacher(input_ids=torch.tensor([ids])).logits[0]
        positions = (labels[1:] != IGNORE_INDEX).nonzero().flatten()
        direct = F.cross_entropy(logits[positions], labels[positions + 1], reduction="none")
        torch.testing.assert_close(torch.from_numpy(stored.sample(index)), direct, atol=2e-3, rtol=1e-3)
    assert stored.num_units > 400
    assert stored.fingerprint.visual_tokens.startswith(f"{vl2_assets.FRAMES}f:{VISUAL[variant]} per image or video")


def test_an_unreadable_video_records_the_index_of_the_sample_returned_instead(assets):
    """Upstream returns a random other sample when a file cannot be read: its index is recorded."""
    from regate_plugin.patches import videollama2 as target
    from videollama2.train import DataCollatorForSupervisedDataset, LazySupervisedDataset

    target.apply(ReGATEConfig(), None)
    tokenizer = tokenizer_for(assets, "qwen2")
    args = data_args(assets, "qwen2")
    dataset = LazySupervisedDataset(data_path=args.data_path, tokenizer=tokenizer, data_args=args)
    broken = BROKEN
    assert "video" in dataset.list_data_dict[broken]
    for seed in range(3):
        random.seed(seed)
        item = dataset[broken]
        random.seed(seed)
        expected = random.randint(0, len(dataset) - 1)
        while expected == broken:
            expected = random.randint(0, len(dataset) - 1)
        assert item[SAMPLE_INDEX_KEY] == expected
        assert torch.equal(item["input_ids"], dataset[expected]["input_ids"])
        batch = DataCollatorForSupervisedDataset(tokenizer=tokenizer)([item, dataset[0]])
        assert batch[SAMPLE_INDEX_KEY].tolist() == [expected, 0]
        assert len(batch["images"]) == 2 and batch["input_ids"].shape[0] == 2


@pytest.mark.parametrize("variant", VARIANTS)
def test_regate_train_runs_upstream_train_with_the_schedule_and_checkpoints(caches, full_runs, variant):
    out, _ = full_runs(variant)
    ratios = history(out, "regate/keep_ratio")
    kept, total = history(out, "regate/supervised_kept"), history(out, "regate/supervised_total")
    config = ReGATEConfig(warmup=4, cycle=6, dense_steps=2, keep_ratio=0.5)
    assert sorted(ratios) == list(range(1, STEPS + 1))
    sparse = 0
    for step, ratio in ratios.items():
        assert ratio == keep_ratio_at(step - 1, config)
        if ratio == 1.0:
            assert kept[step] == total[step]
        else:
            sparse += 1
            assert total[step] / 2 <= kept[step] < total[step]  # ceil(p * n) per sample
    assert sparse == 10
    losses = history(out, "loss")
    assert sum(losses[s] for s in range(16, 21)) < sum(losses[s] for s in range(1, 6))
    for step in (10, 20):
        state = torch.load(out / f"checkpoint-{step}" / "regate_state.pt", weights_only=True)
        assert state["step"] == step and state["ema"]["values"].numel() == RefCache.open(caches[variant]).num_units


@pytest.mark.parametrize("variant,extra", [("qwen2", []), ("mistral", []),
                                           # LoRA dropout masks depend on the batch's shape (padded vs packed): off
                                           ("qwen2", ["--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16",
                                                      "--lora_dropout", "0", "--mm_projector_lr", "2e-4"])],
                         ids=["qwen2", "mistral", "qwen2-lora"])
def test_keep_ratio_one_reproduces_upstream_losses(tmp_path, assets, caches, videollama2_src, variant, extra):
    if extra:  # upstream saves LoRA weights through deepspeed.zero, with or without DeepSpeed
        pytest.importorskip("deepspeed", reason="upstream's LoRA path imports deepspeed (pip install --no-deps deepspeed)")
    losses = {}
    for name, flags in (("upstream", ["--no-regate"]), ("dense", ["--ref-cache", caches[variant], "--keep-ratio", "1.0"])):
        regate_train(tmp_path / f"{name}.json", *flags, "--",
                     *vl2_assets.upstream_args(assets, variant, tmp_path / name, steps=STEPS), *extra, cwd=videollama2_src)
        losses[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert len(losses["upstream"]) == len(losses["dense"]) == STEPS
    for step, (expected, got) in enumerate(zip(losses["upstream"], losses["dense"])):
        assert got == pytest.approx(expected, abs=1e-5), step
    assert "regate/keep_ratio" not in (tmp_path / "upstream" / "trainer_state.json").read_text()
    dense = tmp_path / "dense"
    assert sum(history(dense, "regate/llm_tokens").values()) < sum(history(dense, "regate/padded_tokens").values())


def test_cache_for_another_dataset_is_refused_before_training(tmp_path, assets, caches, videollama2_src):
    """As the user sees it: one `Error:` line with the differing fields, no traceback, no Trainer."""
    records = json.loads(Path(assets["data"]).read_text())
    changed = tmp_path / "data.json"
    changed.write_text(json.dumps(records[:-1]))
    out = tmp_path / "run"
    done = run("-m", "regate_plugin", "train", "--target", "videollama2", "--ref-cache", caches["qwen2"], "--",
               *vl2_assets.upstream_args(assets, "qwen2", out, steps=2, **{"--data_path": str(changed)}),
               cwd=videollama2_src, check=False)
    assert done.returncode == 1
    error = done.stderr[done.stderr.index("Error: "):]  # after upstream's import-time warnings
    assert error.startswith(f"Error: reference cache {caches['qwen2']} was built for a different setup:\n  dataset: cache has ")
    assert error.endswith("point --ref-cache at the matching cache.\n") and "Traceback" not in done.stderr
    assert not out.exists()  # the Trainer, which creates it, was never built


def test_a_cache_for_other_frames_is_refused_before_upstream_loads_any_weight(tmp_path, assets, caches, videollama2_src,
                                                                           monkeypatch):
    from click.testing import CliRunner
    from videollama2 import train as upstream_train

    from regate_plugin import cli

    def train(*args, **kwargs):
        raise AssertionError("upstream's train() started: it loads the weights")

    monkeypatch.setattr(upstream_train, "train", train)
    monkeypatch.chdir(videollama2_src)
    args = vl2_assets.upstream_args(assets, "qwen2", tmp_path / "run", steps=2, **{"--num_frames": "8"})
    result = CliRunner().invoke(cli.main, ["train", "--target", "videollama2", "--ref-cache", str(caches["qwen2"]), "--", *args])
    assert result.exit_code == 1 and result.output.startswith(f"Error: reference cache {caches['qwen2']} was built for a different")
    assert "visual_tokens: cache has '4f:8 " in result.output and "this run has '8f:16 " in result.output


def test_resume_without_torch_force_no_weights_only_load(tmp_path, assets, caches, full_runs, videollama2_src):
    """Transformers 4.40-4.42 read rng_state.pth weights-only under torch >= 2.6 and fail on its numpy
    state; regate train resumes (upstream's train() resumes from the last checkpoint of --output_dir)
    and continues exactly as the uninterrupted run."""
    out = tmp_path / "run"
    for steps, name in ((10, "first"), (STEPS, "resumed")):
        regate_train(tmp_path / f"{name}.json", "--regate", "--ref-cache", caches["qwen2"], *SCHEDULE, "--",
                     *vl2_assets.upstream_args(assets, "qwen2", out, steps=steps), cwd=videollama2_src)
    first, resumed = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("first", "resumed"))
    full_out, full_losses = full_runs("qwen2")
    assert len(first) == len(resumed) == 10
    assert first + resumed == pytest.approx(full_losses, abs=1e-6)
    assert history(out, "regate/keep_ratio") == history(full_out, "regate/keep_ratio")
    state = torch.load(out / f"checkpoint-{STEPS}" / "regate_state.pt", weights_only=True)
    expected = torch.load(full_out / f"checkpoint-{STEPS}" / "regate_state.pt", weights_only=True)
    assert state["step"] == STEPS and torch.allclose(state["ema"]["values"], expected["ema"]["values"], atol=1e-6)
