"""caption: a short caption per kept image (paper: OFA-base) -> `captions`.

Any transformers image-to-text model named in `models:` (realsyn_models/captioner.py), run in the
GPU tasks. Only images without a caption from the current model are captioned, so a re-run or a
new batch costs only the new images and a new model captions everything again under its id.
Whether the weights can be had is decided once, here on the driver: offline without them the
stage captions nothing, says so loudly (and again in the run's closing summary), and leaves an
empty `captions` table; the generation prompt then reads "(no caption)".
"""
from __future__ import annotations

from pyspark.sql import DataFrame

from etl.config import ImageToTextModel
from etl.context import StageContext, StageResult
from etl.gpu import infer_into
from etl.stage import Step, stage
from realsyn_models.captioner import CaptionSpec, locate_weights
from realsyn_models.clip import WeightsUnavailable
from udfs.caption import CAPTION_SCHEMA, make_caption_fn

CAPTIONS_SCHEMA = CAPTION_SCHEMA + ", batch_id string"


def caption_spec(model: ImageToTextModel) -> CaptionSpec:
    return CaptionSpec(source=model.source, precision=model.precision, batch_size=model.batch_size,
                       prompt=model.prompt, max_new_tokens=model.max_new_tokens, offline=model.offline,
                       cache_dir=model.cache_dir)


def kept_images(ctx: StageContext) -> DataFrame:
    kept = ctx.read("images").where("kept = true").select("image_id")
    return kept.join(ctx.read("image_bytes").select("image_id", "bytes"), "image_id")


@stage(reads=("images", "image_bytes"), optional_reads=("captions",), writes=("captions",),
       config=("caption",), models=("caption.model",),
       steps=(Step("captioner", "image-to-text model over kept images"),))
def caption(ctx: StageContext) -> StageResult:
    result = StageResult()
    ctx.create_if_missing("captions", CAPTIONS_SCHEMA)
    key = ctx.cfg.caption.model
    if key is None:
        result.notes["skipped"] = "caption.model is not set: no captions"
        return result
    spec = caption_spec(ctx.cfg.models[key])
    try:
        locate_weights(spec)
    except WeightsUnavailable as e:
        result.warn(f"NO CAPTIONS: the caption model's weights are not available ({e}); the generation "
                    "prompt's caption slot stays empty")
        result.notes["skipped"] = str(e)
        return result
    result.models[key] = spec.model_id
    fn = make_caption_fn(spec, ctx.cfg.embed.max_image_bytes, ctx.cfg.embed.max_pixels, ctx.cfg.embed.decode_threads)
    infer_into(ctx, result, kept_images(ctx), "captions", "image_id", fn, CAPTION_SCHEMA, spec.model_id, "caption",
               step="captioner")
    return result
