"""The whole pipeline on a slice of the bundled sample, on real local Spark + Delta, with small
real models built offline (tiny open_clip, tiny GPT-2): every table fills, every image with an
embedding gets its top-k, a second run changes nothing, and the notebook runs over the result."""
from __future__ import annotations

import os
import runpy

import pyarrow.parquet as pq
import pytest

from clip_fixtures import tiny_clip  # noqa: F401  (fixture)
from etl.runner import run_stages
from etl.stages import PIPELINE
from lm_fixtures import tiny_lm  # noqa: F401  (fixture)
from tests.conftest import PROJECT

pytestmark = pytest.mark.spark

TABLES = ("documents", "doc_texts", "doc_images", "quarantine", "images", "image_bytes", "sentences",
          "sentence_occurrences", "word_unigrams", "image_embeddings", "sentence_embeddings",
          "text_centroids", "sentence_clusters", "retrievals")


@pytest.fixture(scope="module")
def sample_slice(tmp_path_factory):
    """The first 40 pages of the bundled sample, same OBELICS file format."""
    table = pq.read_table(PROJECT / "sample" / "recipes.obelics.parquet").slice(0, 40)
    path = tmp_path_factory.mktemp("slice") / "recipes40.parquet"
    pq.write_table(table, path)
    return path


def versions(ctx) -> dict[str, int]:
    from etl import tables

    return {t: tables.version(ctx.spark, ctx.table(t)) for t in TABLES}


def test_whole_pipeline_then_rerun_changes_nothing(stage_ctx, sample_slice, tiny_clip, tiny_lm):
    ctx = stage_ctx(
        ingest={"paths": [str(sample_slice)]},
        models={"clip": {"name": "realsyn-tiny", "pretrained": tiny_clip.checkpoint,
                         "model_config_dir": tiny_clip.config_dir, "offline": True, "precision": "fp32",
                         "batch_size": 16},
                # A random tiny LM has no meaningful perplexity: keep the band wide open here.
                "perplexity_lm": {"source": tiny_lm, "min_perplexity": 0, "max_perplexity": 1e9}},
        embed={"decode_threads": 2},
        cluster={"k": 4},
        retrieve={"k": 3},
    )
    results = run_stages(ctx.spark, ctx.cfg)
    assert list(results) == list(PIPELINE)

    count = lambda sql: ctx.spark.sql(sql.format(db=ctx.cfg.catalog.database)).collect()[0][0]  # noqa: E731
    assert count("SELECT count(*) FROM {db}.documents") == 40
    assert count("SELECT count(*) FROM {db}.images WHERE kept") > 0
    assert count("SELECT count(*) FROM {db}.sentences WHERE kept") > 10
    embedded = count("SELECT count(*) FROM {db}.image_embeddings WHERE vector IS NOT NULL")
    assert embedded > 0
    # Every kept, embedded image has exactly k realistic sentences, ranked 1..k, all kept sentences.
    assert count("""SELECT count(*) FROM (SELECT image_id, count(*) AS n, max(rank) AS r
                    FROM {db}.retrievals GROUP BY image_id) WHERE n = 3 AND r = 3""") == count(
        """SELECT count(*) FROM {db}.images i JOIN {db}.image_embeddings e USING (image_id)
           WHERE i.kept AND e.vector IS NOT NULL""")
    assert count("""SELECT count(*) FROM {db}.retrievals r LEFT ANTI JOIN
                    (SELECT sentence_id FROM {db}.sentences WHERE kept) USING (sentence_id)""") == 0
    runs = ctx.read("runs").where("status = 'ok'").select("stage").distinct().count()
    assert runs == len(PIPELINE)

    before = versions(ctx)
    again = run_stages(ctx.spark, ctx.cfg)
    assert versions(ctx) == before, "a second run on the same input must commit nothing"
    assert again["ingest"].metrics["inserted_documents"] == 0

    os.environ["REALSYN_SET"] = f"catalog.database={ctx.cfg.catalog.database}"
    try:
        runpy.run_path(str(PROJECT / "notebooks" / "explore_tables.py"), run_name="__main__")
    finally:
        os.environ.pop("REALSYN_SET")
