"""`regate estimate --target swift` on the tiny run's dataset: ms-swift's own dataset loading and template
encoding (the teacher pass's scoring source), estimated against the engine over the same batches."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from click.testing import CliRunner

import swift_assets as assets
from regate_plugin import ReGATEConfig, estimate
from regate_plugin.cli import main

sys.path.insert(0, str(Path(__file__).parents[1]))  # estimate_check: shared with tests/test_estimate.py
from estimate_check import check_against_engine  # noqa: E402


def test_estimate_of_the_tiny_run_equals_the_engine_on_the_same_batches(tmp_path: Path) -> None:
    from regate_plugin.patches.swift import scoring_source

    assets.build_student(tmp_path / "student")
    data = assets.build_dataset(tmp_path / "data")
    args = assets.sft_args(tmp_path / "student", data, tmp_path / "run")
    out = tmp_path / "estimate.json"
    schedule = ["--warmup", "0", "--cycle", "2", "--dense-steps", "1", "--keep-ratio", "0.5"]  # odd steps sparse
    result = CliRunner().invoke(main, ["estimate", "--target", "swift", "--model", str(tmp_path / "student"),
                                       "--batch-size", "2", "--steps", "24", "--no-progress", "--json", str(out),
                                       *schedule, "--", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    report = json.loads(out.read_text())
    assert report["samples"] == 16 and report["sparse_steps"] == 12
    assert report["tokens_per_sample"]["visual"]["mean"] == assets.VISUAL_TOKENS  # ms-swift's template expansion
    source = scoring_source(args, "")
    tokens = estimate.scan(source, [1.0], progress=False)
    batches = estimate.draw_batches(tokens.length, 2, 24)
    check_against_engine(source, report, batches, ReGATEConfig(warmup=0, cycle=2, dense_steps=1, keep_ratio=0.5))
