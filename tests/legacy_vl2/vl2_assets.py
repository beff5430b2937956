"""Tiny local assets for VideoLLaMA2's own train(): a Qwen2 and a Mistral with tokenizers trained
here (ChatML and [INST] chat templates), SigLIP and CLIP towers saved to folders, pretrained-style
connectors, generated videos (mp4 files and a frame folder), images, a text-only sample and one
unreadable video, and a conversation file. Nothing is downloaded."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import torch

WORDS = ("red green blue yellow circle square triangle left right top bottom small large one two three moving "
         "the a is there in of on video image frame what color shape where how many describe does it move").split()
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}

# The chat templates of Qwen2-7B-Instruct and Mistral-7B-Instruct-v0.2 (tokenizer_config.json).
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           max_position_embeddings=512)
# (model_type, tower, connector): VideoLLaMA2.1-7B-16F's and VideoLLaMA2-7B's layouts, scaled down.
VARIANTS = {
    "qwen2": dict(model_type="videollama2_qwen2", tower="siglip", projector="stc_connector_v35"),
    "mistral": dict(model_type="videollama2", tower="clip", projector="stc_connector"),
}
FRAMES = 4
MAX_LENGTH = 96


def _sentences(rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def _corpus(rng: random.Random) -> list[str]:
    chat = ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
            "<|im_end|>\n<|im_start|>assistant\n", "<s>[INST] describe the video [/INST] it is red</s>"]
    return _sentences(rng, 400) + chat * 40 + [".,?!:;'\"()[]/\\<>|_-\n0123456789"] * 5


def _qwen2_tokenizer(folder: Path, corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    ))
    tokenizer = Qwen2TokenizerFast(tokenizer_object=tok, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=QWEN2_TEMPLATE)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _mistral_tokenizer(folder: Path, corpus: list[str]):
    from tokenizers import SentencePieceBPETokenizer
    from transformers import LlamaTokenizerFast

    alphabet = sorted({c for line in corpus for c in line})
    sp = SentencePieceBPETokenizer(unk_token="<unk>")
    sp.train_from_iterator(corpus, vocab_size=700, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet,
                           show_progress=False)
    tokenizer = LlamaTokenizerFast(tokenizer_object=sp._tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   chat_template=MISTRAL_TEMPLATE)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _towers(root: Path) -> dict[str, Path]:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    # Upstream picks the tower class by name: the folder names must say 'siglip' and 'clip'.
    siglip, clip = root / "tower-siglip", root / "tower-clip-vit"
    torch.manual_seed(1)
    # 70/14 = 5 patches per side (odd, as SigLIP-so400m's 27); 56/14 = 4 (even, as CLIP-L/14-336's 24).
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                         image_size=70, patch_size=14)).save_pretrained(siglip, safe_serialization=False)
    SiglipImageProcessor(size={"height": 70, "width": 70}).save_pretrained(siglip)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                     image_size=56, patch_size=14, projection_dim=32)).save_pretrained(clip, safe_serialization=False)
    CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(clip)
    return {"siglip": siglip, "clip": clip}


def save_projector(path: Path, projector_type: str, mm_hidden_size: int, hidden_size: int, seed: int = 0) -> Path:
    """The connector that pre-training would have produced (upstream's own class): runs start from the same weights."""
    from videollama2.model.projector import build_vision_projector

    torch.manual_seed(seed)
    projector = build_vision_projector(SimpleNamespace(mm_projector_type=projector_type, mm_hidden_size=mm_hidden_size,
                                                       hidden_size=hidden_size))
    torch.save({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()}, path)
    return path


def _media(folder: Path, samples: int, rng: random.Random) -> list[dict]:
    import cv2
    import numpy as np
    from PIL import Image

    for sub in ("videos", "images", "frames"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(samples):
        color = rng.choice(sorted(COLORS))
        rgb = COLORS[color]
        kind = "text" if i == 5 else "broken" if i == 9 else "image" if i % 4 == 3 else "frames" if i == 6 else "video"
        record: dict = {"id": i}
        if kind == "video":
            writer = cv2.VideoWriter(str(folder / "videos" / f"{i}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 4, (40, 32))
            for t in range(rng.randint(6, 14)):
                frame = np.zeros((32, 40, 3), np.uint8)
                frame[:] = rgb[::-1]
                frame[:, (3 * t) % 35 : (3 * t) % 35 + 5] = 255
                writer.write(frame)
            writer.release()
            record["video"] = f"videos/{i}.mp4"
        elif kind == "broken":  # not a video: upstream falls back to a random other sample
            (folder / "videos" / f"{i}.mp4").write_bytes(b"not a video" * 10)
            record["video"] = f"videos/{i}.mp4"
        elif kind == "frames":
            (folder / "frames" / str(i)).mkdir(exist_ok=True)
            for t in range(5):
                Image.new("RGB", (36, 30), tuple(max(0, c - 30 * t) for c in rgb)).save(folder / "frames" / str(i) / f"{t:03d}.png")
            record["video"] = f"frames/{i}"
        elif kind == "image":
            Image.new("RGB", (40, 28), rgb).save(folder / "images" / f"{i}.png")
            record["image"] = f"images/{i}.png"
        modal = "<image>" if kind == "image" else "" if kind == "text" else "<video>"
        turns = []
        for t in range(rng.randint(1, 3)):
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
            if t == 0 and modal:  # upstream moves the tag to the head of the turn
                question = f"{question} {modal}" if i % 2 else f"{modal}\n{question}"
            answer = f"the {'video' if modal else 'answer'} is {color} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        record["conversations"] = turns
        records.append(record)
    return records


def build(root: Path, samples: int = 24, seed: int = 0) -> dict[str, Path]:
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    corpus = _corpus(rng)
    assets: dict[str, Path] = dict(_towers(root))
    for name, make_tokenizer, config_cls, model_cls, extra in (
        ("qwen2", _qwen2_tokenizer, Qwen2Config, Qwen2ForCausalLM, dict(sliding_window=4096, use_sliding_window=False)),
        ("mistral", _mistral_tokenizer, MistralConfig, MistralForCausalLM, dict(sliding_window=None)),
    ):
        folder = root / f"llm-{name}"
        tokenizer = make_tokenizer(folder, corpus)
        torch.manual_seed(seed)
        model_cls(config_cls(vocab_size=len(tokenizer), **LLM, **extra)).save_pretrained(folder, safe_serialization=False)
        assets[name] = folder
        variant = VARIANTS[name]
        assets[f"{name}-projector"] = save_projector(root / f"mm_projector-{name}.bin", variant["projector"], 32, LLM["hidden_size"])
    data = root / "data"
    records = _media(data, samples, rng)
    (root / "data.json").write_text(json.dumps(records))
    assets.update(data=root / "data.json", folder=data)
    return assets


def upstream_args(assets: dict[str, Path], variant: str, output_dir: Path, steps: int = 20, **overrides: str) -> list[str]:
    """VideoLLaMA2's own command-line arguments, as scripts/custom/finetune.sh passes them, scaled down for CPU."""
    spec = VARIANTS[variant]
    args = {
        "--model_type": spec["model_type"], "--model_path": str(assets[variant]), "--vision_tower": str(assets[spec["tower"]]),
        "--mm_projector_type": spec["projector"], "--pretrain_mm_mlp_adapter": str(assets[f"{variant}-projector"]),
        "--data_path": str(assets["data"]), "--data_folder": str(assets["folder"]), "--mm_vision_select_layer": "-2",
        "--image_aspect_ratio": "pad", "--num_frames": str(FRAMES), "--bf16": "False", "--fp16": "False",
        "--output_dir": str(output_dir), "--max_steps": str(steps), "--per_device_train_batch_size": "2",
        "--gradient_accumulation_steps": "1", "--save_strategy": "steps", "--save_steps": "10", "--learning_rate": "1e-3",
        "--weight_decay": "0.", "--lr_scheduler_type": "constant", "--logging_steps": "1",
        "--model_max_length": str(MAX_LENGTH), "--gradient_checkpointing": "True", "--dataloader_num_workers": "0",
        "--report_to": "none", "--seed": "0",
    }
    args.update(overrides)
    return [item for pair in args.items() for item in pair]
