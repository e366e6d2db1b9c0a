"""What a stage is given (StageContext) and what it hands back (StageResult).

A stage module in `etl/stages/` reads top to bottom as read -> transform -> write -> record:

    NAME = "fetch"
    READS = ("doc_images",)
    WRITES = ("images",)
    GPU = False

    def run(ctx: StageContext) -> StageResult: ...

The runner logs every StageResult into the `runs` table with the table versions around it.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pyspark.sql import DataFrame, SparkSession

from etl import tables
from etl.config import Config


@dataclass
class StageResult:
    rows_in: int = 0
    rows_out: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    # Free-form facts worth keeping with the run (e.g. "weights": "RANDOM INIT, not pretrained").
    notes: dict[str, str] = field(default_factory=dict)

    def add_drops(self, counts: dict[str | None, int] | Counter) -> None:
        for reason, n in counts.items():
            if reason:
                self.drops[reason] = self.drops.get(reason, 0) + int(n)


@dataclass
class StageContext:
    spark: SparkSession
    cfg: Config
    run_id: str
    batch_id: str

    def table(self, name: str) -> str:
        return tables.qualified(self.cfg.catalog.database, name)

    def read(self, name: str) -> DataFrame:
        return self.spark.table(self.table(name))

    def exists(self, name: str) -> bool:
        return tables.exists(self.spark, self.table(name))

    def merge_new(self, df: DataFrame, name: str, keys: list[str]) -> int:
        return tables.merge_new(df, self.table(name), keys)

    def upsert(self, df: DataFrame, name: str, keys: list[str]) -> int:
        return tables.upsert(df, self.table(name), keys)

    def update_columns(self, df: DataFrame, name: str, keys: list[str], columns: list[str]) -> int:
        return tables.update_columns(df, self.table(name), keys, columns)

    def create_if_missing(self, name: str, schema: str) -> None:
        tables.create_if_missing(self.spark, self.table(name), schema)
