"""Property-based fuzzing of the image decode path (udfs/image_quality.py, hypothesis): random bytes
and valid images of every allowed format (and a few more) with bytes flipped, cut, inserted or
duplicated. Properties: `check_image` never raises and gives a known verdict; an image it keeps
has an allowed format, a size within the rules and a pHash; the batch function's output converts
to Arrow as Spark's worker does it. Budget: tests/conftest.py's profile (REALSYN_FUZZ_EXAMPLES)."""
from __future__ import annotations

import io

import pandas as pd
import pytest

from hypothesis import given
from hypothesis import strategies as st
from PIL import Image  # noqa: E402

import hostile_corpus as H  # noqa: E402
from udfs import image_quality as Q  # noqa: E402

# Pillow warns about every corruption it reads past (and libtiff prints to stderr): expected here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

# A small pixel cap keeps a header mutated into a large canvas cheap to refuse or decode.
RULES = Q.QualityRules(max_pixels=2_000_000)
VERDICTS = {None, Q.NO_BYTES, Q.UNDECODABLE, Q.FORMAT, Q.BOMB, Q.ANIMATED, Q.TOO_SMALL, Q.ASPECT, Q.TRUNCATED}


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _seeds() -> dict[str, bytes]:
    """Valid images the rules keep (so a mutation reaches the full decode and pHash), in every
    allowed format and mode, with EXIF orientation, animation and pages; and some they refuse."""
    rgb = Image.new("RGB", (160, 120))
    rgb.putdata([(x % 256, (x * 7) % 256, (x * 13) % 256) for x in range(160 * 120)])
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated, so exif_transpose does work
    frames = [rgb, rgb.rotate(90, expand=False)]
    return {
        "jpeg": _encode(rgb, "JPEG", quality=80),
        "jpeg-exif": _encode(rgb, "JPEG", exif=exif.tobytes()),
        "jpeg-progressive-cmyk": _encode(rgb.convert("CMYK"), "JPEG", progressive=True),
        "png": _encode(rgb, "PNG"),
        "png-palette": _encode(rgb.convert("P"), "PNG"),
        "png-16bit-gray": _encode(rgb.convert("I;16"), "PNG"),
        "png-la": _encode(rgb.convert("LA"), "PNG"),
        "webp": _encode(rgb, "WEBP", quality=60),
        "webp-lossless": _encode(rgb, "WEBP", lossless=True),
        "gif": _encode(rgb.convert("P"), "GIF"),
        "gif-animated": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "bmp": _encode(rgb, "BMP"),
        "tiff": _encode(rgb, "TIFF", compression="tiff_deflate"),
        "tiff-pages": _encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
        "tiff-exif": _encode(rgb, "TIFF", exif=exif.tobytes()),
        "ico": _encode(rgb, "ICO"),
        "png-bomb-header": H.png(),
    }


SEEDS = _seeds()


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)), label="seed")])
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "flip", "header", "cut", "insert", "duplicate", "zero"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op in ("flip", "header") and data:
            at = at if op == "flip" else at % min(len(data), 64)  # headers say what the rest is
            data[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "duplicate":
            n = draw(st.integers(1, 64))
            data[at:at] = data[at:at + n]
        elif op == "zero":
            n = draw(st.integers(1, 64))
            data[at:at + n] = b"\0" * len(data[at:at + n])
    return bytes(data)


def check_verdict(data: bytes) -> None:
    v = Q.check_image(data, RULES)
    assert v.drop_reason in VERDICTS
    if v.drop_reason is None:
        assert v.format in RULES.formats and v.phash is not None
        assert min(v.width, v.height) >= RULES.min_side and v.width * v.height <= RULES.max_pixels


def test_seeds_are_kept_or_refused_as_designed():
    verdicts = {name: Q.check_image(data, RULES).drop_reason for name, data in SEEDS.items()}
    assert verdicts == {**{name: None for name in SEEDS}, "gif-animated": Q.ANIMATED, "tiff-pages": Q.ANIMATED,
                        "ico": Q.FORMAT}


@given(st.binary(max_size=4096))
def test_random_bytes_get_a_verdict(data):
    check_verdict(data)


@given(st.lists(mutated(), min_size=1, max_size=4))
def test_mutated_images_get_a_verdict_and_convert_to_arrow(images):
    for data in images:
        check_verdict(data)
    fn = Q.make_quality_fn(max_pixels=RULES.max_pixels)
    batch = pd.DataFrame({"image_id": [f"i{n}" for n in range(len(images) + 1)], "bytes": [*images, None]})
    out = pd.concat(list(fn(iter([batch]))), ignore_index=True)
    H.to_arrow(out, Q.QUALITY_SCHEMA)
    assert out["image_id"].tolist() == batch["image_id"].tolist()
