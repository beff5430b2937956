"""`regate bench`: workload presets, the cost model, the schedule weighting, and one tiny CPU run."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

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


def test_cost_model_counts_the_lm_head_and_the_layers():
    assert bench.lm_head_flops(TOY, 3) == 2 * 3 * 4 * 10 == 240
    # padded 2 x 4, 3 layers: 3 * 2816 + head over all 8 positions (640)
    assert bench.padded_step_cost(TOY, 3, 2, 4) == 3 * 2816 + 640
    # packed segments [2, 2], 3 layers, 2 loss rows: 3 * 1280 + 160
    assert bench.step_cost(TOY, 3, 4, [2, 2], 2) == 3 * 1280 + 160
    ideal = bench.ideal_speedup(bench.padded_step_cost(TOY, 3, 2, 4), bench.step_cost(TOY, 3, 4, [2, 2], 2))
    assert ideal == pytest.approx((3 * 2816 + 640) / (3 * 1280 + 160))
    assert ideal > bench.ideal_speedup(bench.padded_cost(TOY, 2, 4), bench.layer_cost(TOY, 4, [2, 2]))  # the head
    assert bench.training_flops(100.0) == 300.0


def test_mfu_and_bf16_peaks():
    assert bench.mfu(3e12, 2.0, 1e13) == pytest.approx(0.15)
    assert bench.mfu(3e12, 2.0, None) is None
    names = {"NVIDIA H100 80GB HBM3": 989.4e12, "NVIDIA H100 PCIe": 756.5e12, "NVIDIA H200": 989.4e12,
             "NVIDIA GH200 480GB": 989.4e12, "NVIDIA B200": 2.25e15, "NVIDIA L40": 181.05e12, "NVIDIA L40S": 362.05e12,
             "NVIDIA A100-SXM4-80GB": 312e12, "Tesla T4": None}
    for name, peak in names.items():
        assert bench.bf16_peak(name) == peak, name


def fake(mode, seconds, tokens, ideal, overhead, peak, mfu=None, cpu=None):
    return dict(mode=mode, keep_ratio=1.0, step_seconds_median=seconds, mfu=mfu, peak_memory_bytes=peak,
                llm_tokens_per_step=tokens, ideal_speedup=ideal, measured_speedup=None, overhead_share=overhead,
                step_cpu_seconds_median=cpu, cpu_time_speedup=None)


def test_schedule_weighting_by_closed_form_step_counts():
    padded = fake("padded-dense", 3.0, 1000, 1.0, None, 300, cpu=6.0)
    dense = fake("packed-dense", 2.0, 800, 1.25, 0.1, 200, mfu=0.4, cpu=4.0)
    sparse = fake("regate-0.5", 1.0, 600, 2.0, 0.2, 100, mfu=0.3, cpu=3.0)
    row = bench.schedule_weighted(dense, sparse, 5000, ReGATEConfig(), padded)  # 724 dense, 4276 sparse
    assert row["mode"] == "regate-schedule"
    assert row["step_seconds_median"] == pytest.approx((724 * 2.0 + 4276 * 1.0) / 5000)
    assert row["keep_ratio"] == pytest.approx(0.5724)
    assert row["llm_tokens_per_step"] == pytest.approx((724 * 800 + 4276 * 600) / 5000)
    assert row["ideal_speedup"] == pytest.approx(5000 / (724 / 1.25 + 4276 / 2.0))
    assert row["measured_speedup"] == pytest.approx(3.0 / row["step_seconds_median"])
    assert row["overhead_share"] == pytest.approx((724 * 0.2 + 4276 * 0.2) / 5000 / row["step_seconds_median"])
    assert row["peak_memory_bytes"] == 200
    # FLOPs done over time taken: (724 * 0.4 * 2 + 4276 * 0.3 * 1) / (724 * 2 + 4276 * 1)
    assert row["mfu"] == pytest.approx((724 * 0.8 + 4276 * 0.3) / (724 * 2.0 + 4276 * 1.0))
    assert set(row) == set(bench.RESULT_FIELDS)
    assert row["step_cpu_seconds_median"] == pytest.approx((724 * 4.0 + 4276 * 3.0) / 5000)
    assert row["cpu_time_speedup"] == pytest.approx(6.0 / row["step_cpu_seconds_median"])
    assert bench.schedule_weighted(fake("p", 2.0, 8, 1.0, 0.1, 1), sparse, 5000, ReGATEConfig(), padded)["mfu"] is None


def test_tiny_cpu_run_writes_every_mode_and_field(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--device", "cpu", "--shape", "tiny", "--scale", "16", "--batch-size", "4", "--steps", "2",
            "--warmup-steps", "1", "--seed", "1", "--host-samples", "3000", "--json", str(out)]
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
        assert row["mfu"] is None  # no bf16 peak on a CPU
        assert row["step_cpu_seconds_median"] > 0 and row["cpu_time_speedup"] > 0

    # the same batches the command drew: tokens through the LLM, padded and packed
    samples, batches = bench.make_batches(bench.PRESETS["llava-1.5"], 4, 2, seed=1, scale=16, vocab_size=VOCAB)
    padded_tokens = sum(b.shape[0] * b.shape[1] for b in batches) / 2
    real_tokens = sum(b.real_tokens for b in batches) / 2
    padded, packed, half = rows["padded-dense"], rows["packed-dense"], rows["regate-0.5"]
    assert padded["llm_tokens_per_step"] == padded_tokens
    # each sample's last token (its EOS) is no unit and nothing after it is: no loss row attends to it
    assert packed["llm_tokens_per_step"] == real_tokens - 4 < padded_tokens
    elided = sum(n - math.ceil(n / 2) for s in samples for n in [s.supervised_tokens]) / 2
    assert half["llm_tokens_per_step"] <= real_tokens - 4 - elided < packed["llm_tokens_per_step"]
    assert rows["regate-0.25"]["llm_tokens_per_step"] < half["llm_tokens_per_step"] < rows["regate-0.75"]["llm_tokens_per_step"]
    assert padded["ideal_speedup"] == padded["measured_speedup"] == padded["cpu_time_speedup"] == 1.0
    assert [len(report["step_cpu_seconds"][m]) for m in bench.MODES] == [2] * 5
    assert 1.0 < packed["ideal_speedup"] < half["ideal_speedup"]
    assert [rows[m]["keep_ratio"] for m in bench.MODES] == [1.0, 1.0, 0.25, 0.5, 0.75]

    schedule = rows["regate-schedule"]
    low, high = sorted([packed["step_seconds_median"], half["step_seconds_median"]])
    assert low <= schedule["step_seconds_median"] <= high
    assert half["llm_tokens_per_step"] < schedule["llm_tokens_per_step"] < packed["llm_tokens_per_step"]
    assert schedule["keep_ratio"] == pytest.approx(0.5724)

    host = report["engine_host"]
    assert host["workload"] == {"name": "llava-665k", "samples": 3000, "units_per_sample": 160, "batch": 16,
                                "length": 2048, "keep_ratio": 0.5}
    assert host["share"] == pytest.approx(host["host_seconds_median"] / host["step_estimate_seconds"])
    assert set(host["parts_seconds_median"]) == {"plan", "record", "end_step"}
    assert "H100 SXM" in host["step_estimate"] and "engine host time per micro-batch" in result.output


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


def test_host_batch_has_the_workload_shape():
    workload = bench.HostWorkload("w", samples=500, units=160, batch=16, length=2048)
    labels, mask, ids = bench.host_batch(workload, 0)
    assert labels.shape == mask.shape == (16, 2048)
    assert find_units(labels, mask).counts.tolist() == [160] * 16
    assert (mask.sum(1) >= 320).all() and (mask.sum(1) <= 2048).all()
    assert ((labels != IGNORE_INDEX) <= mask.bool()).all() and not (labels[:, 0] != IGNORE_INDEX).any()
    assert len(set(ids.tolist())) == 16 and 0 <= int(ids.min()) and int(ids.max()) < 500
    again = bench.host_batch(workload, 0)
    assert all(torch.equal(a, b) for a, b in zip((labels, mask, ids), again))
    assert not torch.equal(bench.host_batch(workload, 1)[1], mask)


def test_engine_host_time_estimates_a_7b_step_over_the_packed_row():
    workload = bench.HostWorkload("w", samples=400, units=160, batch=16, length=2048)
    host = bench.engine_host_time(workload, torch.device("cpu"), None, micro_batches=1)
    shortest = bench.training_flops(bench.step_cost(bench.SHAPES["7b-width"], 32, 16 * 160, [160] * 16, 16 * 80))
    longest = bench.training_flops(bench.padded_step_cost(bench.SHAPES["7b-width"], 32, 16, 2048))
    assert shortest / 989.4e12 < host["step_estimate_seconds"] < longest / 989.4e12
    assert host["micro_batches"] == 1 and host["host_seconds_median"] > 0
    assert "32 7b-width layers" in host["step_estimate"]


# ---------------------------------------------------------------- benchmarks/gpu: its CPU behaviour

GPU_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"


@pytest.fixture
def gpu_checks(monkeypatch):
    monkeypatch.syspath_prepend(str(GPU_DIR))
    import checks

    return checks


def test_gpu_run_sh_without_cuda_says_it_skipped_and_exits_0(tmp_path):
    results = GPU_DIR.parents[0] / "results"
    before = sorted(p.name for p in results.iterdir())
    done = subprocess.run(["bash", str(GPU_DIR / "run.sh")], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("benchmarks/gpu/run.sh: skipped: no CUDA device")
    assert sorted(p.name for p in results.iterdir()) == before  # nothing written, nothing installed
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    linted = subprocess.run([shellcheck, str(GPU_DIR / "run.sh")], capture_output=True, text=True)
    assert linted.returncode == 0, linted.stdout


def small_cases(checks):
    """The GPU script's parity cases, shrunk for a CPU."""
    return (checks.Case("mha", 4, 4, 16, (5, 1, 9)), checks.Case("gqa", 8, 2, 16, (3, 12, 2)))


def test_gpu_parity_runs_every_kernel_call_path_through_the_fakes(gpu_checks, monkeypatch):
    import attention_fakes
    from regate_plugin import attention

    calls = {"flash4": [], "flash": [], "torch": []}
    monkeypatch.setattr(attention, "_accelerated", lambda device: True)
    monkeypatch.setattr(attention, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(attention, "_flash4_varlen", lambda: attention_fakes.flash_attn_4_varlen_func_fake(calls["flash4"]))
    monkeypatch.setattr(attention, "_flash_varlen", lambda: attention_fakes.flash_attn_varlen_func_fake(calls["flash"]))
    monkeypatch.setattr(attention, "_torch_varlen", lambda: attention_fakes.varlen_attn_2_12_fake(calls["torch"]))
    cpu = torch.device("cpu")
    backends, unavailable = gpu_checks.available_backends(cpu, torch.bfloat16)
    assert backends == ["flash4", "flash", "torch", "sdpa"] and unavailable == {}
    results = gpu_checks.backend_parity(cpu, backends, small_cases(gpu_checks))
    assert len(results) == 4 * 2 * 4 and all(r.passed for r in results), [r for r in results if not r.passed]
    assert {name: len(c) for name, c in calls.items()} == {"flash4": 2, "flash": 2, "torch": 2}

    # a kernel that is off (here: not causal) fails its parity
    def acausal(calls_):
        fake = attention_fakes.flash_attn_varlen_func_fake(calls_)
        return lambda *args, **kwargs: fake(*args, **{**kwargs, "causal": False})

    monkeypatch.setattr(attention, "_flash_varlen", lambda: acausal([]))
    broken = gpu_checks.backend_parity(cpu, ["flash"], small_cases(gpu_checks))
    assert not any(r.passed for r in broken if r.case.endswith(":out"))

    # a kernel that raises fails its cases by name, and the other backends still run
    monkeypatch.setattr(attention, "_flash4_varlen", lambda: attention_fakes.flash_attn_4_varlen_func_fake([], 8))
    crashed = gpu_checks.backend_parity(cpu, ["flash4", "sdpa"], small_cases(gpu_checks))
    failed = [r for r in crashed if r.check == "parity:flash4"]
    assert [(r.case, r.passed) for r in failed] == [("mha", False), ("gqa", False)]
    assert "Unsupported compute capability" in failed[0].detail
    assert len(crashed) == 2 + 2 * 4 and all(r.passed for r in crashed if r.check == "parity:sdpa")


def test_gpu_hf_checks_pass_on_cpu_bf16_and_report(gpu_checks):
    report = gpu_checks.run_checks(torch.device("cpu"), cases=small_cases(gpu_checks)[:1], shape=bench.SHAPES["tiny"])
    assert report["passed"], [r for r in report["results"] if not r["passed"]]
    assert report["backends"] == ["sdpa"] and set(report["unavailable"]) == {"flash4", "flash", "torch"}
    checks_run = {r["check"] for r in report["results"]}
    assert checks_run == {"parity:sdpa", "hf-dense", "sparse-step"}
    sparse = [r for r in report["results"] if r["check"] == "sparse-step"]
    assert sparse[2]["case"] == "units elided" and 0 < sparse[2]["error"] < sparse[2]["allowed"]
    json.dumps(report)


def test_gpu_sparse_check_catches_renumbered_positions(gpu_checks, monkeypatch):
    """A packing plan that renumbers each segment's positions from 0 (RoPE then sees the deleted
    tokens' gaps closed) fails the sparse check; the plain one passes it (previous test)."""
    import dataclasses

    from regate_plugin import engine

    real = engine.pack_plan

    def renumbered(*args, **kwargs):
        plan = real(*args, **kwargs)
        starts = torch.repeat_interleave(plan.cu_seqlens[:-1].long(), plan.cu_seqlens.diff().long())
        return dataclasses.replace(plan, position_ids=(torch.arange(plan.num_tokens) - starts)[None])

    monkeypatch.setattr(engine, "pack_plan", renumbered)
    per_unit, loss, elided = gpu_checks.sparse_step(torch.device("cpu"), shape=bench.SHAPES["tiny"])
    assert not per_unit.passed and per_unit.error > 5 * per_unit.allowed
    assert not loss.passed and elided.passed


def test_gpu_checks_main_prints_each_case_writes_json_and_exits_by_the_result(gpu_checks, monkeypatch, tmp_path, capsys):
    import functools

    monkeypatch.setenv("REGATE_ATTN_BACKEND", "sdpa")
    small = functools.partial(gpu_checks.run_checks, cases=small_cases(gpu_checks)[1:], shape=bench.SHAPES["tiny"])
    monkeypatch.setattr(gpu_checks, "run_checks", small)
    assert gpu_checks.main(["--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "$REGATE_ATTN_BACKEND ignored here" in printed and "REGATE_ATTN_BACKEND" not in os.environ
    assert "backend flash4: not checked (the flash4 backend needs a CUDA device" in printed
    assert any(line.startswith("ok ") and "parity:sdpa" in line and "gqa:dq" in line for line in printed.splitlines())
    assert "checks passed" in printed
    report = json.loads((tmp_path / "out" / "checks.json").read_text())
    assert report["passed"] and len(report["results"]) == printed.count("\nok ") + printed.startswith("ok ")

    failing = dict(report, passed=False)
    monkeypatch.setattr(gpu_checks, "run_checks", lambda device: failing)
    assert gpu_checks.main(["--out", str(tmp_path / "again"), "--device", "cpu"]) == 1
