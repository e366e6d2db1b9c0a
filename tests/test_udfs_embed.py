"""Embedding udfs on plain pandas batches (no Spark): bad bytes give a reason, never a crash."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from clip_fixtures import fresh_model_cache  # noqa: F401  (fixture)
from data_paths import TEST_DATA
from realsyn_models import cache
from realsyn_models.clip import get_encoder
from udfs import embed as E

PIX = TEST_DATA / "recipes" / "static" / "pix"  # bundled real photos (tests/data/README.md)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def _pixel_bomb() -> bytes:
    """A valid PNG header that claims 100000 x 100000 pixels (a few dozen bytes on disk)."""
    png = _encode(Image.new("L", (1, 1)), "PNG")
    ihdr = struct.pack(">II", 100_000, 100_000) + png[24:29]
    return png[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + png[33:]


@pytest.fixture(scope="module")
def images() -> dict[str, bytes | None]:
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (120, 90, 3), dtype=np.uint8))
    jpeg = _encode(photo, "JPEG")
    out = {
        "jpeg": jpeg,
        "png_rgba": _encode(Image.new("RGBA", (50, 70), (10, 200, 30, 128)), "PNG"),
        "gif_palette": _encode(photo.convert("P"), "GIF"),
        "corrupt": b"\x89PNG\r\n\x1a\n" + rng.bytes(300),
        "truncated": jpeg[: len(jpeg) // 2],
        "zero_bytes": b"",
        "none": None,
        "too_large": jpeg + b"\0" * (2 << 20),
        "bomb": _pixel_bomb(),
    }
    out["webp_photo"] = sorted(PIX.glob("*.webp"))[0].read_bytes()  # a real photo, always bundled
    return out


EXPECTED_ERRORS = {"corrupt": E.UNDECODABLE, "truncated": E.UNDECODABLE, "zero_bytes": E.EMPTY_BYTES,
                   "none": E.MISSING_BYTES, "too_large": E.TOO_LARGE, "bomb": E.TOO_MANY_PIXELS}


@pytest.fixture(autouse=True)
def _fresh_cache(fresh_model_cache):
    """Every test here starts with no model loaded (load counts start at zero)."""


def _frames(ids, values, col, sizes):
    """Split rows into frames of the given sizes, as Arrow batches arrive."""
    frames, start = [], 0
    for size in sizes:
        frames.append(pd.DataFrame({col[0]: ids[start:start + size], col[1]: values[start:start + size]}))
        start += size
    return frames


def test_bad_images_get_null_vectors_with_reasons(tiny_clip, images):
    ids, blobs = list(images), list(images.values())
    fn = E.make_image_embed_fn(tiny_clip.spec(), batch_size=3, decode_threads=2, max_image_bytes=1 << 20)
    out = pd.concat(fn(iter(_frames(ids, blobs, ("image_id", "bytes"), [4, 1, len(ids) - 5]))), ignore_index=True)

    assert out["image_id"].tolist() == ids  # order kept across re-chunking
    assert list(out.columns) == ["image_id", "model_id", "vector", "dim", "error"]
    got = dict(zip(out["image_id"], out["error"]))
    assert {k: v for k, v in got.items() if v is not None} == EXPECTED_ERRORS
    good = out[out["error"].isna()]
    assert len(good) == len(ids) - len(EXPECTED_ERRORS)
    vectors = np.stack(good["vector"].tolist())
    assert vectors.dtype == np.float32 and vectors.shape[1] == 16 and (good["dim"] == 16).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert out.loc[out["error"].notna(), "vector"].isna().all() and out.loc[out["error"].notna(), "dim"].isna().all()
    assert (out["model_id"] == tiny_clip.spec().model_id).all()

    # The pipelined, batched path gives what the encoder gives image by image (PNG: JPEGs are
    # decoded at reduced scale, see decode_image).
    encoder = get_encoder(tiny_clip.spec())
    direct = encoder.encode_pil([Image.open(io.BytesIO(images["png_rgba"])).convert("RGB")])[0]
    np.testing.assert_allclose(out.loc[out["image_id"] == "png_rgba", "vector"].iloc[0], direct, atol=1e-5)


def test_pixel_limit_is_checked_before_decoding(tiny_clip, images):
    fn = E.make_image_embed_fn(tiny_clip.spec(), max_pixels=100 * 100)
    out = pd.concat(fn(iter([pd.DataFrame({"image_id": ["jpeg"], "bytes": [images["jpeg"]]})])))
    assert out["error"].tolist() == [E.TOO_MANY_PIXELS]


def test_model_loads_once_across_batches_and_calls(tiny_clip, images):
    fn = E.make_image_embed_fn(tiny_clip.spec(), batch_size=2)
    frames = _frames(["a", "b", "c"], [images["jpeg"]] * 3, ("image_id", "bytes"), [1, 2])
    for _ in range(3):  # three "tasks" in one worker
        assert sum(len(df) for df in fn(iter(frames))) == 3
    assert cache.load_count() == 1


def test_empty_partition_loads_no_model(tiny_clip):
    fn = E.make_image_embed_fn(tiny_clip.spec())
    assert list(fn(iter([]))) == []
    assert list(fn(iter([pd.DataFrame({"image_id": [], "bytes": []})]))) == []
    assert cache.load_count() == 0


def test_texts_embed_in_batches_and_empty_text_has_a_reason(tiny_clip):
    texts = ["Knead the dough for ten minutes.", "", None, "   ", "Serve warm with cream.", "a " * 500]
    ids = [f"s{i}" for i in range(len(texts))]
    fn = E.make_text_embed_fn(tiny_clip.spec(), batch_size=4)
    chunks = list(fn(iter(_frames(ids, texts, ("sentence_id", "text"), [2, 4]))))
    assert [len(c) for c in chunks] == [4, 2]
    # Within each Arrow batch, shortest text first (model batches of similar widths).
    assert chunks[0]["sentence_id"].tolist() == ["s1", "s0", "s2", "s3"]
    out = pd.concat(chunks, ignore_index=True).set_index("sentence_id").loc[ids]
    assert out["error"].tolist() == [None, E.EMPTY_TEXT, E.EMPTY_TEXT, E.EMPTY_TEXT, None, None]
    vectors = np.stack(out["vector"].dropna().tolist())
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    encoder = get_encoder(tiny_clip.spec())
    for i in (0, 4, 5):  # each text alone gives the vector it got in its length-sorted batch
        np.testing.assert_allclose(out["vector"].iloc[i], encoder.encode_texts([texts[i]])[0], atol=1e-5)
