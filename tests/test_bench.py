"""`regate bench`: workload presets, the cost model, the schedule weighting, and one tiny CPU run."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from regate_plugin import ReGATEConfig, bench
from regate_plugin.units import IGNORE_INDEX, find_units

pytest.importorskip("transformers")

VOCAB = bench.SHAPES["tiny"].vocab


@pytest.mark.parametrize("name", sorted(bench.PRESETS))
def test_preset_composition(name):
    preset = bench.PRESETS[name]
    samples = bench.make_samples(preset, 60, seed=3, vocab_size=VOCAB)
    image_id = VOCAB - 1
    for s in samples:
        ids, labels = s.input_ids, s.labels
        # layout: prefix (BOS first), then exactly the preset's visual tokens in one block
        assert ids[0] == bench.BOS_ID and s.visual_start == preset.prefix_tokens
        assert s.visual_tokens == preset.visual_tokens == int((ids == image_id).sum())
        assert (ids[s.visual_start : s.visual_start + s.visual_tokens] == image_id).all()
        lo, hi = preset.turns
        assert lo <= len(s.answer_lengths) == len(s.instruction_lengths) <= hi
        assert all(preset.instruction[0] <= n <= preset.instruction[1] for n in s.instruction_lengths)
        assert all(preset.answer[0] <= n <= preset.answer[1] for n in s.answer_lengths)
        assert s.length == preset.prefix_tokens + preset.visual_tokens + sum(s.instruction_lengths) + sum(s.answer_lengths)
        # supervised tokens are exactly the answers (each ending in EOS), labels equal to the ids there
        expected = torch.full_like(labels, IGNORE_INDEX)
        at = s.visual_start + s.visual_tokens
        for n_instr, n_answer in zip(s.instruction_lengths, s.answer_lengths):
            at += n_instr
            expected[at : at + n_answer] = ids[at : at + n_answer]
            assert ids[at + n_answer - 1] == bench.EOS_ID
            at += n_answer
        assert at == s.length
        assert torch.equal(labels, expected)
        assert s.supervised_tokens == int(find_units(labels[None]).counts[0]) == int((labels != IGNORE_INDEX).sum())
    # reproducible for a seed, different for another; lengths do not depend on the vocabulary
    again = bench.make_samples(preset, 60, seed=3, vocab_size=VOCAB)
    assert all(torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels) for a, b in zip(samples, again))
    other = bench.make_samples(preset, 60, seed=4, vocab_size=VOCAB)
    assert [s.length for s in other] != [s.length for s in samples]
    wide = bench.make_samples(preset, 60, seed=3, vocab_size=32000)
    assert [s.answer_lengths for s in wide] == [s.answer_lengths for s in samples]


def test_llava_answers_are_mostly_short_and_turns_vary():
    samples = bench.make_samples(bench.PRESETS["llava-1.5"], 400, seed=0, vocab_size=VOCAB)
    answers = sorted(n for s in samples for n in s.answer_lengths)
    assert answers[len(answers) // 2] < (5 + 150) / 2  # log-uniform: median ~ sqrt(5 * 151) ~ 27
    assert {len(s.answer_lengths) for s in samples} == {1, 2, 3, 4}


def test_scale_divides_every_length():
    preset = bench.PRESETS["llava-1.5"]
    full = bench.make_samples(preset, 20, seed=1, vocab_size=VOCAB)
    small = bench.make_samples(preset, 20, seed=1, scale=8, vocab_size=VOCAB)
    for f, s in zip(full, small):
        assert s.visual_tokens == 72 and s.visual_start == round(35 / 8)
        assert s.answer_lengths == tuple(max(1, round(n / 8)) for n in f.answer_lengths)
        assert s.instruction_lengths == tuple(max(1, round(n / 8)) for n in f.instruction_lengths)
        assert s.supervised_tokens == int(find_units(s.labels[None]).counts[0])


def test_batches_are_right_padded_with_global_sample_ids():
    samples, batches = bench.make_batches(bench.PRESETS["llava-1.5"], 4, 3, seed=2, scale=8, vocab_size=VOCAB)
    assert len(samples) == 12 and [b.shape[0] for b in batches] == [4, 4, 4]
    assert batches[2].sample_ids.tolist() == [8, 9, 10, 11]
    b = batches[1]
    assert b.lengths == tuple(s.length for s in samples[4:8]) and b.shape[1] == max(b.lengths)
    assert b.attention_mask.sum(1).tolist() == list(b.lengths) and b.real_tokens == sum(b.lengths)
    for row, s in enumerate(samples[4:8]):
        assert torch.equal(b.labels[row, : s.length], s.labels)
        assert (b.labels[row, s.length :] == IGNORE_INDEX).all() and (b.input_ids[row, s.length :] == bench.PAD_ID).all()
        assert int(b.visual_mask[row].sum()) == s.visual_tokens
    assert find_units(b.labels, b.attention_mask).counts.tolist() == [s.supervised_tokens for s in samples[4:8]]


TOY = bench.Shape("toy", hidden=4, heads=2, kv_heads=1, intermediate=8, vocab=10)
# per token: 2 * (2*4*4 + 2*4*2 + 3*4*8) = 2 * (32 + 16 + 96) = 288; per squared segment length: 4 * 4 = 16


def test_cost_model_hand_computed():
    assert TOY.kv_hidden == 2
    assert bench.linear_flops(TOY, 1) == 288 and bench.attention_flops(TOY, [1]) == 16
    # no padding, everything kept: 2 rows of 3 -> 6*288 + 16*(9+9) both ways
    assert bench.padded_cost(TOY, 2, 3) == 2016 == bench.layer_cost(TOY, 6, [3, 3])
    assert bench.ideal_speedup(bench.padded_cost(TOY, 2, 3), bench.layer_cost(TOY, 6, [3, 3])) == 1.0
    # half the tokens, segments halved: (8*288 + 16*32) / (4*288 + 16*8) = 2816 / 1280
    assert bench.ideal_speedup(bench.padded_cost(TOY, 2, 4), bench.layer_cost(TOY, 4, [2, 2])) == pytest.approx(2.2)
    # padding only: rows of 4 and 2 padded to 4: 2816 / (6*288 + 16*(16+4)) = 2816 / 2048
    assert bench.ideal_speedup(bench.padded_cost(TOY, 2, 4), bench.layer_cost(TOY, 6, [4, 2])) == pytest.approx(1.375)
    # Llama-7B widths: 2 * (2*4096^2 + 2*4096^2 + 3*4096*11008) FLOPs per token and layer
    assert bench.linear_flops(bench.SHAPES["7b-width"], 1) == 2 * (4 * 4096**2 + 3 * 4096 * 11008)


def fake(mode, seconds, tokens, ideal, overhead, peak):
    return dict(mode=mode, keep_ratio=1.0, step_seconds_median=seconds, peak_memory_bytes=peak,
                llm_tokens_per_step=tokens, ideal_speedup=ideal, measured_speedup=None, overhead_share=overhead)


def test_schedule_weighting_by_closed_form_step_counts():
    padded = fake("padded-dense", 3.0, 1000, 1.0, None, 300)
    dense = fake("packed-dense", 2.0, 800, 1.25, 0.1, 200)
    sparse = fake("regate-0.5", 1.0, 600, 2.0, 0.2, 100)
    row = bench.schedule_weighted(dense, sparse, 5000, ReGATEConfig(), padded)  # 724 dense, 4276 sparse
    assert row["mode"] == "regate-schedule"
    assert row["step_seconds_median"] == pytest.approx((724 * 2.0 + 4276 * 1.0) / 5000)
    assert row["keep_ratio"] == pytest.approx(0.5724)
    assert row["llm_tokens_per_step"] == pytest.approx((724 * 800 + 4276 * 600) / 5000)
    assert row["ideal_speedup"] == pytest.approx(5000 / (724 / 1.25 + 4276 / 2.0))
    assert row["measured_speedup"] == pytest.approx(3.0 / row["step_seconds_median"])
    assert row["overhead_share"] == pytest.approx((724 * 0.2 + 4276 * 0.2) / 5000 / row["step_seconds_median"])
    assert row["peak_memory_bytes"] == 200


def test_tiny_cpu_run_writes_every_mode_and_field(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--device", "cpu", "--shape", "tiny", "--scale", "16", "--batch-size", "4", "--steps", "2",
            "--warmup-steps", "1", "--seed", "1", "--json", str(out)]
    result = CliRunner().invoke(bench.command, args)
    assert result.exit_code == 0, result.output
    assert "scale 16" in result.output and "attention backend (packed modes): sdpa" in result.output
    report = json.loads(out.read_text())
    assert report["device"].startswith("cpu")
    assert (report["preset"], report["shape"], report["scale"]) == ("llava-1.5", "tiny", 16)
    rows = {r["mode"]: r for r in report["results"]}
    assert list(rows) == list(bench.MODES) + ["regate-schedule"]
    for mode, row in rows.items():
        assert set(row) == set(bench.RESULT_FIELDS), mode
        assert f"| {mode} |" in result.output
        assert row["step_seconds_median"] > 0 and row["ideal_speedup"] > 0 and row["measured_speedup"] > 0
        assert row["peak_memory_bytes"] is None or row["peak_memory_bytes"] >= 0
        assert (row["overhead_share"] is None) == (mode == "padded-dense")
        assert row["overhead_share"] is None or 0 < row["overhead_share"] < 1

    # the same batches the command drew: tokens through the LLM, padded and packed
    samples, batches = bench.make_batches(bench.PRESETS["llava-1.5"], 4, 2, seed=1, scale=16, vocab_size=VOCAB)
    padded_tokens = sum(b.shape[0] * b.shape[1] for b in batches) / 2
    real_tokens = sum(b.real_tokens for b in batches) / 2
    padded, packed, half = rows["padded-dense"], rows["packed-dense"], rows["regate-0.5"]
    assert padded["llm_tokens_per_step"] == padded_tokens
    assert packed["llm_tokens_per_step"] == real_tokens < padded_tokens
    elided = sum(n - math.ceil(n / 2) for s in samples for n in [s.supervised_tokens]) / 2
    assert half["llm_tokens_per_step"] == real_tokens - elided < packed["llm_tokens_per_step"]
    assert rows["regate-0.25"]["llm_tokens_per_step"] < half["llm_tokens_per_step"] < rows["regate-0.75"]["llm_tokens_per_step"]
    assert padded["ideal_speedup"] == padded["measured_speedup"] == 1.0
    assert 1.0 < packed["ideal_speedup"] < half["ideal_speedup"]
    assert [rows[m]["keep_ratio"] for m in bench.MODES] == [1.0, 1.0, 0.25, 0.5, 0.75]

    schedule = rows["regate-schedule"]
    low, high = sorted([packed["step_seconds_median"], half["step_seconds_median"]])
    assert low <= schedule["step_seconds_median"] <= high
    assert half["llm_tokens_per_step"] < schedule["llm_tokens_per_step"] < packed["llm_tokens_per_step"]
    assert schedule["keep_ratio"] == pytest.approx(0.5724)


def test_help_and_bad_device():
    runner = CliRunner()
    result = runner.invoke(bench.command, ["--help"])
    assert result.exit_code == 0
    for option in ("--preset", "--shape", "--layers", "--batch-size", "--steps", "--warmup-steps", "--scale",
                   "--device", "--seed", "--json", "llava-1.5", "videollama2-16f", "long-answer"):
        assert option in result.output
    if not torch.cuda.is_available():
        result = runner.invoke(bench.command, ["--device", "cuda"])
        assert result.exit_code == 2 and "CUDA is not available" in result.output


def test_noisy_modes_flags_spread_repetitions():
    report = {"step_seconds": {"padded-dense": [1.0, 1.2, 1.4], "packed-dense": [1.0, 2.0], "regate-0.5": []}}
    assert bench.noisy_modes(report) == ["packed-dense"]
