"""The whole pipeline's settings and input for the one run on the bundled sample that the suite
shares (the `sample_run` fixture in conftest.py): the end-to-end test checks every table, the rerun, the
report and the notebook on it, and the incremental test takes it as its from-scratch side, so the
suite pays for that run once.

The input is two files of the bundled sample's pages (batch 1 and batch 2 of the incremental test).
The settings are what makes an incremental run comparable with a full one, under the rules
docs/architecture.md ("Incremental runs") states for global state:
- every image probes every cluster (`retrieve.nprobe` = `cluster.k`): the top-k is exact and does
  not depend on the centroids, which an incremental run keeps from its first run;
- the entropy rule is off (`min_entropy` 0): a sentence's entropy is computed against the unigram
  table of the run that first saw it, so no verdict may hang on it;
- only the shipped base tag vocabulary (mined tags need counts over the whole corpus);
- semantic-dedup thresholds at 1.0: an incremental run keeps an old survivor where a full run keeps
  the lower id (tests/test_dedup_incremental.py covers those rules);
- generation is not capped per run.
The models are the suite's tiny offline ones; a random tiny LM has no meaningful perplexity, so the
band is wide open, and it writes 4 tokens per synthetic text. Those each stage's own tests cover:
mined tags, the entropy rule and semantic-dedup drops.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from data_paths import PROJECT

BATCH_1 = list(range(10))
BATCH_2 = [16, 17, 22, 23]


def write_batches(folder: Path) -> list[Path]:
    """batch1.parquet and batch2.parquet: the bundled sample's pages BATCH_1 and BATCH_2."""
    sample = pq.read_table(PROJECT / "sample" / "recipes.obelics.parquet")
    paths = []
    for i, rows in enumerate((BATCH_1, BATCH_2), start=1):
        paths.append(folder / f"batch{i}.parquet")
        pq.write_table(sample.take(rows), paths[-1])
    return paths


def settings(clip, lm, paths: list[Path], export_dir: Path | None = None) -> dict:
    """Config sections for stage_ctx / make_cfg: the input `paths`, the tiny models, the rules above."""
    sections = dict(
        ingest={"paths": [str(p) for p in paths]},
        models={"clip": {"name": "realsyn-tiny", "pretrained": clip.checkpoint, "model_config_dir": clip.config_dir,
                         "offline": True, "precision": "fp32", "batch_size": 16},
                "perplexity_lm": {"source": lm, "min_perplexity": 0, "max_perplexity": 1e9},
                "llm": {"source": lm, "max_new_tokens": 4}},
        sentences={"min_entropy": 0},
        semantic_dedup={"images": {"threshold": 1.0}, "sentences": {"threshold": 1.0}},
        cluster={"k": 4},
        retrieve={"k": 3, "nprobe": 4},
        tag={"mine_min_count": 1_000_000, "threshold": -1.0, "top_n": 3},
        # Some sample sentences overflow the tiny LM's 64 positions: those rows are errors, tried once.
        generate={"max_images": 1_000, "max_attempts": 1,
                  "prompt": {"version": "tests", "system": "", "user": "{sentence} {caption} {tags}"}},
        embed={"decode_threads": 2},
    )
    if export_dir is not None:
        sections["export"] = {"out_dir": str(export_dir), "subset": "cap-8"}
    return sections
