"""image_quality: decode every newly fetched image once; dimensions, format, mode, pHash, and
kept=false with the first failing rule (udfs/image_quality.py) for the rest.

New work = kept images not decoded yet (width is null), so a re-run, or an image already judged,
is not decoded again; an image a later fetch run recovers is picked up. Only the verdict columns
of `images` are written; the bytes are read from `image_bytes` and never rewritten.
"""
from __future__ import annotations

from pyspark.sql import functions as F

from etl.context import StageContext, StageResult
from etl.session import default_parallelism
from etl.stage import stage
from udfs.image_quality import QUALITY_SCHEMA, make_quality_fn

JUDGED = ["format", "width", "height", "mode", "phash", "kept", "drop_reason"]


@stage(reads=("images", "image_bytes"), writes=("images",), config=("image_quality",))
def image_quality(ctx: StageContext) -> StageResult:
    # read
    todo = (ctx.read("images").where(F.col("kept") & F.col("width").isNull()).select("image_id")
            .join(ctx.read("image_bytes").select("image_id", "bytes"), "image_id"))

    # transform. Checkpointed: each image is decoded once, whatever reads the verdicts.
    judge = make_quality_fn(**ctx.cfg.image_quality.model_dump())
    verdicts = (todo.repartition(default_parallelism(ctx.spark), "image_id")
                .mapInPandas(judge, QUALITY_SCHEMA)
                .withColumn("kept", F.col("drop_reason").isNull())
                .localCheckpoint())

    # write
    written = ctx.update_columns(verdicts, "images", ["image_id"], JUDGED)

    # record
    outcomes = verdicts.groupBy("drop_reason").count().collect()
    result = StageResult(rows_in=sum(r["count"] for r in outcomes), rows_out=written)
    result.add_drops({r["drop_reason"]: r["count"] for r in outcomes})
    return result
