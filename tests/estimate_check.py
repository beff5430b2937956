"""The acceptance check of `regate estimate`: its shares against the engine's StepStats totals over the
same batches (plain helper module, used by tests/test_estimate.py and tests/llamafactory)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from regate_plugin import ReGATEConfig, ReGATEEngine
from regate_plugin.plugins import build_plugin_manager
from regate_plugin.refcache import Fingerprint, RefCache
from regate_plugin.units import IGNORE_INDEX, find_units

SHARE_TOLERANCE = 0.02  # the 2 points: the schedule's rounding and the random last kept unit


def engine_totals(source, batches, config: ReGATEConfig) -> dict[str, int]:
    """Run ``ReGATEEngine.plan`` over ``batches`` (right-padded from ``source.context``) with a
    reference cache of random losses, one optimizer step per batch; the StepStats totals."""
    samples = [source.context(i) for i in range(len(source))]
    counts = [int(find_units(labels[None]).counts[0]) for _, labels in samples]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    losses = (np.random.default_rng(0).random(int(offsets[-1]), dtype=np.float32) * 6).astype(np.float16)
    fingerprint = Fingerprint(dataset="estimate-test", tokenizer="t", teacher="random", visual_tokens="-", max_length=0)
    cache = RefCache(Path("estimate-test"), {"fingerprint": fingerprint.to_dict()}, losses, offsets, None)
    engine = ReGATEEngine(config, cache, pm=build_plugin_manager(load_entrypoints=False))
    totals = dict.fromkeys(("supervised_total", "supervised_kept", "llm_tokens", "padded_tokens"), 0)
    for batch in batches:
        length = max(samples[i][0].numel() for i in batch)
        labels = torch.full((len(batch), length), IGNORE_INDEX)
        mask = torch.zeros(len(batch), length, dtype=torch.long)
        for row, i in enumerate(batch):
            n = samples[i][1].numel()
            labels[row, :n], mask[row, :n] = samples[i][1], 1
        engine.plan(labels, mask, torch.as_tensor(batch))
        stats = engine.end_step()
        for key in totals:
            totals[key] += getattr(stats, key)
    return totals


def check_against_engine(source, report: dict, batches, config: ReGATEConfig) -> dict[str, int]:
    """The estimate's shares against the engine's totals over the same batches; returns ReGATE's totals."""
    dense = engine_totals(source, batches, config.replace(keep_ratio=1.0))
    regate = engine_totals(source, batches, config)
    modes = report["modes"]
    # packed dense: exact (the same trimming, nothing random)
    assert modes["packed-dense"]["llm_token_share"] == pytest.approx(dense["llm_tokens"] / dense["padded_tokens"])
    assert modes["padded-dense"]["llm_tokens_per_step"] * len(batches) == dense["padded_tokens"]
    # ReGATE: the schedule's quotas exactly, the trimmed rows within the tolerance
    achieved_supervised = regate["supervised_kept"] / regate["supervised_total"]
    achieved_llm = regate["llm_tokens"] / regate["padded_tokens"]
    assert achieved_supervised < 0.95  # sparse steps happened
    assert modes["regate"]["supervised_share"] == pytest.approx(achieved_supervised)
    assert abs(modes["regate"]["llm_token_share"] - achieved_llm) < SHARE_TOLERANCE
    assert modes["regate"]["llm_token_share"] < modes["packed-dense"]["llm_token_share"]
    return regate
