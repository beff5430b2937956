"""Selection and schedule against brute-force references."""

import math

import pytest
import torch

from regate_plugin.config import ConfigError, ReGATEConfig
from regate_plugin.schedule import is_dense_step, keep_ratio_at, sparse_step_count, token_share
from regate_plugin.selection import difficulty_scores, keep_quota, select_units
from regate_plugin.units import IGNORE_INDEX, find_units


def units_for_counts(counts, length=None):
    """Units of rows fully supervised with the given unit counts (row b has counts[b] units)."""
    length = length or max(counts) + 1
    labels = torch.full((len(counts), length), IGNORE_INDEX)
    for b, n in enumerate(counts):
        labels[b, 1 : n + 1] = 7
    return find_units(labels)


def brute_force_select(scores, units, ratio):
    keep = []
    for b, n in enumerate(units.counts.tolist()):
        idx = [i for i in range(len(units)) if units.row[i] == b]
        quota = 0 if n == 0 else max(1, math.ceil(round(ratio * n, 9)))
        ranked = sorted(idx, key=lambda i: (-float(scores[i]), int(units.col[i])))
        keep.extend(ranked[:quota])
    mask = torch.zeros(len(units), dtype=torch.bool)
    mask[keep] = True
    return mask


def test_scores_formula():
    ema, ref = torch.tensor([1.0, 2.0]), torch.tensor([4.0, 0.5])
    assert torch.allclose(difficulty_scores(ema, ref, 0.5), torch.tensor([3.0, 2.25]))


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("seed", range(4))
def test_per_sample_selection_matches_brute_force(ratio, seed):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 12, (5,), generator=gen).tolist()
    units = units_for_counts(counts)
    scores = torch.randint(0, 4, (len(units),), generator=gen).float()  # many ties
    keep = select_units(scores, units, ratio)
    assert torch.equal(keep, brute_force_select(scores, units, ratio))
    for b, n in enumerate(counts):
        kept = int(keep[units.row == b].sum())
        assert kept == (0 if n == 0 else max(1, math.ceil(round(ratio * n, 9))))


def test_quota_exact_for_float_products():
    assert keep_quota(torch.tensor([10, 3, 1, 0, 20]), 0.7).tolist() == [7, 3, 1, 0, 14]
    assert keep_quota(torch.tensor([10]), 0.3).tolist() == [3]  # 0.3*10 = 3.0000000000000004 in floats


def test_ties_keep_earlier_positions_and_are_deterministic():
    units = units_for_counts([6])
    scores = torch.ones(6)
    keep = select_units(scores, units, 0.5)
    assert keep.tolist() == [True, True, True, False, False, False]
    scores = torch.tensor([1.0, 5.0, 1.0, 5.0, 1.0, 5.0])
    assert select_units(scores, units, 0.5).tolist() == [False, True, False, True, False, True]
    assert all(torch.equal(select_units(scores, units, 0.5), select_units(scores.clone(), units, 0.5)) for _ in range(3))


def test_per_batch_selection_takes_global_top():
    units = units_for_counts([3, 1])
    scores = torch.tensor([0.1, 0.2, 0.3, 9.0])
    assert select_units(scores, units, 0.5, per_batch=True).tolist() == [False, False, True, True]
    assert select_units(scores, units, 0.5).tolist() == [False, True, True, True]


def test_keep_ratio_one_keeps_all_and_nan_is_refused():
    units = units_for_counts([4])
    assert select_units(torch.zeros(4), units, 1.0).all()
    with pytest.raises(ValueError, match="NaN"):
        select_units(torch.tensor([0.0, float("nan"), 1.0, 2.0]), units, 0.5)
    with pytest.raises(ValueError, match="shape"):
        select_units(torch.zeros(3), units, 0.5)


def test_schedule_phases():
    cfg = ReGATEConfig(warmup=3, cycle=4, dense_steps=1, keep_ratio=0.25)
    got = [keep_ratio_at(t, cfg) for t in range(12)]
    assert got == [1, 1, 1, 1, 0.25, 0.25, 0.25, 1, 0.25, 0.25, 0.25, 1]
    assert [is_dense_step(t, cfg) for t in range(12)].count(False) == sparse_step_count(12, cfg) == 6
    with pytest.raises(ValueError):
        keep_ratio_at(-1, cfg)


def test_schedule_share_of_supervised_units_over_5000_steps():
    """Units actually selected over 5,000 default steps equal the closed-form share."""
    cfg = ReGATEConfig()
    steps = 5000
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 40, (8,), generator=gen).tolist()
    units = units_for_counts(counts)
    scores = torch.rand(len(units), generator=gen)
    kept_sparse = int(select_units(scores, units, cfg.keep_ratio).sum())
    used = sum(len(units) if keep_ratio_at(t, cfg) == 1.0 else kept_sparse for t in range(steps))
    sparse = sparse_step_count(steps, cfg)
    # Closed form: 38 full cycles of 112 sparse steps, then 36 - 16 = 20 more.
    assert sparse == 38 * 112 + 20
    expected_units = (steps - sparse) * len(units) + sparse * sum(max(1, math.ceil(cfg.keep_ratio * n)) for n in counts)
    assert used == expected_units
    share_without_rounding = (steps - sparse * (1 - cfg.keep_ratio)) / steps
    assert share_without_rounding == pytest.approx(0.5724)  # the paper: about 56-59% of dense tokens
    assert token_share(steps, cfg) == pytest.approx(share_without_rounding)
    assert token_share(steps, cfg) == pytest.approx(sum(keep_ratio_at(t, cfg) for t in range(steps)) / steps)


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("keep_ratio", 0.0, "(0, 1]"),
        ("keep_ratio", 1.5, "(0, 1]"),
        ("keep_ratio", float("nan"), "(0, 1]"),
        ("cycle", 0, ">= 1"),
        ("cycle", 2.5, "integers"),
        ("dense_steps", 200, "[0, cycle=128]"),
        ("warmup", -1, ">= 0"),
        ("ema_beta", 1.0, "[0, 1)"),
        ("ref_weight", float("inf"), "finite"),
        ("selection", "random", "per_sample"),
        ("attn_backend", "xformers", "sdpa"),
        ("warmup", True, "integers"),
    ],
)
def test_config_errors_name_field_and_range(field, value, words):
    with pytest.raises(ConfigError) as err:
        ReGATEConfig(**{field: value})
    assert f"ReGATEConfig.{field}" in str(err.value) and words in str(err.value)


def test_config_defaults_and_dict_round_trip():
    cfg = ReGATEConfig()
    assert (cfg.keep_ratio, cfg.cycle, cfg.dense_steps, cfg.warmup, cfg.ema_beta, cfg.ref_weight) == (
        0.5, 128, 16, 100, 0.9, 0.5,
    )
    assert ReGATEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="keep_ration"):
        ReGATEConfig.from_dict({"keep_ration": 0.3})
