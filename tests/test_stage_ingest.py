"""ingest on a real local Spark + Delta: every reader on real files, idempotency, quarantine, runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_paths import PROJECT, SHARED_DATA, TEST_DATA, requires_shared
from lock_helpers import hold_in_child
from etl import tables
from etl.runner import run_stages
from udfs import ingest as I

# Bundled real pages (tests/data/README.md); the full sets in ../shared/data are optional extras.
RECIPES = TEST_DATA / "recipes"
RECIPE_SETS = [pytest.param(RECIPES, 23, id="bundled"),
               pytest.param(SHARED_DATA / "recipes", 410, id="shared", marks=requires_shared)]
MMC4_SETS = [pytest.param(TEST_DATA / "mmc4_docs" / "docs.jsonl", id="bundled"),
             pytest.param(SHARED_DATA / "mmc4_docs" / "docs.jsonl", id="shared", marks=requires_shared)]


def count(ctx, table, where="true"):
    return ctx.spark.sql(f"SELECT count(*) AS n FROM {ctx.table(table)} WHERE {where}").collect()[0]["n"]


@pytest.fixture(scope="module")
def obelics_parquet(tmp_path_factory) -> Path:
    """A real OBELICS-shaped parquet built from 20 recipe pages, inline bytes included."""
    sys.path.insert(0, str(PROJECT / "tools"))
    from build_sample import convert

    lines = (RECIPES / "docs.jsonl").read_text().splitlines()[:20]
    rows = [convert(json.loads(line), RECIPES) for line in lines]
    path = tmp_path_factory.mktemp("obelics") / "part-0.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("recipes, n_docs", RECIPE_SETS)
def test_recipes_jsonl_reader_and_missing_files(stage_ctx, recipes, n_docs):
    ctx = stage_ctx(ingest={"format": "interleaved_jsonl", "paths": [str(recipes / "docs.jsonl")]})
    result = run_stages(ctx.spark, ctx.cfg, ["ingest"])["ingest"]
    docs = [json.loads(line) for line in (recipes / "docs.jsonl").open()]
    present = sum(1 for d in docs for b in d["blocks"] if b["type"] == "image" and (recipes / b["path"]).is_file())
    missing = sum(1 for d in docs for b in d["blocks"] if b["type"] == "image" and not (recipes / b["path"]).is_file())
    assert count(ctx, "documents") == len(docs) == n_docs
    assert count(ctx, "doc_images") == present
    assert count(ctx, "doc_images", "bytes IS NULL") == 0
    assert count(ctx, "quarantine", f"reason = '{I.MISSING_FILE}'") == missing > 0
    assert result.drops == {I.MISSING_FILE: missing}


@pytest.mark.parametrize("mmc4", MMC4_SETS)
def test_mmc4_reader(stage_ctx, mmc4):
    ctx = stage_ctx(ingest={"format": "mmc4", "paths": [str(mmc4)]})
    run_stages(ctx.spark, ctx.cfg, ["ingest"])
    docs = [json.loads(line) for line in mmc4.open()]
    assert count(ctx, "documents") == len({d["url"] for d in docs})
    urls = [i["raw_url"] for d in docs for i in d["image_info"]]
    assert count(ctx, "doc_images") == sum(map(I._is_web_url, urls))
    assert count(ctx, "quarantine", f"reason = '{I.BAD_URL}'") == len(urls) - sum(map(I._is_web_url, urls))
    assert count(ctx, "doc_images", "url IS NULL OR bytes IS NOT NULL") == 0  # URL-only: fetch's job


def test_obelics_reader_is_idempotent_and_logs_runs(stage_ctx, obelics_parquet):
    ctx = stage_ctx(ingest={"format": "obelics", "paths": [str(obelics_parquet)]})
    first = run_stages(ctx.spark, ctx.cfg, ["ingest"])["ingest"]
    sizes = {t: count(ctx, t) for t in ("documents", "doc_texts", "doc_images")}
    assert sizes["documents"] == 20 and sizes["doc_images"] > 0
    assert count(ctx, "doc_images", "bytes IS NULL") == 0
    assert first.metrics["inserted_documents"] == 20

    second = run_stages(ctx.spark, ctx.cfg, ["ingest"])["ingest"]
    assert {t: count(ctx, t) for t in sizes} == sizes
    assert all(second.metrics[f"inserted_{t}"] == 0 for t in sizes)

    runs = ctx.spark.table(ctx.table("runs")).orderBy("started_at").collect()
    assert [r["stage"] for r in runs] == ["ingest", "ingest"] and {r["status"] for r in runs} == {"ok"}
    assert runs[0]["rows_in"] == 20 and runs[0]["wall_s"] > 0
    assert runs[0]["config_hash"] == ctx.cfg.hash()
    assert runs[1]["output_versions"]["documents"] >= runs[0]["output_versions"]["documents"]
    assert runs[0]["batch_id"] != runs[1]["batch_id"]
    # Rows keep the batch that first brought them.
    assert {r["batch_id"] for r in ctx.read("documents").select("batch_id").distinct().collect()} == {runs[0]["batch_id"]}


def test_bad_input_lands_in_quarantine_with_reasons(stage_ctx, tmp_path):
    ok = {"url": "https://ok.org/page", "blocks": [{"type": "text", "text": "Whisk the eggs until pale."}]}
    lines = [
        json.dumps(ok).encode(),
        b'{"url": "https://x.org", "blocks": [',                                        # bad_json
        b'"just a string"',                                                             # not_an_object
        json.dumps({"url": "https://x.org/2"}).encode(),                                # missing_field
        json.dumps({"blocks": "not a list"}).encode(),                                  # wrong_type
        json.dumps({"blocks": [{"type": "text", "text": 42}]}).encode(),               # wrong_type
        b'{"url": "https://x.org/3", "blocks": [{"type": "text", "text": "caf\xe9 au lait"}]}',  # non_utf8
        json.dumps({"url": "https://x.org/4", "blocks": []}).encode(),                  # empty_doc
        json.dumps({"url": "https://x.org/5", "blocks": [{"type": "text", "text": "Add salt."},
                                                         {"type": "image", "path": "gone.webp"}]}).encode(),  # missing_file
        json.dumps({"url": "https://x.org/6", "blocks": [{"type": "text", "text": "y" * 5000}]}).encode(),  # too large
    ]
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    mmc4 = tmp_path / "mmc4_bad"
    mmc4.mkdir()
    (mmc4 / "a.jsonl").write_text(json.dumps({"url": "https://m.org", "text_list": ["One sentence here."],
                                              "image_info": [{"raw_url": "https://m.org/i.jpg", "matched_text_index": 3}]}) + "\n")

    ctx = stage_ctx(ingest={"format": "interleaved_jsonl", "paths": [str(src)], "max_record_bytes": 4000})
    result = run_stages(ctx.spark, ctx.cfg, ["ingest"])["ingest"]
    reasons = {r["reason"]: r["n"] for r in ctx.spark.sql(
        f"SELECT reason, count(*) AS n FROM {ctx.table('quarantine')} GROUP BY reason").collect()}
    assert reasons == {I.BAD_JSON: 1, I.NOT_AN_OBJECT: 1, I.MISSING_FIELD: 1, I.WRONG_TYPE: 2, I.NON_UTF8: 1,
                       I.EMPTY_DOC: 1, I.MISSING_FILE: 1, I.RECORD_TOO_LARGE: 1}
    assert result.drops == reasons
    assert count(ctx, "documents") == 2  # the good page and the one that only lost its image
    row = ctx.spark.sql(f"SELECT * FROM {ctx.table('quarantine')} WHERE reason = 'bad_json'").collect()[0]
    assert row["source"] == str(src) and row["record_no"] == 1 and row["raw"].startswith('{"url"')
    assert len(ctx.spark.sql(f"SELECT raw FROM {ctx.table('quarantine')} WHERE reason = 'record_too_large'")
               .collect()[0]["raw"]) == ctx.cfg.ingest.quarantine_raw_chars

    # MMC4 bad reference and an unreadable parquet file, in the same database.
    run_stages(ctx.spark, ctx.cfg.model_copy(update={"ingest": ctx.cfg.ingest.model_copy(
        update={"format": "mmc4", "paths": [str(mmc4)]})}), ["ingest"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.parquet").write_bytes(b"PAR1 definitely not parquet")
    run_stages(ctx.spark, ctx.cfg.model_copy(update={"ingest": ctx.cfg.ingest.model_copy(
        update={"format": "obelics", "paths": [str(broken)]})}), ["ingest"])
    reasons = {r["reason"] for r in ctx.read("quarantine").select("reason").distinct().collect()}
    assert {I.BAD_REFERENCE, I.UNREADABLE_FILE} <= reasons
    assert len(reasons) >= 10


def test_cli_run_then_sql_from_a_new_process(obelics_parquet, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    base = [sys.executable, "-m", "etl.cli"]
    common = ["--set", f"spark.warehouse_dir={tmp_path / 'wh'}", "--set", f"ingest.paths=[{obelics_parquet}]",
              "--set", "spark.master=local[2]", "--set", "spark.conf.spark.databricks.delta.snapshotPartitions=1"]
    run = subprocess.run(base + ["run", "--stages", "ingest"] + common, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "[ingest " in run.stderr and "in=20 out=20" in run.stderr
    # A reader while a run holds the warehouse: it reads the Delta folders, no metastore needed.
    holder = hold_in_child(tmp_path / "wh", 120)
    try:
        sql = subprocess.run(base + ["sql", "SELECT count(*) AS n FROM realsyn.documents"] + common,
                             env=env, capture_output=True, text=True, cwd=tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert sql.returncode == 0, sql.stderr[-3000:]
    assert "|20|" in sql.stdout.replace(" ", "")
    assert "run child" in sql.stderr and "reading the Delta table folders directly" in sql.stderr
    status = subprocess.run(base + ["status"] + common, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert status.returncode == 0 and "ingest" in status.stdout and "documents" in status.stdout
    bad = subprocess.run(base + ["run", "--set", "retrieval.k=0"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "retrieval.k" in bad.stderr


# --- versions, processed files, record numbers ----------------------------------------------------

def _page(url: str, *texts: str) -> str:
    return json.dumps({"url": url, "blocks": [{"type": "text", "text": t} for t in texts]}) + "\n"


def _slots(ctx, url_like="%"):
    return sorted((r["position"], r["text"]) for r in ctx.spark.sql(
        f"SELECT t.position, t.text FROM {ctx.table('doc_texts')} t JOIN {ctx.table('documents')} d "
        f"USING (doc_id) WHERE d.url LIKE '{url_like}'").collect())


def test_a_recrawled_document_replaces_its_old_version_whole(stage_ctx, tmp_path):
    first, second = tmp_path / "crawl1", tmp_path / "crawl2"
    first.mkdir(), second.mkdir()
    (first / "a.jsonl").write_text(_page("https://r.org/p", "Old one.", "Old two.", "Old three.")
                                   + _page("https://r.org/q", "Stays as it is."))
    ctx = stage_ctx(ingest={"format": "interleaved_jsonl", "paths": [str(first)]})
    run_stages(ctx.spark, ctx.cfg, ["ingest"])
    # The re-crawl is shorter and changed; within one run the record read last wins.
    (second / "b.jsonl").write_text(_page("https://r.org/p", "Never kept.") + _page("https://r.org/p", "New one.", "Old two."))
    cfg2 = ctx.cfg.model_copy(update={"ingest": ctx.cfg.ingest.model_copy(update={"paths": [str(second)]})})
    result = run_stages(ctx.spark, cfg2, ["ingest"])["ingest"]
    assert _slots(ctx, "%/p") == [(0, "New one."), (1, "Old two.")]  # position 2 of the old version is gone
    assert _slots(ctx, "%/q") == [(0, "Stays as it is.")]
    assert count(ctx, "documents") == 2 and count(ctx, "documents", "n_texts = 2 AND url LIKE '%/p'") == 1
    assert result.drops == {"superseded_in_run": 1} and result.rows_in == 2 and result.rows_out == 1
    assert result.metrics["replaced_doc_texts"] == 2  # position 0 rewritten, position 2 deleted
    # The same re-crawl again changes nothing (its file is not even read) and commits nothing.
    before = {t: tables.version(ctx.spark, ctx.table(t)) for t in ("documents", "doc_texts", "doc_images")}
    again = run_stages(ctx.spark, cfg2, ["ingest"])["ingest"]
    assert again.rows_in == 0 and again.metrics["files_recorded"] == 0
    assert {t: tables.version(ctx.spark, ctx.table(t)) for t in before} == before


def test_ingested_files_are_skipped_until_they_change(stage_ctx, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_text(_page("https://f.org/1", "First page here."))
    ctx = stage_ctx(ingest={"format": "interleaved_jsonl", "paths": [str(src)]})
    assert run_stages(ctx.spark, ctx.cfg, ["ingest"])["ingest"].rows_in == 1
    os.utime(src / "a.jsonl", ns=(1, 1))  # touched, same bytes: hashed, not parsed
    (src / "b.jsonl").write_text(_page("https://f.org/2", "Second page here."))
    second = run_stages(ctx.spark, ctx.cfg, ["ingest"])["ingest"]
    assert second.rows_in == 1 and second.metrics["files_recorded"] == 2  # b read; a only re-recorded with its new mtime
    (src / "a.jsonl").write_text(_page("https://f.org/1", "First page, edited."))
    third = run_stages(ctx.spark, ctx.cfg, ["ingest"])["ingest"]
    assert third.rows_in == 1 and _slots(ctx, "%/1") == [(0, "First page, edited.")]
    assert count(ctx, "ingested_files") == 3  # a twice (two contents), b once


def test_record_numbers_of_a_folder_read_by_spark_do_not_move_when_it_grows(stage_ctx, tmp_path):
    src = tmp_path / "remote"
    src.mkdir()
    (src / "b.jsonl").write_text("not json\n" + json.dumps({"url": "https://m.org/x", "text_list": []}) + "\n{")
    ctx = stage_ctx(ingest={"format": "mmc4", "paths": [f"file://{src}"]})  # a URI: Spark's reader
    run_stages(ctx.spark, ctx.cfg, ["ingest"])
    before = {(r["source"], r["record_no"], r["reason"]) for r in ctx.read("quarantine").collect()}
    (src / "a.jsonl").write_text("[1]\n")  # sorts first
    run_stages(ctx.spark, ctx.cfg, ["ingest"])
    after = {(r["source"], r["record_no"], r["reason"]) for r in ctx.read("quarantine").collect()}
    assert {(Path(s).name, n, r) for s, n, r in before} == {("b.jsonl", 0, I.BAD_JSON), ("b.jsonl", 1, I.EMPTY_DOC),
                                                            ("b.jsonl", 2, I.BAD_JSON)}
    assert after - before == {(s, 0, I.NOT_AN_OBJECT) for s, *_ in after if s.endswith("a.jsonl")}
    assert len(after) == 4
