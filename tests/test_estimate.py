"""`regate estimate`: the estimate against the engine run over the same batches, and against `regate
bench`'s cost model on the same batch."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("transformers")

from regate_plugin import ReGATEConfig, ReGATEEngine, cli, estimate  # noqa: E402
from regate_plugin import report as run_report  # noqa: E402
from regate_plugin.bench import cost, workloads  # noqa: E402
from regate_plugin.hookspecs import Target, hookimpl  # noqa: E402
from regate_plugin.plugins import build_plugin_manager  # noqa: E402
from regate_plugin.selection import keep_quota  # noqa: E402
from regate_plugin.units import IGNORE_INDEX  # noqa: E402

from estimate_check import SHARE_TOLERANCE, check_against_engine  # noqa: E402


def test_expected_row_equals_the_mean_over_every_choice_of_kept_units():
    columns = np.array([3, 4, 5, 9, 10, 17, 18])
    for p, input_elision in itertools.product((0.1, 0.3, 0.5, 0.75, 1.0), (True, False)):
        k, row, squared = estimate.expected_row(columns, p, input_elision)
        rows = []
        for kept in itertools.combinations(range(len(columns)), k):
            last = max(kept)
            elided_before = (last + 1 - k) if input_elision else 0
            rows.append(columns[last] + 1 - elided_before)
        assert k == max(1, int(np.ceil(p * len(columns) - 1e-9)))
        assert row == pytest.approx(np.mean(rows)) and squared == pytest.approx(np.mean(np.square(rows)))
    assert estimate.expected_row(np.array([], dtype=np.int64), 0.5, True) == (0, 0.0, 0.0)


# ------------------------------------------------------------- the engine over the same batches


def test_demo_estimate_equals_the_engine_run_on_the_same_batches(tmp_path):
    from regate_plugin import demo
    from regate_plugin import demo_task as task
    from regate_plugin.patches import hf

    tokenizer = task.build_tokenizer()
    _, llava_config = demo._configs(tokenizer.get_vocab())
    llava_config.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    source = hf.HFScoringSource(demo.train_dataset(), str(tmp_path / "student"), dataset_id="regate-demo-seed0")
    steps = 200
    config = demo.scaled_config(demo.DEFAULT_STEPS)  # what `regate demo` runs: warmup 32, cycle 40, 5 dense
    tokens = estimate.scan(source, [1.0, config.keep_ratio], progress=False)
    model = estimate.resolve_model(str(tmp_path / "student"))
    report = estimate.estimate(tokens, model, config, demo.BATCH_SIZE, steps)
    batches = estimate.draw_batches(tokens.length, demo.BATCH_SIZE, steps)

    # the demo's samples: BOS, 4 visual tokens... as the task builds them
    first_ids, first_labels = source.context(0)
    assert tokens.visual[0] == task.VISUAL_TOKENS
    assert tokens.supervised[0] == int((first_labels != IGNORE_INDEX).sum()) and tokens.length[0] == first_ids.numel()
    assert report["model"]["hidden"] == llava_config.text_config.hidden_size
    check_against_engine(source, report, batches, config)

    # and against the recorded `regate demo --seed 0` run (its Trainer's own batches, the teacher's scores)
    recorded = json.loads((Path(__file__).parents[1] / "benchmarks/results/demo/seed0/demo.json").read_text())
    run = estimate.estimate(tokens, model, config, recorded["batch_size"], recorded["steps"])["modes"]
    for mode, name in (("packed-dense", "dense"), ("regate", "regate")):
        achieved = recorded["runs"][name]
        supervised = achieved["supervised_tokens"] / achieved["supervised_tokens_dense_equivalent"]
        assert abs(run[mode]["supervised_share"] - supervised) < SHARE_TOLERANCE
        assert abs(run[mode]["llm_token_share"] - achieved["llm_tokens"] / achieved["padded_tokens"]) < SHARE_TOLERANCE


def test_tiny_hf_dataset_through_the_cli_equals_the_engine_run(tmp_path):
    from score_assets import train_dataset, write_student_and_teacher

    from regate_plugin.patches import hf

    student, _ = write_student_and_teacher(tmp_path)
    out = tmp_path / "run" / "regate_estimate.json"
    schedule = ["--warmup", "2", "--cycle", "8", "--dense-steps", "2", "--keep-ratio", "0.25"]
    result = CliRunner().invoke(cli.main, ["estimate", "--target", "hf", "--model", str(student), "--batch-size", "4",
                                           "--steps", "60", "--no-progress", "--json", str(out), *schedule, "--",
                                           "--dataset", "score_assets:train_dataset", "--student", str(student)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert "verdict: packing removes" in result.output and "| regate |" in result.output
    assert report["samples"] == 24 and report["steps"] == 60 and report["sparse_steps"] == 60 - 2 - 2 * 8
    source = hf.HFScoringSource(train_dataset(), str(student), dataset_id="score_assets:train_dataset")
    tokens = estimate.scan(source, [1.0], progress=False)
    batches = estimate.draw_batches(tokens.length, 4, 60)
    config = ReGATEConfig(warmup=2, cycle=8, dense_steps=2, keep_ratio=0.25)
    achieved = check_against_engine(source, report, batches, config)

    # `regate report` on a run folder holding the estimate and a Trainer log of those totals
    entry = {"step": 60, "loss": 1.5, "regate/keep_ratio": (18 * 1.0 + 42 * 0.25) / 60,
             **{f"regate/{key}": value for key, value in achieved.items()}}
    final = {"step": 60, "train_runtime": 12.0, "train_steps_per_second": 5.0}  # what Trainer.train() logs last
    (out.parent / "trainer_state.json").write_text(json.dumps({"log_history": [entry, final]}))
    shown = CliRunner().invoke(cli.main, ["report", str(out.parent), "--json"])
    assert shown.exit_code == 0, shown.output
    facts = json.loads(shown.output)
    guess = facts["estimate"]
    assert guess["mode"] == "regate" and guess["flops_share"] == report["modes"]["regate"]["flops_share"]
    assert guess["supervised_share"] == pytest.approx(facts["supervised_share"])
    assert abs(guess["llm_share"] - facts["llm_share"]) < SHARE_TOLERANCE
    packing_only = run_report.estimated(report, packing_only=True)
    assert packing_only["mode"] == "packed-dense" and packing_only["supervised_share"] == 1.0
    text = CliRunner().invoke(cli.main, ["report", str(out.parent)]).output
    assert f"({facts['supervised_share']:.1%}; estimated {guess['supervised_share']:.1%})" in text
    assert f"ideal speedup {report['modes']['regate']['ideal_speedup']:.2f}x" in text
    assert facts["seconds_per_step"] == pytest.approx(12.0 / 60)
    assert "step time             0.2 s per optimizer step" in text


@pytest.mark.parametrize("elision", ["input", "loss"])
def test_multi_turn_workload_estimate_equals_the_engine_run(elision):
    """Several answers a sample: where the last kept unit falls moves the trimmed row (single-turn
    rows do not depend on it), so this exercises the expectation over it."""
    source = estimate.WorkloadSource("llava-1.5", 512, seed=0)
    config = ReGATEConfig(warmup=10, cycle=20, dense_steps=2, keep_ratio=0.25, elision=elision)
    tokens = estimate.scan(source, [1.0, 0.25], input_elision=elision == "input", progress=False)
    report = estimate.estimate(tokens, estimate.MODEL_PRESETS["llava-1.5-7b"], config, 16, 100)
    assert max(len(s.answer_lengths) for s in source.samples) == 4
    check_against_engine(source, report, estimate.draw_batches(tokens.length, 16, 100), config)


class _QuarterAfterTen:
    @hookimpl
    def regate_keep_ratio(self, step, config):
        return 1.0 if step < 10 else 0.25


def test_the_schedule_is_the_keep_ratio_hook_a_plugin_may_replace():
    source = estimate.WorkloadSource("long-answer", 64, seed=1)
    pm = build_plugin_manager(load_entrypoints=False, extra=[_QuarterAfterTen()])
    config = ReGATEConfig()  # its own schedule (warmup 100) would keep everything over 40 steps
    assert estimate.schedule(config, 40, pm) == [1.0] * 10 + [0.25] * 30
    tokens = estimate.scan(source, [0.25, 1.0], progress=False)
    report = estimate.estimate(tokens, estimate.MODEL_PRESETS["llava-1.5-7b"], config, 8, 40, pm=pm)
    batches = estimate.draw_batches(tokens.length, 8, 40)
    counts = [torch.as_tensor(tokens.supervised[b]) for b in batches]
    kept = sum(int(c.sum()) for c in counts[:10]) + sum(int(keep_quota(c, 0.25).sum()) for c in counts[10:])
    assert report["sparse_steps"] == 30
    no_sparse = estimate.estimate(tokens, estimate.MODEL_PRESETS["llava-1.5-7b"], config, 8, 40)  # the built-in schedule
    assert no_sparse["sparse_steps"] == 0 and no_sparse["modes"]["regate"]["supervised_share"] == 1.0
    assert "none of the 40 steps is sparse (warmup 100)" in estimate.verdict(no_sparse)
    assert report["modes"]["regate"]["supervised_share"] == pytest.approx(kept / sum(int(c.sum()) for c in counts))


# ------------------------------------------------------------- one cost model with `regate bench`


def test_estimate_flops_equal_bench_cost_model_on_the_same_batch():
    from regate_plugin.bench.cost import padded_step_cost, plan_cost

    source = estimate.WorkloadSource("llava-1.5", 32, seed=3)
    tokens = estimate.scan(source, [1.0], progress=False)
    model = estimate.MODEL_PRESETS["llava-1.5-7b"]
    engine = ReGATEEngine(ReGATEConfig(), None, pm=build_plugin_manager(load_entrypoints=False))
    for start in (0, 16):
        ids = np.arange(start, start + 16)
        batch = workloads.collate(source.samples[start : start + 16], start)
        plan = engine.plan(batch.labels, batch.attention_mask, batch.sample_ids)
        bench_packed = plan_cost(model.shape, model.layers, plan.host)
        bench_padded = padded_step_cost(model.shape, model.layers, *batch.shape)
        assert estimate.packed_step(tokens, ids, model, 1.0).flops.total == bench_packed
        assert estimate.padded_step(tokens, ids, model).flops.total == bench_padded
        assert bench_packed < bench_padded
    # the visual tokens are the workload's
    assert (tokens.visual == 576).all() and (tokens.supervised == [s.supervised_tokens for s in source.samples]).all()


def test_step_flops_parts_sum_to_the_step_cost():
    shape = cost.Shape("toy", hidden=4, heads=2, kv_heads=1, intermediate=8, vocab=10)
    parts = cost.step_flops(shape, 3, 4, 2**2 + 2**2, 2)
    assert parts.linear == 3 * cost.linear_flops(shape, 4)
    assert parts.attention == 3 * cost.attention_flops(shape, [2, 2])
    assert parts.head == cost.lm_head_flops(shape, 2)
    assert parts.total == cost.step_cost(shape, 3, 4, [2, 2], 2)
    assert cost.padded_step_flops(shape, 3, 2, 4).total == cost.padded_step_cost(shape, 3, 2, 4)


# ------------------------------------------------------------- inputs: models, samplers, targets


def test_model_widths_from_a_llava_config_and_the_presets(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llava", "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}}))
    model = estimate.resolve_model(str(tmp_path))
    assert (model.shape.hidden, model.shape.intermediate, model.layers, model.shape.heads, model.shape.kv_heads,
            model.shape.vocab) == (64, 128, 2, 4, 2, 256)
    qwen = estimate.resolve_model("qwen2.5-vl-7b")
    assert (qwen.shape.hidden, qwen.shape.kv_heads, qwen.layers, qwen.shape.vocab) == (3584, 4, 28, 152064)
    with pytest.raises(ValueError, match="lacks the LLM field 'hidden_size'"):
        estimate.model_from_config({"num_attention_heads": 4}, "x/config.json")
    with pytest.raises(ValueError, match="neither a preset"):
        estimate.resolve_model(str(tmp_path / "missing"))


def test_batches_cover_every_sample_each_epoch_and_grouping_cuts_padding():
    lengths = np.random.default_rng(1).integers(10, 1000, size=1000)
    for grouped in (False, True):
        batches = estimate.draw_batches(lengths, 8, 250, seed=2, grouped=grouped)
        assert [len(b) for b in batches] == [8] * 250
        assert sorted(np.concatenate(batches[:125])) == list(range(1000))
        assert sorted(np.concatenate(batches[125:])) == list(range(1000))
    random_share = estimate.padding_share(lengths, estimate.draw_batches(lengths, 8, 125))
    grouped_share = estimate.padding_share(lengths, estimate.draw_batches(lengths, 8, 125, grouped=True))
    assert grouped_share < random_share / 5
    assert estimate.uses_length_grouping(["--group_by_modality_length", "True", "--bf16", "True"])
    assert estimate.uses_length_grouping(["--group_by_length"]) and estimate.uses_length_grouping(["--group-by-length=true"])
    assert not estimate.uses_length_grouping(["--group_by_length", "False"]) and not estimate.uses_length_grouping([])


class _NoSource:
    @hookimpl
    def regate_targets(self):
        return [Target("scriptonly", "enabled from a script")]


def test_a_target_without_a_scoring_source_says_so_in_one_line(monkeypatch):
    from regate_plugin import plugins

    pm = build_plugin_manager(load_entrypoints=False, extra=[_NoSource()])
    monkeypatch.setattr(plugins, "plugin_manager", lambda: pm)
    result = CliRunner().invoke(cli.main, ["estimate", "--target", "scriptonly", "--no-progress"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: the scriptonly target has no scoring source to read its samples through: estimate with --target hf "
        "(your dataset as --dataset MOD:FN) or --workload"
    ]


def test_keep_ratio_auto_is_estimated_at_its_ceiling():
    """``auto`` decides its ratio during training: the estimate spends its ceiling, ``keep_max``, on
    every sparse step (what the schedule's default answer gives) and says so."""
    source = estimate.WorkloadSource("llava-1.5", 128, seed=0)
    tokens = estimate.scan(source, [1.0, 0.4], progress=False)
    auto = ReGATEConfig(warmup=2, cycle=4, dense_steps=1, keep_ratio="auto", keep_min=0.1, keep_max=0.4)
    fixed = auto.replace(keep_ratio=0.4)
    model = estimate.MODEL_PRESETS["llava-1.5-7b"]
    got, want = (estimate.estimate(tokens, model, c, 8, 20) for c in (auto, fixed))
    assert got["modes"] == want["modes"] and got["sparse_steps"] == 13
    assert "ReGATE at keep auto (estimated at its ceiling --keep-max 0.4) removes" in estimate.verdict(got)
    assert "sparse at keep auto (estimated at its ceiling --keep-max 0.4)" in estimate.format_estimate(got)
