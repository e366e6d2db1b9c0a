"""embed: kept images and sentences -> `image_embeddings`, `sentence_embeddings` (open_clip).

Only ids without a row for the current model id are embedded, so a re-run or a new batch costs
just the new rows, and changing the model (or its weights) embeds everything again under a new
id. Rows whose input was unusable are stored with a null vector and the reason, so they are not
retried on every run. Where the weights come from is decided here, once, on the driver, and is
recorded in `runs.notes["weights"]`: a random-init fallback is never silent.
"""
from __future__ import annotations

import time

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl.config import EmbedConfig
from etl.context import StageContext, StageResult
from etl.gpu import map_in_pandas
from realsyn_models.clip import ClipSpec, resolve
from udfs.embed import IMAGE_EMBED_SCHEMA, SENTENCE_EMBED_SCHEMA, make_image_embed_fn, make_text_embed_fn

NAME = "embed"
READS = ("images", "doc_images", "sentences", "doc_texts")
WRITES = ("image_embeddings", "sentence_embeddings")
GPU = True


def clip_spec(cfg: EmbedConfig) -> ClipSpec:
    return ClipSpec(model=cfg.model, pretrained=cfg.pretrained, precision=cfg.precision, seed=cfg.random_init_seed,
                    model_config_dir=cfg.model_config_dir, cache_dir=cfg.cache_dir, offline=cfg.offline)


def image_inputs(ctx: StageContext) -> DataFrame | None:
    """(image_id, bytes): kept fetched images, or the ingested bytes before fetch exists."""
    if ctx.exists("images"):
        return ctx.read("images").where("kept = true").select("image_id", "bytes")
    if ctx.exists("doc_images"):
        return (ctx.read("doc_images").where("bytes IS NOT NULL")
                .select("image_id", "bytes").dropDuplicates(["image_id"]))
    return None


def sentence_inputs(ctx: StageContext) -> DataFrame | None:
    """(sentence_id, text): kept sentences, or whole doc_texts paragraphs until that stage exists."""
    if ctx.exists("sentences"):
        return ctx.read("sentences").where("kept = true").select("sentence_id", "text")
    if ctx.exists("doc_texts"):
        return (ctx.read("doc_texts").select(F.col("text_id").alias("sentence_id"), "text")
                .dropDuplicates(["sentence_id"]))
    return None


def _not_embedded(ctx: StageContext, todo: DataFrame, table: str, id_col: str, model_id: str) -> DataFrame:
    if not ctx.exists(table):
        return todo
    done = ctx.read(table).where(F.col("model_id") == model_id).select(id_col)
    return todo.join(done, id_col, "left_anti")


def _embed_into(ctx: StageContext, result: StageResult, source: DataFrame | None, table: str, id_col: str,
                fn, schema: str, model_id: str, kind: str) -> None:
    if source is None:
        result.notes[f"{kind}_skipped"] = "no input table yet"
        return
    started = time.perf_counter()
    todo = _not_embedded(ctx, source, table, id_col, model_id)
    partitions = ctx.cfg.embed.partitions or ctx.spark.sparkContext.defaultParallelism
    out = (map_in_pandas(ctx, todo.repartition(partitions), fn, schema, gpu=True)
           .withColumn("batch_id", F.lit(ctx.batch_id))
           .persist())  # the MERGE must not run the model a second time
    try:
        # One pass computes (and caches) every vector; partitions with no new rows load no model.
        counts = {row["error"]: row["count"] for row in out.groupBy("error").count().collect()}
        result.rows_in += sum(counts.values())
        result.add_drops({f"{kind}_{error}": n for error, n in counts.items() if error})
        if counts:
            written = ctx.merge_new(out, table, [id_col, "model_id"])
            result.rows_out += written
            result.notes[f"{kind}_rows"] = str(written)
    finally:
        out.unpersist()
    result.notes[f"{kind}_wall_s"] = f"{time.perf_counter() - started:.1f}"


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.embed
    spec, weights_note = resolve(clip_spec(cfg), cfg.allow_random_init)
    result = StageResult(notes={"weights": weights_note, "model_id": spec.model_id})

    images = make_image_embed_fn(spec, cfg.batch_size, cfg.decode_threads, cfg.max_image_bytes, cfg.max_pixels)
    _embed_into(ctx, result, image_inputs(ctx), "image_embeddings", "image_id", images, IMAGE_EMBED_SCHEMA,
                spec.model_id, "image")
    texts = make_text_embed_fn(spec, cfg.batch_size)
    _embed_into(ctx, result, sentence_inputs(ctx), "sentence_embeddings", "sentence_id", texts,
                SENTENCE_EMBED_SCHEMA, spec.model_id, "sentence")
    return result
