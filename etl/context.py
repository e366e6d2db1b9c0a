"""What a stage is given (StageContext) and what it hands back (StageResult).

The runner logs every StageResult into the `runs` table with the table versions around it
(etl/runner.py); etl/stage.py says how a stage is declared.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from etl import tables
from etl.config import Config

if TYPE_CHECKING:
    from etl.stage import Stage


@dataclass
class StageResult:
    rows_in: int = 0
    rows_out: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    # Typed numbers worth keeping with the run (fractions, counts, seconds): runs.metrics.
    metrics: dict[str, float] = field(default_factory=dict)
    # What this run consumed of each input (table -> Delta version or batch id); the next run of
    # the stage starts from here (runs.watermarks).
    watermarks: dict[str, str] = field(default_factory=dict)
    # Model key -> the exact model id the stage ran (weights included): runs.models.
    models: dict[str, str] = field(default_factory=dict)
    # What a user must not miss (random-init weights...): logged loudly and repeated at the end.
    warnings: list[str] = field(default_factory=list)
    # Free-form facts (skipped because..., which route was taken).
    notes: dict[str, str] = field(default_factory=dict)

    def add_drops(self, counts: dict[str | None, int] | Counter) -> None:
        for reason, n in counts.items():
            if reason:
                self.drops[reason] = self.drops.get(reason, 0) + int(n)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)


@dataclass
class StageContext:
    spark: SparkSession
    cfg: Config
    run_id: str
    batch_id: str
    stage: Stage | None = None

    def gpu_step(self, step: str) -> bool:
        """Whether `step` of this stage runs as GPU tasks (declared with a GPU, and GPUs enabled)."""
        return bool(self.stage and self.stage.step(step).resources.gpu and self.cfg.spark.gpu.enabled)

    def resources_used(self) -> str:
        """What this stage's steps asked for, as `runs.resources` keeps it."""
        from etl.gpu import executor_cores, model_task_request
        from etl.session import rapids_active

        if self.stage is None:
            return "-"
        gpu = self.cfg.spark.gpu
        # Whether the RAPIDS Accelerator ran this stage's SQL: runs.resources keeps it.
        rapids = "; RAPIDS SQL on" if gpu.enabled and rapids_active(self.spark) else ""
        steps = ", ".join(s.name for s in self.stage.gpu_steps)
        if not steps:
            return "CPU tasks" + rapids
        if not gpu.enabled:
            return f"GPU steps {steps} as CPU tasks (spark.gpu.enabled is false)"
        return (f"GPU steps {steps}: {model_task_request(gpu, executor_cores(self.spark))} per task; "
                "other steps CPU tasks" + rapids)

    def table(self, name: str) -> str:
        return tables.qualified(self.cfg.catalog.database, name)

    def read(self, name: str) -> DataFrame:
        return self.spark.table(self.table(name))

    def exists(self, name: str) -> bool:
        return tables.exists(self.spark, self.table(name))

    def create_if_missing(self, name: str, schema: str | StructType) -> None:
        tables.create_if_missing(self.spark, self.table(name), schema)

    def merge_new(self, df: DataFrame, name: str, keys: list[str]) -> int:
        return tables.merge_new(df, self.table(name), keys)

    def upsert(self, df: DataFrame, name: str, keys: list[str]) -> int:
        return tables.upsert(df, self.table(name), keys)

    def update_columns(self, df: DataFrame, name: str, keys: list[str], columns: list[str]) -> int:
        return tables.update_columns(df, self.table(name), keys, columns)

    def delete_keys(self, df: DataFrame, name: str, keys: list[str]) -> int:
        return tables.delete_keys(df, self.table(name), keys)

    def sync(self, df: DataFrame, name: str, keys: list[str], compare: list[str]) -> int:
        return tables.sync(df, self.table(name), keys, compare)

    def last_watermark(self, table: str) -> str | None:
        """The watermark of `table` recorded by this stage's last successful run (None: never)."""
        if self.stage is None or not self.exists("runs"):
            return None
        row = (self.read("runs").where((F.col("stage") == self.stage.name) & (F.col("status") == "ok")
                                       & F.col("watermarks").getItem(table).isNotNull())
               .orderBy(F.col("started_at").desc()).select(F.col("watermarks").getItem(table).alias("w"))
               .first())
        return row["w"] if row else None
