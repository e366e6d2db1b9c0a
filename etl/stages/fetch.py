"""fetch: doc_images -> images (one row per image id: status, attempts) + image_bytes (written once).

Rows that came with bytes (local files, the bundled sample) are `inline` and never fetched.
URL-only rows are fetched with udfs/fetch.py (bounded threads per task, SSRF guard, opt-out
headers, size cap). A later run fetches new ids plus earlier RETRYABLE failures that still have
attempts left; every other outcome is final. The bytes go to `image_bytes` once and are never
rewritten: every later verdict updates only the narrow `images` columns.
"""
from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl.context import StageContext, StageResult
from etl.session import default_parallelism
from etl.stage import stage
from udfs.fetch import FETCH_SCHEMA, INLINE, OK, RETRYABLE, make_fetch_fn

# The images table: fetch creates it; image_quality, image_dedup and semantic_dedup fill the rest.
IMAGES_SCHEMA = (
    "image_id string, url string, fetch_status string, http_status int, "
    "fetch_error string, fetch_attempts int, format string, width int, height int, mode string, "
    "phash bigint, phash_group string, semantic_group string, semantic_model string, kept boolean, "
    "drop_reason string, "
    "batch_id string"
)
IMAGE_BYTES_SCHEMA = "image_id string, bytes binary, n_bytes int, sha256 string, batch_id string"
IMAGE_COLUMNS = [f.split()[0] for f in IMAGES_SCHEMA.split(", ")]
NO_SOURCE = "no_source"  # neither bytes nor URL: nothing to fetch


def to_fetch(ctx: StageContext) -> tuple[DataFrame, DataFrame]:
    """(new image ids that came with bytes or without a source, URLs to request): new ids from
    doc_images (the same URL or bytes on many pages is one image) plus retryable failures."""
    images = ctx.read("images")
    new = (ctx.read("doc_images").select("image_id", "url", "bytes", "batch_id")
           .dropDuplicates(["image_id"]).join(images.select("image_id"), "image_id", "left_anti"))
    retry = images.where(F.col("fetch_status").isin(*RETRYABLE)
                         & (F.col("fetch_attempts") < ctx.cfg.fetch.max_attempts_total))
    no_fetch = new.where(F.col("bytes").isNotNull() | F.col("url").isNull()).select(
        "image_id", "url", "bytes",
        F.when(F.col("bytes").isNotNull(), INLINE).otherwise(NO_SOURCE).alias("fetch_status"),
        F.lit(None).cast("int").alias("http_status"), F.lit(None).cast("string").alias("fetch_error"),
        F.lit(0).alias("fetch_attempts"), "batch_id")
    requests = (new.where(F.col("bytes").isNull() & F.col("url").isNotNull())
                .select("image_id", "url", "batch_id", F.lit(0).alias("fetch_attempts"))
                .unionByName(retry.select("image_id", "url", "batch_id", "fetch_attempts")))
    return no_fetch, requests


def as_image_rows(df: DataFrame) -> DataFrame:
    """Fetch outcome columns -> images rows; kept only with bytes in hand."""
    kept = F.col("fetch_status").isin(OK, INLINE)
    unset = {"format": "string", "width": "int", "height": "int", "mode": "string", "phash": "bigint",
             "phash_group": "string", "semantic_group": "string", "semantic_model": "string"}
    return df.select(
        "image_id", "url", "fetch_status", F.col("http_status").cast("int"), "fetch_error",
        F.col("fetch_attempts").cast("int"), *[F.lit(None).cast(t).alias(c) for c, t in unset.items()],
        kept.alias("kept"),
        F.when(kept, F.lit(None)).otherwise(F.concat(F.lit("fetch_"), "fetch_status")).alias("drop_reason"),
        "batch_id",
    ).select(*IMAGE_COLUMNS)


@stage(reads=("doc_images",), writes=("images", "image_bytes"), config=("fetch", "redaction"))
def fetch(ctx: StageContext) -> StageResult:
    ctx.create_if_missing("images", IMAGES_SCHEMA)
    ctx.create_if_missing("image_bytes", IMAGE_BYTES_SCHEMA)

    # read
    no_fetch, requests = to_fetch(ctx)

    # transform. Checkpointed: the HTTP requests happen once, whatever reads the rows afterwards.
    fn = make_fetch_fn(**ctx.cfg.fetch.model_dump(), secret_params=ctx.cfg.redaction.secret_params)
    fetched = (requests.repartition(default_parallelism(ctx.spark), "image_id")
               .mapInPandas(fn, FETCH_SCHEMA))
    outcomes = no_fetch.unionByName(fetched).localCheckpoint()
    blobs = outcomes.where(F.col("bytes").isNotNull()).select(
        "image_id", "bytes", F.length("bytes").alias("n_bytes"), F.sha2("bytes", 256).alias("sha256"), "batch_id")

    rows = as_image_rows(outcomes)

    # write
    stored = ctx.merge_new(blobs, "image_bytes", ["image_id"])
    written = ctx.upsert(rows, "images", ["image_id"])

    # record
    counts = rows.groupBy("fetch_status", "drop_reason").count().collect()
    result = StageResult(rows_in=sum(r["count"] for r in counts), rows_out=written)
    result.add_drops({r["drop_reason"]: r["count"] for r in counts})
    result.metrics = {f"status_{r['fetch_status']}": float(r["count"]) for r in counts}
    result.metrics["image_bytes_written"] = float(stored)
    return result
