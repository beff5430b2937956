"""The score and selection variants of ReGATEConfig (issue 16) against brute-force references, and
their engine contracts: chosen from the config, checked, deterministic and resumable."""

import math

import click
import pytest
import torch
from click.testing import CliRunner

from regate_plugin import ReGATEConfig, ReGATEEngine
from regate_plugin.cli import config_options
from regate_plugin.config import ConfigError
from regate_plugin.hookspecs import hookimpl
from regate_plugin.plugins import PluginError, build_plugin_manager
from regate_plugin.selection import learnable_scores, select_adaptive, select_units
from regate_plugin.units import IGNORE_INDEX
from regate_plugin.words import WordProgress

from test_engine import SAMPLE_IDS, cache, toy_batch  # noqa: F401 (cache: the engine tests' fixture)
from test_selection import units_for_counts


# --- the learnability-aware score ------------------------------------------------------------


def brute_force_word_progress(steps, beta):
    """Per step, per word v seen c times: S[v] = beta**c * S[v] + its c losses (T[v] likewise for refs,
    N[v] for the count); known once N[v] >= half a window, 0.5 / (1 - beta)."""
    student, teacher, count = {}, {}, {}
    for targets, losses, refs in steps:
        for v in set(targets):
            mine = [i for i, t in enumerate(targets) if t == v]
            student[v] = beta ** len(mine) * student.get(v, 0.0) + sum(losses[i] for i in mine)
            teacher[v] = beta ** len(mine) * teacher.get(v, 0.0) + sum(refs[i] for i in mine)
            count[v] = beta ** len(mine) * count.get(v, 0.0) + len(mine)
    return {v: 1 - student[v] / teacher[v] for v in student if count[v] >= 0.5 / (1 - beta) - 1e-9}


def test_word_progress_matches_brute_force_and_round_trips():
    gen = torch.Generator().manual_seed(0)
    steps = []
    progress = WordProgress(0.9)
    for _ in range(6):
        n = int(torch.randint(1, 30, (1,), generator=gen))
        targets = torch.randint(0, 12, (n,), generator=gen)
        losses, refs = torch.rand(n, generator=gen) * 3, torch.rand(n, generator=gen) * 3 + 0.1
        for part in (slice(0, n // 2), slice(n // 2, n)):  # two micro-batches, one commit
            progress.record(targets[part], losses[part], refs[part])
        progress.commit()
        steps.append((targets.tolist(), losses.tolist(), refs.tolist()))
    expected = brute_force_word_progress(steps, 0.9)
    got = progress.learned(torch.arange(14))
    for v in range(14):
        if v in expected:
            assert got[v].item() == pytest.approx(expected[v], rel=1e-5, abs=1e-6), v
        else:
            assert math.isnan(got[v])  # never seen
    again = WordProgress(0.5)
    again.load_state_dict(progress.state_dict())
    assert torch.allclose(again.learned(torch.arange(14)), got, equal_nan=True) and again.beta == 0.9
    progress.record(torch.tensor([3]), torch.tensor([1.0]), torch.tensor([1.0]))
    with pytest.raises(RuntimeError, match="commit"):
        progress.state_dict()


def brute_force_learnable(ema, ref, learned, ref_weight, discount):
    out = []
    for m, r, share in zip(ema.tolist(), ref.tolist(), learned.tolist()):
        stuck = not math.isnan(share) and abs(share) < 0.25
        out.append((m + ref_weight * r) * (discount if stuck else 1.0))
    return torch.tensor(out)


def test_learnable_score_matches_brute_force_and_keeps_the_papers_where_nothing_is_stuck():
    gen = torch.Generator().manual_seed(0)
    ref = torch.rand(200, generator=gen) * 2
    ema = ref + (torch.rand(200, generator=gen) - 0.7) * 0.4
    learned = torch.rand(200, generator=gen) * 2 - 1
    learned[::7] = float("nan")
    got = learnable_scores(ema, ref, learned, 0.5, 0.25)
    assert torch.allclose(got, brute_force_learnable(ema, ref, learned, 0.5, 0.25))
    assert torch.equal(learnable_scores(ema, ref, learned, 0.5, 1.0), ema + 0.5 * ref)  # discount 1: the paper's


def test_learnable_score_ranks_a_word_being_learned_above_a_free_word():
    """Many samples of a free word (ln 3 for the teacher, the student stays at ln 3) and of a corner
    word (ln 2 for the teacher, the student learning to read it from the picture) through
    WordProgress; then a sample the student has not seen again: its EMA is still the teacher's loss
    on both units, so the paper's score keeps the free word, the learnable one the corner word."""
    free, corner = 40, 41
    progress = WordProgress(0.9)
    for step in range(20):
        student_corner = math.log(2) * (1 - step / 25)
        progress.record(torch.tensor([free] * 4 + [corner] * 4), torch.tensor([math.log(3)] * 4 + [student_corner] * 4),
                        torch.tensor([math.log(3)] * 4 + [math.log(2)] * 4))
        progress.commit()
    learned = progress.learned(torch.tensor([free, corner, 99]))
    assert abs(learned[0]) < 1e-6 and learned[1] > 0.25 and math.isnan(learned[2])
    ref = torch.tensor([math.log(3), math.log(2), math.log(2)])
    ema = ref.clone()  # not visited since the start
    paper = ema + 0.5 * ref
    assert paper[0] > paper[1]
    score = learnable_scores(ema, ref, learned, 0.5, 0.25)
    assert score[1] > score[0] and score[2] > score[0]  # an unseen word keeps the paper's score
    assert score[1] == paper[1] and score[0] == pytest.approx(0.25 * paper[0])


# --- the adaptive budget ---------------------------------------------------------------------


def brute_force_adaptive(scores, units, ratio, cap):
    """Greedy: every sample's best unit, then the batch's best in order, skipping full samples."""
    n = len(units)
    rows = units.row.tolist()
    order = sorted(range(n), key=lambda i: (-float(scores[i]), rows[i], int(units.col[i])))
    counts = units.counts.tolist()
    caps = [min(c, math.ceil(round(min(1.0, cap * ratio) * c, 9))) for c in counts]
    budget = max(sum(c > 0 for c in counts), math.ceil(round(ratio * n, 9)))
    keep, taken = set(), [0] * len(counts)
    for i in order:  # floor
        if taken[rows[i]] == 0:
            keep.add(i)
            taken[rows[i]] = 1
    for i in order:
        if len(keep) >= budget:
            break
        if i not in keep and taken[rows[i]] < caps[rows[i]]:
            keep.add(i)
            taken[rows[i]] += 1
    mask = torch.zeros(n, dtype=torch.bool)
    mask[sorted(keep)] = True
    return mask


@pytest.mark.parametrize("cap", [1.0, 2.0, 3.0, 10.0])
@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("seed", range(4))
def test_adaptive_selection_matches_brute_force(cap, ratio, seed):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 16, (6,), generator=gen).tolist()
    units = units_for_counts(counts)
    scores = torch.randint(0, 5, (len(units),), generator=gen).float()  # many ties
    keep = select_adaptive(scores, units, ratio, cap)
    assert torch.equal(keep, brute_force_adaptive(scores, units, ratio, cap))
    samples = sum(c > 0 for c in counts)
    assert int(keep.sum()) == max(samples, math.ceil(round(ratio * len(units), 9)))
    for b, n in enumerate(counts):
        kept = int(keep[units.row == b].sum())
        assert (kept >= 1 if n else kept == 0) and kept <= max(1, math.ceil(round(min(1.0, cap * ratio) * n, 9)))


def test_adaptive_selection_moves_slots_to_the_sample_that_needs_them():
    """Two samples of 10 units at keep 0.2: per sample keeps 2 + 2; the budget of 4 goes 3 + 1 when
    one sample has three high scores and the other none."""
    units = units_for_counts([10, 10])
    scores = torch.zeros(20)
    scores[[1, 4, 7]] = 5.0
    scores[12] = 0.5
    per_sample = select_units(scores, units, 0.2)
    adaptive = select_adaptive(scores, units, 0.2, cap=3.0)
    assert per_sample.nonzero().flatten().tolist() == [1, 4, 10, 12]
    assert adaptive.nonzero().flatten().tolist() == [1, 4, 7, 12]
    # a cap of 1: no sample keeps more than its per-sample quota, so the same as per-sample
    assert torch.equal(select_adaptive(scores, units, 0.2, cap=1.0), per_sample)
    assert select_adaptive(scores, units, 1.0, cap=3.0).all()
    with pytest.raises(ValueError, match="NaN"):
        select_adaptive(torch.full((20,), float("nan")), units, 0.2, cap=3.0)


# --- configuration, CLI -------------------------------------------------------------------------


def test_config_variants_default_to_the_paper_and_are_validated():
    config = ReGATEConfig()
    assert (config.score, config.selection) == ("paper", "per_sample")
    for field, value, words in [("score", "entropy", "learnable"), ("selection", "topk", "adaptive"),
                                ("adaptive_cap", 0.5, ">= 1"), ("irreducible_discount", 1.5, "[0, 1]"),
                                ("elision", "mask", "loss")]:
        with pytest.raises(ConfigError, match=rf"ReGATEConfig\.{field}.*{words}"):
            ReGATEConfig(**{field: value})
    assert ReGATEConfig.from_dict(ReGATEConfig(score="learnable", selection="adaptive").to_dict()).score == "learnable"


def test_cli_options_choose_the_variants():
    seen = {}

    @click.command()
    @config_options
    def show(config):
        seen["config"] = config

    result = CliRunner().invoke(show, ["--score", "learnable", "--selection", "adaptive", "--adaptive-cap", "2",
                                       "--irreducible-discount", "0.5", "--elision", "loss"])
    assert result.exit_code == 0, result.output
    assert seen["config"] == ReGATEConfig(score="learnable", selection="adaptive", adaptive_cap=2.0,
                                          irreducible_discount=0.5, elision="loss")
    bad = CliRunner().invoke(show, ["--score", "nope"])
    assert bad.exit_code == 2 and "ref_only" in bad.output


# --- through the engine -------------------------------------------------------------------------


SPARSE = dict(warmup=0, dense_steps=0, keep_ratio=0.2)


def expected_keep(engine, plan, labels, config, steps):
    flat = engine.ema.flat_index(SAMPLE_IDS[plan.units.row], plan.units.k)
    ema, ref = engine.ema.lookup(flat), engine.refcache.lookup(flat)
    progress = brute_force_word_progress(steps, config.ema_beta)
    targets = labels[plan.units.row, plan.units.col + 1].tolist()
    learned = torch.tensor([progress.get(t, float("nan")) for t in targets])
    scores = brute_force_learnable(ema, ref, learned, config.ref_weight, config.irreducible_discount)
    return brute_force_adaptive(scores, plan.units, config.keep_ratio, config.adaptive_cap)


def test_engine_uses_the_configured_variants_and_resumes_them(cache):
    tokens, labels, mask = toy_batch()
    config = ReGATEConfig(warmup=70, dense_steps=0, keep_ratio=0.2, score="learnable", selection="adaptive")
    engine = ReGATEEngine(config, cache)
    # 70 dense steps (enough for a word's share to be known): the student at the teacher's loss on
    # the words of the first half (stuck), far below it on the others
    words = labels[labels != IGNORE_INDEX].unique().tolist()
    stuck_words = set(words[: len(words) // 2])
    steps = []
    for _ in range(70):
        plan = engine.plan(labels, mask, SAMPLE_IDS)
        rows = plan.host.loss_rows
        flat = engine.ema.flat_index(SAMPLE_IDS[plan.host.row[rows]], plan.host.unit_k[rows])
        ref, targets = engine.refcache.lookup(flat), plan.host.targets[rows]
        losses = torch.where(torch.tensor([t in stuck_words for t in targets.tolist()]), ref, ref * 0.1)
        engine.record(plan, losses)
        engine.end_step()
        steps.append((targets.tolist(), losses.tolist(), ref.tolist()))
    sparse = engine.plan(labels, mask, SAMPLE_IDS)
    assert sparse.keep_ratio == 0.2
    assert torch.equal(sparse.unit_keep, expected_keep(engine, sparse, labels, config, steps))
    unknown = expected_keep(engine, sparse, labels, config, steps[:1])  # one step: no word known yet
    assert not torch.equal(sparse.unit_keep, unknown)  # the stuck units gave their slots away
    # resumed from the saved state: the same decision, on any rank that loads it
    restored = ReGATEEngine(config, cache)
    restored.load_state_dict(engine.state_dict())
    assert torch.equal(restored.plan(labels, mask, SAMPLE_IDS).unit_keep, sparse.unit_keep)
    # a state saved before the word table existed resumes with a fresh one (the paper's order until it fills)
    older = {k: v for k, v in engine.state_dict().items() if k != "words"}
    restored.load_state_dict(older)
    assert restored.words.student.numel() == 0
    assert torch.equal(restored.plan(labels, mask, SAMPLE_IDS).unit_keep, unknown)
    # the paper's score reads no word table, so none is kept (no bookkeeping, no collective per step)
    assert ReGATEEngine(config.replace(score="paper"), cache).words is None


def test_engine_ref_only_score_ranks_by_the_reference_loss(cache):
    tokens, labels, mask = toy_batch()
    engine = ReGATEEngine(ReGATEConfig(**SPARSE, score="ref_only"), cache)
    plan = engine.plan(labels, mask, SAMPLE_IDS)
    engine.record(plan, torch.full((int(plan.unit_keep.sum()),), 50.0))  # a huge EMA changes nothing
    engine.end_step()
    plan = engine.plan(labels, mask, SAMPLE_IDS)
    ref = engine.refcache.lookup(engine.ema.flat_index(SAMPLE_IDS[plan.units.row], plan.units.k))
    assert torch.equal(plan.unit_keep, select_units(ref, plan.units, 0.2))


class DropSecondSample:
    @hookimpl
    def regate_select(self, scores, units, keep_ratio, config):
        return units.row != 1


def test_adaptive_selection_is_checked_for_one_unit_per_sample(cache):
    tokens, labels, mask = toy_batch()
    engine = ReGATEEngine(ReGATEConfig(**SPARSE, selection="adaptive"), cache,
                          pm=build_plugin_manager(load_entrypoints=False, extra=[DropSecondSample()]))
    with pytest.raises(PluginError, match="keeps none of the .* units of batch row 1"):
        engine.plan(labels, mask, SAMPLE_IDS)
