"""tag: object tags per kept image (paper: RAM++, its vocabulary extended from the sentences) -> `tags`.

A zero-shot tagger on the pipeline's own CLIP (realsyn_models/tagger.py): the vocabulary is the
shipped RAM++ tag list plus the noun chunks seen in at least `tag.mine_min_count` kept sentences
(mined with spaCy in the tasks, summed in Spark), each embedded once as "a photo of a {tag}" on the
GPU tasks and kept in `tag_vocab` by vocabulary version; each image's stored CLIP vector then
takes the tags above `tag.threshold`, at most `tag.top_n`. Images already tagged with this model
and vocabulary are not tagged again; a grown vocabulary (new mined tags) is a new version and
re-tags every image (a matrix product each). On random-init CLIP weights the tags would be noise:
the stage refuses, loudly, unless `tag.on_random_init` is set.
"""
from __future__ import annotations

import numpy as np
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl.context import StageContext, StageResult
from etl.embeddings import clip_model, resolved_clip, usable_vectors
from etl.gpu import map_in_pandas
from etl.session import default_parallelism
from etl.stage import Step, stage
from realsyn_models.clip import is_random_init
from realsyn_models.tagger import ClipZeroShotTagger, load_vocab, prompts, vocab_version
from udfs.embed import SENTENCE_EMBED_SCHEMA, make_text_embed_fn
from udfs.tags import MINED_SCHEMA, TAGS_SCHEMA, make_mine_fn, make_tag_fn

VOCAB_SCHEMA = "vocab_version string, model_id string, tag string, mined boolean, vector array<float>"


def mined_tags(ctx: StageContext) -> dict[str, int]:
    """Noun chunks of the kept sentences seen in at least mine_min_count of them: tag -> sentences."""
    cfg = ctx.cfg.tag
    pos = ctx.cfg.models[ctx.cfg.sentences.pos_model]
    texts = ctx.read("sentences").where("kept = true").select("text")
    counts = (texts.mapInPandas(make_mine_fn(pos.candidates, pos.batch_size), MINED_SCHEMA)
              .groupBy("tag").agg(F.sum("n").alias("n")).where(F.col("n") >= cfg.mine_min_count)
              .orderBy(F.desc("n"), "tag").limit(cfg.mine_max_tags))
    return {r["tag"]: int(r["n"]) for r in counts.collect()}


def vocab_vectors(ctx: StageContext, spec, vocab: list[str], version: str, mined: set[str]) -> np.ndarray:
    """The vocabulary's prompt vectors under this CLIP: from `tag_vocab`, or embedded (GPU tasks) and
    stored there once."""
    def stored() -> DataFrame:
        return ctx.read("tag_vocab").where((F.col("vocab_version") == version) & (F.col("model_id") == spec.model_id))

    if not (ctx.exists("tag_vocab") and stored().count() == len(vocab)):
        texts = ctx.spark.createDataFrame(list(zip(vocab, prompts(vocab, ctx.cfg.tag.prompt))), "sentence_id string, text string")
        model = clip_model(ctx.cfg)
        vectors = (map_in_pandas(ctx, texts.repartition(default_parallelism(ctx.spark)),
                                 make_text_embed_fn(spec, model.batch_size), SENTENCE_EMBED_SCHEMA, step="clip_text")
                   .select(F.lit(version).alias("vocab_version"), "model_id", F.col("sentence_id").alias("tag"),
                           F.col("sentence_id").isin(list(mined)).alias("mined"), "vector"))
        ctx.merge_new(vectors, "tag_vocab", ["vocab_version", "model_id", "tag"])
    rows = stored().select("tag", "vector").toPandas().set_index("tag").loc[vocab]
    return np.stack([np.asarray(v, dtype=np.float32) for v in rows["vector"]])


def untagged(ctx: StageContext, model_id: str, version: str) -> DataFrame:
    """(image_id, vector) of kept images with a vector from this CLIP and no tags of this vocabulary."""
    images = usable_vectors(ctx, "image_embeddings", "image_id", "images", model_id)
    if ctx.exists("tags"):
        done = ctx.read("tags").where((F.col("model_id") == f"clip-zero-shot:{model_id}")
                                      & (F.col("vocab_version") == version)).select("image_id")
        images = images.join(done, "image_id", "left_anti")
    return images


@stage(reads=("images", "image_embeddings", "sentences"), optional_reads=("tags", "tag_vocab"),
       writes=("tag_vocab", "tags"), config=("tag",), models=("embed.model", "sentences.pos_model"),
       steps=(Step("clip_text", "CLIP text tower over the tag prompts, once per vocabulary"),))
def tag(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.tag
    spec, _ = resolved_clip(ctx.cfg)
    result = StageResult(models={ctx.cfg.embed.model: spec.model_id})
    ctx.create_if_missing("tags", TAGS_SCHEMA + ", batch_id string")
    if is_random_init(spec.model_id) and not cfg.on_random_init:
        result.warn(f"NO TAGS: {spec.model_id} is a random-init CLIP, whose zero-shot tags would be noise "
                    "(set tag.on_random_init to force); the generation prompt's tag slot stays empty")
        return result

    # read: the vocabulary (shipped + mined) and its vectors, the images not tagged with it yet
    mined = mined_tags(ctx)
    vocab = load_vocab(mined)
    version = vocab_version(vocab, cfg.prompt)
    tagger = ClipZeroShotTagger(spec.model_id, vocab, vocab_vectors(ctx, spec, vocab, version, set(mined)),
                                threshold=cfg.threshold, top_n=cfg.top_n, prompt=cfg.prompt, force=cfg.on_random_init)
    todo = untagged(ctx, spec.model_id, version)

    # transform: one matrix product per batch (CPU tasks: no model runs here)
    tagged = (todo.mapInPandas(make_tag_fn(tagger), TAGS_SCHEMA)
              .withColumn("batch_id", F.lit(ctx.batch_id)).localCheckpoint())

    # write: one current tag set per image
    written = ctx.upsert(tagged, "tags", ["image_id"])

    # record
    n = tagged.count()
    result.rows_in, result.rows_out = n, written
    result.metrics.update({"vocab_size": float(len(vocab)), "mined_tags": float(len(mined)),
                           "images_without_tags": float(tagged.where(F.size("tags") == 0).count())})
    result.notes["vocab_version"] = version
    return result
