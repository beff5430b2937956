"""ReGATE in a Hugging Face Trainer script, end to end on a tiny random Llava (CPU, ~20 s).

    python recipes/hf/train_tiny.py --out runs/tiny
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
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from regate_plugin import ReGATEConfig, ReGATEEngine, RefCache
from regate_plugin.patches import hf
from regate_plugin.scoring import load_teacher, score_dataset
from regate_plugin.trainer import IndexedCollator, IndexedDataset, attach

VOCAB, IMAGE_TOKEN, PAD = 128, 127, 0
IMAGE_SIZE, PATCH = 32, 8
VISUAL_TOKENS = (IMAGE_SIZE // PATCH) ** 2


def build_student(folder: Path) -> LlavaForConditionalGeneration:
    """A tiny Llava and a word-level tokenizer, saved like any pretrained student."""
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         image_seq_length=VISUAL_TOKENS, vision_feature_layer=-1, attn_implementation="sdpa")
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(folder)
    vocab = {("<pad>" if i == PAD else "<image>" if i == IMAGE_TOKEN else f"w{i}"): i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                        pad_token="<pad>", unk_token="<pad>", model_max_length=256)
    tokenizer.save_pretrained(folder)
    return model


def save_teacher(student: LlavaForConditionalGeneration, student_dir: Path, folder: Path) -> None:
    """The teacher: the student's own language model before multimodal training, text-only."""
    teacher = LlamaForCausalLM(student.config.text_config)
    teacher.model.load_state_dict(student.model.language_model.state_dict())
    teacher.lm_head.load_state_dict(student.lm_head.state_dict())
    teacher.save_pretrained(folder)
    PreTrainedTokenizerFast.from_pretrained(student_dir).save_pretrained(folder)


def toy_dataset(size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """[prompt] [image placeholders, expanded] [question] [answer]: labels only on the answer."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(size):
        prompt, question = torch.randint(1, 100, (3,), generator=gen), torch.randint(1, 100, (5,), generator=gen)
        answer = torch.randint(1, 100, (int(torch.randint(4, 16, (1,), generator=gen)),), generator=gen)
        input_ids = torch.cat([prompt, torch.full((VISUAL_TOKENS,), IMAGE_TOKEN), question, answer])
        labels = torch.cat([torch.full((len(input_ids) - len(answer),), -100), answer])
        samples.append({"input_ids": input_ids, "labels": labels, "pixel_values": torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)})
    return samples


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    length = max(len(s["input_ids"]) for s in samples)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.stack([torch.nn.functional.pad(s[key], (0, length - len(s[key])), value=value) for s in samples])

    input_ids = pad("input_ids", PAD)
    return {"input_ids": input_ids, "labels": pad("labels", -100),
            "attention_mask": pad("input_ids", -1).ne(-1).long(), "pixel_values": torch.stack([s["pixel_values"] for s in samples])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/tiny"))
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    student_dir, teacher_dir = args.out / "student", args.out / "teacher"
    model = build_student(student_dir)
    save_teacher(model, student_dir, teacher_dir)
    dataset = toy_dataset(64)

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
