"""pairs: the final image-text pairs, one row per kept image -> `pairs` (paper §3.3; the release's
`raw_image_url, text1, text2, text3, syn_text` plus lineage).

Joined in one Spark job from rows that are still kept: a kept image, its top-3 retrieved sentences
of the newest centroid version that are still kept (text1..3 by score), and its kept synthetic
text of the configured model and prompt version. `pairs.require_synthetic: false` also takes
images with retrievals only (syn_text null). The table is kept equal to that join: rows whose
inputs changed are rewritten, new ones inserted, and rows whose image or texts were dropped since
are deleted, in one MERGE.
"""
from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from etl.context import StageContext, StageResult
from etl.stage import stage
from etl.stages.generate import prompt_template

PAIRS_SCHEMA = (
    "image_id string, raw_image_url string, text1 string, text2 string, text3 string, syn_text string, "
    "doc_id string, doc_url string, sentence_ids array<string>, sentence_scores array<float>, "
    "cluster_ids array<int>, centroid_version int, embedding_model string, synthetic_model string, "
    "prompt_version string, prompt_hash string, similarity float, width int, height int, sha256 string, "
    "phash bigint, batch_id string"
)
COLUMNS = [c.split()[0] for c in PAIRS_SCHEMA.split(", ")]


def retrieved_texts(ctx: StageContext) -> DataFrame:
    """(image_id, text1..3, sentence_ids, sentence_scores, cluster_ids, centroid_version, embedding_model)
    from the newest centroid version's retrievals whose sentences are still kept."""
    r = ctx.read("retrievals")
    newest = r.agg(F.max("centroid_version")).first()[0]
    kept = ctx.read("sentences").where("kept = true").select("sentence_id", "text")
    ranked = (r.where(F.col("centroid_version") == newest).join(kept, "sentence_id")
              .withColumn("n", F.row_number().over(Window.partitionBy("image_id").orderBy(F.desc("score"), "rank"))))
    top = ranked.where(F.col("n") <= 3)
    texts = [F.max(F.when(F.col("n") == i, F.col("text"))).alias(f"text{i}") for i in (1, 2, 3)]
    ordered = F.array_sort(F.collect_list(F.struct("n", "sentence_id", "score", "cluster_id")))
    return (top.groupBy("image_id").agg(*texts, ordered.alias("_o"), F.first("model_id").alias("embedding_model"))
            .select("image_id", "text1", "text2", "text3",
                    F.col("_o.sentence_id").alias("sentence_ids"), F.col("_o.score").alias("sentence_scores"),
                    F.col("_o.cluster_id").alias("cluster_ids"), F.lit(newest).alias("centroid_version"),
                    "embedding_model"))


def synthetic(ctx: StageContext) -> DataFrame | None:
    """(image_id, syn_text, synthetic_model, prompt_version, prompt_hash, similarity) of the kept
    synthetic texts of the configured model and prompt version."""
    if not ctx.exists("synthetic_texts"):
        return None
    model = ctx.cfg.models[ctx.cfg.generate.model].source
    version = prompt_template(ctx).version
    return (ctx.read("synthetic_texts")
            .where(F.col("kept") & (F.col("model_id") == model) & (F.col("prompt_version") == version))
            .select("image_id", F.col("text").alias("syn_text"), F.col("model_id").alias("synthetic_model"),
                    "prompt_version", "prompt_hash", "similarity"))


def lineage(ctx: StageContext) -> DataFrame:
    """(image_id, raw_image_url, doc_id, doc_url, width, height, sha256, phash) of kept images; the
    first document (by id) that shows the image names its source."""
    images = ctx.read("images").where("kept = true").select("image_id", "url", "width", "height", "phash")
    first_doc = (ctx.read("doc_images").groupBy("image_id").agg(F.min("doc_id").alias("doc_id"))
                 .join(ctx.read("documents").select("doc_id", F.col("url").alias("doc_url")), "doc_id"))
    sha = ctx.read("image_bytes").select("image_id", "sha256")
    return (images.join(first_doc, "image_id", "left").join(sha, "image_id", "left")
            .select("image_id", F.col("url").alias("raw_image_url"), "doc_id", "doc_url", "width", "height",
                    "sha256", "phash"))


@stage(reads=("images", "image_bytes", "doc_images", "documents", "retrievals", "sentences"),
       optional_reads=("synthetic_texts", "pairs"), writes=("pairs",), config=("pairs", "generate.prompt"),
       models=("generate.model",))
def pairs(ctx: StageContext) -> StageResult:
    result = StageResult()
    # read
    texts = retrieved_texts(ctx)
    syn = synthetic(ctx)
    # transform
    joined = lineage(ctx).join(texts, "image_id")
    if syn is None:
        joined = joined.select("*", *[F.lit(None).cast(t).alias(c) for c, t in (
            ("syn_text", "string"), ("synthetic_model", "string"), ("prompt_version", "string"),
            ("prompt_hash", "string"), ("similarity", "float"))])
    else:
        joined = joined.join(syn, "image_id", "inner" if ctx.cfg.pairs.require_synthetic else "left")
    rows = joined.withColumn("batch_id", F.lit(ctx.batch_id)).select(*COLUMNS).localCheckpoint()
    # write: the table becomes exactly `rows` (unchanged rows untouched)
    ctx.create_if_missing("pairs", PAIRS_SCHEMA)
    changed = ctx.sync(rows, "pairs", ["image_id"], compare=[c for c in COLUMNS if c != "batch_id"])
    # record
    result.rows_in = rows.count()
    result.rows_out = changed
    result.metrics.update({"pairs": float(result.rows_in),
                           "with_syn_text": float(rows.where(F.col("syn_text").isNotNull()).count())})
    return result
