"""One loaded model per Python worker, keyed by its config.

Spark reuses Python workers across tasks (spark.python.worker.reuse, on by default), so a
module-level cache means a worker loads a model once and then serves every batch and task it
is given. `load_count` lets tests check that.
"""
from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any

_models: dict[Hashable, Any] = {}
_loads: Counter = Counter()
_lock = threading.Lock()


def get_or_load(key: Hashable, load: Callable[[], Any]) -> Any:
    """The cached instance for `key`, calling `load()` the first time only (thread-safe)."""
    model = _models.get(key)
    if model is not None:
        return model
    with _lock:
        if key not in _models:
            _models[key] = load()
            _loads[key] += 1
        return _models[key]


def load_count(key: Hashable | None = None) -> int:
    """How many times this worker loaded `key` (all keys when None)."""
    return sum(_loads.values()) if key is None else _loads[key]


def clear() -> None:
    """Drop every cached model (tests; frees memory between benchmark models)."""
    with _lock:
        _models.clear()
        _loads.clear()
