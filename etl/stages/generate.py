"""generate: one synthetic text per image from its best retrieved sentence, caption and tags
(paper §3.2, LLM fusion) -> `synthetic_texts`.

The prompt is a versioned template in config (`generate.prompt`: the paper's instruction in our
words, slots {sentence}, {caption}, {tags}); the LLM runs behind one interface in the tasks
(realsyn_models/llm.py: vLLM or transformers in the worker, or an OpenAI-compatible endpoint).
Rows are keyed by (image, model, prompt version): only images without a text for the current
model and prompt version are generated, so a new batch costs only its images, a new prompt
version adds a second text beside the first, and a row whose backend call failed is tried again
by later runs, up to `generate.max_attempts` tries in all (a prompt the model can never take is
not retried forever).
Work is committed every `generate.commit_every` images, so a killed run loses at most that much
and its re-run resumes with the rest. Bad generations are kept with their reason
(udfs/generate.py: empty, truncated, refusal, copy_of_sentence, prompt_leak, too_long,
not_english, error), never dropped; `kept` starts as "no reason", and the similarity_band stage
judges the kept ones next.
"""
from __future__ import annotations

import functools
import math

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl.config import LLMModel
from etl.context import StageContext, StageResult
from etl.gpu import DEVICE, devices_used, map_in_pandas
from etl.session import default_parallelism
from etl.stage import Step, stage
from realsyn_models.llm import PromptTemplate, SamplingConfig, make_backend
from udfs.generate import SYNTHETIC_SCHEMA, make_generate_fn

SYNTHETIC_TEXTS_SCHEMA = ("synthetic_id string, " + SYNTHETIC_SCHEMA
                          + ", attempts int, kept boolean, similarity float, similarity_model string, batch_id string")
KEYS = ["synthetic_id"]


def synthetic_id():
    """One text per (image, model, prompt version): the row's key."""
    parts = F.concat_ws("\u001f", F.lit("synthetic"), "image_id", "model_id", "prompt_version")
    return F.sha2(parts, 256).substr(1, 32)


def backend_factory(model: LLMModel):
    """A picklable no-argument constructor of the configured backend (built in each task)."""
    sampling = SamplingConfig(max_new_tokens=model.max_new_tokens, temperature=model.temperature,
                              top_p=model.top_p, seed=model.seed)
    if model.backend == "transformers":
        kwargs = dict(source=model.source, precision=model.precision, batch_size=model.batch_size)
    elif model.backend == "vllm":
        kwargs = dict(model=model.source, tensor_parallel_size=model.tensor_parallel_size,
                      gpu_memory_utilization=model.gpu_memory_utilization, max_model_len=model.max_model_len)
    else:
        kwargs = dict(base_url=model.base_url, model=model.source, api_key_env=model.api_key_env,
                      concurrency=model.concurrency, timeout_s=model.timeout_s, retries=model.retries,
                      backoff_s=model.backoff_s, max_backoff_s=model.max_backoff_s)
    return functools.partial(make_backend, model.backend, sampling=sampling, **kwargs)


def prompt_template(ctx: StageContext) -> PromptTemplate:
    p = ctx.cfg.generate.prompt
    return PromptTemplate(version=p.version, system=p.system, user=p.user)


def fusion_inputs(ctx: StageContext) -> DataFrame:
    """(image_id, source_sentence_id, sentence, caption, tags): each kept image's best retrieved
    sentence (rank 1 of the newest centroid version, still kept), with its caption and tag names
    where those stages produced any."""
    retrievals = ctx.read("retrievals")
    newest = retrievals.agg(F.max("centroid_version")).first()[0]
    best = (retrievals.where((F.col("rank") == 1) & (F.col("centroid_version") == newest))
            .join(ctx.read("images").where("kept = true").select("image_id"), "image_id", "left_semi")
            .join(ctx.read("sentences").where("kept = true")
                  .select("sentence_id", F.col("text").alias("sentence")), "sentence_id")
            .select("image_id", F.col("sentence_id").alias("source_sentence_id"), "sentence"))
    caption_key = ctx.cfg.caption.model
    if caption_key is not None and ctx.exists("captions"):
        captions = (ctx.read("captions").where(F.col("error").isNull() & F.col("caption").isNotNull())
                    .groupBy("image_id").agg(F.max_by("caption", "batch_id").alias("caption")))
        best = best.join(captions, "image_id", "left")
    else:
        best = best.withColumn("caption", F.lit(None).cast("string"))
    if ctx.exists("tags"):
        tags = ctx.read("tags").select("image_id", F.transform("tags", lambda t: t["tag"]).alias("tags"))
        best = best.join(tags, "image_id", "left")
    else:
        best = best.withColumn("tags", F.lit(None).cast("array<string>"))
    return best


def to_generate(ctx: StageContext, inputs: DataFrame, model_id: str, version: str) -> DataFrame:
    """Inputs without a text for this model and prompt version (or whose tries failed, fewer than
    generate.max_attempts times), with the tries so far, capped at generate.max_images, in image order."""
    inputs = inputs.withColumn("attempts", F.lit(0))
    if ctx.exists("synthetic_texts"):
        mine = (ctx.read("synthetic_texts")
                .where((F.col("model_id") == model_id) & (F.col("prompt_version") == version))
                # A text of an older best sentence is stale: generated again (same key, upsert).
                .join(inputs.select("image_id", "source_sentence_id"), ["image_id", "source_sentence_id"],
                      "left_semi"))
        done = mine.where((F.col("finish_reason") != "error") | (F.col("attempts") >= ctx.cfg.generate.max_attempts))
        tried = mine.select("image_id", F.col("attempts").alias("_tried"))
        inputs = (inputs.join(done.select("image_id"), "image_id", "left_anti").join(tried, "image_id", "left")
                  .withColumn("attempts", F.coalesce("_tried", F.lit(0))).drop("_tried"))
    cap = ctx.cfg.generate.max_images
    return (inputs.orderBy("image_id").limit(cap) if cap else inputs).localCheckpoint()


def generate_chunk(ctx: StageContext, chunk: DataFrame, fn) -> tuple[int, list[tuple[str | None, str, int]]]:
    """generate (GPU tasks) -> upsert -> (rows written, (drop reason, device, rows) counted)."""
    tries = chunk.select("image_id", (F.col("attempts") + 1).alias("attempts"))
    out = (map_in_pandas(ctx, chunk.drop("attempts"), fn, SYNTHETIC_SCHEMA, step="llm", with_device=True)
           .join(tries, "image_id")
           .withColumn("synthetic_id", synthetic_id())
           .withColumn("kept", F.col("drop_reason").isNull())
           .withColumn("similarity", F.lit(None).cast("float"))
           .withColumn("similarity_model", F.lit(None).cast("string"))
           .withColumn("batch_id", F.lit(ctx.batch_id))
           .persist())
    try:
        tally = [(r["drop_reason"], r[DEVICE], r["count"]) for r in out.groupBy("drop_reason", DEVICE).count().collect()]
        written = ctx.upsert(out.select(*[c.split()[0] for c in SYNTHETIC_TEXTS_SCHEMA.split(", ")]),
                             "synthetic_texts", KEYS)
    finally:
        out.unpersist()
    return written, tally


@stage(reads=("retrievals", "images", "sentences"), optional_reads=("captions", "tags", "synthetic_texts"),
       writes=("synthetic_texts",), config=("generate", "caption.model"), models=("generate.model",),
       steps=(Step("llm", "the LLM writes each image's synthetic text"),))
def generate(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.generate
    model = ctx.cfg.models[cfg.model]
    template = prompt_template(ctx)
    model_id = model.source  # the served / loaded model's name: what the rows record
    result = StageResult(models={cfg.model: model_id},
                         notes={"prompt": f"{template.version} ({template.hash})", "backend": model.backend})
    ctx.create_if_missing("synthetic_texts", SYNTHETIC_TEXTS_SCHEMA)

    # read
    inputs = fusion_inputs(ctx)
    # propagate: texts of images that no longer have a kept best sentence (a later verdict
    # dropped the image or its sentences) are deleted; pairs and subsets follow by their sync
    gone = ctx.read("synthetic_texts").join(inputs.select("image_id"), "image_id", "left_anti")
    result.metrics["propagated_rows_deleted"] = float(ctx.delete_keys(gone, "synthetic_texts", KEYS))
    todo = to_generate(ctx, inputs, model_id, template.version)
    n = todo.count()
    if cfg.max_images:
        result.notes["capped"] = f"at most {cfg.max_images} images per run (generate.max_images)"
    # transform + write, one commit per chunk: a killed run keeps what it committed
    fn = make_generate_fn(backend_factory(model), template, model.batch_size, cfg.max_chars)
    chunks = max(1, math.ceil(n / cfg.commit_every))
    partitions = default_parallelism(ctx.spark)
    reasons: dict[str, int] = {}
    devices: list[tuple[str, int]] = []
    for c in range(chunks if n else 0):
        part = todo.where(F.pmod(F.xxhash64("image_id"), F.lit(chunks)) == c).repartition(partitions)
        written, tally = generate_chunk(ctx, part, fn)
        result.rows_out += written
        for reason, device, count in tally:
            reasons[reason] = reasons.get(reason, 0) + count
            devices.append((device, count))

    # record
    result.rows_in = n
    result.add_drops({k: v for k, v in reasons.items() if k})
    result.metrics.update({"generated": float(n), "kept": float(reasons.get(None, 0)), "chunks": float(chunks if n else 0)})
    if devices:
        result.notes["devices"] = devices_used(devices)
    return result
