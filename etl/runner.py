"""Runs the registry's stages in order and records every run in the `runs` Delta table.

Before any Spark work the selection is checked (every table a stage reads is written by an
earlier selected stage or exists already). Each stage's commits carry its run id as Delta commit
user metadata; each run, ok or failed, is one typed `runs` row: counts, drops per reason, metrics,
the input watermarks it consumed, the output versions, its resources and models. The run ends with
one closing summary that repeats every warning a user must not miss.
"""
from __future__ import annotations

import logging
import re
import time
import traceback
import uuid
from collections.abc import Callable
from datetime import datetime, timezone

from pyspark.sql import SparkSession

from etl import tables
from etl.config import Config
from etl.context import StageContext, StageResult
from etl.hints import hint
from etl.lock import Holder
from etl.logs import stage_context
from etl.session import in_background, tag_jobs
from etl.stage import Registry, Stage
from udfs.redact import redact_text

log = logging.getLogger("realsyn")

RUNS_SCHEMA = (
    "run_id string, stage string, batch_id string, status string, config_hash string, "
    "stage_config_hash string, started_at timestamp, wall_s double, rows_in bigint, "
    "rows_out bigint, drops map<string,bigint>, metrics map<string,double>, "
    "watermarks map<string,string>, input_versions map<string,bigint>, "
    "output_versions map<string,bigint>, resources string, models map<string,string>, "
    "warnings array<string>, notes map<string,string>"
)
# An absolute path (or file: URI) in an error text: only its last part is kept.
_PATH = re.compile(r"(?<![\w:/.~-])(?:file:)?(?:/+[^\s/'\"`,;()\[\]]+)+/([^\s/'\"`,;()\[\]]*)")
ERROR_CHARS = 300


def reason_line(e: BaseException) -> str:
    """The one line that says why: an exception's first line, but for an error raised in a Python
    worker (whose first line is only "PythonException:") the worker's own last traceback line, and
    for a Py4J error the JVM exception's first line rather than "An error occurred while calling"."""
    from py4j.protocol import Py4JJavaError

    if isinstance(e, Py4JJavaError):
        try:
            return str(e.java_exception.toString()).strip().splitlines()[0]
        except Exception:  # noqa: BLE001 - a dead JVM cannot render its exception
            pass
    text = "".join(traceback.format_exception_only(e)).strip()
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    if "PythonException" in type(e).__name__ and len(lines) > 1:
        return f"{type(e).__name__} from a Python worker: {lines[-1]}"
    return lines[0] if lines else type(e).__name__


def stored_error(e: BaseException, secret_params) -> str:
    """An exception as `runs` keeps it: its reason line (`reason_line`), credentials redacted,
    absolute paths cut to their last part (they name users and mounts), at most ERROR_CHARS
    characters. The full traceback goes to the log (--verbose), never to a table. A Delta-level fault
    is said as `etl/warehouse.py: delta_fault` says it (the table, the repair); the table a failed
    write was writing is named (`etl/tables.py: merge_into`)."""
    from etl.warehouse import delta_fault

    line = delta_fault(e) or reason_line(e)
    table = next((t for x in _causes(e) if (t := getattr(x, "realsyn_table", None))), None)
    where = f" (writing {table})" if table and table not in line else ""
    text = _PATH.sub(lambda m: f".../{m.group(1)}", redact_text(line, secret_params))
    room = ERROR_CHARS - len(where)
    return (text if len(text) <= room else text[:room - 3] + "...") + where


def _causes(e: BaseException | None):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


class StageFailed(RuntimeError):
    pass


class RunNotRecorded(StageFailed):
    """A stage's `runs` row could not be written. The warehouse lock keeps the holder and `reason`,
    so the next run records this one abandoned with it (and completes what it left: its writes
    are idempotent MERGEs)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class SparkStopped(RunNotRecorded):
    """A stage failed and took the SparkContext (or the JVM) with it: nothing more can be recorded
    in this process."""


def spark_alive(spark: SparkSession) -> bool:
    from etl.session import is_connect

    if is_connect(spark):
        return True  # the server's context: a dead one fails the client's next call by itself
    try:
        return not spark.sparkContext._jsc.sc().isStopped()
    except Exception:  # noqa: BLE001 - a dead JVM answers nothing
        return False


def default_registry() -> Registry:
    from etl.stages import registry

    return registry()


def new_batch_id() -> str:
    return datetime.now(timezone.utc).strftime("b%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6]


def _versions(spark: SparkSession, database: str, names: tuple[str, ...]) -> dict[str, int]:
    # One history read per table, all at once: each is driver-side log work, not cluster work.
    pending = {name: in_background(spark, lambda n=name: tables.version(spark, tables.qualified(database, n)))
               for name in names}
    return {name: v for name, wait in pending.items() if (v := wait()) is not None}


def _record(spark: SparkSession, cfg: Config, row: dict) -> None:
    runs = tables.qualified(cfg.catalog.database, "runs")
    tables.create_if_missing(spark, runs, RUNS_SCHEMA)
    full = {name.split()[0]: None for name in RUNS_SCHEMA.split(", ")} | row
    # mergeSchema: a warehouse made by an older version gains the new columns.
    (spark.createDataFrame([full], schema=RUNS_SCHEMA).write.format("delta").mode("append")
     .option("mergeSchema", "true").saveAsTable(runs))


def record_run(spark: SparkSession, cfg: Config, *, stage: str, batch_id: str, started: datetime,
               **fields) -> None:
    """A `runs` row for work done outside the stage runner (calibration)."""
    wall = (datetime.now(timezone.utc) - started).total_seconds()
    _record(spark, cfg, {"run_id": uuid.uuid4().hex[:12], "stage": stage, "batch_id": batch_id, "status": "ok",
                         "config_hash": cfg.hash(), "started_at": started, "wall_s": wall, "drops": {},
                         "watermarks": {}, "input_versions": {}, "output_versions": {}, "warnings": [],
                         **fields})


def record_abandoned(spark: SparkSession, cfg: Config, holder: Holder) -> None:
    """A `runs` row for a run whose process died without recording its end (see etl/lock.py)."""
    _record(spark, cfg, {
        "run_id": holder.run_id, "stage": holder.stage or "(none)", "batch_id": holder.run_id,
        "status": "abandoned", "drops": {}, "metrics": {}, "watermarks": {}, "input_versions": {},
        "output_versions": {}, "models": {}, "warnings": [],
        "started_at": datetime.strptime(holder.started_at, "%Y-%m-%d %H:%M:%S UTC").replace(tzinfo=timezone.utc),
        "notes": {"error": holder.error or f"the process died during this stage: {holder.describe()}"},
    })
    log.warning("the previous run died without finishing (%s); recorded as abandoned in `runs`. Its "
                "MERGEs are idempotent: this run completes what it left.", holder.describe())


def summary_line(result: StageResult, wall_s: float) -> str:
    drops = ", ".join(f"{k}={v}" for k, v in sorted(result.drops.items())) or "none"
    return f"done in {wall_s:.1f}s: in={result.rows_in} out={result.rows_out} drops: {drops}"


def run_stages(spark: SparkSession, cfg: Config, stages: list[str] | None = None, batch_id: str | None = None,
               on_stage: Callable[[str | None], None] | None = None,
               registry: Registry | None = None) -> dict[str, StageResult]:
    """Run stages in order; each run (ok or failed) is a row in `runs`. Stops at the first failure.
    `on_stage(name)` is told each stage as it starts (the warehouse lock keeps it)."""
    registry = registry or default_registry()
    selected = registry.resolve(stages)
    registry.check_inputs(selected, lambda t: tables.exists(spark, tables.qualified(cfg.catalog.database, t)))
    batch_id = batch_id or new_batch_id()
    results: dict[str, StageResult] = {}
    walls: dict[str, float] = {}
    try:
        for stage in selected:
            if on_stage is not None:
                on_stage(stage.name)
            results[stage.name], walls[stage.name] = run_one(spark, cfg, stage, batch_id)
    finally:
        if len(selected) > 1 or any(r.warnings for r in results.values()):
            closing_summary(results, walls, [s.name for s in selected])
    return results


def run_one(spark: SparkSession, cfg: Config, stage: Stage, batch_id: str) -> tuple[StageResult, float]:
    run_id = uuid.uuid4().hex[:12]
    ctx = StageContext(spark=spark, cfg=cfg, run_id=run_id, batch_id=batch_id, stage=stage)
    tag_jobs(spark, run_id, f"realsyn {stage.name}")
    # Every commit this stage makes carries its run id: MERGE counts and audits find their own.
    spark.conf.set("spark.databricks.delta.commitInfo.userMetadata", run_id)
    dumped = cfg.model_dump(mode="json")
    inputs = _versions(spark, cfg.catalog.database, stage.reads + stage.optional_reads)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    status, error = "ok", None
    try:
        with stage_context(stage.name, run_id):
            log.info("starting (batch %s, %s)", batch_id, ctx.resources_used())
            result = stage.run(ctx)
    except Exception as e:  # recorded, then re-raised: a failed run is still a run
        status, error = "failed", e
        result = StageResult(notes={"error": stored_error(e, cfg.redaction.secret_params)})
    if error is not None and not spark_alive(spark):
        # Spark's own reason, not a secondary error from cleaning up on the dead session.
        raise SparkStopped(f"stage {stage.name} failed (run {run_id}): {result.notes['error']} -- Spark shut "
                           "the SparkContext down; the next `realsyn run` records this run as abandoned",
                           result.notes["error"]) from error
    spark.conf.unset("spark.databricks.delta.commitInfo.userMetadata")
    wall = time.perf_counter() - t0
    # What each reason means and the way out, beside its count (etl/hints.py).
    result.notes.update({f"hint:{r}": h for r, n in result.drops.items() if n and (h := hint(r))})
    row = {
        "run_id": run_id, "stage": stage.name, "batch_id": batch_id, "status": status,
        "config_hash": cfg.hash(), "stage_config_hash": stage.config_hash(dumped),
        "started_at": started, "wall_s": wall, "rows_in": result.rows_in, "rows_out": result.rows_out,
        "drops": result.drops, "metrics": result.metrics, "watermarks": result.watermarks,
        "input_versions": inputs, "output_versions": _versions(spark, cfg.catalog.database, stage.writes),
        "resources": ctx.resources_used(), "models": result.models, "warnings": result.warnings,
        "notes": result.notes,
    }
    try:
        _record(spark, cfg, row)
    except Exception as e:
        reason = stored_error(e, cfg.redaction.secret_params)
        raise RunNotRecorded(f"stage {stage.name} {'failed' if error else 'ran'} (run {run_id}) but its `runs` row "
                             f"could not be written: {reason} -- the next `realsyn run` records this run as abandoned",
                             reason) from e
    if error is not None:
        raise StageFailed(f"stage {stage.name} failed (run {run_id}): {result.notes['error']}") from error
    with stage_context(stage.name, run_id):
        log.info(summary_line(result, wall))
        for warning in result.warnings:
            log.warning("WARNING: %s", warning)
    return result, wall


def closing_summary(results: dict[str, StageResult], walls: dict[str, float], selected: list[str]) -> None:
    """One table for the whole run, the hints of its three largest drop reasons, then every warning
    again: they scroll past during a run."""
    lines = ["run summary:", f"  {'stage':<16} {'in':>9} {'out':>9} {'wall s':>8}  drops"]
    for name in selected:
        r = results.get(name)
        if r is None:
            lines.append(f"  {name:<16} {'(not run)':>9}")
            continue
        drops = ", ".join(f"{k}={v}" for k, v in sorted(r.drops.items())) or "-"
        lines.append(f"  {name:<16} {r.rows_in:>9} {r.rows_out:>9} {walls[name]:>8.1f}  {drops}")
    ranked = sorted(((n, name, reason) for name, r in results.items() for reason, n in r.drops.items()
                     if n and hint(reason)), key=lambda x: (-x[0], x[1], x[2]))
    for n, name, reason in ranked[:3]:  # the run's largest reasons, and what to do about them
        lines.append(f"  {reason} ({name}, {n}): {hint(reason)}")
    warnings = [(name, w) for name, r in results.items() for w in r.warnings]
    for name, w in warnings:
        lines.append(f"  WARNING [{name}] {w}")
    log.info("\n".join(lines))
