"""similarity_band: keep image-synthetic text pairs inside a CLIP cosine band (paper §3.2:
0.51-0.61 for EVA02-CLIP-E/14+) -> `synthetic_texts.kept / drop_reason / similarity`.

The band belongs to the CLIP model (`models.<clip>.min_similarity / max_similarity`), as a
perplexity band belongs to its LM: another CLIP scores on another scale. Each kept synthetic text
is embedded once with the pipeline's CLIP text tower (GPU tasks) and its cosine with the stored
image vector kept in `similarity` (with `similarity_model`); verdicts are then re-derived from
the stored similarities, so a changed band costs no model run. On random-init CLIP weights the
similarities mean nothing: the filter is skipped loudly (unless `similarity_band.on_random_init`).
"""
from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from etl.context import StageContext, StageResult
from etl.embeddings import clip_model, resolved_clip, usable_vectors
from etl.gpu import map_in_pandas
from etl.session import default_parallelism
from etl.stage import Step, stage
from realsyn_models.clip import is_random_init
from udfs.embed import SENTENCE_EMBED_SCHEMA, make_text_embed_fn

BELOW, ABOVE = "below_band", "above_band"


def cosine(a: str, b: str) -> Column:
    """Dot product of two L2-normalised array<float> columns."""
    return F.aggregate(F.zip_with(a, b, lambda x, y: x * y), F.lit(0.0), lambda acc, v: acc + v).cast("float")


def unscored(ctx: StageContext, model_id: str) -> DataFrame:
    """(synthetic_id, image_id, text) of texts still in the running with no similarity under this CLIP."""
    return (ctx.read("synthetic_texts")
            .where((F.col("kept") | F.col("drop_reason").isin(BELOW, ABOVE))
                   & ~F.col("similarity_model").eqNullSafe(F.lit(model_id)))
            .select("synthetic_id", "image_id", "text"))


def score(ctx: StageContext, spec, todo: DataFrame) -> DataFrame:
    """(synthetic_id, similarity, similarity_model): text vectors (GPU tasks) . image vectors."""
    texts = todo.select(F.col("synthetic_id").alias("sentence_id"), "text")
    vectors = map_in_pandas(ctx, texts.repartition(default_parallelism(ctx.spark)),
                            make_text_embed_fn(spec, clip_model(ctx.cfg).batch_size), SENTENCE_EMBED_SCHEMA,
                            step="clip_text")
    images = usable_vectors(ctx, "image_embeddings", "image_id", "images", spec.model_id)
    return (vectors.where(F.col("vector").isNotNull())
            .select(F.col("sentence_id").alias("synthetic_id"), F.col("vector").alias("text_vector"))
            .join(todo.select("synthetic_id", "image_id"), "synthetic_id")
            .join(images.withColumnRenamed("vector", "image_vector"), "image_id")
            .select("synthetic_id", cosine("text_vector", "image_vector").alias("similarity"),
                    F.lit(spec.model_id).alias("similarity_model")))


def verdicts(ctx: StageContext, model_id: str, low: float, high: float) -> DataFrame:
    """(synthetic_id, kept, drop_reason) of the scored rows whose verdict changes under the band."""
    reason = (F.when(F.col("similarity") < low, F.lit(BELOW))
              .when(F.col("similarity") > high, F.lit(ABOVE)).otherwise(F.lit(None).cast("string")))
    rows = (ctx.read("synthetic_texts")
            .where((F.col("similarity_model") == model_id)
                   & (F.col("drop_reason").isNull() | F.col("drop_reason").isin(BELOW, ABOVE)))
            .withColumn("_reason", reason))
    return (rows.where(~F.col("drop_reason").eqNullSafe(F.col("_reason")))
            .select("synthetic_id", F.col("_reason").isNull().alias("kept"), F.col("_reason").alias("drop_reason")))


@stage(reads=("synthetic_texts", "image_embeddings"), optional_reads=("images",), writes=("synthetic_texts",),
       config=("similarity_band",), models=("embed.model",),
       steps=(Step("clip_text", "CLIP text tower over the synthetic texts"),))
def similarity_band(ctx: StageContext) -> StageResult:
    spec, _ = resolved_clip(ctx.cfg)
    model = clip_model(ctx.cfg)
    result = StageResult(models={ctx.cfg.embed.model: spec.model_id})
    if is_random_init(spec.model_id) and not ctx.cfg.similarity_band.on_random_init:
        result.warn(f"SIMILARITY BAND NOT APPLIED: {spec.model_id} is a random-init CLIP, whose image-text "
                    "similarities mean nothing; every generated text without a reason stays kept")
        return result
    if model.min_similarity is None or model.max_similarity is None:
        result.warn(f"SIMILARITY BAND NOT APPLIED: models.{ctx.cfg.embed.model} sets no band for {model.name}")
        return result
    result.notes["band"] = f"{model.min_similarity}-{model.max_similarity} ({model.similarity_band_source})"

    # read + transform: similarities for the texts not scored by this CLIP yet
    todo = unscored(ctx, spec.model_id).localCheckpoint()
    scored = score(ctx, spec, todo).localCheckpoint()
    # write: similarities, then the verdicts they imply (all scored rows: a changed band re-judges)
    result.rows_in = todo.count()
    ctx.update_columns(scored, "synthetic_texts", ["synthetic_id"], ["similarity", "similarity_model"])
    changed = verdicts(ctx, spec.model_id, model.min_similarity, model.max_similarity).localCheckpoint()
    result.rows_out = ctx.update_columns(changed, "synthetic_texts", ["synthetic_id"], ["kept", "drop_reason"])

    # record
    result.add_drops({r["drop_reason"]: r["count"] for r in changed.groupBy("drop_reason").count().collect()
                      if r["drop_reason"]})
    stats = ctx.read("synthetic_texts").where(F.col("similarity_model") == spec.model_id).agg(
        F.expr("percentile_approx(similarity, 0.5)").alias("median")).first()
    if stats["median"] is not None:
        result.metrics["similarity_median"] = float(stats["median"])
    return result
