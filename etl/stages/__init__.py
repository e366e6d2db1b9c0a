"""One module per pipeline stage, named as in ARCHITECTURE.md, each declaring its stage once
(`@stage` in etl/stage.py). PIPELINE is the only list of them: the runner, `realsyn stages`, the
config hashes and the GPU profiles all read the registry built from it."""
from __future__ import annotations

import importlib

from etl.stage import Registry

PIPELINE = (
    "ingest",
    "fetch",
    "image_quality",
    "image_dedup",
    "sentences",
    "embed",
    "semantic_dedup",
    "cluster",
    "retrieve",
    "caption",
    "tag",
    "generate",
    "similarity_band",
    "pairs",
    "balance",
    "export",
)


def registry() -> Registry:
    return Registry([getattr(importlib.import_module(f"etl.stages.{name}"), name) for name in PIPELINE])
