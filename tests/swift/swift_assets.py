"""A tiny LLaVA-1.5-HF student, its text-only teacher (tests/llamafactory's builders) and a jsonl dataset
with pictures in ms-swift's messages format: everything `swift sft` reads, built offline in seconds."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parents[1] / "llamafactory"))  # lf_assets: the same tiny models

from lf_assets import (  # noqa: E402
    COLORS, IMAGE_SIZE, SHAPES, VISUAL_TOKENS, build_student, build_teacher, build_tokenizer,
)

__all__ = ["VISUAL_TOKENS", "build_student", "build_teacher", "build_tokenizer", "build_dataset", "sft_args",
           "log_history"]


def build_dataset(folder: Path, num_samples: int = 16, seed: int = 0) -> Path:
    """``folder/tiny_vqa.jsonl``: one picture per sample, every third sample with a second turn."""
    from PIL import Image

    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(num_samples):
        color, shape = rng.choice(COLORS), rng.choice(SHAPES)
        image = folder / "images" / f"{i}.png"
        Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), color).save(image)
        size = rng.choice(("small", "large", "bright"))
        turns = [{"role": "user", "content": "<image>what is the color and shape ?"},
                 {"role": "assistant", "content": f"the picture shows a {size} {color} {shape} on a white background ."}]
        if i % 3 == 0:
            turns += [{"role": "user", "content": "what color is it ?"}, {"role": "assistant", "content": f"it is {color} ."}]
        lines.append(json.dumps({"messages": turns, "images": [str(image)]}))
    path = folder / "tiny_vqa.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def sft_args(student: Path, data: Path, out: Path, **overrides: Any) -> list[str]:
    """``swift sft`` arguments of the tiny run (CPU, fp32, deterministic order); ``key=value`` overrides
    replace or add ``--key value`` (a list: ``--key v1 v2``; None drops a default)."""
    options: dict[str, Any] = {
        "model": student, "model_type": "llava1_5_hf", "template": "llava1_5_hf", "dataset": data,
        "tuner_type": "full", "torch_dtype": "float32", "max_length": 64, "output_dir": out, "add_version": False,
        "check_model": False, "split_dataset_ratio": 0, "dataset_num_proc": 1, "dataloader_num_workers": 0,
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 1e-3, "max_steps": 6,
        "lr_scheduler_type": "constant", "warmup_ratio": 0, "seed": 0, "data_seed": 0, "report_to": "none",
        "logging_steps": 1, "save_strategy": "no", "use_cpu": True, "freeze_vit": True,
    }
    options.update(overrides)
    args: list[str] = []
    for key, value in options.items():
        if isinstance(value, (list, tuple)):
            args += [f"--{key}", *map(str, value)]
        elif value is not None:
            args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def log_history(out: Path) -> list[dict[str, Any]]:
    """The training log entries of a run (one per optimizer step here), final summary excluded."""
    state = json.loads((out / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]
