"""Where the tests' real data lives.

TEST_DATA (`tests/data`, committed) holds the few real photos and texts every test needs, so the
suite passes on a fresh clone with nothing beside it. SHARED_DATA (`../shared/data` beside the
project, or `$REALSYN_SHARED_DATA`) is the larger optional set: tests that need it carry
`requires_shared` and skip with a stated reason when it is absent. Both folders have the same
layout (`recipes/docs.jsonl`, `recipes/static/pix/`, `mmc4_docs/docs.jsonl`, `images/...`), so a
test can take either as its root. Nothing here reads a file.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
TEST_DATA = PROJECT / "tests" / "data"
# REALSYN_SHARED_DATA=/nonexistent hides the shared set (to prove the suite does not need it).
SHARED_DATA = Path(os.environ.get("REALSYN_SHARED_DATA") or PROJECT.parent / "shared" / "data")
SHARED_REASON = "../shared/data not present (optional larger check)"
HAS_SHARED = all((SHARED_DATA / p).exists() for p in
                 ("recipes/docs.jsonl", "recipes/static/pix", "mmc4_docs/docs.jsonl"))

requires_shared = pytest.mark.skipif(not HAS_SHARED, reason=SHARED_REASON)
