"""ReGATE in a Hugging Face Trainer script, end to end on a tiny random VLM (CPU, ~20 s).

    python recipes/hf/train_tiny.py --out runs/tiny [--family llava|internvl|qwen3_vl|idefics3]
    regate report runs/tiny/run

The lines marked `# ReGATE` are all a Trainer script needs; the rest builds a toy student, its
teacher and a dataset so that the example runs anywhere without downloads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, models
from transformers import (
    CLIPVisionConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Trainer,
    TrainingArguments,
)

from regate_plugin import ReGATEConfig, ReGATEEngine, RefCache
from regate_plugin.patches import hf
from regate_plugin.scoring import load_teacher, score_dataset
from regate_plugin.trainer import IndexedCollator, IndexedDataset, attach

VOCAB, PAD = 128, 0
IMAGE_TOKEN, OPEN, CLOSE, GLOBAL = 127, 126, 125, 124  # the image placeholder and the tokens around it
TOKEN_NAMES = {PAD: "<pad>", IMAGE_TOKEN: "<image>", OPEN: "<open>", CLOSE: "<close>", GLOBAL: "<global-img>"}
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=PAD)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
QWEN_PATCH, QWEN_MERGE, QWEN_GRID = 4, 2, (1, 4, 4)  # a 16x16 picture: 4x4 patches, merged 2x2 -> 4 tokens


def llava() -> PreTrainedModel:
    vision = CLIPVisionConfig(**TINY_VISION, image_size=32, patch_size=8)
    return LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision, text_config=LlamaConfig(**TEXT), image_token_index=IMAGE_TOKEN, image_seq_length=16,
        vision_feature_layer=-1))


def internvl() -> PreTrainedModel:
    vision = dict(**TINY_VISION, image_size=[56, 56], patch_size=[14, 14])  # 4x4 patches, pixel-shuffled: 4 tokens
    return InternVLForConditionalGeneration(InternVLConfig(
        vision_config=vision, text_config=dict(TEXT, model_type="qwen2"), image_token_id=IMAGE_TOKEN,
        image_seq_length=4, downsample_ratio=0.5, vision_feature_layer=-1))


def qwen3_vl() -> PreTrainedModel:
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=QWEN_PATCH,
                  spatial_merge_size=QWEN_MERGE, temporal_patch_size=2, out_hidden_size=64, deepstack_visual_indexes=[0])
    return Qwen3VLForConditionalGeneration(Qwen3VLConfig(
        text_config=dict(TEXT, head_dim=16, rope_parameters=rope), vision_config=vision, image_token_id=IMAGE_TOKEN,
        video_token_id=GLOBAL, vision_start_token_id=OPEN, vision_end_token_id=CLOSE, tie_word_embeddings=False))


def idefics3() -> PreTrainedModel:
    vision = dict(**TINY_VISION, image_size=32, patch_size=8)  # 4x4 patches, scale factor 2: 4 tokens
    return Idefics3ForConditionalGeneration(Idefics3Config(
        vision_config=vision, text_config=dict(TEXT, model_type="llama"), image_token_id=IMAGE_TOKEN, scale_factor=2,
        tie_word_embeddings=False))


def picture(family: str, gen: torch.Generator) -> tuple[list[int], dict[str, torch.Tensor]]:
    """One picture as the family's processor lays it out: its tokens (placeholders expanded, with the
    special tokens around them) and its model inputs (leading dimension: one picture)."""
    if family == "llava":
        return [IMAGE_TOKEN] * 16, {"pixel_values": torch.randn(1, 3, 32, 32, generator=gen)}
    if family == "internvl":
        return [OPEN] + [IMAGE_TOKEN] * 4 + [CLOSE], {"pixel_values": torch.randn(1, 3, 56, 56, generator=gen)}
    if family == "idefics3":
        return [OPEN, GLOBAL] + [IMAGE_TOKEN] * 4 + [OPEN], {"pixel_values": torch.randn(1, 1, 3, 32, 32, generator=gen)}
    t, h, w = QWEN_GRID  # qwen3_vl: flattened patches, as Qwen's image processor gives them
    patches = torch.randn(t * h * w, 3 * 2 * QWEN_PATCH * QWEN_PATCH, generator=gen)
    return [OPEN] + [IMAGE_TOKEN] * (t * h * w // QWEN_MERGE**2) + [CLOSE], {
        "pixel_values": patches, "image_grid_thw": torch.tensor([QWEN_GRID])}


FAMILIES = {"llava": llava, "internvl": internvl, "qwen3_vl": qwen3_vl, "idefics3": idefics3}
# The text-only teacher class for each family's language model (Qwen3-VL's is Qwen3 with M-RoPE).
TEACHERS = {"llava": (LlamaForCausalLM, LlamaConfig), "internvl": (Qwen2ForCausalLM, Qwen2Config),
            "qwen3_vl": (Qwen3ForCausalLM, Qwen3Config), "idefics3": (LlamaForCausalLM, LlamaConfig)}


def build_student(family: str, folder: Path) -> PreTrainedModel:
    """A tiny student of ``family`` and a word-level tokenizer, saved like any pretrained student."""
    torch.manual_seed(0)
    model = FAMILIES[family]()
    model.save_pretrained(folder)
    vocab = {TOKEN_NAMES.get(i, f"w{i}"): i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                        pad_token="<pad>", unk_token="<pad>", model_max_length=256)
    tokenizer.save_pretrained(folder)
    return model


def save_teacher(family: str, student: PreTrainedModel, student_dir: Path, folder: Path) -> None:
    """The teacher: the student's own language model before multimodal training, text-only."""
    causal_lm, config = TEACHERS[family]
    text = student.config.text_config.to_dict()
    text.pop("model_type", None)
    teacher = causal_lm(config(**text))
    teacher.model.load_state_dict(hf.adapter_for(student).text_model(student).state_dict())
    teacher.lm_head.load_state_dict(student.lm_head.state_dict())
    teacher.save_pretrained(folder)
    PreTrainedTokenizerFast.from_pretrained(student_dir).save_pretrained(folder)


def toy_dataset(family: str, size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """[prompt] [picture] [question] [answer]: labels only on the answer."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(size):
        prompt, question = torch.randint(1, 100, (3,), generator=gen), torch.randint(1, 100, (5,), generator=gen)
        answer = torch.randint(1, 100, (int(torch.randint(4, 16, (1,), generator=gen)),), generator=gen)
        tokens, pixels = picture(family, gen)
        input_ids = torch.cat([prompt, torch.tensor(tokens), question, answer])
        labels = torch.cat([torch.full((len(input_ids) - len(answer),), -100), answer])
        sample = {"input_ids": input_ids, "labels": labels, **pixels}
        if family == "qwen3_vl":  # which tokens are image tokens: Qwen's M-RoPE positions need it
            sample["mm_token_type_ids"] = (input_ids == IMAGE_TOKEN).long()
        samples.append(sample)
    return samples


TEXT_KEYS = {"input_ids": PAD, "labels": -100, "mm_token_type_ids": 0}


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad the token rows; concatenate the pictures' inputs in sample order."""
    length = max(len(s["input_ids"]) for s in samples)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.stack([torch.nn.functional.pad(s[key], (0, length - len(s[key])), value=value) for s in samples])

    batch = {key: pad(key, value) for key, value in TEXT_KEYS.items() if key in samples[0]}
    batch["attention_mask"] = pad("input_ids", -1).ne(-1).long()
    batch.update({key: torch.cat([s[key] for s in samples]) for key in samples[0] if key not in TEXT_KEYS})
    return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/tiny"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llava")
    args = parser.parse_args()
    student_dir, teacher_dir = args.out / "student", args.out / "teacher"
    model = build_student(args.family, student_dir)
    save_teacher(args.family, model, student_dir, teacher_dir)
    dataset = toy_dataset(args.family, 64)

    # ReGATE 1/3: the teacher pass, once (`regate score --target hf ...` does the same from the shell).
    source = hf.HFScoringSource(dataset, str(student_dir), dataset_id="toy", teacher=str(teacher_dir))
    if not (args.out / "refcache" / "meta.json").exists():
        score_dataset(source, load_teacher(str(teacher_dir), torch.device("cpu"), torch.float32), args.out / "refcache")

    # ReGATE 2/3: an engine over the cache (refused if the dataset or tokenizer changed), on the model.
    config = ReGATEConfig(warmup=4, cycle=8, dense_steps=2, keep_ratio=0.5)  # the paper's schedule, scaled down
    engine = ReGATEEngine(config, RefCache.open(args.out / "refcache", expect=source.expected()))
    hf.enable(model, engine)

    training = TrainingArguments(output_dir=str(args.out / "run"), max_steps=args.steps, per_device_train_batch_size=4,
                                 learning_rate=1e-3, logging_steps=1, save_steps=20, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=training,
                      train_dataset=IndexedDataset(dataset),        # ReGATE 3/3: sample indices in the batch,
                      data_collator=IndexedCollator(collate))
    attach(trainer, engine)                                          # and the schedule, logs and checkpoints.
    trainer.train()
    trainer.save_state()
    print(f"done: regate report {args.out / 'run'}")


if __name__ == "__main__":
    main()
