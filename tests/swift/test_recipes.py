"""recipes/swift: the .args files are ms-swift's own sft arguments that ReGATE trains with, and the scripts
are valid bash, shellcheck-clean, and print the launch line they would run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from regate_plugin.patches.swift import refusal

RECIPES = Path(__file__).parents[2] / "recipes" / "swift"
ARGS = sorted(RECIPES.glob("*.args"))
SCRIPTS = sorted(RECIPES.glob("*.sh"))


def recipe_args(path: Path) -> list[str]:
    """The recipe's arguments as common.sh reads them (comments and blank lines dropped)."""
    return [word for line in path.read_text().splitlines() for word in line.split("#", 1)[0].split()]


def test_recipes_exist() -> None:
    assert {p.stem for p in ARGS} == {"qwen2_5vl_7b_full", "qwen2_5vl_7b_lora", "internvl3_5_8b_full", "internvl3_5_8b_lora"}


@pytest.mark.parametrize("recipe", ARGS, ids=lambda p: p.stem)
def test_args_are_swift_sft_that_regate_trains(recipe: Path) -> None:
    """Parsed by ms-swift's own argument parser for SftArguments with the scripts' additions (no unknown
    argument), and refused by nothing. The namespace is the parser's (building SftArguments would fetch
    the model's config); ms-swift resolves task_type None to causal_lm for these models."""
    from swift.arguments import SftArguments
    from swift.utils.utils import _patch_get_type_hints
    from transformers import HfArgumentParser

    with _patch_get_type_hints():
        parser = HfArgumentParser([SftArguments])
    argv = [*recipe_args(recipe), "--dataset", "data/train.jsonl", "--deepspeed", "zero2", "--output_dir", "out"]
    namespace, unknown = parser.parse_known_args(argv)
    assert unknown == []
    assert namespace.task_type is None
    namespace.task_type = "causal_lm"
    assert refusal(namespace) is None
    assert namespace.tuner_type == recipe.stem.rsplit("_", 1)[1]
    assert namespace.model == ("Qwen/Qwen2.5-VL-7B-Instruct" if recipe.stem.startswith("qwen") else "OpenGVLab/InternVL3_5-8B-HF")
    assert namespace.truncation_strategy == "right" and not namespace.packing and not namespace.padding_free


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax_and_shellcheck(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    done = subprocess.run([shellcheck, "-x", "-P", "SCRIPTDIR", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def dry_run(script: str, *args: str, **env: str) -> tuple[str, str]:
    environment = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", GPUS="4",
                       DATASET="/data/a.jsonl /data/b.jsonl", REF_CACHE="/caches/ref", **env)
    done = subprocess.run(["bash", str(RECIPES / script), "--dry-run", *args], capture_output=True, text=True,
                          env=environment, timeout=120)
    assert done.returncode == 0, done.stderr
    command = next(line for line in done.stdout.splitlines() if line.startswith("command:"))
    return command, done.stdout[done.stdout.index(command) + len(command):].strip()


def test_finetune_dry_run() -> None:
    command, resolved = dry_run("finetune_regate.sh", "--max_steps", "10", RECIPE="internvl3_5_8b_lora", ZERO="2",
                                REGATE_ARGS="--keep-ratio 0.4")
    assert command.startswith("command: torchrun --nnodes 1 --node_rank 0 --nproc_per_node 4")
    assert "-m regate_plugin train --target swift --regate --ref-cache /caches/ref --keep-ratio 0.4 -- --model " in command
    tail = "--dataset /data/a.jsonl /data/b.jsonl --deepspeed zero2 --output_dir ./output/internvl3_5_8b_lora-regate"
    assert "--tuner_type lora --lora_rank 64 " in command and tail in command and command.endswith("--max_steps 10")
    config = json.loads(resolved)
    assert config["mode"] == "ReGATE" and config["config"]["keep_ratio"] == 0.4
    assert config["attn_implementation"] == "--attn_impl among ms-swift's arguments"


def test_baseline_and_teacher_pass_dry_run() -> None:
    command, resolved = dry_run("finetune_regate.sh", REGATE="0")
    assert "train --target swift --no-regate -- --model Qwen/Qwen2.5-VL-7B-Instruct" in command
    assert "--deepspeed zero3" in command and json.loads(resolved)["mode"] == "upstream (no ReGATE)"
    command, _ = dry_run("score_reference.sh", TEACHER="/teachers/qwen2.5-7b")
    assert ("score --target swift --teacher /teachers/qwen2.5-7b --out /caches/ref --batch-size 16 -- "
            "--model Qwen/Qwen2.5-VL-7B-Instruct --tuner_type full") in command
    assert "--dataset /data/a.jsonl /data/b.jsonl --output_dir" in command
