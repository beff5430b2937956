"""A tiny LLaVA-1.5-HF student, its text-only teacher and a sharegpt dataset with pictures, registered in
a local dataset_info.json: everything LLaMA-Factory's SFT workflow reads, built offline in seconds."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

IMAGE_SIZE, PATCH = 28, 14  # (28/14)^2 patches + CLS - CLS ("default" feature strategy): 4 visual tokens per picture
VISUAL_TOKENS = 4
COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("square", "circle", "star")
WORDS = ("USER:", "ASSISTANT:", "what", "color", "shape", "is", "it", "the", "a", "picture", "shows", "and", "?", ".",
         "describe", "this", "i", "see", "bright", "small", "large", "on", "white", "background") + COLORS + SHAPES
SPECIAL = ("<unk>", "<s>", "</s>", "<pad>", "<image>")


def build_tokenizer() -> Any:
    """A word-level tokenizer; ``<image>`` is a special token, so LLaMA-Factory's expanded placeholders
    (``<image><image>...``, no spaces) split into one id each."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", additional_special_tokens=["<image>"], model_max_length=512)


def _text_config(vocab_size: int) -> dict[str, Any]:
    return dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, pad_token_id=3, bos_token_id=1, eos_token_id=2,
                tie_word_embeddings=False)


def build_student(path: Path, seed: int = 0) -> None:
    """LlavaForConditionalGeneration (CLIP tower, Llama LM) with its tokenizer and LlavaProcessor."""
    from transformers import (
        CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
    )

    tokenizer = build_tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**_text_config(len(tokenizer))),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH, num_additional_image_tokens=1,
                   vision_feature_select_strategy="default", image_token="<image>").save_pretrained(path)


def build_teacher(path: Path, seed: int = 1) -> None:
    """The text-only teacher: a Llama with the student's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**_text_config(len(tokenizer)))).save_pretrained(path)
    tokenizer.save_pretrained(path)


def build_dataset(folder: Path, num_samples: int = 16, seed: int = 0) -> None:
    """``folder/dataset_info.json`` registering ``tiny_vqa`` (sharegpt, one picture per sample)."""
    from PIL import Image

    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(num_samples):
        color, shape = rng.choice(COLORS), rng.choice(SHAPES)
        image = folder / "images" / f"{i}.png"
        Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), color).save(image)
        size = rng.choice(("small", "large", "bright"))
        answer = f"the picture shows a {size} {color} {shape} on a white background ."
        turns = [{"role": "user", "content": "<image>what is the color and shape ?"},
                 {"role": "assistant", "content": answer}]
        if i % 3 == 0:  # some two-turn samples: several supervised spans per sample
            turns += [{"role": "user", "content": "what color is it ?"}, {"role": "assistant", "content": f"it is {color} ."}]
        records.append({"messages": turns, "images": [f"images/{i}.png"]})
    (folder / "tiny_vqa.json").write_text(json.dumps(records, indent=1))
    info = {"tiny_vqa": {"file_name": "tiny_vqa.json", "formatting": "sharegpt",
                         "columns": {"messages": "messages", "images": "images"},
                         "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=1))


def train_config(student: Path, data: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    """A LLaMA-Factory SFT config for the tiny run (CPU, fp32, deterministic order)."""
    config = {
        "model_name_or_path": str(student), "trust_remote_code": False,
        "stage": "sft", "do_train": True, "finetuning_type": "full",
        "dataset": "tiny_vqa", "dataset_dir": str(data), "media_dir": str(data), "template": "llava",
        "cutoff_len": 64, "overwrite_cache": True, "preprocessing_num_workers": None, "dataloader_num_workers": 0,
        "output_dir": str(out), "logging_steps": 1, "save_strategy": "no", "overwrite_output_dir": True,
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 1.0e-3,
        "max_steps": 6, "lr_scheduler_type": "constant", "seed": 0, "report_to": "none", "use_cpu": True,
        "bf16": False, "fp16": False, "ddp_timeout": 60, "plot_loss": False,
    }
    config.update(overrides)
    return config


def write_yaml(path: Path, config: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config))
    return path


def log_history(out: Path) -> list[dict[str, Any]]:
    """The training log entries of a run (one per optimizer step here), final summary excluded."""
    state = json.loads((out / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]
