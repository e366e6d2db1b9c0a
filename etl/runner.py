"""Orders stages, runs the ones asked for, and logs every run into the `runs` Delta table."""
from __future__ import annotations

import importlib
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from types import ModuleType

from pyspark.sql import SparkSession

from etl import tables
from etl.config import Config
from etl.context import StageContext, StageResult
from etl.lock import Holder
from udfs.redact import redact_text

# The paper's pipeline, in dependency order (ARCHITECTURE.md). Later issues append
# generate, balance and export here.
STAGE_ORDER = (
    "ingest",
    "fetch",
    "image_quality",
    "image_dedup",
    "sentences",
    "embed",
    "semantic_dedup",
    "cluster",
    "retrieve",
)

RUNS_SCHEMA = (
    "run_id string, stage string, batch_id string, status string, config_hash string, "
    "stage_config_hash string, started_at timestamp, wall_s double, rows_in bigint, "
    "rows_out bigint, drops map<string,bigint>, input_versions map<string,bigint>, "
    "output_versions map<string,bigint>, notes map<string,string>"
)


class StageFailed(RuntimeError):
    pass


def load_stage(name: str) -> ModuleType:
    if name not in STAGE_ORDER:
        raise ValueError(f"unknown stage {name!r}; stages are: {', '.join(STAGE_ORDER)}")
    return importlib.import_module(f"etl.stages.{name}")


def resolve_stages(requested: list[str] | None) -> list[str]:
    """Requested stages in pipeline order (all of them when none are named)."""
    if not requested:
        return list(STAGE_ORDER)
    for name in requested:
        load_stage(name)  # validates the name before anything runs
    return [s for s in STAGE_ORDER if s in requested]


def new_batch_id() -> str:
    return datetime.now(timezone.utc).strftime("b%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6]


def _versions(spark: SparkSession, database: str, names: tuple[str, ...]) -> dict[str, int]:
    out = {}
    for name in names:
        v = tables.version(spark, tables.qualified(database, name))
        if v is not None:
            out[name] = v
    return out


def _record(spark: SparkSession, cfg: Config, row: dict) -> None:
    runs = tables.qualified(cfg.catalog.database, "runs")
    tables.create_if_missing(spark, runs, RUNS_SCHEMA)
    spark.createDataFrame([row], schema=RUNS_SCHEMA).write.format("delta").mode("append").saveAsTable(runs)


def summary_line(stage: str, result: StageResult, wall_s: float) -> str:
    drops = ", ".join(f"{k}={v}" for k, v in sorted(result.drops.items())) or "none"
    return f"[{stage}] in={result.rows_in} out={result.rows_out} drops: {drops} ({wall_s:.1f}s)"


def record_abandoned(spark: SparkSession, cfg: Config, holder: Holder) -> None:
    """A `runs` row for a run whose process died without recording its end (see etl/lock.py)."""
    _record(spark, cfg, {
        "run_id": holder.run_id, "stage": holder.stage or "(none)", "batch_id": holder.run_id,
        "status": "abandoned", "config_hash": None, "stage_config_hash": None,
        "started_at": datetime.strptime(holder.started_at, "%Y-%m-%d %H:%M:%S UTC").replace(tzinfo=timezone.utc),
        "wall_s": None, "rows_in": None, "rows_out": None, "drops": {}, "input_versions": {},
        "output_versions": {},
        "notes": {"error": f"the process died during this stage: {holder.describe()}"},
    })
    print(f"realsyn: the previous run died without finishing ({holder.describe()}); recorded as abandoned "
          "in `runs`. Its MERGEs are idempotent: this run completes what it left.", file=sys.stderr, flush=True)


def run_stages(spark: SparkSession, cfg: Config, stages: list[str] | None = None,
               batch_id: str | None = None, on_stage: Callable[[str | None], None] | None = None,
               ) -> dict[str, StageResult]:
    """Run stages in order; each run (ok or failed) is a row in `runs`. Stops at the first failure.
    `on_stage(name)` is told each stage as it starts (the warehouse lock keeps it)."""
    batch_id = batch_id or new_batch_id()
    results: dict[str, StageResult] = {}
    for name in resolve_stages(stages):
        if on_stage is not None:
            on_stage(name)
        module = load_stage(name)
        run_id = uuid.uuid4().hex[:12]
        ctx = StageContext(spark=spark, cfg=cfg, run_id=run_id, batch_id=batch_id)
        spark.sparkContext.setJobGroup(run_id, f"realsyn {name}")
        print(f"[{name}] starting (run {run_id}, batch {batch_id})", file=sys.stderr, flush=True)
        inputs = _versions(spark, cfg.catalog.database, module.READS)
        started = datetime.now(timezone.utc)
        t0 = time.perf_counter()
        status, error = "ok", None
        try:
            result = module.run(ctx)
        except Exception as e:  # recorded, then re-raised: a failed run is still a run
            status, error = "failed", e
            message = "".join(traceback.format_exception_only(e)).strip()[:2000]
            result = StageResult(notes={"error": redact_text(message, cfg.redaction.secret_params)})
        wall = time.perf_counter() - t0
        _record(spark, cfg, {
            "run_id": run_id, "stage": name, "batch_id": batch_id, "status": status,
            "config_hash": cfg.hash(), "stage_config_hash": _stage_config_hash(cfg, name),
            "started_at": started, "wall_s": wall, "rows_in": result.rows_in,
            "rows_out": result.rows_out, "drops": result.drops, "input_versions": inputs,
            "output_versions": _versions(spark, cfg.catalog.database, module.WRITES),
            "notes": result.notes,
        })
        if error is not None:
            raise StageFailed(f"stage {name} failed (run {run_id}): {result.notes['error']}") from error
        print(summary_line(name, result, wall), file=sys.stderr, flush=True)
        results[name] = result
    return results


def _stage_config_hash(cfg: Config, stage: str) -> str:
    # Stages without a section of their own (runner-level ones) hash the whole config.
    section = {"ingest": "input", "semantic_dedup": "image_dedup", "retrieve": "retrieval"}.get(stage, stage)
    return cfg.hash(section) if section in Config.model_fields else cfg.hash()
