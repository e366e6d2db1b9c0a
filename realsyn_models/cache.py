"""One loaded model per Python worker, keyed by its spec (never by device).

Spark reuses Python workers across tasks (spark.python.worker.reuse, on by default), so a
module-level cache means a worker loads a model once and then serves every batch and task it
is given. Inside a Spark task a worker holds one model at a time: loading another stage's model
first frees the previous one (`teardown`), so a GPU never holds a model nobody uses. A cached model
asked for on another device (a reused worker given another GPU) is freed and loaded there, never
copied. `load_count` lets tests check all of that.
"""
from __future__ import annotations

import gc
import sys
import threading
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any

from realsyn_models import device as device_module

_models: dict[Hashable, tuple[str | None, Any]] = {}
_loads: Counter = Counter()
_lock = threading.Lock()


def get_or_load(key: Hashable, load: Callable[[], Any], device: str | None = None) -> Any:
    """The cached instance for `key` on `device`, calling `load()` only when there is none."""
    entry = _models.get(key)
    if entry is not None and entry[0] == device:
        return entry[1]
    with _lock:
        entry = _models.get(key)
        if entry is None or entry[0] != device:
            others = list(_models) if device_module.in_spark_task() else [key] if key in _models else []
            for other in others:
                _free(other)
            _models[key] = (device, load())
            _loads[key] += 1
        return _models[key][1]


def _free(key: Hashable) -> None:
    del _models[key]
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def teardown() -> None:
    """Free every cached model (end of a stage's work in this worker, benchmarks between models)."""
    with _lock:
        for key in list(_models):
            _free(key)


def load_count(key: Hashable | None = None) -> int:
    """How many times this worker loaded `key` (all keys when None)."""
    return sum(_loads.values()) if key is None else _loads[key]


def clear() -> None:
    """Drop every cached model and the load counts (tests)."""
    teardown()
    with _lock:
        _loads.clear()
