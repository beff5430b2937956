"""recipes/llamafactory: the YAMLs are LLaMA-Factory's own arguments that ReGATE trains with, and the
scripts are valid bash, shellcheck-clean, and print the launch line they would run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from regate_plugin.patches.llamafactory import _read_args, refusal

RECIPES = Path(__file__).parents[2] / "recipes" / "llamafactory"
YAMLS = sorted(RECIPES.glob("*.yaml"))
SCRIPTS = sorted(RECIPES.glob("*.sh"))


def test_recipes_exist() -> None:
    assert {p.stem for p in YAMLS} == {"qwen2_5vl_7b_full", "qwen2_5vl_7b_lora", "internvl3_5_8b_full", "internvl3_5_8b_lora"}
    for stage in (2, 3):
        assert json.loads((RECIPES / f"zero{stage}.json").read_text())["zero_optimization"]["stage"] == stage


@pytest.mark.parametrize("yaml", YAMLS, ids=lambda p: p.stem)
def test_yaml_is_llamafactory_sft_that_regate_trains(yaml: Path) -> None:
    """Parsed by LLaMA-Factory's own argument classes with the scripts' overrides (no unknown key)."""
    from llamafactory.hparams import DataArguments, FinetuningArguments, GeneratingArguments, ModelArguments, TrainingArguments
    from transformers import HfArgumentParser

    args = _read_args([str(yaml), "dataset=mllm_demo", "dataset_dir=data", "output_dir=out", "bf16=false"])
    parser = HfArgumentParser([ModelArguments, DataArguments, TrainingArguments, FinetuningArguments, GeneratingArguments])
    model_args, data_args, training_args, finetuning_args, _ = parser.parse_dict(args, allow_extra_keys=False)
    assert refusal(data_args, training_args, finetuning_args) is None
    assert finetuning_args.finetuning_type == yaml.stem.rsplit("_", 1)[1]
    assert (data_args.template, model_args.model_name_or_path) == (
        ("qwen2_vl", "Qwen/Qwen2.5-VL-7B-Instruct") if yaml.stem.startswith("qwen") else ("intern_vl", "OpenGVLab/InternVL3_5-8B-HF"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax_and_shellcheck(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    done = subprocess.run([shellcheck, "-x", "-P", "SCRIPTDIR", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def dry_run(script: str, *args: str, **env: str) -> tuple[str, str]:
    environment = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", GPUS="4",
                       DATASET="vqa_mix", DATASET_DIR="/data", REF_CACHE="/caches/ref", **env)
    done = subprocess.run(["bash", str(RECIPES / script), "--dry-run", *args], capture_output=True, text=True,
                          env=environment, timeout=120)
    assert done.returncode == 0, done.stderr
    command = next(line for line in done.stdout.splitlines() if line.startswith("command:"))
    return command, done.stdout[done.stdout.index(command) + len(command):].strip()


def test_finetune_dry_run() -> None:
    command, resolved = dry_run("finetune_regate.sh", "max_steps=10", RECIPE="internvl3_5_8b_lora", ZERO="2",
                                REGATE_ARGS="--keep-ratio 0.4")
    assert command.startswith("command: torchrun --nnodes 1 --node_rank 0 --nproc_per_node 4")
    assert "-m regate_plugin train --target llamafactory --regate --ref-cache /caches/ref --keep-ratio 0.4 --" in command
    tail = f"{RECIPES}/internvl3_5_8b_lora.yaml dataset=vqa_mix dataset_dir=/data media_dir=/data deepspeed={RECIPES}/zero2.json"
    assert tail in command and command.endswith("max_steps=10")
    config = json.loads(resolved)
    assert config["mode"] == "ReGATE" and config["config"]["keep_ratio"] == 0.4


def test_baseline_and_teacher_pass_dry_run() -> None:
    command, resolved = dry_run("finetune_regate.sh", REGATE="0")
    assert "train --target llamafactory --no-regate --" in command and json.loads(resolved)["mode"] == "upstream (no ReGATE)"
    command, _ = dry_run("score_reference.sh", TEACHER="/teachers/qwen2.5-7b")
    assert ("score --target llamafactory --teacher /teachers/qwen2.5-7b --out /caches/ref --batch-size 16 -- "
            f"{RECIPES}/qwen2_5vl_7b_full.yaml dataset=vqa_mix dataset_dir=/data media_dir=/data") in command
