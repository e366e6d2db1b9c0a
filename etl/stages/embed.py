"""embed: kept images and sentences -> `image_embeddings`, `sentence_embeddings` (open_clip).

Only ids without a row for the current model id are embedded, so a re-run or a new batch costs
just the new rows, and changing the model (or its weights) embeds everything again under a new
id. Rows whose input was unusable are stored with a null vector and the reason, so they are not
retried on every run. Where the weights come from is decided here, once, on the driver, and is
recorded in `runs.models` (and the route in `runs.notes["weights"]`): a random-init fallback is a
warning, repeated in the run's closing summary.
"""
from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl.context import StageContext, StageResult
from etl.embeddings import clip_model, resolved_clip
from etl.gpu import infer_into
from etl.stage import Step, stage
from udfs.embed import IMAGE_EMBED_SCHEMA, SENTENCE_EMBED_SCHEMA, make_image_embed_fn, make_text_embed_fn


def image_inputs(ctx: StageContext) -> DataFrame | None:
    """(image_id, bytes): kept fetched images, or the ingested bytes before fetch exists."""
    if ctx.exists("images"):
        kept = ctx.read("images").where("kept = true").select("image_id")
        return kept.join(ctx.read("image_bytes").select("image_id", "bytes"), "image_id")
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


@stage(reads=(), optional_reads=("images", "image_bytes", "doc_images", "sentences", "doc_texts"),
       writes=("image_embeddings", "sentence_embeddings"), config=("embed",), models=("embed.model",),
       steps=(Step("clip_image", "CLIP image tower over decoded images"),
              Step("clip_text", "CLIP text tower over kept sentences")))
def embed(ctx: StageContext) -> StageResult:
    model = clip_model(ctx.cfg)
    spec, weights_note = resolved_clip(ctx.cfg)
    result = StageResult(models={ctx.cfg.embed.model: spec.model_id}, notes={"weights": weights_note})
    if spec.random_init:
        result.warn(f"embeddings come from a RANDOM INIT of {model.name} ({spec.model_id}): not meaningful")

    e = ctx.cfg.embed
    images = make_image_embed_fn(spec, model.batch_size, e.decode_threads, e.max_image_bytes, e.max_pixels)
    infer_into(ctx, result, image_inputs(ctx), "image_embeddings", "image_id", images, IMAGE_EMBED_SCHEMA,
               spec.model_id, "image", step="clip_image")
    texts = make_text_embed_fn(spec, model.batch_size)
    infer_into(ctx, result, sentence_inputs(ctx), "sentence_embeddings", "sentence_id", texts,
               SENTENCE_EMBED_SCHEMA, spec.model_id, "sentence", step="clip_text")
    return result
