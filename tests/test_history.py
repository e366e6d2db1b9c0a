"""Time travel on real local Spark + Delta: a table's history names its runs; a rollback to a run
restores every table (tables created later are emptied), is recorded as a run, and the runs after
it can be redone (the processed-files record travels back too)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from etl.cli import cmd_rollback
from etl.context import StageContext, StageResult
from etl.history import ROLLBACK, UnknownRun, history, rollback
from etl.runner import run_stages
from etl.stage import Registry, stage

pytestmark = pytest.mark.spark


@stage(reads=("documents",), writes=("doc_count",), config=())
def doc_count(ctx: StageContext) -> StageResult:
    rows = ctx.read("documents").groupBy().count()
    return StageResult(rows_out=ctx.upsert(rows.selectExpr("0 AS k", "count"), "doc_count", ["k"]))


def _page(url: str, text: str) -> str:
    return json.dumps({"url": url, "blocks": [{"type": "text", "text": text}]}) + "\n"


def _contents(ctx) -> dict[str, list]:
    return {t: sorted(map(str, ctx.read(t).drop("batch_id", "ingested_at", "quarantined_at").collect()))
            for t in ("documents", "doc_texts", "ingested_files")}


def test_rollback_restores_every_table_to_its_version_after_a_run(stage_ctx, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_text(_page("https://h.org/1", "The first page."))
    ctx = stage_ctx(ingest={"format": "interleaved_jsonl", "paths": [str(src)]})
    run_stages(ctx.spark, ctx.cfg, ["ingest"])
    first = ctx.read("runs").first()["run_id"]
    after_first = _contents(ctx)

    (src / "b.jsonl").write_text(_page("https://h.org/2", "The second page."))
    run_stages(ctx.spark, ctx.cfg, ["ingest"])
    run_stages(ctx.spark, ctx.cfg, registry=Registry([doc_count]))
    assert ctx.read("documents").count() == 2 and ctx.read("doc_count").first()["count"] == 2

    # history: one line per commit, each with the run and stage that made it
    lines = history(ctx.spark, ctx.cfg, "documents")
    assert [h["stage"] for h in lines][:2] == ["ingest", "ingest"] and lines[-1]["run_id"] == first

    done = rollback(ctx.spark, ctx.cfg, first)
    assert _contents(ctx) == after_first
    assert done["doc_count"].startswith("emptied") and ctx.read("doc_count").count() == 0
    assert done["ingested_files"].startswith("restored")
    last = ctx.read("runs").orderBy("started_at", ascending=False).first()
    assert last["stage"] == ROLLBACK and last["status"] == "ok" and last["notes"]["to_run"] == first
    assert history(ctx.spark, ctx.cfg, "documents")[0]["stage"] == ROLLBACK

    # b.jsonl is new again to ingest; rolling back to the run after the rollback is a no-op
    again = run_stages(ctx.spark, ctx.cfg, ["ingest"])["ingest"]
    assert again.rows_in == 1 and ctx.read("documents").count() == 2
    with pytest.raises(UnknownRun):
        rollback(ctx.spark, ctx.cfg, "no-such-run")

    # `realsyn rollback` says that the export folder is not rolled back, and how to write it again
    cmd_rollback(ctx.spark, ctx.cfg, SimpleNamespace(to_run=first), None)
    said = capsys.readouterr().out.splitlines()
    assert said[-1] == (f"The export folder ({ctx.cfg.export.out_dir}) is not rolled back: `realsyn run --stages "
                        "export` writes it again from the rolled-back tables."), said


def test_history_counts_the_rows_a_merge_changed_not_the_rows_it_copied(stage_ctx):
    """A MERGE of 2 new and 1 changed row into a 4-row table rewrites its one file (4 + 2 rows
    written out), but changed 3 rows; a DELETE of 1 row changed 1; the first write wrote 4."""
    ctx = stage_ctx()
    name = ctx.table("merged")
    ctx.spark.createDataFrame([(i, "a") for i in range(4)], "k int, v string").coalesce(1) \
        .write.format("delta").saveAsTable(name)
    ctx.spark.createDataFrame([(3, "b"), (4, "b"), (5, "b")], "k int, v string").createOrReplaceTempView("merge_src")
    try:
        ctx.spark.sql(f"MERGE INTO {name} t USING merge_src s ON t.k = s.k "
                      "WHEN MATCHED THEN UPDATE SET * WHEN NOT MATCHED THEN INSERT *")
    finally:  # a temporary view is the session's: other tests list it among their tables
        ctx.spark.catalog.dropTempView("merge_src")
    ctx.spark.sql(f"DELETE FROM {name} WHERE k = 0")
    rows = {h["operation"]: h["rows"] for h in history(ctx.spark, ctx.cfg, "merged")}
    assert rows == {"CREATE TABLE AS SELECT": 4, "MERGE": 3, "DELETE": 1}, rows
