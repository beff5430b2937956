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


# What a cluster or the caller may set: each test starts without them.
LAUNCH_VARIABLES = ("WORLD_SIZE", "NPROC_PER_NODE", "RANK", "MASTER_ADDR", "MASTER_PORT", "NODES", "NODE_RANK", "GPUS")


def dry_run(script, expect_ok=True, args=("--dry-run",), **env):
    """Run a recipe; ``GPUS=None`` leaves GPUS unset (the default 4 stands for a caller's setting)."""
    environment = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    environment.update({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "MODEL": "/models/llm",
                        "DATA_PATH": "/data/mix.json", "REF_CACHE": "/caches/ref", "GPUS": "4", **env})
    environment = {k: v for k, v in environment.items() if v is not None}
    done = subprocess.run(["bash", str(RECIPES / script), *args], capture_output=True, text=True, env=environment, timeout=120)
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


def launch(command):
    """torchrun's --nnodes, --nproc_per_node, --master_addr, --master_port and --node_rank of a dry run."""
    words = command.split()
    return tuple(words[words.index(flag) + 1] for flag in
                 ("--nnodes", "--nproc_per_node", "--master_addr", "--master_port", "--node_rank"))


def test_positional_arguments_as_upstreams_scripts():
    """`bash finetune.sh 2 8 1` as upstream's scripts/custom/finetune.sh: nodes, GPUs per node, node rank;
    --dry-run anywhere among them."""
    for args in (["2", "8", "1", "--dry-run"], ["--dry-run", "2", "8", "1"], ["2", "--dry-run", "8", "1"]):
        command, resolved = dry_run("finetune_regate.sh", args=args, GPUS=None)
        assert launch(command) == ("2", "8", "127.0.0.1", "16666", "1"), args
        assert "--gradient_accumulation_steps 2 " in resolved["upstream_args"]  # 128 / (2 nodes x 8 GPUs x 4)
    command, _ = dry_run("finetune_lora_regate.sh", args=["4", "--dry-run"], GPUS=None)
    assert launch(command) == ("4", "8", "127.0.0.1", "16666", "0")  # upstream's defaults for the rest
    command, _ = dry_run("finetune_qlora_regate.sh", args=["--dry-run"], GPUS=None)
    assert launch(command) == ("1", "8", "127.0.0.1", "16666", "0")


def test_cluster_variables_as_upstreams_scripts():
    """WORLD_SIZE (nodes) and NPROC_PER_NODE replace the arguments when both are set; RANK when
    MASTER_ADDR, MASTER_PORT and RANK are all set; our NODES, GPUS and NODE_RANK win over both."""
    cluster = {"WORLD_SIZE": "4", "NPROC_PER_NODE": "2", "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "23456", "RANK": "3"}
    command, resolved = dry_run("finetune_regate.sh", args=["1", "8", "0", "--dry-run"], GPUS=None, **cluster)
    assert launch(command) == ("4", "2", "10.0.0.9", "23456", "3")
    assert "--gradient_accumulation_steps 4 " in resolved["upstream_args"]  # 128 / (4 x 2 x 4)
    half = {"WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.9", "RANK": "3"}  # no NPROC_PER_NODE, no MASTER_PORT
    command, _ = dry_run("finetune_regate.sh", args=["2", "8", "1", "--dry-run"], GPUS=None, **half)
    assert launch(command) == ("2", "8", "10.0.0.9", "16666", "1")
    command, _ = dry_run("finetune_regate.sh", args=["--dry-run"], NODES="2", GPUS="4", NODE_RANK="1", **cluster)
    assert launch(command) == ("2", "4", "10.0.0.9", "23456", "1")


def test_bad_arguments_are_refused():
    for args, message in ((["--dry-run", "--foo"], "unexpected argument '--foo'"), (["two", "--dry-run"], "'two'"),
                          (["1", "8", "0", "5", "--dry-run"], "too many arguments")):
        done = dry_run("finetune_regate.sh", expect_ok=False, args=args)
        assert done.returncode == 2 and message in done.stderr and not done.stdout, args


def test_score_runs_on_one_node():
    command, _ = dry_run("score_reference.sh", args=["1", "2", "--dry-run"], GPUS=None)
    assert command.startswith("command: torchrun --nproc_per_node 2 -m regate_plugin score ")
    done = dry_run("score_reference.sh", expect_ok=False, args=["2", "8", "--dry-run"], GPUS=None)
    assert done.returncode == 2 and "runs on one node" in done.stderr and not done.stdout


def test_readme_installs_from_a_checkout():
    readme = (RECIPES / "README.md").read_text()
    assert 'pip install -e "/path/to/regate-plugin[flash]"' in readme and "git+file:///path/to/regate-plugin" in readme
    assert 'pip install "regate-plugin[flash]"' not in readme  # not on a registry
