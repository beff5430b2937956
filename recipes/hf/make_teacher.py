"""Make the teacher folder for `regate score`: the base language model with the student's tokenizer.

A VLM's processor usually adds tokens to its language model's vocabulary (InternVL3.5's <img>,
</img>, <IMG_CONTEXT>; Qwen3-VL's vision pads), so the base LM's tokenizer differs from the
student's and `regate score` refuses the pair. Those extra tokens only stand where the teacher
pass puts padding, so the base LM can score with the student's tokenizer as long as every token
of the base vocabulary keeps its id and every extra id has a row in the base LM's embeddings.
This checks both, then saves the base weights (unchanged) with the student's tokenizer:

    python make_teacher.py --student OpenGVLab/InternVL3_5-8B-HF --base Qwen/Qwen3-8B --out teachers/qwen3-8b
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def vocabulary_problems(base: dict[str, int], student: dict[str, int], rows: int) -> list[str]:
    """Why the student's tokenizer cannot drive the base LM (empty: it can)."""
    moved = sorted(token for token, i in base.items() if student.get(token) != i)
    beyond = sorted(token for token, i in student.items() if i >= rows)
    problems = []
    if moved:
        problems.append(f"{len(moved)} base tokens have another id in the student's tokenizer (e.g. {moved[:3]})")
    if beyond:
        problems.append(f"{len(beyond)} student token ids exceed the base LM's {rows} embedding rows (e.g. {beyond[:3]})")
    return problems


def make_teacher(student: str, base: str, out: Path, dtype: torch.dtype = torch.bfloat16) -> Any:
    """Save ``base`` with ``student``'s tokenizer into ``out``; ValueError if their vocabularies disagree."""
    student_tokenizer = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    rows = model.get_input_embeddings().weight.shape[0]
    problems = vocabulary_problems(AutoTokenizer.from_pretrained(base).get_vocab(), student_tokenizer.get_vocab(), rows)
    if problems:
        raise ValueError(f"{base} cannot be the teacher of {student}: " + "; ".join(problems) +
                         ": use the student's own language model before multimodal training")
    model.save_pretrained(out)
    student_tokenizer.save_pretrained(out)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", required=True, help="the VLM (its tokenizer is used)")
    parser.add_argument("--base", required=True, help="its language model before multimodal training")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = parser.parse_args()
    make_teacher(args.student, args.base, args.out, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    print(f"teacher: {args.out}")


if __name__ == "__main__":
    main()
