"""`regate estimate --target llamafactory` on the tiny LLaVA-1.5-HF run's dataset: LLaMA-Factory's own
tokenization and visual-token expansion, estimated against the engine over the same batches."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from regate_plugin import ReGATEConfig, estimate
from regate_plugin.cli import main
from estimate_check import check_against_engine

import lf_assets as assets


def test_estimate_of_the_tiny_run_equals_the_engine_on_the_same_batches(tmp_path: Path) -> None:
    from regate_plugin.patches.llamafactory import scoring_source

    assets.build_student(tmp_path / "student")
    assets.build_dataset(tmp_path / "data")
    config_yaml = assets.write_yaml(tmp_path / "run.yaml",
                                    assets.train_config(tmp_path / "student", tmp_path / "data", tmp_path / "run"))
    out = tmp_path / "estimate.json"
    schedule = ["--warmup", "0", "--cycle", "2", "--dense-steps", "1", "--keep-ratio", "0.5"]  # odd steps sparse
    result = CliRunner().invoke(main, ["estimate", "--target", "llamafactory", "--model", str(tmp_path / "student"),
                                       "--batch-size", "2", "--steps", "24", "--no-progress", "--json", str(out),
                                       *schedule, "--", str(config_yaml)])
    assert result.exit_code == 0, (result.output, result.exception)
    report = json.loads(out.read_text())
    assert report["samples"] == 16 and report["sparse_steps"] == 12
    assert report["tokens_per_sample"]["visual"]["mean"] == assets.VISUAL_TOKENS  # LLaMA-Factory's expansion

    source = scoring_source([str(config_yaml)], "")
    tokens = estimate.scan(source, [1.0], progress=False)
    assert tokens.supervised.max() > tokens.supervised.min()  # one- and two-turn samples
    batches = estimate.draw_batches(tokens.length, 2, 24)
    check_against_engine(source, report, batches, ReGATEConfig(warmup=0, cycle=2, dense_steps=1, keep_ratio=0.5))
