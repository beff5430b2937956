"""Tiny local assets for LLaVA's own train(): a Llama, a sentencepiece tokenizer trained here, a CLIP
tower saved to a folder, generated images and a conversation file. Nothing is downloaded."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = ("red green blue yellow circle square triangle left right top bottom small large one two three "
         "the a is there in of on image picture what color shape where how many describe").split()
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def _sentences(rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def build(root: Path, samples: int = 24, seed: int = 0) -> dict[str, Path]:
    import sentencepiece as spm
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    llm, tower, images = root / "llm", root / "clip", root / "images"
    for folder in (llm, tower, images):
        folder.mkdir(exist_ok=True)

    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions. USER: ASSISTANT:")
    corpus = _sentences(rng, 400) + [system] * 50
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(root / "spm"), vocab_size=700, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, byte_fallback=True,
        minloglevel=2,
    )
    tokenizer = LlamaTokenizer(vocab_file=str(root / "spm.model"), legacy=True)
    tokenizer.save_pretrained(llm)

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(llm, safe_serialization=False)

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=32)
    CLIPVisionModel(vision).save_pretrained(tower, safe_serialization=False)
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(tower)

    # The projector that pre-training would have produced: makes runs start from the same weights.
    projector = {f"model.mm_projector.{name}": tensor for name, tensor in torch.nn.Sequential(
        torch.nn.Linear(vision.hidden_size, config.hidden_size), torch.nn.GELU(), torch.nn.Linear(config.hidden_size, config.hidden_size),
    ).state_dict().items()}
    torch.save(projector, root / "mm_projector.bin")

    records = []
    for i in range(samples):
        color = rng.choice(sorted(COLORS))
        Image.new("RGB", (40, 32), COLORS[color]).save(images / f"{i}.png")
        turns = []
        for t in range(rng.randint(1, 2)):
            question = ("<image>\n" if t == 0 else "") + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
            answer = f"the image is {color} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        records.append({"id": str(i), "image": f"{i}.png", "conversations": turns})
    data = root / "data.json"
    data.write_text(json.dumps(records))
    return {"llm": llm, "clip": tower, "images": images, "data": data, "projector": root / "mm_projector.bin"}


def llava_args(assets: dict[str, Path], output_dir: Path, steps: int = 20, **overrides: str) -> list[str]:
    """LLaVA's own command-line arguments, as scripts/v1_5/finetune.sh passes them, scaled down for CPU."""
    args = {
        "--model_name_or_path": str(assets["llm"]), "--version": "v1", "--data_path": str(assets["data"]),
        "--image_folder": str(assets["images"]), "--vision_tower": str(assets["clip"]),
        "--pretrain_mm_mlp_adapter": str(assets["projector"]),
        "--mm_projector_type": "mlp2x_gelu", "--mm_vision_select_layer": "-2", "--mm_use_im_start_end": "False",
        "--mm_use_im_patch_token": "False", "--image_aspect_ratio": "pad", "--group_by_modality_length": "False",
        "--bf16": "False", "--output_dir": str(output_dir), "--max_steps": str(steps),
        "--per_device_train_batch_size": "2", "--gradient_accumulation_steps": "1", "--save_strategy": "steps",
        "--save_steps": "10", "--learning_rate": "1e-3", "--weight_decay": "0.", "--lr_scheduler_type": "constant",
        "--logging_steps": "1", "--model_max_length": "128", "--gradient_checkpointing": "True",
        "--dataloader_num_workers": "0", "--lazy_preprocess": "True", "--report_to": "none", "--seed": "0",
    }
    args.update(overrides)
    return [item for pair in args.items() for item in pair]
