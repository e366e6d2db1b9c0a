"""Decode and quality-filter image bytes: one verdict per image, the first rule that fails.

Cheap header rules run before any pixel is decoded, so a decompression bomb or a tiny icon costs
a header read. Images that pass are decoded in full (which is what catches truncation) and get
their pHash here, so every image is decoded once.

Any bytes get a verdict, never an exception: Pillow's plugins raise more than OSError on corrupt
input (a TIFF whose next page lacks its size raises TypeError while counting frames, found by
tests/test_fuzz_images.py), so whatever else a step raises is `undecodable`.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import pandas as pd
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from udfs.phash import phash_int64

QUALITY_SCHEMA = (
    "image_id string, format string, width int, height int, mode string, phash bigint, drop_reason string"
)

# Drop reasons, in the order the rules run.
NO_BYTES = "no_bytes"
UNDECODABLE = "undecodable"
FORMAT = "format_not_allowed"
BOMB = "decompression_bomb"
ANIMATED = "animated"
TOO_SMALL = "too_small"
ASPECT = "aspect_ratio"
TRUNCATED = "truncated"

# Decoding a JPEG at 1/2..1/8 scale is several times faster; pHash only needs 32x32.
_DRAFT_SIZE = (256, 256)


@dataclass(frozen=True)
class QualityRules:
    min_side: int = 100
    min_aspect: float = 1 / 3
    max_aspect: float = 3.0
    max_pixels: int = 89_478_485
    drop_animated: bool = True
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")


@dataclass
class Verdict:
    format: str | None = None
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    phash: int | None = None
    drop_reason: str | None = None


def check_image(data: bytes | None, rules: QualityRules) -> Verdict:
    if not data:
        return Verdict(drop_reason=NO_BYTES)
    try:
        with warnings.catch_warnings():
            # Pillow warns (and past 2x its limit raises) on huge images; our own cap decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        return Verdict(drop_reason=BOMB)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return Verdict(drop_reason=TRUNCATED if _riff_truncated(data) else UNDECODABLE)
    except Exception:  # noqa: BLE001 - a plugin's own error on corrupt bytes
        return Verdict(drop_reason=UNDECODABLE)
    with img:
        v = Verdict(format=img.format, width=img.width, height=img.height, mode=img.mode)
        try:
            v.drop_reason = _header_rule(img, rules)  # counting frames reads every page's header
        except Image.DecompressionBombError:
            v.drop_reason = BOMB
        except Exception:  # noqa: BLE001 - a plugin's own error on corrupt bytes
            v.drop_reason = UNDECODABLE
        if v.drop_reason:
            return v
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img.draft("RGB", _DRAFT_SIZE)
                img.load()
                v.phash = phash_int64(ImageOps.exif_transpose(img))
        except OSError as e:
            v.drop_reason = TRUNCATED if "truncated" in str(e) or "end of file" in str(e).lower() else UNDECODABLE
        except Exception:  # noqa: BLE001 - ValueError, SyntaxError, EOFError, a plugin's own error
            v.drop_reason = UNDECODABLE
        return v


def _riff_truncated(data: bytes) -> bool:
    # libwebp refuses a cut file at open; the RIFF header says how long it should have been.
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP" and int.from_bytes(data[4:8], "little") + 8 > len(data)


def _header_rule(img: Image.Image, rules: QualityRules) -> str | None:
    if img.format not in rules.formats:
        return FORMAT
    if img.width * img.height > rules.max_pixels:
        return BOMB
    if rules.drop_animated and getattr(img, "n_frames", 1) > 1:
        return ANIMATED
    if min(img.width, img.height) < rules.min_side:
        return TOO_SMALL
    if not rules.min_aspect <= img.width / img.height <= rules.max_aspect:
        return ASPECT
    return None


def make_quality_fn(**rules: object) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """mapInPandas fn: (image_id, bytes) -> QUALITY_SCHEMA rows."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on: truncated images would pass")
    r = QualityRules(**{k: tuple(v) if isinstance(v, list) else v for k, v in rules.items()})

    def quality_batches(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            verdicts = [check_image(b, r) for b in pdf["bytes"]]
            yield pd.DataFrame({
                "image_id": pdf["image_id"],
                "format": [v.format for v in verdicts],
                "width": pd.array([v.width for v in verdicts], dtype="Int32"),
                "height": pd.array([v.height for v in verdicts], dtype="Int32"),
                "mode": [v.mode for v in verdicts],
                "phash": pd.array([v.phash for v in verdicts], dtype="Int64"),
                "drop_reason": [v.drop_reason for v in verdicts],
            })

    return quality_batches
