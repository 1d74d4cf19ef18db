"""Bootstrap confidence intervals for evaluation metrics.

A metric here is a mean over independent queries (VQA questions, NLVR2 statements, retrieval
queries: captions for IR, images for TR). Its 95% interval: resample the queries with replacement
``resamples`` times (a fixed seed, so the interval is deterministic), take the metric of each
resample, report the 2.5th and 97.5th percentiles. It says how much the number would move on another
draw of a split of the same size from the same distribution; it does not cover a shift of distribution.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95
SEED = 0


def bootstrap_interval(values: Sequence[float], resamples: int = RESAMPLES, level: float = LEVEL,
                       seed: int = SEED) -> list[float]:
    """[low, high]: the percentile bootstrap interval of the mean of ``values`` (empty: [0, 0])."""
    data = np.asarray(list(values), dtype=np.float64)
    if data.size == 0:
        return [0.0, 0.0]
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 4_000_000 // data.size)  # bound the index matrix's memory on big splits
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        means[start:start + count] = data[rng.integers(0, data.size, size=(count, data.size))].mean(axis=1)
    low, high = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return [round(float(low), 6), round(float(high), 6)]
