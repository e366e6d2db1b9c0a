"""image_quality: decode every newly fetched image once; dimensions, format, mode, pHash, and
kept=false with the first failing rule (udfs/image_quality.py) for the rest.

New work = kept images not decoded yet (width is null), so a re-run, or an image already judged,
is not decoded again; an image a later fetch run recovers is picked up.
"""
from __future__ import annotations

from pyspark.sql import functions as F

from etl.context import StageContext, StageResult
from udfs.image_quality import QUALITY_SCHEMA, make_quality_fn

NAME = "image_quality"
READS = ("images",)
WRITES = ("images",)
GPU = False

_JUDGED = ("format", "width", "height", "mode", "phash", "kept", "drop_reason")


def run(ctx: StageContext) -> StageResult:
    # read
    images = ctx.read("images")
    todo = images.where(F.col("kept") & F.col("width").isNull() & F.col("bytes").isNotNull())

    # transform
    judge = make_quality_fn(**ctx.cfg.image_quality.model_dump())
    verdicts = (todo.select("image_id", "bytes")
                .repartition(ctx.spark.sparkContext.defaultParallelism, "image_id")
                .mapInPandas(judge, QUALITY_SCHEMA)
                .withColumn("kept", F.col("drop_reason").isNull()))
    rows = todo.drop(*_JUDGED).join(verdicts, "image_id").select(*images.columns).localCheckpoint()

    # write
    written = ctx.upsert(rows, "images", ["image_id"]) if not rows.isEmpty() else 0

    # record
    outcomes = rows.groupBy("drop_reason").count().collect()
    result = StageResult(rows_in=sum(r["count"] for r in outcomes), rows_out=written)
    result.add_drops({r["drop_reason"]: r["count"] for r in outcomes})
    return result
