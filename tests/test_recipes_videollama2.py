"""The VideoLLaMA2 recipes: valid bash, shellcheck-clean, and their --dry-run resolves the full command
(without VideoLLaMA2 installed: the target's entry point imports nothing from upstream)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RECIPES = Path(__file__).parents[1] / "recipes" / "videollama2"
SCRIPTS = sorted(RECIPES.glob("*.sh"))
FINETUNE = ["finetune_regate.sh", "finetune_lora_regate.sh", "finetune_qlora_regate.sh"]
VARIANTS = {
    "qwen2-16f": ["--model_type videollama2_qwen2", "--vision_tower google/siglip-so400m-patch14-384",
                  "--mm_projector_type stc_connector_v35", "--num_frames 16",
                  "--pretrain_mm_mlp_adapter DAMO-NLP-SG/VideoLLaMA2.1-7B-16F-Base/mm_projector.bin"],
    "mistral-8f": ["--model_type videollama2 ", "--vision_tower openai/clip-vit-large-patch14-336",
                   "--mm_projector_type stc_connector ", "--num_frames 8",
                   "--pretrain_mm_mlp_adapter DAMO-NLP-SG/VideoLLaMA2-7B-Base/mm_projector.bin"],
}


def test_recipes_exist():
    assert {p.name for p in SCRIPTS} == {"common.sh", "score_reference.sh", *FINETUNE}
    for config in ("zero2.json", "zero3.json"):
        stage = json.loads((RECIPES / config).read_text())["zero_optimization"]["stage"]
        assert stage == int(config[4])
    assert (RECIPES / "README.md").is_file()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax_and_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    done = subprocess.run([shellcheck, "-x", "-P", "SCRIPTDIR", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def dry_run(script, expect_ok=True, **env):
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                   "MODEL": "/models/llm", "DATA_PATH": "/data/mix.json", "REF_CACHE": "/caches/ref", "GPUS": "4", **env}
    done = subprocess.run(["bash", str(RECIPES / script), "--dry-run"], capture_output=True, text=True, env=environment, timeout=120)
    if not expect_ok:
        return done
    assert done.returncode == 0, done.stderr
    command = next(line for line in done.stdout.splitlines() if line.startswith("command:"))
    resolved = done.stdout[done.stdout.index(command) + len(command):].strip()
    return command, json.loads(resolved) if resolved else None


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("script", FINETUNE)
def test_finetune_dry_run_prints_the_full_command(script, variant):
    command, resolved = dry_run(script, VARIANT=variant, REGATE_ARGS="--keep-ratio 0.4 --warmup 50")
    assert command.startswith("command: torchrun --nnodes 1 --nproc_per_node 4 --master_addr 127.0.0.1 "
                              "--master_port 16666 --node_rank 0 -m regate_plugin")
    assert "train --target videollama2 --regate --ref-cache /caches/ref --keep-ratio 0.4 --warmup 50 --" in command
    assert resolved["target"] == "videollama2"
    assert resolved["mode"] == "ReGATE" and resolved["ref_cache"] == "/caches/ref"
    assert resolved["config"]["keep_ratio"] == 0.4 and resolved["config"]["warmup"] == 50
    upstream = resolved["upstream_args"] + " "
    zero = "zero2.json" if "qlora" in script else "zero3.json"
    for expected in (f"--deepspeed {RECIPES / zero} ", "--model_path /models/llm ", "--data_path /data/mix.json ",
                     "--mm_vision_select_layer -2 ", "--image_aspect_ratio pad ", "--model_max_length 2048 ",
                     "--bf16 True ", "--gradient_checkpointing True ", "--per_device_train_batch_size 4 ",
                     "--gradient_accumulation_steps 8 ", "--learning_rate 2e-5 ", *VARIANTS[variant]):
        assert expected in upstream, expected
    assert ("--lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5" in upstream) == ("lora" in script)
    assert ("--bits 4" in upstream) == ("qlora" in script)


def test_baseline_and_multinode():
    command, resolved = dry_run("finetune_regate.sh", REGATE="0", NODES="2", NODE_RANK="1", MASTER_ADDR="10.1.2.3")
    assert "--nnodes 2" in command and "--node_rank 1" in command and "--master_addr 10.1.2.3" in command
    assert "--no-regate" in command and resolved["mode"] == "upstream (no ReGATE)"
    assert "--gradient_accumulation_steps 4" in resolved["upstream_args"]  # 128 / (2 nodes x 4 GPUs x 4)


def test_score_dry_run():
    for variant, expected in VARIANTS.items():
        command, _ = dry_run("score_reference.sh", VARIANT=variant)
        assert command.startswith("command: torchrun --nproc_per_node 4 -m regate_plugin score --target videollama2 "
                                  "--teacher /models/llm --out /caches/ref --batch-size 16 --")
        for flag in ("--data_path /data/mix.json", "--model_max_length 2048", *expected[:4]):
            assert flag.strip() in command


def test_bad_settings_are_refused():
    done = dry_run("finetune_regate.sh", expect_ok=False, VARIANT="llama-13b")
    assert done.returncode != 0 and "unknown VARIANT=llama-13b" in done.stderr
    done = dry_run("finetune_regate.sh", expect_ok=False, GPUS="3")
    assert done.returncode != 0 and "not a multiple" in done.stderr
