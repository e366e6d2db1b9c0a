"""fetch: doc_images -> images. One row per image id; bytes from ingest or from the web.

Rows that came with bytes (local files, the bundled sample) are `inline` and never fetched.
URL-only rows are fetched with udfs/fetch.py (bounded threads per task, SSRF guard, opt-out
headers, size cap). A later run fetches new ids plus earlier RETRYABLE failures that still have
attempts left; every other outcome is final.
"""
from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl.context import StageContext, StageResult
from udfs.fetch import FETCH_SCHEMA, INLINE, OK, RETRYABLE, make_fetch_fn

NAME = "fetch"
READS = ("doc_images",)
WRITES = ("images",)
GPU = False

# The images table: fetch creates it; image_quality, image_dedup and semantic_dedup fill the rest.
IMAGES_SCHEMA = (
    "image_id string, url string, bytes binary, fetch_status string, http_status int, "
    "fetch_error string, fetch_attempts int, format string, width int, height int, mode string, "
    "phash bigint, phash_group string, semantic_group string, kept boolean, drop_reason string, "
    "batch_id string"
)
NO_SOURCE = "no_source"  # neither bytes nor URL: nothing to fetch


def _as_image_rows(df: DataFrame) -> DataFrame:
    """Fetch outcome columns -> full images rows; kept only with bytes in hand."""
    kept = F.col("fetch_status").isin(OK, INLINE)
    return df.select(
        "image_id", "url", "bytes", "fetch_status", F.col("http_status").cast("int"),
        "fetch_error", F.col("fetch_attempts").cast("int"),
        F.lit(None).cast("string").alias("format"), F.lit(None).cast("int").alias("width"),
        F.lit(None).cast("int").alias("height"), F.lit(None).cast("string").alias("mode"),
        F.lit(None).cast("bigint").alias("phash"), F.lit(None).cast("string").alias("phash_group"),
        F.lit(None).cast("string").alias("semantic_group"),
        kept.alias("kept"),
        F.when(kept, F.lit(None)).otherwise(F.concat(F.lit("fetch_"), "fetch_status")).alias("drop_reason"),
        "batch_id",
    )


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.fetch
    ctx.create_if_missing("images", IMAGES_SCHEMA)

    # read: the same URL (or the same bytes) on many pages is one image
    images = ctx.read("images")
    new = (ctx.read("doc_images").select("image_id", "url", "bytes", "batch_id")
           .dropDuplicates(["image_id"]).join(images.select("image_id"), "image_id", "left_anti"))
    retry = images.where(F.col("fetch_status").isin(*RETRYABLE)
                         & (F.col("fetch_attempts") < cfg.max_attempts_total))

    # transform
    no_fetch = new.where(F.col("bytes").isNotNull() | F.col("url").isNull()).select(
        "image_id", "url", "bytes",
        F.when(F.col("bytes").isNotNull(), INLINE).otherwise(NO_SOURCE).alias("fetch_status"),
        F.lit(None).cast("int").alias("http_status"), F.lit(None).cast("string").alias("fetch_error"),
        F.lit(0).alias("fetch_attempts"), "batch_id")
    to_fetch = (new.where(F.col("bytes").isNull() & F.col("url").isNotNull())
                .select("image_id", "url", "batch_id", F.lit(0).alias("fetch_attempts"))
                .unionByName(retry.select("image_id", "url", "batch_id", "fetch_attempts")))
    fetch = make_fetch_fn(**cfg.model_dump(), secret_params=ctx.cfg.redaction.secret_params)
    fetched = (to_fetch.repartition(ctx.spark.sparkContext.defaultParallelism, "image_id")
               .mapInPandas(fetch, FETCH_SCHEMA))
    # Checkpointed: the HTTP requests happen once, whatever reads the rows afterwards.
    rows = _as_image_rows(no_fetch.unionByName(fetched)).localCheckpoint()

    # write
    written = ctx.upsert(rows, "images", ["image_id"]) if not rows.isEmpty() else 0

    # record
    outcomes = rows.groupBy("fetch_status", "drop_reason").count().collect()
    result = StageResult(rows_in=sum(r["count"] for r in outcomes), rows_out=written)
    result.add_drops({r["drop_reason"]: r["count"] for r in outcomes})
    result.notes["fetch_status"] = ", ".join(f"{r['fetch_status']}={r['count']}"
                                             for r in sorted(outcomes, key=lambda r: r["fetch_status"]))
    return result
