"""The whole pipeline on pages of the bundled sample (the suite's shared `sample_run`: real local
Spark + Delta, small real models built offline, settings in tests/sample_pipeline.py): every table
fills, every image with an embedding gets its top-k, pairs / subsets / export hold only kept rows
and read back whole, a second run changes nothing, and the notebook (nbclient, its own kernel) runs
over the result."""
from __future__ import annotations

import json
import os

import pytest

from data_paths import PROJECT
from etl.runner import run_stages
from etl.stages import PIPELINE
from sample_pipeline import BATCH_1, BATCH_2

pytestmark = pytest.mark.spark

TABLES = ("documents", "doc_texts", "doc_images", "quarantine", "images", "image_bytes", "sentences",
          "sentence_occurrences", "word_unigrams", "image_embeddings", "sentence_embeddings",
          "text_centroids", "text_centroid_cells", "sentence_clusters", "retrievals", "captions", "tag_vocab",
          "tags", "synthetic_texts", "pairs", "image_centroids", "image_centroid_cells", "image_clusters",
          "subsets")


def versions(ctx) -> dict[str, int]:
    from etl import tables

    return {t: tables.version(ctx.spark, ctx.table(t)) for t in TABLES}


def assert_export_round_trips(ctx, out) -> None:
    """The export read back with pandas and webdataset equals the subset's pairs."""
    import pandas as pd
    import webdataset as wds

    expected = (ctx.read("pairs").join(ctx.read("subsets").where("subset = 'cap-8'"), "image_id", "left_semi")
                .toPandas().sort_values("image_id").reset_index(drop=True))
    release = pd.concat(pd.read_parquet(p) for p in sorted((out / "data").glob("part-*.parquet")))
    assert list(release.columns) == ["raw_image_url", "text1", "text2", "text3", "syn_text"]
    extras = pd.concat(pd.read_parquet(p) for p in sorted((out / "extras").glob("part-*.parquet")))
    got = pd.concat([extras[["image_id"]].reset_index(drop=True), release.reset_index(drop=True)], axis=1)
    assert got["image_id"].tolist() == expected["image_id"].tolist()
    assert got["text1"].tolist() == expected["text1"].tolist() and got["syn_text"].tolist() == expected["syn_text"].tolist()
    samples = list(wds.WebDataset([str(p) for p in sorted((out / "webdataset").glob("*.tar"))], shardshuffle=False))
    assert len(samples) == len(expected) and all(s["__key__"].isdigit() and len(s["__key__"]) == 9 for s in samples)
    by_id = expected.set_index("image_id")
    for s in samples:
        meta = json.loads(s["json"])
        assert s["txt"].decode() == (by_id.loc[meta["image_id"], "text1"] or "")
        assert s["jpg"][:2] == b"\xff\xd8"
    manifest = json.loads((out / "manifest.json").read_text())
    card = (out / "README.md").read_text()
    assert manifest["counts"]["samples"] == len(expected) and card.startswith("---")
    # the card says what stood in for the paper's models: the tiny CLIP, the tiny LM where a kept
    # synthetic text of it was exported, no captioner
    warning = card.split("\n\n## ", 1)[0]
    assert "[!WARNING]" in warning and "stands in for the paper's EVA02-E-14-plus" in warning
    llm = set(expected["synthetic_model"].dropna())
    assert ("in place of the paper's LLaMA-3-8B" in warning) == bool(llm) and "No captioner ran" in warning


def assert_report_renders(ctx, out) -> None:
    """`realsyn report` over these tables: every section drawn, every image present in Chromium."""
    import chromium
    from etl.report import render_report
    from etl.report_data import collect

    data = collect(ctx.spark, ctx.cfg)
    page = render_report(data, out)
    html = page.read_text()
    assert "Not available yet" not in html  # every section drawn from these tables
    browser = chromium.find_chromium()
    if browser is None:
        assert not os.environ.get("CI"), "no headless Chromium in CI: `make test` should have installed it"
        return  # tests/test_report.py says why the browser checks are skipped
    res = chromium.load_page(page, binary=browser)
    assert res.errors == [] and res.failed == []
    assert len(res.images) >= len(data.gallery) > 0
    assert all(i["complete"] and i["width"] > 0 for i in res.images)


def run_notebook(ctx):
    """notebooks/explore.ipynb executed top to bottom by nbclient in its own kernel (its own Spark
    session over the test warehouse's table folders), parameters from the environment, started in
    notebooks/ as Jupyter starts it."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(PROJECT / "notebooks" / "explore.ipynb", as_version=4)
    overrides = (f"catalog.database={ctx.cfg.catalog.database} spark.warehouse_dir={ctx.cfg.spark.warehouse_dir} "
                 "spark.master=local[1] spark.conf.spark.driver.memory=2g")
    os.environ["REALSYN_SET"] = overrides
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", startup_timeout=120,
                       resources={"metadata": {"path": str(PROJECT / "notebooks")}}).execute()
    finally:
        os.environ.pop("REALSYN_SET")
    return nb


def notebook_text(nb) -> str:
    return "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                     for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []))


def test_the_notebook_runs_on_a_warehouse_with_empty_and_missing_tables(stage_ctx):
    """As after a rollback (retrievals emptied) or before a stage ran (no images, runs, subsets):
    every cell says so instead of raising."""
    ctx = stage_ctx()
    ctx.spark.sql(f"CREATE TABLE {ctx.table('retrievals')} (image_id string, rank int, score float, "
                  "sentence_id string, centroid_version int) USING delta")
    ctx.spark.sql(f"CREATE TABLE {ctx.table('sentences')} (sentence_id string, text string, drop_reason string) "
                  "USING delta")
    text = notebook_text(run_notebook(ctx))
    assert f"database {ctx.cfg.catalog.database}: 2 tables" in text
    assert "no table runs yet" in text and "no table images yet" in text and "no table subsets yet" in text
    assert "no retrieval yet" in text


def test_whole_pipeline_then_rerun_changes_nothing(sample_run, tmp_path):
    ctx, results, out = sample_run.ctx, sample_run.results, sample_run.export_dir
    assert list(results) == list(PIPELINE)

    count = lambda sql: ctx.spark.sql(sql.format(db=ctx.cfg.catalog.database)).collect()[0][0]  # noqa: E731
    assert count("SELECT count(*) FROM {db}.documents") == len(BATCH_1) + len(BATCH_2)
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
    # Tags on the tiny (pretrained-from-file) CLIP; captions none (no weights offline); texts from the LM.
    assert count("SELECT count(*) FROM {db}.tags") == count(
        """SELECT count(*) FROM {db}.images i JOIN {db}.image_embeddings e USING (image_id)
           WHERE i.kept AND e.vector IS NOT NULL""")
    assert count("SELECT count(*) FROM {db}.captions") == 0
    generated = min(ctx.cfg.generate.max_images, count("SELECT count(DISTINCT image_id) FROM {db}.retrievals"))
    assert count("SELECT count(*) FROM {db}.synthetic_texts") == generated > 0
    assert count("SELECT count(*) FROM {db}.synthetic_texts WHERE text IS NOT NULL OR finish_reason = 'error'") == generated
    runs = ctx.read("runs").where("status = 'ok'").select("stage").distinct().count()
    assert runs == len(PIPELINE)

    # pairs: only kept images and kept sentences
    assert count("SELECT count(*) FROM {db}.pairs") > 0
    assert count("""SELECT count(*) FROM {db}.pairs LEFT ANTI JOIN
                    (SELECT image_id FROM {db}.images WHERE kept) USING (image_id)""") == 0
    assert count("""SELECT count(*) FROM (SELECT explode(sentence_ids) AS sentence_id FROM {db}.pairs) LEFT ANTI JOIN
                    (SELECT sentence_id FROM {db}.sentences WHERE kept) USING (sentence_id)""") == 0
    assert_export_round_trips(ctx, out)
    assert_report_renders(ctx, tmp_path / "report")

    before = versions(ctx)
    again = run_stages(ctx.spark, ctx.cfg)
    assert versions(ctx) == before, "a second run on the same input must commit nothing"
    assert again["ingest"].metrics["inserted_documents"] == 0
    assert again["export"].metrics["files_written"] == 0 and again["export"].metrics["files_unchanged"] > 0

    notebook = run_notebook(ctx)
    text = notebook_text(notebook)
    assert f"database {ctx.cfg.catalog.database}:" in text and "retrieve" in text and "cap-8" in text
    assert sum("image/png" in o.get("data", {}) for cell in notebook.cells for o in cell.get("outputs", [])) >= 3
