"""`regate inspect`: the sanity check of a reference cache before a long training run."""

from __future__ import annotations

from typing import Any

import numpy as np

from .refcache import RefCache
from .units import find_units

PERCENTILES = (1, 10, 50, 90, 99)
SAMPLE_LIMIT = 5_000_000  # units drawn for the percentiles of a very large cache


def statistics(cache: RefCache, seed: int = 0) -> dict[str, Any]:
    """Sizes, mean and percentiles of the reference loss, and the fingerprint."""
    counts = cache.counts()
    losses = cache.losses
    if losses.size > SAMPLE_LIMIT:
        losses = losses[np.sort(np.random.default_rng(seed).choice(losses.size, SAMPLE_LIMIT, replace=False))]
    values = np.asarray(losses, dtype=np.float32)
    return {
        "path": str(cache.path),
        "samples": cache.num_samples,
        "units": cache.num_units,
        "samples_without_units": int((counts == 0).sum()),
        "units_per_sample_mean": float(counts.mean()) if counts.size else 0.0,
        "ref_loss_mean": float(values.mean()) if values.size else float("nan"),
        "ref_loss_percentiles": {str(p): float(v) for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES))}
        if values.size
        else {},
        "fingerprint": cache.fingerprint.to_dict(),
    }


def extreme_units(cache: RefCache, count: int) -> tuple[list[int], list[int]]:
    """Flat indices of the ``count`` highest and lowest reference losses (ties: lower index first)."""
    values = np.asarray(cache.losses, dtype=np.float32)
    order = np.argsort(-values, kind="stable")
    return order[:count].tolist(), np.argsort(values, kind="stable")[:count].tolist()


def describe_unit(cache: RefCache, flat: int, source: Any, decode, context: int = 8) -> dict[str, Any]:
    """Sample, k, loss, and the target token with the text before it, decoded."""
    sample = int(np.searchsorted(cache.offsets, flat, side="right") - 1)
    k = flat - int(cache.offsets[sample])
    input_ids, labels = source.text_only(sample)
    units = find_units(labels[None])
    if units.counts[0] != cache.counts()[sample]:
        raise ValueError(
            f"sample {sample} has {int(units.counts[0])} units now but {int(cache.counts()[sample])} in the cache: "
            "the dataset changed since scoring"
        )
    j = int(units.col[k])
    return {
        "sample": sample,
        "k": k,
        "ref_loss": float(cache.losses[flat]),
        "context": decode(input_ids[max(0, j - context + 1) : j + 1].tolist()),
        "token": decode([int(labels[j + 1])]),
    }
