"""Assets for the teacher-pass tests: a tiny student and teacher on disk, and datasets by import path.

The subprocess tests reach the datasets as ``score_assets:train_dataset`` (tests/ on PYTHONPATH).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from tiny_hf import BOS_ID, EOS_ID, LLAVA_IMAGE_ID, PAD_ID, VOCAB_SIZE, tiny_model, tiny_samples

NUM_SAMPLES = int(os.environ.get("SCORE_ASSETS_SAMPLES", "24"))


def tokenizer(rename: int | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary; ``rename`` changes one token's text."""
    names = {PAD_ID: "<pad>", BOS_ID: "<s>", EOS_ID: "</s>", LLAVA_IMAGE_ID: "<image>"}
    vocab = {names.get(i, f"w{i}" if i != rename else f"x{i}"): i for i in range(VOCAB_SIZE)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>",
        model_max_length=64,
    )


def write_student_and_teacher(root: Path, teacher_tokenizer_rename: int | None = None) -> tuple[Path, Path]:
    """The student (tiny Llava, config + tokenizer) and its teacher: the same language model, text-only."""
    student = tiny_model("llava", seed=0)
    student_dir, teacher_dir = root / "student", root / "teacher"
    student.save_pretrained(student_dir)
    tokenizer().save_pretrained(student_dir)
    teacher = LlamaForCausalLM(student.config.text_config)
    teacher.model.load_state_dict(student.model.language_model.state_dict())
    teacher.lm_head.load_state_dict(student.lm_head.state_dict())
    teacher.save_pretrained(teacher_dir)
    tokenizer(teacher_tokenizer_rename).save_pretrained(teacher_dir)
    return student_dir, teacher_dir


def train_dataset() -> list[dict[str, torch.Tensor]]:
    return tiny_samples("llava", NUM_SAMPLES, seed=5)


class _Slow(list):
    def __getitem__(self, index):
        time.sleep(0.02)
        return super().__getitem__(index)


def slow_dataset() -> list[dict[str, torch.Tensor]]:
    """The same samples, slowly: lets a test kill the teacher pass half-way."""
    return _Slow(train_dataset())
