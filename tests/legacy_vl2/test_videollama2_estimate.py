"""`regate estimate --target videollama2` on the tiny runs' datasets: VideoLLaMA2's own preprocessing
and merge (the teacher pass's scoring source), estimated against the engine over the same batches."""

import json

import pytest
from click.testing import CliRunner

import vl2_assets
from estimate_check import check_against_engine
from regate_plugin import ReGATEConfig, estimate
from regate_plugin.cli import main

pytestmark = pytest.mark.usefixtures("videollama2_src")
# by the connector formulas, as tests/legacy_vl2/test_videollama2.py states them (4 frames)
VISUAL = {"qwen2": (4 // 2) * (5 // 2) ** 2, "mistral": (4 // 2 + 1) * (4 // 2 + 1) ** 2}


@pytest.mark.parametrize("variant", sorted(vl2_assets.VARIANTS))
def test_estimate_of_the_tiny_run_equals_the_engine_on_the_same_batches(tmp_path, variant):
    from regate_plugin.patches.videollama2 import VideoLLaMA2ScoringSource

    assets = vl2_assets.build(tmp_path / "assets")
    args = vl2_assets.upstream_args(assets, variant, tmp_path / "run")
    out = tmp_path / "estimate.json"
    schedule = ["--warmup", "0", "--cycle", "2", "--dense-steps", "1", "--keep-ratio", "0.5"]  # odd steps sparse
    result = CliRunner().invoke(main, ["estimate", "--target", "videollama2", "--model", str(assets[variant]),
                                       "--batch-size", "2", "--steps", "24", "--no-progress", "--json", str(out),
                                       *schedule, "--", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    report = json.loads(out.read_text())
    source = VideoLLaMA2ScoringSource(args, "")
    assert report["samples"] == len(source) and report["sparse_steps"] == 12
    tokens = estimate.scan(source, [1.0], progress=False)
    assert set(tokens.visual.tolist()) == {0, VISUAL[variant]}  # the connector's count; one text-only sample
    batches = estimate.draw_batches(tokens.length, 2, 24)
    check_against_engine(source, report, batches, ReGATEConfig(warmup=0, cycle=2, dense_steps=1, keep_ratio=0.5))
