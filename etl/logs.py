"""Logging: one `realsyn` logger whose every record names its stage and run id, and quiet
third-party output unless asked for.

The stage and run id come from a context variable the runner sets around each stage, so any
module can `logging.getLogger("realsyn")` and log without passing them along.
"""
from __future__ import annotations

import contextvars
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

LOGGER = "realsyn"
_context: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar("realsyn_stage", default=("-", "-"))

# Progress bars and info chatter of model libraries, printed by Python workers for every model
# load (GGUF de-quantisation, weight loading): noise in a pipeline log unless --verbose.
QUIET_ENV = {
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@contextmanager
def stage_context(stage: str, run_id: str) -> Iterator[None]:
    token = _context.set((stage, run_id))
    try:
        yield
    finally:
        _context.reset(token)


class _StageFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        stage, run_id = _context.get()
        record.where = f"[{stage} {run_id}] " if stage != "-" else ""
        return True


def setup(verbose: bool = False) -> None:
    """Log `realsyn` records to stderr as `HH:MM:SS [stage run] message` (no brackets outside a
    stage); quiet libraries' bars
    (in this process and, through the environment, in the Spark Python workers it starts)."""
    logger = logging.getLogger(LOGGER)
    if not any(getattr(h, "_realsyn", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(where)s%(message)s", "%H:%M:%S"))
        handler.addFilter(_StageFilter())
        handler._realsyn = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    # py4j logs a traceback of its own for every call after the JVM is gone; the CLI says it once.
    logging.getLogger("py4j").setLevel(logging.CRITICAL)
    if not verbose:
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)


def quiet_env(verbose: bool) -> dict[str, str]:
    """The environment the Spark Python workers get on a cluster (spark.executorEnv.*)."""
    return {} if verbose else dict(QUIET_ENV)
