"""The LLaVA recipes: valid bash, shellcheck-clean, and their --dry-run resolves the full command."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RECIPES = Path(__file__).parents[1] / "recipes" / "llava"
SCRIPTS = sorted(RECIPES.glob("*.sh"))


def test_recipes_exist():
    assert {p.name for p in SCRIPTS} == {"common.sh", "score_reference.sh", "finetune_regate.sh", "finetune_lora_regate.sh"}
    for config in ("zero2.json", "zero3.json"):
        stage = json.loads((RECIPES / config).read_text())["zero_optimization"]["stage"]
        assert stage == int(config[4])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax_and_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    done = subprocess.run([shellcheck, "-x", "-P", "SCRIPTDIR", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def dry_run(script, args=("--dry-run",), **env):
    environment = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                       MODEL="/models/vicuna", DATA_PATH="/data/mix.json", REF_CACHE="/caches/ref", GPUS="4", **env)
    done = subprocess.run(["bash", str(RECIPES / script), *args], capture_output=True, text=True, env=environment, timeout=120)
    assert done.returncode == 0, done.stderr
    command = next(line for line in done.stdout.splitlines() if line.startswith("command:"))
    resolved = done.stdout[done.stdout.index(command) + len(command):].strip()
    return command, json.loads(resolved) if resolved else None


@pytest.mark.parametrize("script", ["finetune_regate.sh", "finetune_lora_regate.sh"])
def test_finetune_dry_run_prints_the_full_command(script):
    command, resolved = dry_run(script, REGATE_ARGS="--keep-ratio 0.4 --warmup 50")
    assert command.startswith("command: deepspeed --num_gpus 4 --num_nodes 1")
    assert "train --target llava --regate --ref-cache /caches/ref --keep-ratio 0.4 --warmup 50 --" in command
    assert resolved["mode"] == "ReGATE" and resolved["ref_cache"] == "/caches/ref"
    assert resolved["config"]["keep_ratio"] == 0.4 and resolved["config"]["warmup"] == 50
    upstream = resolved["upstream_args"]
    for expected in ("--deepspeed", "zero3.json", "--model_name_or_path /models/vicuna", "--data_path /data/mix.json",
                     "--version v1", "--mm_projector_type mlp2x_gelu", "--gradient_checkpointing True",
                     "--per_device_train_batch_size 16"):
        assert expected in upstream
    assert ("--lora_enable True" in upstream) == ("lora" in script)


def test_baseline_and_multinode():
    command, resolved = dry_run("finetune_regate.sh", REGATE="0", NODES="2", HOSTFILE="/etc/hostfile")
    assert "--hostfile /etc/hostfile" in command and "--num_nodes 2" in command
    assert "--no-regate" in command and resolved["mode"] == "upstream (no ReGATE)"


def test_score_dry_run():
    command, _ = dry_run("score_reference.sh")
    assert command.startswith("command: torchrun --nproc_per_node 4 -m regate_plugin score --target llava --teacher /models/vicuna --out /caches/ref")
    assert "--data_path /data/mix.json" in command
    assert "--output_dir" not in command  # regate score --target llava needs none
    assert 'regate inspect "$REF_CACHE" --target llava -- "${DATA_ARGS[@]}"' in (RECIPES / "score_reference.sh").read_text()


def test_dry_run_anywhere_and_extra_upstream_arguments():
    command, resolved = dry_run("finetune_regate.sh", args=["--seed", "1", "--dry-run"])
    assert command.startswith("command: deepspeed ")
    assert resolved["upstream_args"].startswith("--seed 1 --deepspeed ")
    assert "--dry-run" not in resolved["upstream_args"]


def test_readme_installs_from_a_checkout():
    readme = (RECIPES / "README.md").read_text()
    assert 'pip install -e "/path/to/regate-plugin[flash,deepspeed]"' in readme and "git+file:///path/to/regate-plugin" in readme
    assert 'pip install "regate-plugin[flash,deepspeed]"' not in readme  # not on a registry
