"""`regate estimate --target llava` on the tiny LLaVA run's dataset: LLaVA's own preprocessing and
multimodal merge (the teacher pass's scoring source), estimated against the engine over the same batches."""

import json

from click.testing import CliRunner

import llava_assets
from estimate_check import check_against_engine
from regate_plugin import ReGATEConfig, estimate
from regate_plugin.cli import main


def test_estimate_of_the_tiny_run_equals_the_engine_on_the_same_batches(tmp_path):
    from regate_plugin.patches.llava import LlavaScoringSource

    assets = llava_assets.build(tmp_path / "assets")
    args = llava_assets.llava_args(assets, tmp_path / "run")
    out = tmp_path / "estimate.json"
    schedule = ["--warmup", "0", "--cycle", "2", "--dense-steps", "1", "--keep-ratio", "0.5"]  # odd steps sparse
    result = CliRunner().invoke(main, ["estimate", "--target", "llava", "--model", str(assets["llm"]), "--batch-size", "2",
                                       "--steps", "24", "--no-progress", "--json", str(out), *schedule, "--", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    report = json.loads(out.read_text())
    source = LlavaScoringSource(args, "")
    assert report["samples"] == len(source) and report["sparse_steps"] == 12
    tokens = estimate.scan(source, [1.0], progress=False)
    assert tokens.visual.min() > 0  # LLaVA's merge expanded every picture
    batches = estimate.draw_batches(tokens.length, 2, 24)
    check_against_engine(source, report, batches, ReGATEConfig(warmup=0, cycle=2, dense_steps=1, keep_ratio=0.5))
