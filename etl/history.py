"""Time travel over the tables: `realsyn status --history TABLE` and `realsyn rollback --to-run RUN_ID`.

Every commit carries the run id of the stage run that made it (Delta commit user metadata, set by
the runner), so a table's Delta history reads as a list of runs. A rollback restores every table
of the database except `runs` (the record of what happened, rollbacks included) to its version as
of the end of the given run, with Delta `RESTORE`, and is itself recorded in `runs` as a run of the
stage `rollback`; its commits carry its run id like any stage's. It can be undone by rolling back
to a later run.

"As of the end of the run": the last commit of each table made before the next run started (runs
hold the warehouse one at a time, etl/lock.py, so no other writer's commit falls between); a table
created after the run is emptied (a `DELETE`, itself a version to travel back from).
"""
from __future__ import annotations

import uuid
from datetime import datetime, timezone

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from etl import tables
from etl.config import Config

ROLLBACK = "rollback"


class UnknownRun(ValueError):
    pass


def history(spark: SparkSession, cfg: Config, table: str, limit: int = 50) -> list[dict]:
    """The table's Delta versions, newest first: version, time, operation, rows written, and the
    run (run id, stage, status) that made each commit."""
    name = tables.qualified(cfg.catalog.database, table)
    if not tables.exists(spark, name):
        raise UnknownRun(f"no table {name}")
    commits = spark.sql(f"DESCRIBE HISTORY {name} LIMIT {int(limit)}").collect()
    runs = _runs(spark, cfg)
    out = []
    for c in commits:
        run = runs.get(c["userMetadata"] or "", {})
        out.append({"version": c["version"], "time": c["timestamp"], "operation": c["operation"],
                    "rows": rows_changed(c["operationMetrics"] or {}), "run_id": c["userMetadata"] or "", "stage": run.get("stage", ""),
                    "status": run.get("status", "")})
    return out


def rows_changed(metrics: dict[str, str]) -> int:
    """The rows a commit inserted, updated or deleted, from its Delta operation metrics. A MERGE,
    DELETE or UPDATE also counts in `numOutputRows` the rows it copied unchanged into rewritten
    files, so that is used only for plain writes."""
    def n(*keys: str) -> int:
        return sum(int(metrics.get(k) or 0) for k in keys)

    if any(k.startswith("numTargetRows") for k in metrics):  # MERGE
        return n("numTargetRowsInserted", "numTargetRowsUpdated", "numTargetRowsDeleted")
    if "numDeletedRows" in metrics or "numUpdatedRows" in metrics:  # DELETE, UPDATE
        return n("numDeletedRows", "numUpdatedRows")
    return n("numOutputRows")  # WRITE, CREATE TABLE AS SELECT, REPLACE


def _runs(spark: SparkSession, cfg: Config) -> dict[str, dict]:
    runs = tables.qualified(cfg.catalog.database, "runs")
    if not tables.exists(spark, runs):
        return {}
    return {r["run_id"]: r.asDict() for r in spark.table(runs).select(
        "run_id", "stage", "status", "started_at", "wall_s").collect()}


def versions_after(spark: SparkSession, cfg: Config, run_id: str) -> dict[str, int | None]:
    """table -> its version as of the end of `run_id` (None: the table did not exist yet)."""
    runs = tables.qualified(cfg.catalog.database, "runs")
    if not tables.exists(spark, runs):
        raise UnknownRun("no run has been recorded in this warehouse")
    # Compared as epoch milliseconds: collected timestamps would be in the session's time zone.
    target = (spark.table(runs).where(F.col("run_id") == run_id)
              .select(F.unix_millis("started_at").alias("t"), "wall_s").first())
    if target is None:
        raise UnknownRun(f"no run {run_id!r} in `runs` (see `realsyn status`)")
    later = (spark.table(runs).select(F.unix_millis("started_at").alias("t")).where(F.col("t") > target["t"])
             .agg(F.min("t")).first()[0])
    # A commit of the run itself ends before its `runs` row; the next run's start bounds them all.
    bound = later or target["t"] + int(((target["wall_s"] or 0) + 1) * 1000)
    out = {}
    for t in spark.catalog.listTables(cfg.catalog.database):
        if t.name == "runs" or t.isTemporary:
            continue
        name = tables.qualified(cfg.catalog.database, t.name)
        row = (spark.sql(f"DESCRIBE HISTORY {name}").where(F.unix_millis("timestamp") < bound)
               .agg(F.max("version")).first())
        out[t.name] = None if row[0] is None else int(row[0])
    return out


def rollback(spark: SparkSession, cfg: Config, to_run: str) -> dict[str, str]:
    """Restore every table to its version after `to_run`; recorded in `runs`. Returns
    table -> what was done ("restored to version N", "emptied", "unchanged at version N")."""
    from etl.runner import new_batch_id, record_run

    targets = versions_after(spark, cfg, to_run)
    run_id = uuid.uuid4().hex[:12]
    started = datetime.now(timezone.utc)
    done, before = {}, {}
    spark.conf.set("spark.databricks.delta.commitInfo.userMetadata", run_id)
    try:
        for table, version in sorted(targets.items()):
            name = tables.qualified(cfg.catalog.database, table)
            before[table] = tables.version(spark, name)
            if version == before[table]:
                done[table] = f"unchanged at version {version}"
            elif version is None:
                spark.sql(f"DELETE FROM {name}")
                done[table] = "emptied (created after that run)"
            else:
                spark.sql(f"RESTORE TABLE {name} TO VERSION AS OF {version}")
                done[table] = f"restored to version {version}"
    finally:
        spark.conf.unset("spark.databricks.delta.commitInfo.userMetadata")
        after = {t: tables.version(spark, tables.qualified(cfg.catalog.database, t)) for t in done}
        record_run(spark, cfg, run_id=run_id, stage=ROLLBACK, batch_id=new_batch_id(), started=started,
                   status="ok" if len(done) == len(targets) else "failed",
                   input_versions={t: v for t, v in before.items() if v is not None},
                   output_versions={t: v for t, v in after.items() if v is not None},
                   notes={"to_run": to_run, **{t: d for t, d in done.items()}})
    return done
