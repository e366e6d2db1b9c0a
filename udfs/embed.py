"""Embedding functions (CLIP; a sentence encoder for dedup) for mapInPandas: Iterator[pd.DataFrame] -> Iterator[pd.DataFrame].

Rows are regrouped into model batches of `batch_size`. For images, decode + preprocessing of the
next batch runs on a small thread pool while the model runs on the current one (PIL and torch
both release the GIL), so the accelerator is not left waiting on JPEG decoding. A row whose input
cannot be used gets a null vector and a reason in `error`; the task never fails on bad data.
"""
from __future__ import annotations

import io
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pandas as pd

from realsyn_models.clip import ClipSpec, get_encoder
from realsyn_models.text_encoder import TextEncoderSpec, get_text_encoder

IMAGE_EMBED_SCHEMA = "image_id string, model_id string, vector array<float>, dim int, error string"
SENTENCE_EMBED_SCHEMA = "sentence_id string, model_id string, vector array<float>, dim int, error string"

# Reasons a row gets no vector (the `error` column).
MISSING_BYTES = "missing_bytes"
EMPTY_BYTES = "empty_bytes"
TOO_LARGE = "too_large"  # more bytes than embed.max_image_bytes
TOO_MANY_PIXELS = "too_many_pixels"  # header says more pixels than embed.max_pixels
UNDECODABLE = "undecodable"  # corrupt or truncated
EMPTY_TEXT = "empty_text"

Prepared = tuple[object | None, str | None]  # (model input, error)


def make_image_embed_fn(spec: ClipSpec, batch_size: int = 32, decode_threads: int = 2,
                        max_image_bytes: int = 20 << 20, max_pixels: int = 89_478_485,
                        id_col: str = "image_id", bytes_col: str = "bytes"):
    """(image_id, bytes) batches -> IMAGE_EMBED_SCHEMA batches."""

    def embed_images(batches: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import torch

        batches = nonempty(batches)
        if batches is None:  # nothing to do: do not load a model for an empty partition
            return
        encoder = get_encoder(spec)

        def prepare(data) -> Prepared:
            image, error = decode_image(data, max_image_bytes, max_pixels, draft_size=_input_size(encoder))
            if error:
                return None, error
            try:
                return encoder.preprocess(image), None
            except Exception:  # a decodable image the transforms still reject
                return None, UNDECODABLE

        def encode(inputs: list) -> np.ndarray:
            return encoder.encode_images(torch.stack(inputs))

        yield from _embed(batches, id_col, bytes_col, batch_size, decode_threads, encoder, prepare, encode)

    return embed_images


def make_text_embed_fn(spec: ClipSpec, batch_size: int = 256,
                       id_col: str = "sentence_id", text_col: str = "text"):
    """(sentence_id, text) batches -> SENTENCE_EMBED_SCHEMA batches."""

    def embed_texts(batches: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        batches = nonempty(batches)
        if batches is None:
            return
        encoder = get_encoder(spec)
        # Tokenising is cheap next to the forward pass: no thread pool.
        yield from _embed(by_length(batches, text_col), id_col, text_col, batch_size, 0, encoder, prepare_text,
                          encoder.encode_texts)

    return embed_texts


def make_sentence_encoder_fn(spec: TextEncoderSpec, model_id: str, batch_size: int = 256,
                             id_col: str = "sentence_id", text_col: str = "text"):
    """(sentence_id, text) batches -> SENTENCE_EMBED_SCHEMA batches under a sentence-transformers
    encoder (the sentence dedup's, where it is not the CLIP)."""

    def encode_sentences(batches: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        batches = nonempty(batches)
        if batches is None:
            return
        encoder = get_text_encoder(spec, model_id)
        yield from _embed(batches, id_col, text_col, batch_size, 0, encoder, prepare_text,
                          lambda texts: encoder.encode_texts(texts, batch_size))

    return encode_sentences


def by_length(batches: Iterable[pd.DataFrame], text_col: str) -> Iterator[pd.DataFrame]:
    """Each Arrow batch's rows, shortest text first. A model batch of similar lengths is only as
    wide as its own longest text, which the CLIP text tower trims to (ClipEncoder.encode_texts);
    the rows keep their ids, so the order they leave in does not matter."""
    for pdf in batches:
        lengths = pdf[text_col].map(lambda t: len(t) if isinstance(t, str) else 0)
        yield pdf.iloc[np.argsort(lengths.to_numpy(), kind="stable")]


def prepare_text(text) -> Prepared:
    if not isinstance(text, str) or not text.strip():
        return None, EMPTY_TEXT
    return text, None


def decode_image(data, max_image_bytes: int, max_pixels: int, draft_size: int | None = None):
    """Bytes -> (RGB PIL image, None) or (None, reason). Size limits are checked before decoding."""
    from PIL import Image

    if data is None:
        return None, MISSING_BYTES
    if len(data) == 0:
        return None, EMPTY_BYTES
    if len(data) > max_image_bytes:
        return None, TOO_LARGE
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            return None, TOO_MANY_PIXELS
        if draft_size and image.format == "JPEG":
            # DCT-domain downscale: a 4000 px photo decodes several times faster; kept at >= twice
            # the model's input so the final resize still filters from more pixels than it keeps.
            image.draft("RGB", (2 * draft_size, 2 * draft_size))
        return image.convert("RGB"), None
    except Image.DecompressionBombError:
        return None, TOO_MANY_PIXELS
    except Exception:  # PIL raises a zoo of types for corrupt/truncated data
        return None, UNDECODABLE


def _input_size(encoder) -> int | None:
    size = getattr(getattr(encoder.model, "visual", None), "image_size", None)
    return max(size) if isinstance(size, (tuple, list)) else size


def _embed(batches: Iterable[pd.DataFrame], id_col: str, value_col: str, batch_size: int, threads: int,
           encoder, prepare: Callable[[object], Prepared], encode: Callable[[list], np.ndarray]
           ) -> Iterator[pd.DataFrame]:
    pool = ThreadPoolExecutor(threads, thread_name_prefix="embed-prep") if threads > 0 else None
    # One batch in flight ahead: its inputs are prepared on the pool while the current one runs.
    pending: deque[tuple[pd.Series, list[Future | Prepared]]] = deque()
    try:
        for chunk in rechunk(batches, batch_size):
            values = chunk[value_col].tolist()
            prepared = [pool.submit(prepare, v) for v in values] if pool else [prepare(v) for v in values]
            pending.append((chunk[id_col].reset_index(drop=True), prepared))
            if len(pending) > 1:
                yield _finish(*pending.popleft(), id_col, encoder, encode)
        while pending:
            yield _finish(*pending.popleft(), id_col, encoder, encode)
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)


def _finish(ids: pd.Series, prepared: list, id_col: str, encoder, encode) -> pd.DataFrame:
    results = [p.result() if isinstance(p, Future) else p for p in prepared]
    ok = [i for i, (_, error) in enumerate(results) if error is None]
    vectors: list[np.ndarray | None] = [None] * len(results)
    if ok:
        for i, vec in zip(ok, encode([results[i][0] for i in ok])):
            vectors[i] = vec
    return pd.DataFrame({
        id_col: ids,
        "model_id": encoder.model_id,
        "vector": vectors,
        "dim": pd.array([encoder.dim if v is not None else None for v in vectors], dtype="Int32"),
        "error": [error for _, error in results],
    })


def nonempty(batches: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame] | None:
    """The batches with empty frames skipped, or None when there are no rows at all."""
    batches = (df for df in batches if len(df))
    first = next(batches, None)
    return None if first is None else itertools.chain([first], batches)


def rechunk(batches: Iterable[pd.DataFrame], size: int) -> Iterator[pd.DataFrame]:
    """Arrow batches of any size -> frames of exactly `size` rows (the last may be shorter)."""
    carry: pd.DataFrame | None = None
    for df in batches:
        if carry is not None and len(carry):
            df = pd.concat([carry, df], ignore_index=True)
        start = 0
        while len(df) - start >= size:
            yield df.iloc[start:start + size]
            start += size
        carry = df.iloc[start:]
    if carry is not None and len(carry):
        yield carry
