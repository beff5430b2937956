"""keep_ratio="auto": the controller against a brute-force reference, on a task where elision is safe
and one where it is not, resumed mid-run, and its settings and refusals."""

import io

import pytest
import torch

from regate_plugin import Fingerprint, ReGATEConfig, ReGATEEngine
from regate_plugin.budget import ELIDED, KEPT, LAG_TOLERANCE, LEARNED, MIN_UNITS, STEP, KeepController, next_ratio, start_ratio
from regate_plugin.config import ConfigError
from regate_plugin.hookspecs import hookimpl
from regate_plugin.plugins import PluginError, build_plugin_manager
from regate_plugin.refcache import RefCache, write_cache
from regate_plugin.schedule import is_dense_step
from regate_plugin.trainer import load_state, save_state
from regate_plugin.units import IGNORE_INDEX

FP = Fingerprint(dataset="d", tokenizer="t", teacher="m", visual_tokens="0", max_length=16)
SAMPLES, UNITS, BATCH = 24, 6, 4  # 6 steps an epoch
CONFIG = ReGATEConfig(keep_ratio="auto", warmup=2, cycle=6, dense_steps=2, ema_beta=0.5)
STEPS = 84


@pytest.fixture
def cache(tmp_path):
    gen = torch.Generator().manual_seed(0)
    write_cache(tmp_path / "cache", FP, [0.5 + 2 * torch.rand(UNITS, generator=gen) for _ in range(SAMPLES)])
    return tmp_path / "cache"


def batch(sample_ids):
    """Rows of a one-token prompt and UNITS supervised tokens (sample id as the token)."""
    labels = torch.full((len(sample_ids), UNITS + 2), IGNORE_INDEX)
    labels[:, 1:UNITS + 1] = torch.as_tensor(sample_ids)[:, None] + 1
    return labels, torch.ones_like(labels)


class Student:
    """A synthetic student: a loss level per unit (flat index), which training lowers.

    safe: every unit's loss falls each step whether it is computed or not (what it teaches is learned
    from other units); unsafe: only the units computed learn, and elided ones slip back."""

    def __init__(self, initial, safe):
        self.level = initial.double().clone()
        self.safe = safe

    def losses(self, flat):
        return self.level[flat].float()

    def step(self, computed):
        trained = torch.zeros_like(self.level, dtype=torch.bool)
        trained[computed] = True
        if self.safe:
            self.level *= 0.85
        else:
            self.level = torch.where(trained, self.level * 0.6, self.level * 1.05)


def order(step):
    """The samples of step ``step``: a fixed permutation per epoch, BATCH a step."""
    epoch, position = divmod(step, SAMPLES // BATCH)
    perm = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(epoch))
    return perm[position * BATCH:(position + 1) * BATCH]


def run(engine, student, start, stop, events=None, micro_batches=1):
    """Steps ``start``..``stop-1``; ``events`` collects (step, flat, losses, elided flat) per step."""
    ratios = []
    for step in range(start, stop):
        engine.step = step
        ids = order(step)
        computed, elided, losses = [], [], []
        for part in ids.chunk(micro_batches):
            plan = engine.plan(*batch(part), part)
            rows = plan.host.loss_rows
            flat = engine.ema.flat_index(plan.sample_ids[plan.host.row[rows]], plan.host.unit_k[rows])
            loss = student.losses(flat)
            engine.record(plan, loss)
            all_flat = engine.ema.flat_index(plan.sample_ids[plan.units.row], plan.units.k)
            computed.append(flat)
            losses.append(loss)
            elided.append(all_flat[~plan.unit_keep])
        ratios.append(engine.keep_ratio())
        engine.end_step()
        flat, loss = torch.cat(computed), torch.cat(losses)
        if events is not None:
            events.append((step, flat, loss, torch.cat(elided)))
        student.step(flat)
    return ratios


def reference_ratios(events, initial, config):
    """Brute force, one unit at a time in plain Python: the EMA, every unit's last visit, the
    dense phase's sums and the rule; returns the ratio of every step and the decisions."""
    ema = [float(v) for v in initial]
    visit = [0] * len(ema)
    seen = {KEPT: [], ELIDED: []}  # (m, loss) of the dense phase's units, by their last visit
    ratio, ratios, decisions = (config.keep_min * config.keep_max) ** 0.5, [], []
    for step, flat, losses, elided in events:
        dense = is_dense_step(step, config)
        ratios.append(1.0 if dense else ratio)
        before = [ema[u] for u in flat.tolist()]
        for u, loss, m in zip(flat.tolist(), losses.tolist(), before):
            if dense and visit[u] in seen:
                seen[visit[u]].append((m, loss))
        for u, loss in zip(flat.tolist(), losses.tolist()):
            ema[u] = config.ema_beta * ema[u] + (1 - config.ema_beta) * loss
            visit[u] = 0 if dense else KEPT
        if not dense:
            for u in elided.tolist():
                visit[u] = ELIDED
        elif step >= config.warmup and not is_dense_step(step + 1, config):
            shed = {}
            for side, pairs in seen.items():
                open_ = [(m, loss) for m, loss in pairs if max(m, loss) >= LEARNED]
                shed[side] = (sum(m - loss for m, loss in open_) / sum(max(m, loss) for m, loss in open_)
                              if len(open_) >= MIN_UNITS else None)
            if len(seen[ELIDED]) >= MIN_UNITS:
                slipped = shed[ELIDED] is not None and (shed[KEPT] or 0.0) - shed[ELIDED] > LAG_TOLERANCE
                ratio = min(config.keep_max, max(config.keep_min, ratio * (STEP if slipped else 1 / STEP)))
            decisions.append((step, ratio, shed[KEPT], shed[ELIDED]))
            seen = {KEPT: [], ELIDED: []}
    return ratios, decisions


def check_against_reference(engine, cache, events, ratios):
    expected, decisions = reference_ratios(events, RefCache.open(cache).all_losses(), engine.config)
    assert ratios == pytest.approx(expected, abs=1e-9)
    assert [d["step"] for d in engine.budget.decisions] == [d[0] for d in decisions]
    for mine, theirs in zip(engine.budget.decisions, decisions):
        assert mine["keep_ratio"] == pytest.approx(theirs[1], abs=1e-9)
        for key, value in zip(("shed_kept", "shed_elided"), theirs[2:]):
            assert mine[key] is value is None or mine[key] == pytest.approx(value, rel=1e-5, abs=1e-6)


def sparse_ratios(ratios):
    return [r for r in ratios if r < 1.0]


@pytest.mark.parametrize("selection", ["per_sample", "per_batch", "adaptive"])
@pytest.mark.parametrize("score", ["paper", "learnable"])
def test_ratios_fall_where_elision_is_safe_and_rise_where_it_is_not(cache, selection, score):
    config = CONFIG.replace(selection=selection, score=score)
    found = {}
    for safe in (True, False):
        engine = ReGATEEngine(config, RefCache.open(cache))
        events = []
        ratios = run(engine, Student(engine.ema.values, safe), 0, STEPS, events)
        check_against_reference(engine, cache, events, ratios)
        found[safe] = sparse_ratios(ratios)
    # safe: down to keep_min and held there; unsafe: back up to keep_max after every dip
    assert found[True][-4:] == [config.keep_min] * 4 and min(found[True]) == config.keep_min
    assert found[False][-4:] == [config.keep_max] * 4
    assert sum(found[True]) < 0.5 * sum(found[False])


def test_two_micro_batches_decide_as_one(cache):
    """Accumulation splits a step's samples; the step's sums and decisions do not change."""
    results = []
    for micro_batches in (1, 2):
        engine = ReGATEEngine(CONFIG, RefCache.open(cache))
        ratios = run(engine, Student(engine.ema.values, safe=False), 0, 30, micro_batches=micro_batches)
        results.append((ratios, engine.budget.decisions))
    assert results[0] == results[1]


def test_resume_mid_run_equals_the_uninterrupted_run(cache, tmp_path):
    whole = ReGATEEngine(CONFIG, RefCache.open(cache))
    student = Student(whole.ema.values, safe=True)
    ratios = run(whole, student, 0, STEPS)

    first = ReGATEEngine(CONFIG, RefCache.open(cache))
    resumed_student = Student(first.ema.values, safe=True)
    stop = 15  # inside a sparse phase, with elided units marked and dense-phase sums pending later
    head = run(first, resumed_student, 0, stop)
    save_state(first, tmp_path / "checkpoint")
    second = ReGATEEngine(CONFIG, RefCache.open(cache))
    load_state(second, tmp_path / "checkpoint")
    tail = run(second, resumed_student, stop, STEPS)

    assert head + tail == ratios
    assert second.budget.decisions == whole.budget.decisions
    assert torch.equal(second.budget.last_visit, whole.budget.last_visit)
    assert torch.equal(second.ema.values, whole.ema.values)
    assert len(set(sparse_ratios(ratios))) > 2  # the ratio moved, so the resumed state mattered


def test_a_state_saved_before_the_auto_ratio_loads(cache, tmp_path):
    """A fixed-ratio run's state (saved before keep_min/keep_max and the budget existed) resumes."""
    engine = ReGATEEngine(CONFIG.replace(keep_ratio=0.5), RefCache.open(cache))
    run(engine, Student(engine.ema.values, safe=True), 0, 6)
    state = engine.state_dict()
    del state["budget"]
    for key in ("keep_min", "keep_max"):
        del state["config"][key]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "regate_state.pt").write_bytes(buffer.getvalue())
    resumed = ReGATEEngine(CONFIG.replace(keep_ratio=0.5), RefCache.open(cache))
    load_state(resumed, tmp_path / "checkpoint")
    assert resumed.step == 6 and torch.equal(resumed.ema.values, engine.ema.values)
    auto = ReGATEEngine(CONFIG, RefCache.open(cache))
    auto.load_state_dict(state)  # an auto run's engine given a state without one starts it afresh
    assert auto.budget.ratio == start_ratio(CONFIG) == pytest.approx(0.05 ** 0.5) and auto.budget.decisions == []


def test_controller_state_round_trip_and_layout_check():
    controller = KeepController(10, CONFIG)
    controller.ratio = 0.2
    controller.last_visit[3] = ELIDED
    controller.sums[0, 0] = 5
    controller.decisions.append({"step": 7, "keep_ratio": 0.2, "shed_kept": 0.3, "shed_elided": 0.1})
    copy = KeepController(10, CONFIG)
    copy.load_state_dict(controller.state_dict())
    assert copy.ratio == 0.2 and torch.equal(copy.last_visit, controller.last_visit)
    assert torch.equal(copy.sums, controller.sums) and copy.decisions == controller.decisions
    with pytest.raises(ValueError, match="tracks 10 units, this run's cache 11"):
        KeepController(11, CONFIG).load_state_dict(controller.state_dict())


def test_next_ratio_steps_within_the_bounds():
    assert next_ratio(0.5, STEP, 0.1, 0.5) == 0.5
    assert next_ratio(0.5, 1 / STEP, 0.1, 0.5) == 0.4
    assert next_ratio(0.11, 1 / STEP, 0.1, 0.5) == 0.1
    ratio = 0.5
    for _ in range(3):
        ratio = next_ratio(ratio, 1 / STEP, 0.1, 0.5)
    for _ in range(3):
        ratio = next_ratio(ratio, STEP, 0.1, 0.5)
    assert ratio == 0.5


def test_config_accepts_auto_and_checks_its_bounds():
    assert ReGATEConfig(keep_ratio="auto").auto_keep and not ReGATEConfig().auto_keep
    with pytest.raises(ConfigError, match=r"keep_ratio = 'most' is out of range: allowed \(0, 1\] or 'auto'"):
        ReGATEConfig(keep_ratio="most")
    with pytest.raises(ConfigError, match="keep_max = 0.2 is out of range"):
        ReGATEConfig(keep_ratio="auto", keep_min=0.3, keep_max=0.2)
    with pytest.raises(ConfigError, match="keep_min = 0.0 is out of range"):
        ReGATEConfig(keep_min=0.0)


class FixedSchedule:
    @hookimpl
    def regate_keep_ratio(self, step, config):
        return 0.3


def test_auto_refuses_a_plugin_that_sets_the_keep_ratio(cache):
    pm = build_plugin_manager(load_entrypoints=False, extra=[FixedSchedule()])
    with pytest.raises(PluginError, match="sets the keep ratio .* keep_ratio='auto' sets it too"):
        ReGATEEngine(CONFIG, RefCache.open(cache), pm=pm)
    assert ReGATEEngine(CONFIG.replace(keep_ratio=0.5), RefCache.open(cache), pm=pm).budget is None
