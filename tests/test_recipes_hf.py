"""The README's runnable example (recipes/hf/train_tiny.py) runs and trains with ReGATE on."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from regate_plugin import cli

RECIPE = Path(__file__).parents[1] / "recipes" / "hf" / "train_tiny.py"


@pytest.mark.parametrize("family", ["llava", "qwen3_vl"])  # internvl, idefics3: the same path, run by hand
def test_tiny_hf_recipe_runs_and_reports(tmp_path, family):
    done = subprocess.run([sys.executable, str(RECIPE), "--out", str(tmp_path), "--steps", "12", "--family", family],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "refcache" / "meta.json").is_file()
    assert (tmp_path / "run" / "checkpoint-12" / "regate_state.pt").is_file()  # the final save carries it too
    result = CliRunner().invoke(cli.main, ["report", str(tmp_path / "run"), "--json"])
    facts = json.loads(result.output)
    assert facts["steps"] == 12
    # warmup 4, cycle 8 with 2 dense: steps 6-11 sparse at 0.5 -> fewer supervised tokens than dense
    assert facts["supervised_kept"] < facts["supervised_total"]
    assert facts["llm_tokens"] < facts["padded_tokens"]
