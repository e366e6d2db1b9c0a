"""Exactly-once results: `realsyn run` SIGKILLed at several points of ingest and sentences (between
two tables' MERGEs, midway through a MERGE, between the sentence rows and their occurrences), or
losing the Python worker of sentences' model step, then run again, ends in tables equal cell for
cell to an uninterrupted run's; while a run holds the warehouse a second `realsyn run` is refused at
once naming it; each killed run is recorded `abandoned` by the next, the worker's loss `failed`.

The kills come from the test hooks `etl/tables.py: crash_point` and `etl/gpu.py:
_worker_crash_point` (REALSYN_CRASH_AT). Each killed run is followed by the next kill point's run,
so every run after the first also proves that the one before it is completed: five processes in
all. The uninterrupted run is made in this process, on
the shared session (other shuffle partitions than the CLI's: order must not matter either).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from data_paths import PROJECT
from etl.lock import current_holder
from etl.runner import run_stages

pytestmark = pytest.mark.spark

STAGES = ["ingest", "sentences"]
# When rows arrived, not what they are: left out of the comparison.
WHEN = {"batch_id", "ingested_at", "quarantined_at"}


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> Path:
    table = pq.read_table(PROJECT / "sample" / "recipes.obelics.parquet").slice(0, 6)
    path = tmp_path_factory.mktemp("kill") / "pages.parquet"
    pq.write_table(table, path)
    return path


def settings(pages: Path, lm: str) -> dict:
    return {"ingest": {"format": "obelics", "paths": [str(pages)]},
            "models": {"perplexity_lm": {"source": lm, "precision": "fp32", "batch_size": 4,
                                         "min_perplexity": 1.0, "max_perplexity": 1e9}}}


def checksums(spark, frames: dict) -> dict[str, str]:
    """table -> SHA-256 of its rows (sorted, as JSON), the WHEN columns left out. Unigram counts are
    summed over batches (a killed run's words may be keyed by another batch than the clean run's)."""
    out = {}
    for name, df in frames.items():
        df = df.drop(*WHEN)
        if name == "word_unigrams":
            df = df.groupBy("word").agg(F.sum("count").alias("count"))
        rows = sorted(r[0] for r in df.select(F.to_json(F.struct(*sorted(df.columns)))).collect())
        out[name] = hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16] + f" ({len(rows)} rows)"
    return out


def _cli(warehouse: Path, pages: Path, lm: str, crash: dict[str, str] | None = None) -> subprocess.Popen:
    flat = {"spark.warehouse_dir": str(warehouse), "spark.master": "local[2]",
            "spark.conf.spark.databricks.delta.snapshotPartitions": "1", "ingest.format": "obelics",
            "ingest.paths": f"[{pages}]", "models.perplexity_lm.source": lm,
            "models.perplexity_lm.precision": "fp32", "models.perplexity_lm.batch_size": "4",
            "models.perplexity_lm.min_perplexity": "1.0", "models.perplexity_lm.max_perplexity": "1000000000.0"}
    sets = [a for k, v in flat.items() for a in ("--set", f"{k}={v}")]
    env = {**os.environ, "PYTHONPATH": str(PROJECT), **(crash or {})}
    return subprocess.Popen([sys.executable, "-m", "etl.cli", "run", "--stages", ",".join(STAGES), *sets],
                            env=env, cwd=warehouse.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _second_run_is_refused(warehouse: Path, pages: Path, lm: str) -> None:
    deadline = time.monotonic() + 60
    while current_holder(warehouse) is None:
        assert time.monotonic() < deadline, "the first run never took the warehouse lock"
        time.sleep(0.2)
    second = _cli(warehouse, pages, lm)
    _, err = second.communicate(timeout=60)
    assert second.returncode == 4 and "is in use by `realsyn run`" in err, err


def test_killed_runs_rerun_to_the_same_tables(stage_ctx, pages, tiny_lm, tmp_path):
    ctx = stage_ctx(**settings(pages, tiny_lm))
    run_stages(ctx.spark, ctx.cfg, STAGES)
    names = sorted(t.name for t in ctx.spark.catalog.listTables(ctx.cfg.catalog.database) if t.name != "runs")
    clean = checksums(ctx.spark, {t: ctx.read(t) for t in names})

    warehouse = tmp_path / "wh"
    kills = [
        {"REALSYN_CRASH_AT": "merge:doc_texts"},  # documents committed, their slots not
        {"REALSYN_CRASH_AT": "merge:doc_images", "REALSYN_CRASH_AFTER_S": "1.5"},  # midway, after texts
        {"REALSYN_CRASH_AT": "worker:sentences"},  # the perplexity udf's Python worker: the stage fails
        {"REALSYN_CRASH_AT": "merge:sentence_occurrences"},  # sentences committed, occurrences not
    ]
    for i, crash in enumerate(kills):
        run = _cli(warehouse, pages, tiny_lm, crash)
        if i == 0:
            _second_run_is_refused(warehouse, pages, tiny_lm)
        _, err = run.communicate(timeout=300)
        if crash["REALSYN_CRASH_AT"].startswith("worker:"):
            assert run.returncode == 1 and "stage sentences failed" in err, (crash, err[-3000:])
        else:
            assert run.returncode == -signal.SIGKILL, (crash, err[-3000:])
    last = _cli(warehouse, pages, tiny_lm)
    _, err = last.communicate(timeout=300)
    assert last.returncode == 0, err[-3000:]

    folder = warehouse / "tables" / "realsyn.db"
    read = {t: ctx.spark.read.format("delta").load(str(folder / t)) for t in names}
    assert checksums(ctx.spark, read) == clean
    runs = ctx.spark.read.format("delta").load(str(folder / "runs"))
    assert runs.where("status = 'abandoned'").count() == len(kills) - 1
    assert [r["stage"] for r in runs.where("status = 'failed'").collect()] == ["sentences"]
    assert {r["stage"] for r in runs.where("status = 'ok'").collect()} == set(STAGES)


def test_a_table_left_half_created_by_a_kill_is_resolved(stage_ctx, tmp_path):
    """What a kill during a table's creation can leave at its managed location, without the catalog
    entry: data files with no Delta log (removed: no reader would see them), or a committed log
    (registered where it is: nothing lost). Either way the next write just works."""
    ctx = stage_ctx()
    spark = ctx.spark
    database = ctx.cfg.catalog.database
    location = spark.sql(f"DESCRIBE DATABASE {database}").where("info_name = 'Location'").first()["info_value"]
    folder = Path(location.removeprefix("file:"))
    rows = spark.createDataFrame([(1, "a"), (2, "b")], "id int, v string")

    debris = folder / "no_log"
    debris.mkdir(parents=True)
    (debris / "part-00000.parquet").write_bytes(b"not committed")
    assert ctx.merge_new(rows, "no_log", ["id"]) == 2
    assert sorted(ctx.read("no_log").collect()) == sorted(rows.collect())

    elsewhere = tmp_path / "committed"
    rows.limit(1).write.format("delta").save(str(elsewhere))
    shutil.copytree(elsewhere, folder / "committed")
    assert not ctx.exists("committed")
    assert ctx.merge_new(rows, "committed", ["id"]) == 1
    assert sorted(ctx.read("committed").collect()) == sorted(rows.collect())
