"""Caption function for mapInPandas: (image_id, bytes) batches -> one caption row per image.

Images are decoded by the embed path's `decode_image`, with the same byte and pixel caps and the
same reasons, so an image is refused for the same reason in every stage. Bad data never fails the
task: an image that cannot be decoded, or that the model's processor rejects, gets a reason in
`error` and no caption. A failure of the model itself (generate, the GPU) does fail the task, so
Spark retries it instead of writing a partition of empty captions.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pandas as pd

from realsyn_models.captioner import Captioner, CaptionSpec, UnprocessableImages, load_captioner
from udfs.embed import UNDECODABLE, nonempty, rechunk, decode_image

CAPTION_SCHEMA = "image_id string, caption string, model_id string, error string"


def make_caption_fn(spec: CaptionSpec, max_image_bytes: int = 20 << 20, max_pixels: int = 89_478_485,
                    decode_threads: int = 2, id_col: str = "image_id", bytes_col: str = "bytes"):
    """(image_id, bytes) batches -> CAPTION_SCHEMA batches, one row out per row in."""

    def caption_images(batches: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        batches = nonempty(batches)
        if batches is None:  # nothing to do: do not load a model for an empty partition
            return
        captioner = load_captioner(spec)

        def decode(data):
            return decode_image(data, max_image_bytes, max_pixels, draft_size=captioner.input_size)

        with ThreadPoolExecutor(max(1, decode_threads), thread_name_prefix="caption-decode") as pool:
            for chunk in rechunk(batches, spec.batch_size):
                decoded = list(pool.map(decode, chunk[bytes_col]))
                yield _caption_rows(chunk[id_col].reset_index(drop=True), decoded, captioner, id_col)

    return caption_images


def _caption_rows(ids: pd.Series, decoded: list, captioner: Captioner, id_col: str) -> pd.DataFrame:
    errors = [error for _, error in decoded]
    ok = [i for i, error in enumerate(errors) if error is None]
    captions: list[str | None] = [None] * len(decoded)
    for i, caption in zip(ok, _caption_each([decoded[i][0] for i in ok], captioner)):
        captions[i] = caption
        if caption is None:
            errors[i] = UNDECODABLE  # decodable, but the model's processor rejects it (as embed's transforms)
    return pd.DataFrame({id_col: ids, "caption": captions, "model_id": captioner.model_id, "error": errors})


def _caption_each(images: list, captioner: Captioner) -> list[str | None]:
    """Captions in order; when the processor rejects the batch, image by image so that only the
    images it rejects alone go without (None)."""
    if not images:
        return []
    try:
        return captioner.caption(images)
    except UnprocessableImages:
        if len(images) == 1:
            return [None]
    return [c for image in images for c in _caption_each([image], captioner)]
