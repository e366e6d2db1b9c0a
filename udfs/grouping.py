"""Groups back out of a mapInPandas partition that Spark shuffled by key and sorted within
(etl/gpu.py: `grouped`): the applyInPandas shape, for steps that must run as profiled
(GPU) mapInPandas tasks, which applyInPandas cannot."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd


def by_group(batches: Iterator[pd.DataFrame], keys: list[str]) -> Iterator[tuple[tuple, pd.DataFrame]]:
    """(key, rows) per group; a group may span Arrow batches, so the last group of each batch waits
    for the next one. Memory: one group plus one batch."""
    pending: pd.DataFrame | None = None
    for batch in batches:
        if batch.empty:
            continue
        batch = batch if pending is None else pd.concat([pending, batch], ignore_index=True)
        k = batch[keys]
        starts = np.flatnonzero(k.ne(k.shift()).any(axis=1).to_numpy())
        for a, b in zip(starts, starts[1:]):
            yield tuple(k.iloc[a]), batch.iloc[a:b]
        pending = batch.iloc[starts[-1]:].reset_index(drop=True)
    if pending is not None:
        yield tuple(pending[keys].iloc[0]), pending
