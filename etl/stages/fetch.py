"""fetch: doc_images -> images (one row per image id: status, attempts) + image_bytes (written once).

Rows that came with bytes (local files, the bundled sample) are `inline` and never fetched.
URL-only rows are fetched with udfs/fetch.py (bounded threads per task, per-host gates, kept-alive
connections, SSRF guard, opt-out headers, size cap, magic bytes). A later run fetches new ids plus
earlier RETRYABLE failures that still have attempts left; every other outcome is final.
`fetch.retry_failed` (`realsyn run --stages fetch --retry-failed`) fetches no new ids, only the
failures in RETRY_FAILED that still have attempts left.

One host's URLs go to `fetch.tasks_per_host` tasks (a partition chosen from the host's hash, the
next ones for the other shares), so the per-task host gates bound what a host sees from the whole
stage, not from each of its tasks.

Bytes are written once, by a plain append to `image_bytes` (no MERGE: it would join the wide rows
against the table), before the narrow `images` MERGE (insert-only when no failure is retried: every
other id is new to `images`). Exactly once: a run killed between the two writes leaves bytes for
ids whose `images` row does not say so yet, and the next run fetches those ids again; the ids that
already have bytes are found on the id column alone (a narrow join, nearly always empty, run while
the URLs are fetched) and their bytes are left out of the append (a broadcast anti-join of that
short list: the wide rows are never shuffled). Every later verdict updates only the narrow
`images` columns.
"""
from __future__ import annotations

import json
from functools import reduce

from pyspark.sql import Column, DataFrame, Row
from pyspark.sql import functions as F

from etl.context import StageContext, StageResult
from etl.session import default_parallelism, in_background
from etl.stage import stage
from udfs.fetch import FETCH_SCHEMA, INLINE, OK, RETRY_FAILED, RETRYABLE, make_fetch_fn

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
# fetch_error of a kept image whose server labelled it as something else (udfs/fetch.py).
MISLABELLED = "served as "
# Run-mode and placement keys of the `fetch` section; the rest is udfs.fetch.FetchPolicy.
_STAGE_KEYS = {"retry_failed", "tasks_per_host"}
HOSTS_IN_SUMMARY = 20
_LANDING: dict[int, dict[int, int]] = {}  # partitions -> {partition: a value Spark hashes into it}


def url_host(url: Column) -> Column:
    """Lower-cased host of a URL ('' when none): a regex, since parse_url fails on bad URLs."""
    return F.lower(F.regexp_extract(url, r"^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?(\[[^\]]*\]|[^:/?#]*)", 1))


def to_fetch(ctx: StageContext) -> tuple[DataFrame, DataFrame, DataFrame]:
    """(new image ids that came with bytes or without a source, URLs to request, the retried
    failures among them): new ids from doc_images (the same URL or bytes on many pages is one
    image) plus retryable failures; with fetch.retry_failed, only the failures."""
    fcfg = ctx.cfg.fetch
    images = ctx.read("images")
    retry = images.where(F.col("fetch_status").isin(*(RETRY_FAILED if fcfg.retry_failed else RETRYABLE))
                         & (F.col("fetch_attempts") < fcfg.max_attempts_total))
    retry = retry.select("image_id", "url", "batch_id", "fetch_attempts")
    new = (ctx.read("doc_images").select("image_id", "url", "bytes", "batch_id")
           .dropDuplicates(["image_id"]).join(images.select("image_id"), "image_id", "left_anti"))
    if fcfg.retry_failed:
        new = new.limit(0)
    no_fetch = new.where(F.col("bytes").isNotNull() | F.col("url").isNull()).select(
        "image_id", "url", "bytes",
        F.when(F.col("bytes").isNotNull(), INLINE).otherwise(NO_SOURCE).alias("fetch_status"),
        F.lit(None).cast("int").alias("http_status"), F.lit(None).cast("string").alias("fetch_error"),
        F.lit(0).alias("fetch_attempts"), "batch_id")
    requests = (new.where(F.col("bytes").isNull() & F.col("url").isNotNull())
                .select("image_id", "url", "batch_id", F.lit(0).alias("fetch_attempts"))
                .unionByName(retry))
    return no_fetch, requests, retry


def by_host(ctx: StageContext, requests: DataFrame, tasks_per_host: int) -> DataFrame:
    """`requests` in partitions where each host's URLs fill `tasks_per_host` consecutive ones
    (from its hash on), split by image id."""
    n = max(default_parallelism(ctx.spark), tasks_per_host)
    if n not in _LANDING:
        # repartition(n, c) puts a row in pmod(hash(c), n): for each partition p, a value landing in p.
        _LANDING[n] = dict(ctx.spark.range(64 * n).select(F.pmod(F.hash("id"), F.lit(n)).alias("p"), "id")
                           .groupBy("p").agg(F.min("id")).collect())
    landing = _LANDING[n]
    part = F.pmod(F.hash(url_host(F.col("url"))) + F.pmod(F.hash("image_id"), F.lit(tasks_per_host)), F.lit(n))
    key = F.element_at(F.array(*[F.lit(landing[p]) for p in range(n)]), part + 1)
    return requests.repartition(n, key)


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


def summary(rows: DataFrame, top: int = HOSTS_IN_SUMMARY) -> list[Row]:
    """The run's counts in one action, by `kind`: "status" rows count rows per (fetch_status,
    drop_reason, mislabelled); "host" rows count this run's failures per (host, fetch_status) for
    the `top` hosts with most of them."""
    mislabelled = F.coalesce(F.col("fetch_error").startswith(MISLABELLED), F.lit(False)).alias("mislabelled")
    failed = rows.where(~F.col("kept") & F.col("url").isNotNull()).select(url_host(F.col("url")).alias("host"),
                                                                          "fetch_status")
    by_host = failed.groupBy("host", "fetch_status").count()
    worst = by_host.groupBy("host").agg(F.sum("count").alias("n")).orderBy(F.desc("n"), "host").limit(top)
    parts = {"status": rows.groupBy("fetch_status", "drop_reason", mislabelled).count(),
             "host": by_host.join(worst, "host")}
    return reduce(lambda a, b: a.unionByName(b, allowMissingColumns=True),
                  [df.withColumn("kind", F.lit(kind)) for kind, df in parts.items()]).collect()


def already_stored(ids: DataFrame, stored: DataFrame, retry: DataFrame) -> tuple[list[str], bool]:
    """(the `ids` whose bytes `stored` holds already: leftovers of a run killed between its two
    writes; whether `retry` has rows), in one action on id columns alone."""
    got = (ids.join(stored.select("image_id"), "image_id", "left_semi").select("image_id", F.lit(False).alias("retry"))
           .unionByName(retry.select(F.lit(None).cast("string").alias("image_id"), F.lit(True).alias("retry")).limit(1))
           .collect())
    return [r["image_id"] for r in got if not r["retry"]], any(r["retry"] for r in got)


def failures_by_host(host_rows: list[Row]) -> dict[str, dict[str, int]]:
    """host -> {status: count} from `summary`'s "host" rows."""
    out: dict[str, dict[str, int]] = {}
    for r in host_rows:
        out.setdefault(r["host"], {})[r["fetch_status"]] = r["count"]
    return out


@stage(reads=("doc_images",), writes=("images", "image_bytes"), config=("fetch", "redaction"))
def fetch(ctx: StageContext) -> StageResult:
    ctx.create_if_missing("images", IMAGES_SCHEMA)
    ctx.create_if_missing("image_bytes", IMAGE_BYTES_SCHEMA)

    # read
    no_fetch, requests, retry = to_fetch(ctx)
    # Found while the URLs are fetched: the short queries overlap the long one.
    stored = in_background(ctx.spark, lambda: already_stored(
        no_fetch.select("image_id").unionByName(requests.select("image_id")), ctx.read("image_bytes"), retry))

    # transform. Checkpointed: the HTTP requests happen once, whatever reads the rows afterwards.
    policy = ctx.cfg.fetch.model_dump(exclude=_STAGE_KEYS)
    fn = make_fetch_fn(**policy, secret_params=ctx.cfg.redaction.secret_params)
    fetched = by_host(ctx, requests, ctx.cfg.fetch.tasks_per_host).mapInPandas(fn, FETCH_SCHEMA)
    outcomes = no_fetch.unionByName(fetched).localCheckpoint()
    rows = as_image_rows(outcomes)
    # The counts feed only the run's record: computed while the writes go on.
    counted = in_background(ctx.spark, lambda: summary(rows))
    stored_ids, retried = stored()
    blobs = outcomes.where(F.col("bytes").isNotNull())
    if stored_ids:
        blobs = blobs.join(F.broadcast(ctx.spark.createDataFrame([(i,) for i in stored_ids], "image_id string")),
                           "image_id", "left_anti")
    blobs = blobs.select("image_id", "bytes", F.length("bytes").alias("n_bytes"),
                         F.sha2("bytes", 256).alias("sha256"), "batch_id")

    # write: the bytes first, so that an `images` row never says ok for bytes that are not there.
    # Without retried failures every row is new to `images` (to_fetch left out the known ids): an
    # insert-only MERGE, which skips the pass that finds the files to rewrite.
    any_bytes = not blobs.isEmpty()  # an empty append would still commit a version
    if any_bytes:
        blobs.write.format("delta").mode("append").saveAsTable(ctx.table("image_bytes"))
    written = (ctx.upsert if retried else ctx.merge_new)(rows, "images", ["image_id"])

    # record
    got = counted()
    counts = [r for r in got if r["kind"] == "status"]
    kept = sum(r["count"] for r in counts if r["fetch_status"] in (OK, INLINE))
    with_bytes = 0 if not any_bytes else blobs.count() if stored_ids else kept
    result = StageResult(rows_in=sum(r["count"] for r in counts), rows_out=written)
    result.add_drops({r["drop_reason"]: r["count"] for r in counts})
    for r in counts:
        key = f"status_{r['fetch_status']}"
        result.metrics[key] = result.metrics.get(key, 0.0) + r["count"]
    result.metrics["content_type_mismatch"] = float(sum(r["count"] for r in counts if r["mislabelled"]))
    result.metrics["image_bytes_written"] = float(with_bytes)
    result.notes["failures_by_host"] = json.dumps(
        failures_by_host([r for r in got if r["kind"] == "host"]), sort_keys=True)
    if ctx.cfg.fetch.retry_failed:
        result.notes["mode"] = "retry_failed: only earlier failures in RETRY_FAILED were fetched"
    return result
