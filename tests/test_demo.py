"""`regate demo`: the toy task, the acceptance arithmetic, and a shortened demo through the CLI."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from regate_plugin import ReGATEConfig, demo
from regate_plugin import demo_task as task
from regate_plugin.demo import frontier
from regate_plugin.cli import main
from regate_plugin.refcache import RefCache
from regate_plugin.schedule import keep_ratio_at, sparse_step_count

pytest.importorskip("transformers")


# --- the task ----------------------------------------------------------------------------------


def test_samples_mark_exactly_the_image_words():
    tokenizer = task.build_tokenizer()
    vocab = tokenizer.get_vocab()
    samples = task.generate(200, np.random.default_rng(5))
    data = task.VQADataset(samples, tokenizer, with_targets=True)
    kinds_seen = set()
    for i, (scene, qa, _) in enumerate(samples):
        item = data[i]
        ids, labels, marks = item["input_ids"], item["labels"], item["image_word"]
        prefix = 1 + task.VISUAL_TOKENS
        assert ids[0] == vocab[task.BOS] and (ids[1:prefix] == vocab[task.IMAGE]).all()
        start = prefix + len(qa.question)
        assert (labels[:start] == task.IGNORE_INDEX).all()
        assert labels[start:].tolist() == [vocab[w] for w in qa.answer] + [vocab[task.EOS]]
        for a, (word, slot) in enumerate(zip(qa.answer, qa.image_slots)):
            j = start + a - 1  # the position that predicts answer word a
            if slot is None:
                assert marks[j] == 0
            else:
                assert word == scene.slot(slot) and marks[j] == task.KIND_OF_SLOT[slot]
                kinds_seen.add(int(marks[j]))
        assert int((marks > 0).sum()) == sum(s is not None for s in qa.image_slots) >= 1
        pixels = item["pixel_values"]
        assert pixels.shape == (3, task.IMAGE_SIZE, task.IMAGE_SIZE)
    assert kinds_seen == {1, 2, 3, 4}


def test_objects_are_drawn_in_their_cells_in_their_colour():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = task.random_scene(rng)
        image = task.draw(scene, rng).astype(float) / 255
        for row in range(task.GRID):
            for col in range(task.GRID):
                cell = image[row * task.PATCH:(row + 1) * task.PATCH, col * task.PATCH:(col + 1) * task.PATCH]
                bright = cell.max(-1) > 0.5
                assert bright.any() == ((row, col) in scene.cells)
                if bright.any():
                    mean = cell[bright].mean(0)
                    nearest = min(task.COLORS, key=lambda c: np.abs(np.array(task.COLORS[c]) - mean).sum())
                    assert nearest == scene.color


def test_held_out_set_is_balanced_so_a_blind_guess_scores_chance():
    samples = task.generate_balanced(48, np.random.default_rng(1))
    assert len(samples) == 48 * len(task.QUESTION_TYPES)
    for qtype in task.QUESTION_TYPES:
        asked = [(scene, qa) for scene, qa, _ in samples if qa.question in {tuple(q.split()) for q, _ in task.TEMPLATES[qtype]}]
        assert len(asked) == 48
        for slot, values in task.SLOTS.items():
            counts = {v: sum(scene.slot(slot) == v for scene, _ in asked) for v in values}
            assert set(counts.values()) == {48 // len(values)}, (qtype, slot, counts)
    assert len(task.generate_balanced(12, np.random.default_rng(1))) == 12 * len(task.QUESTION_TYPES)
    with pytest.raises(ValueError, match="multiple of 12"):
        task.generate_balanced(18, np.random.default_rng(1))


# --- schedule scaling and the acceptance arithmetic -----------------------------------------


def test_scaled_schedule_keeps_the_papers_proportions():
    # at the paper's run length: its warmup and dense steps; cycle 5000/40 = 125 (the paper's 128, rounded)
    config = demo.scaled_config(5000)
    assert (config.warmup, config.cycle, config.dense_steps, config.keep_ratio) == (100, 125, 16, 0.5)
    facts = demo.schedule_facts(1600, demo.scaled_config(1600))
    assert (facts["warmup"], facts["cycle"], facts["dense_steps"]) == (32, 40, 5)
    ratios = [keep_ratio_at(t, demo.scaled_config(1600)) for t in range(1600)]
    assert facts["sparse_steps_total"] == sum(r < 1 for r in ratios) == sparse_step_count(1600, demo.scaled_config(1600))
    assert facts["token_share_before_rounding"] == pytest.approx(sum(ratios) / 1600)
    # the same share of tokens as the paper's own schedule over its run, within a point
    paper = [keep_ratio_at(t, ReGATEConfig()) for t in range(5000)]
    assert facts["token_share_before_rounding"] == pytest.approx(sum(paper) / 5000, abs=0.01)


def _curve(points):
    return [{"step": i, "supervised_tokens": t, "val_accuracy": a} for i, (t, a) in enumerate(points)]


def test_compare_curves_by_hand():
    dense = _curve([(0, 0.2), (100, 0.6), (200, 0.8)])
    regate = _curve([(0, 0.2), (50, 0.5), (120, 0.79)])
    c = demo.compare_curves(dense, regate, window=1)
    assert c["token_share"] == pytest.approx(0.6)
    assert c["accuracy_difference"] == pytest.approx(-0.01)
    # compared at 50, 100, 120 (not at the shared start): dense 0.4, 0.6, 0.64; regate 0.5, 0.7286, 0.79
    assert c["curve_points_compared"] == 3 and c["curve_token_range"] == [0.0, 120.0]
    assert c["min_gap"] == pytest.approx(0.1) and c["min_gap_at_tokens"] == 50.0
    # mean over tokens 0..120 of the piecewise-linear gap: integrals 2.5 on 0..50 (0.002x),
    # 5 + 0.01/70*1250 on 50..100, 20 * (0.1 + 0.01/70*50 + 0.15) / 2 on 100..120; total 10.25
    assert c["mean_gap"] == pytest.approx(10.25 / 120, abs=1e-3)
    assert c["accept_token_share"] and c["accept_accuracy"] and c["accept_curve"]
    assert c["regate_tokens_to_dense_final"] is None
    # one evaluation's dip below dense fails the raw comparison; the mean of 3 evaluations does not
    dip = _curve([(0, 0.2), (40, 0.5), (60, 0.3), (90, 0.7), (120, 0.79)])
    raw = demo.compare_curves(dense, dip, window=1)
    assert raw["min_gap"] == pytest.approx(0.3 - 0.44) and raw["min_gap_at_tokens"] == 60 and not raw["accept_curve"]
    assert [p["val_accuracy"] for p in demo.smoothed(dip, 3)] == pytest.approx([0.2, 0.35, 1 / 3, 0.5, 0.59666667])
    smooth = demo.compare_curves(dense, dip, window=3)
    # smoothed dense: 0.2, 0.4, 0.5333 at 0, 100, 200; smallest gap at 60: 1/3 - 0.32
    assert smooth["min_gap"] == pytest.approx(1 / 3 - 0.32) and smooth["min_gap_at_tokens"] == 60 and smooth["accept_curve"]
    assert smooth["curve_smoothing"] == 3 and raw["curve_smoothing"] == 1
    # ReGATE reaching dense's final accuracy: the first of its points at or above it
    strong = _curve([(0, 0.2), (60, 0.81), (110, 0.9)])
    assert demo.compare_curves(dense, strong, window=1)["regate_tokens_to_dense_final"] == pytest.approx(0.3)
    # too many tokens, too low a final accuracy
    heavy = _curve([(0, 0.2), (130, 0.9)])
    assert not demo.compare_curves(dense, heavy)["accept_token_share"]
    weak = _curve([(0, 0.2), (100, 0.78)])
    assert not demo.compare_curves(dense, weak, window=1)["accept_accuracy"]
    with pytest.raises(ValueError, match="must increase"):
        demo.compare_curves(dense, _curve([(0, 0.2), (0, 0.3)]))
    with pytest.raises(ValueError, match="at least two points"):
        demo.compare_curves(dense, _curve([(0, 0.2)]))


# --- a shortened demo, end to end ------------------------------------------------------------

STEPS = 40


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out, work = root / "out", root / "work"
    result = CliRunner().invoke(main, ["demo", "--steps", str(STEPS), "--seed", "3", "--out", str(out),
                                       "--work", str(work), "--no-progress"])
    assert result.exit_code == 0, result.output
    return result.output, json.loads((out / "demo.json").read_text()), out, work


def test_short_demo_writes_what_it_promises(short_demo):
    output, result, out, _ = short_demo
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "held-out image-word accuracy" in output and "acceptance:" in output
    assert (out / "report.txt").read_text().strip() in output and f"results in {out}/" in output
    schedule = result["schedule"]
    assert schedule["steps"] == STEPS and schedule["scaled_from"]["steps"] == 5000
    assert f"scaled to {STEPS} steps: warmup {schedule['warmup']}, cycle {schedule['cycle']}" in output
    dense, regate = result["runs"]["dense"], result["runs"]["regate"]
    for run in (dense, regate):
        assert run["optimizer_steps"] == STEPS and run["train_seconds"] > 0
        curve = run["curve"]
        assert curve[0]["step"] == 0 and curve[0]["supervised_tokens"] == 0 and curve[-1]["step"] == STEPS
        assert [p["step"] for p in curve] == sorted(p["step"] for p in curve)
        assert all(b["supervised_tokens"] > a["supervised_tokens"] for a, b in zip(curve, curve[1:]))
        assert curve[-1]["supervised_tokens"] == run["supervised_tokens"]
        assert run["val_accuracy"] == curve[-1]["val_accuracy"]
        assert all(0.0 <= p["val_accuracy"] <= 1.0 for p in curve)
    # same data, same batches: the same dense-equivalent supervised tokens; dense keeps all of them
    assert dense["supervised_tokens"] == dense["supervised_tokens_dense_equivalent"]
    assert regate["supervised_tokens_dense_equivalent"] == dense["supervised_tokens"]
    # both runs start from the same weights: identical first evaluation
    assert regate["curve"][0]["val_accuracy"] == dense["curve"][0]["val_accuracy"]
    # only supervised tokens are elided: the LLM-token saving is exactly the supervised saving
    saved = dense["supervised_tokens"] - regate["supervised_tokens"]
    assert saved > 0 and dense["llm_tokens"] - regate["llm_tokens"] == saved
    # sparse steps keep ceil(p * n_s) per sample: at least the schedule's share, at most a few % more
    share = regate["supervised_tokens"] / dense["supervised_tokens"]
    assert schedule["token_share_before_rounding"] <= share <= schedule["token_share_before_rounding"] + 0.06
    assert result["comparison"]["token_share"] == pytest.approx(share)
    assert dense["config"]["keep_ratio"] == 1.0 and regate["config"]["keep_ratio"] == 0.5


def test_teacher_finds_template_words_easy_and_image_and_free_words_hard(short_demo):
    """The premise of the demo, read from the reference cache that the real teacher pass wrote."""
    _, _, _, work = short_demo
    cache = RefCache.open(work / "refcache")
    samples = task.generate(demo.TRAIN_SAMPLES, np.random.default_rng([3, 0]))
    assert cache.num_samples == len(samples)
    image, template, free = [], [], []
    for i in range(0, len(samples), 16):
        _, qa, _ = samples[i]
        losses = cache.sample(i).astype(np.float64)
        assert len(losses) == len(qa.answer) + 1  # every answer word and the end of sentence
        for loss, slot, drawn in zip(losses, qa.image_slots, qa.free):
            (free if drawn else template if slot is None else image).append(loss)
    # chance over 2-6 values is 0.69-1.79 nats; the text predicts template words almost surely; a free
    # word is one of three, whatever the text: ln 3 = 1.10 nats, as high as an image word
    assert np.mean(image) > 0.6 and np.mean(template) < 0.1
    assert abs(np.mean(free) - math.log(task.FREE_CHOICES)) < 0.15


def test_demo_refuses_a_non_empty_work_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["demo", "--steps", "10", "--work", str(tmp_path)])
    assert result.exit_code != 0 and "not empty" in result.output
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_image_word_accuracy_counts_only_image_words():
    """A model whose logits put the right next token everywhere scores 1; right only on template
    words scores 0; the count per kind follows the marks."""
    tokenizer = task.build_tokenizer()
    data = task.VQADataset(task.generate(6, np.random.default_rng(2)), tokenizer, with_targets=True)
    batch = task.collate([data[i] for i in range(len(data))], data.pad_id)
    vocab = len(tokenizer.get_vocab())

    class Oracle(torch.nn.Module):
        def __init__(self, wrong_on_image_words: bool):
            super().__init__()
            self.wrong = wrong_on_image_words

        def forward(self, input_ids, attention_mask, pixel_values):
            nxt = torch.roll(input_ids, -1, dims=1)
            if self.wrong:
                nxt = torch.where(batch["image_word"] > 0, (nxt + 1) % vocab, nxt)
            return type("Out", (), {"logits": torch.nn.functional.one_hot(nxt, vocab).float()})

    right = demo.image_word_accuracy(Oracle(False), [batch])
    wrong = demo.image_word_accuracy(Oracle(True), [batch])
    assert right["all"] == 1.0 and wrong["all"] == 0.0
    present = {task.KINDS[k - 1] for k in batch["image_word"].unique().tolist() if k > 0}
    assert all(right[k] == 1.0 for k in present)
    assert all(math.isnan(right[k]) for k in set(task.KINDS) - present)


# --- free words and the frontier sweep ---------------------------------------------------------


def test_free_words_are_drawn_from_their_choices_and_marked():
    samples = task.generate(300, np.random.default_rng(7))
    seen: dict[tuple[str, int], set] = {}
    for _, qa, _ in samples:
        assert sum(qa.free) == 1 and len(qa.free) == len(qa.answer)
        i = qa.free.index(True)
        assert qa.image_slots[i] is None
        seen.setdefault((" ".join(qa.question), i), set()).add(qa.answer[i])
    # every free slot takes all of its three words, and nothing else
    for (question, i), words in seen.items():
        template = next(a for q, a in sum(task.TEMPLATES.values(), ()) if q == question).split()[i]
        assert words == set(template.strip("[]").split("|")) and len(words) == task.FREE_CHOICES


def test_the_task_without_free_words_has_the_same_scenes_and_first_words():
    with_free = task.generate(60, np.random.default_rng(5))
    without = task.generate(60, np.random.default_rng(5), task.Variant(free_words=False))
    for (scene, qa, image), (scene_b, qa_b, image_b) in zip(with_free, without):
        assert scene == scene_b and np.array_equal(image, image_b) and qa.question == qa_b.question
        template = next(a for q, a in sum(task.TEMPLATES.values(), ()) if q == " ".join(qa.question)).split()
        i = qa.free.index(True)
        assert qa_b.answer[i] == template[i].strip("[]").split("|")[0] and not any(qa_b.free)
        assert qa_b.answer[:i] + qa_b.answer[i + 1:] == qa.answer[:i] + qa.answer[i + 1:]


def test_a_variant_asks_only_its_question_types_and_names_what_differs():
    hard = task.Variant(question_types=("count", "where"))
    asked = {" ".join(qa.question) for _, qa, _ in task.generate(200, np.random.default_rng(3), hard)}
    assert asked == {q for t in ("count", "where") for q, _ in task.TEMPLATES[t]}
    held_out = task.generate_balanced(24, np.random.default_rng(3), hard)
    assert len(held_out) == 48 and {s.count for s, _, _ in held_out} == {1, 2, 3, 4}
    assert task.DEMO.name == "" and hard.name == "count+where"
    assert task.Variant(free_words=False, question_types=("color",)).name == "no-free-words-color"
    with pytest.raises(ValueError, match="question types \\['size'\\]: choose from color, shape, count, where, describe"):
        task.Variant(question_types=("color", "size"))


def _rows(runs):
    return frontier.frontier_rows({frontier.run_key(arm, keep, seed): run for (arm, keep, seed), run in runs.items()})


def _run(tokens, accuracies):
    curve = [{"supervised_tokens": t, "val_accuracy": a} for t, a in zip(tokens, accuracies)]
    return {"supervised_tokens": tokens[-1], "val_accuracy": accuracies[-1], "curve": curve}


def test_frontier_rows_and_acceptance_by_hand():
    runs = {
        ("dense", 1.0, 0): _run([0, 100, 200], [0.2, 0.8, 1.0]),
        ("regate", 0.25, 0): _run([0, 40, 70], [0.2, 0.95, 0.97]),  # 3 points below dense: fails
        ("learnable", 0.25, 0): _run([0, 40, 76], [0.2, 0.92, 0.995]),
        ("dense", 1.0, 1): _run([0, 100, 200], [0.2, 0.5, 0.9]),
        ("regate", 0.25, 1): _run([0, 40, 70], [0.2, 0.7, 0.9]),
        ("learnable", 0.25, 1): _run([0, 40, 76], [0.2, 0.6, 0.8]),  # below dense where the paper is not: allowed
    }
    rows = {(r["arm"], r["seed"]): r for r in _rows(runs)}
    assert rows[("regate", 0)]["supervised_share"] == pytest.approx(0.35)
    assert rows[("learnable", 0)]["tokens_to_90pct_of_dense"] == pytest.approx(0.2)  # 0.92 >= 0.9 * 1.0 at 40
    assert rows[("learnable", 1)]["tokens_to_90pct_of_dense"] is None  # never 0.81
    assert rows[("dense", 1)]["tokens_to_90pct_of_dense"] == 1.0 and rows[("dense", 1)]["keep_ratio"] == 1.0
    verdict = frontier.acceptance(list(rows.values()))
    assert verdict == [{"arm": "learnable", "keep_ratio": 0.25, "max_supervised_share": pytest.approx(0.38),
                        "paper_fails_on_seeds": [0], "within_one_point_on": [0], "accept": True}]
    runs[("learnable", 0.25, 0)] = _run([0, 40, 90], [0.2, 0.92, 0.995])  # 45% of dense's tokens
    assert not frontier.acceptance(_rows(runs))[0]["accept"]
    assert "regate                0.25   35.0%     0.935   -3.0  +0.0" in frontier.format_frontier(_rows(runs))


def test_planned_runs_put_dense_first_then_keep_by_keep():
    plan = frontier.planned_runs(["dense", "regate", "learnable"], [0.25, 0.1], [0, 1])
    assert plan[:2] == [("dense", 1.0, 0), ("dense", 1.0, 1)]
    assert plan[2:6] == [("regate", 0.25, 0), ("learnable", 0.25, 0), ("regate", 0.25, 1), ("learnable", 0.25, 1)]
    assert len(plan) == 2 + 2 * 2 * 2 and plan[-1] == ("learnable", 0.1, 1)
    config = frontier.arm_config("adaptive-learnable", 0.1, 600)
    assert (config.keep_ratio, config.selection, config.score) == (0.1, "adaptive", "learnable")
    assert frontier.arm_config("ema-only", 0.1, 600).ref_weight == 0.0
    assert frontier.arm_config("loss-only", 0.1, 600).elision == "loss"
    assert frontier.arm_config("dense", 0.1, 600).keep_ratio == 1.0


def test_sweep_through_the_cli_writes_the_schema_and_resumes(tmp_path, monkeypatch):
    from regate_plugin.demo import runs as demo_runs

    monkeypatch.setattr(demo_runs, "PRETRAIN_STEPS", 5)
    monkeypatch.setattr(demo_runs, "VISION_STEPS", 5)
    args = ["demo", "--arms", "dense,regate,random,loss-only", "--keep", "0.25", "--seeds", "1", "--steps", "10",
            "--out", str(tmp_path), "--no-progress"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert first.output.startswith("frontier: 4 runs of 10 steps (0 done), 1 seed(s) to prepare: estimated")
    saved = json.loads((tmp_path / "frontier.json").read_text())
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [(r["arm"], r["keep_ratio"], r["seed"]) for r in saved["rows"]] == [
        ("dense", 1.0, 0), ("loss-only", 0.25, 0), ("random", 0.25, 0), ("regate", 0.25, 0)]
    for row in saved["rows"]:
        assert set(row) == {"arm", "keep_ratio", "seed", "supervised_share", "final_accuracy", "tokens_to_90pct_of_dense"}
        assert 0.0 < row["supervised_share"] <= 1.0 and 0.0 <= row["final_accuracy"] <= 1.0
    dense, regate, random = (saved["runs"][frontier.run_key(a, 0.25, 0)] for a in ("dense", "regate", "random"))
    assert random["supervised_tokens"] == regate["supervised_tokens"] < dense["supervised_tokens"]
    # loss-only trains the same units as regate, with the elided words still in the LLM's input
    loss_only = saved["runs"][frontier.run_key("loss-only", 0.25, 0)]
    assert loss_only["supervised_tokens"] == regate["supervised_tokens"]
    assert regate["llm_tokens"] < loss_only["llm_tokens"] < dense["llm_tokens"]
    # a second start finds every run done: nothing is trained again, the file is unchanged
    monkeypatch.setattr(frontier, "train_run", lambda *a, **k: pytest.fail("a finished run was trained again"))
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert "(4 done), 0 seed(s) to prepare" in again.output
    assert json.loads((tmp_path / "frontier.json").read_text())["runs"] == saved["runs"]
    other = CliRunner().invoke(main, [*args[:-3], "--steps", "12", "--out", str(tmp_path), "--no-progress"])
    assert other.exit_code == 2 and "other settings" in other.output


# --- what the demo leaves behind: a folder with the picture, the JSON and the text report --------------

RECORDED = Path(__file__).parents[1] / "benchmarks" / "results" / "demo" / "seed0" / "demo.json"


def test_demo_writes_picture_json_and_report_into_a_folder_it_names(tmp_path, monkeypatch):
    recorded = json.loads(RECORDED.read_text())
    monkeypatch.setattr(demo, "run_demo", lambda steps, seed, progress, echo, work: recorded)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["demo", "--no-progress"])
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("results in regate-demo-") and last.endswith("demo.png (the picture), demo.json, report.txt")
    folder = tmp_path / last.removeprefix("results in ").split("/:")[0]
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]
    assert (folder / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((folder / "demo.json").read_text()) == recorded
    report = (folder / "report.txt").read_text()
    assert report == demo.format_table(recorded) + "\n" and report.strip() in result.output
    assert "58.7%" in report and "[FAIL]" not in report


def test_demo_out_still_chooses_the_folder(tmp_path, monkeypatch):
    recorded = json.loads(RECORDED.read_text())
    monkeypatch.setattr(demo, "run_demo", lambda steps, seed, progress, echo, work: recorded)
    result = CliRunner().invoke(main, ["demo", "--no-progress", "--out", str(tmp_path / "mine")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["demo.json", "demo.png", "report.txt"]
    assert f"results in {tmp_path / 'mine'}/" in result.output


def _captured_figure(monkeypatch, result, path):
    from matplotlib.figure import Figure

    figures = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), original(self, *a, **k))[1])
    demo.plot(result, path)
    assert len(figures) == 1
    return figures[0]


def test_picture_states_token_share_and_acceptance_with_thousands_separators(tmp_path, monkeypatch):
    recorded = json.loads(RECORDED.read_text())
    share = recorded["runs"]["regate"]["supervised_tokens"] / recorded["runs"]["dense"]["supervised_tokens"]
    figure = _captured_figure(monkeypatch, recorded, tmp_path / "a.png")
    title = figure._suptitle.get_text()
    assert f"ReGATE trained on {share:.1%} of dense's supervised tokens" in title and f"{share:.1%}" == "58.7%"
    assert "acceptance passed: tokens <= 62% of dense [ok], final accuracy >= dense - 1 point [ok]" in title
    tokens_axis, seconds_axis = figure.axes
    assert tokens_axis.xaxis.get_major_formatter()(224030, 0) == "224,030"
    assert seconds_axis.xaxis.get_major_formatter()(1250, 0) == "1,250"
    failed = {**recorded, "comparison": {**recorded["comparison"], "accept_curve": False}}
    title = _captured_figure(monkeypatch, failed, tmp_path / "b.png")._suptitle.get_text()
    assert "acceptance FAILED" in title and "curve at or above dense's [FAIL]" in title


def test_a_short_run_says_why_its_acceptance_fails():
    from regate_plugin.demo.command import text_report

    recorded = json.loads(RECORDED.read_text())
    assert text_report(recorded) == demo.format_table(recorded)
    short = {**recorded, "steps": 40, "comparison": {**recorded["comparison"], "accept_accuracy": False}}
    report = text_report(short)
    assert "[FAIL]" in report
    assert report.endswith("(the acceptance is set for the default 1,600 steps: a 40-step run ends before dense has "
                           "learned every kind of image word, so FAIL is expected here)")


def test_auto_arm_runs_once_per_seed_and_reports_its_mean_sparse_ratio():
    plan = frontier.planned_runs(["dense", "regate", "auto"], [0.25, 0.1], [0, 1])
    assert plan[:4] == [("dense", 1.0, 0), ("dense", 1.0, 1), ("auto", 0.0, 0), ("auto", 0.0, 1)]
    assert [r for r in plan if r[0] == "auto"] == plan[2:4]  # not once per keep ratio
    config = frontier.arm_config("auto", 0.0, 1600)
    assert config.keep_ratio == "auto" and (config.keep_min, config.keep_max) == (0.1, 0.5)
    assert frontier.run_key("auto", 0.0, 3) == "auto|auto|3"
    auto = {**_run([0, 30, 60], [0.2, 0.9, 0.99]), "step_keep_ratios": [1.0, 1.0, 0.5, 0.4, 1.0, 0.2, 0.2]}
    rows = {r["arm"]: r for r in _rows({("dense", 1.0, 0): _run([0, 100, 200], [0.2, 0.8, 1.0]), ("auto", 0.0, 0): auto})}
    assert rows["auto"]["keep_ratio"] == pytest.approx(0.325) and rows["auto"]["supervised_share"] == pytest.approx(0.3)
    assert "auto                 0.325   30.0%     0.990   -1.0" in frontier.format_frontier(list(rows.values()))


def test_sweep_with_the_auto_arm_records_its_ratios(tmp_path, monkeypatch):
    from regate_plugin.demo import runs as demo_runs
    from regate_plugin.schedule import is_dense_step

    monkeypatch.setattr(demo_runs, "PRETRAIN_STEPS", 5)
    monkeypatch.setattr(demo_runs, "VISION_STEPS", 5)
    args = ["demo", "--arms", "dense,auto", "--seeds", "1", "--steps", "80", "--out", str(tmp_path), "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "frontier.json").read_text())
    run = saved["runs"]["auto|auto|0"]
    config = frontier.arm_config("auto", 0.0, 80)
    assert len(run["step_keep_ratios"]) == 80
    # dense steps at 1.0; every sparse step of a cycle at the ratio its dense steps chose, within the bounds
    ratios = run["step_keep_ratios"]
    for step, ratio in enumerate(ratios):
        assert (ratio == 1.0) == is_dense_step(step, config)
    for decision in run["auto_decisions"]:
        assert config.keep_min <= decision["keep_ratio"] <= config.keep_max
        following = ratios[decision["step"] + 1:decision["step"] + 1 + config.cycle - config.dense_steps]
        assert following and set(following) == {decision["keep_ratio"]}
    [row] = [r for r in saved["rows"] if r["arm"] == "auto"]
    assert row["keep_ratio"] == pytest.approx(frontier.mean_sparse_ratio(run))
    assert 0.0 < row["supervised_share"] < 1.0


def test_a_sweep_on_a_variant_from_a_later_seed_records_both_and_plots_the_auto_ratios(tmp_path, monkeypatch):
    from regate_plugin.demo import runs as demo_runs

    monkeypatch.setattr(demo_runs, "PRETRAIN_STEPS", 5)
    monkeypatch.setattr(demo_runs, "VISION_STEPS", 5)
    prepared = []
    original = frontier.prepare
    monkeypatch.setattr(frontier, "prepare", lambda *a: prepared.append(a) or original(*a))
    args = ["demo", "--arms", "dense,auto", "--seed", "3", "--seeds", "1", "--steps", "40", "--question-types",
            "shape,color", "--no-free-words", "--out", str(tmp_path), "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    [(steps, seed, _, _, variant)] = prepared
    assert (steps, seed) == (40, 3) and variant == task.Variant(free_words=False, question_types=("shape", "color"))
    saved = json.loads((tmp_path / "frontier.json").read_text())
    assert saved["settings"]["seeds"] == [3]
    assert saved["settings"]["task"] == {"free_words": False, "question_types": ["shape", "color"]}
    assert sorted(saved["runs"]) == ["auto|auto|3", "dense|1|3"]
    assert (tmp_path / "auto_ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.output.rstrip().endswith(f"wrote {tmp_path / 'frontier.json'} and {tmp_path / 'frontier.png'}, "
                                           f"{tmp_path / 'auto_ratios.png'}")
    # the same folder with the demo's own task is another sweep
    other = CliRunner().invoke(main, [a for a in args if a != "--no-free-words"])
    assert other.exit_code == 2 and "other settings" in other.output


def test_task_options_are_refused_without_arms_and_checked():
    result = CliRunner().invoke(main, ["demo", "--question-types", "color"])
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1] == (
        "Error: --question-types and --no-free-words change the task of a sweep: use them with --arms")
    result = CliRunner().invoke(main, ["demo", "--arms", "dense,auto", "--question-types", "color,,size", "--out", "x"])
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1] == (
        "Error: Invalid value for --question-types: question types ['size']: choose from color, shape, count, where, describe")


def test_auto_ratio_course_lists_the_sparse_steps_and_their_ratios():
    run = {"step_keep_ratios": [1.0, 1.0, 0.5, 0.4, 1.0, 0.2, 0.2]}
    assert frontier.auto_ratio_course(run) == ([2, 3, 5, 6], [0.5, 0.4, 0.2, 0.2])
    assert frontier.plot_auto_ratios({"dense|1|0": run}, Path("unused.png")) is None
