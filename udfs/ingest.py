"""Raw records -> normalised documents, one mapInPandas pass for every input format.

Every reader first turns its input into one JSON string per record (OBELICS parquet rows via
`to_json`, jsonl lines as they are), so validation is the same code for all formats. A record
either becomes a document (kind "doc") or a quarantine row (kind "bad") with a reason; a document
can also carry per-slot quarantine rows (a missing image file drops that slot, not the page).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import pandas as pd

from udfs.ids import normalise_text, normalise_url, stable_id

INPUT_FORMATS = ("obelics", "mmc4", "interleaved_jsonl")

# Quarantine reasons (the `reason` column); tests assert each one.
BAD_JSON = "bad_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
LENGTH_MISMATCH = "length_mismatch"
BAD_SLOT = "bad_slot"  # OBELICS position holding both or neither of text and image
BAD_REFERENCE = "bad_reference"  # MMC4 matched_text_index outside text_list
NON_UTF8 = "non_utf8"
EMPTY_DOC = "empty_doc"
MISSING_FILE = "missing_file"
BAD_URL = "bad_url"
RECORD_TOO_LARGE = "record_too_large"
UNREADABLE_FILE = "unreadable_file"  # a whole input file Spark cannot read (set by the stage)

PARSED_FIELDS = (
    ("kind", "string"), ("doc_id", "string"), ("url", "string"), ("title", "string"),
    ("source_format", "string"), ("source", "string"), ("record_no", "bigint"), ("metadata", "string"),
    ("texts", "array<struct<position:int,text_id:string,text:string>>"),
    ("images", "array<struct<position:int,image_id:string,url:string,path:string,alt_text:string,"
               "metadata:string,bytes:binary>>"),
    ("reason", "string"), ("detail", "string"), ("raw", "string"),
)
PARSED_COLUMNS = [name for name, _ in PARSED_FIELDS]
PARSED_SCHEMA = ", ".join(f"{name} {kind}" for name, kind in PARSED_FIELDS)


class BadRecord(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Doc:
    url: str | None
    title: str | None
    metadata: dict
    texts: list[dict] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    slot_errors: list[tuple[str, str, str]] = field(default_factory=list)  # (reason, detail, raw)


# --- field checks -----------------------------------------------------------------------------

def _require(obj: dict, key: str, kind: type | tuple[type, ...]) -> object:
    if key not in obj or obj[key] is None:
        raise BadRecord(MISSING_FIELD, f"field {key!r} is missing")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise BadRecord(WRONG_TYPE, f"field {key!r} is {type(value).__name__}")
    return value


def _optional_str(obj: dict, key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRecord(WRONG_TYPE, f"field {key!r} is {type(value).__name__}, expected string")
    return value


def _check_utf8(text: str, where: str) -> str:
    # Spark decodes invalid UTF-8 bytes to U+FFFD; JSON escapes can smuggle lone surrogates.
    if "\ufffd" in text:
        raise BadRecord(NON_UTF8, f"{where}: invalid UTF-8 (replacement character)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRecord(NON_UTF8, f"{where}: lone surrogate") from None
    return text


def _is_web_url(url: str) -> bool:
    url = url.strip()
    return url.startswith(("http://", "https://")) and len(url.split("://", 1)[1]) > 0


def _web_url(url: str) -> str:
    # Crawls carry raw spaces in paths (MMC4 does); browsers send them as %20.
    return url.strip().replace(" ", "%20")


def _json_field(value: object, key: str) -> object:
    """OBELICS stores metadata as JSON strings; accept an already-parsed value too."""
    if value is None or not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise BadRecord(WRONG_TYPE, f"field {key!r} is not valid JSON") from None


# --- one parser per input format ----------------------------------------------------------------

def _image_slot(position: int, url: str | None, path: str | None, alt: str | None,
                meta: dict | None, data: bytes | None) -> dict:
    if url:
        image_id = stable_id("image-url", normalise_url(url))
    else:
        image_id = stable_id("image-bytes", hashlib.sha256(data or b"").digest())
    return {"position": position, "image_id": image_id, "url": url, "path": path, "alt_text": alt,
            "metadata": json.dumps(meta, ensure_ascii=False) if meta else None, "bytes": data}


def _text_slot(doc: Doc, position: int, text: str) -> None:
    text = _check_utf8(text, f"text at position {position}")
    if text.strip():
        doc.texts.append({"position": position, "text_id": stable_id("text", normalise_text(text)),
                          "text": text})


def parse_obelics(obj: dict, base_dir: str) -> Doc:
    """HF OBELICS row: parallel `images`/`texts` lists (one non-null per position), `metadata`
    (JSON list parallel to them), `general_metadata` (JSON with the page url). An optional
    `image_bytes` list (our extension, used by the bundled sample) carries inline bytes."""
    images = _require(obj, "images", list)
    texts = _require(obj, "texts", list)
    if len(images) != len(texts):
        raise BadRecord(LENGTH_MISMATCH, f"images has {len(images)} slots, texts has {len(texts)}")
    metadata = _json_field(obj.get("metadata"), "metadata") or [None] * len(images)
    if not isinstance(metadata, list) or len(metadata) != len(images):
        raise BadRecord(LENGTH_MISMATCH, "metadata is not a list parallel to images/texts")
    inline = obj.get("image_bytes") or [None] * len(images)
    if not isinstance(inline, list) or len(inline) != len(images):
        raise BadRecord(LENGTH_MISMATCH, "image_bytes is not a list parallel to images/texts")
    general = _json_field(obj.get("general_metadata"), "general_metadata") or {}
    if not isinstance(general, dict):
        raise BadRecord(WRONG_TYPE, "general_metadata is not an object")
    url = general.get("url") if isinstance(general.get("url"), str) else None
    doc = Doc(url=url, title=general.get("title") if isinstance(general.get("title"), str) else None,
              metadata=general)
    for pos, (image, text, meta, data) in enumerate(zip(images, texts, metadata, inline)):
        if (image is None) == (text is None):
            raise BadRecord(BAD_SLOT, f"position {pos} holds {'both' if image else 'neither'} text and image")
        if text is not None:
            if not isinstance(text, str):
                raise BadRecord(WRONG_TYPE, f"texts[{pos}] is {type(text).__name__}")
            _text_slot(doc, pos, text)
            continue
        if not isinstance(image, str):
            raise BadRecord(WRONG_TYPE, f"images[{pos}] is {type(image).__name__}")
        if not _is_web_url(image):
            doc.slot_errors.append((BAD_URL, f"images[{pos}] is not an http(s) URL", image))
            continue
        meta = meta if isinstance(meta, dict) else None
        alt = meta.get("alt_text") if meta and isinstance(meta.get("alt_text"), str) else None
        blob = base64.b64decode(data) if isinstance(data, str) else None
        doc.images.append(_image_slot(pos, _web_url(image), None, alt, meta, blob))
    return doc


def parse_mmc4(obj: dict, base_dir: str) -> Doc:
    """MMC4 page: `text_list` (sentences in order), `image_info` (each with `raw_url` and the
    `matched_text_index` it was aligned to), `url`. Images are placed right after their
    matched sentence, keeping MMC4's own order among images matched to the same sentence."""
    text_list = _require(obj, "text_list", list)
    infos = obj.get("image_info") or []
    if not isinstance(infos, list):
        raise BadRecord(WRONG_TYPE, "field 'image_info' is not a list")
    url = _optional_str(obj, "url")
    doc = Doc(url=url, title=None, metadata={k: obj[k] for k in ("url",) if k in obj})
    after: dict[int, list[dict]] = {}
    for j, info in enumerate(infos):
        if not isinstance(info, dict):
            raise BadRecord(WRONG_TYPE, f"image_info[{j}] is {type(info).__name__}")
        idx = info.get("matched_text_index")
        if not isinstance(idx, int) or isinstance(idx, bool):
            raise BadRecord(WRONG_TYPE, f"image_info[{j}].matched_text_index is not an integer")
        if not 0 <= idx < len(text_list):
            raise BadRecord(BAD_REFERENCE, f"image_info[{j}] matches text {idx} of {len(text_list)}")
        after.setdefault(idx, []).append(info)
    position = 0
    for i, text in enumerate(text_list):
        if not isinstance(text, str):
            raise BadRecord(WRONG_TYPE, f"text_list[{i}] is {type(text).__name__}")
        _text_slot(doc, position, text)
        position += 1
        for info in after.get(i, []):
            raw_url = info.get("raw_url")
            if not isinstance(raw_url, str) or not _is_web_url(raw_url):
                doc.slot_errors.append((BAD_URL, f"image at position {position} has no http(s) raw_url",
                                        json.dumps(info)[:500]))
            else:
                meta = {k: v for k, v in info.items() if k != "raw_url"}
                doc.images.append(_image_slot(position, _web_url(raw_url), None, None, meta, None))
            position += 1
    return doc


def parse_interleaved(obj: dict, base_dir: str) -> Doc:
    """Our plain interleaved form (the shape of the recipes' docs.jsonl): `blocks` in reading
    order, each {type: text, text} or {type: image, path (relative to the file), alt}."""
    blocks = _require(obj, "blocks", list)
    url = _optional_str(obj, "url")
    meta = {k: obj[k] for k in ("doc_id", "tags", "author") if isinstance(obj.get(k), str)}
    doc = Doc(url=url, title=_optional_str(obj, "title"), metadata=meta)
    for pos, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") not in ("text", "image"):
            raise BadRecord(WRONG_TYPE, f"blocks[{pos}] is not a text or image block")
        if block["type"] == "text":
            text = _require(block, "text", str)
            _text_slot(doc, pos, text)
            continue
        rel = _require(block, "path", str)
        path = os.path.normpath(os.path.join(base_dir, rel))
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            doc.slot_errors.append((MISSING_FILE, f"blocks[{pos}]: {rel}: {e.strerror}", json.dumps(block)))
            continue
        alt = block.get("alt") if isinstance(block.get("alt"), str) else None
        doc.images.append(_image_slot(pos, None, path, alt, None, data))
    return doc


PARSERS = {"obelics": parse_obelics, "mmc4": parse_mmc4, "interleaved_jsonl": parse_interleaved}


# --- the mapInPandas function -------------------------------------------------------------------

def _doc_id(doc: Doc) -> str:
    if doc.url:
        return stable_id("doc", normalise_url(doc.url))
    content = [t["text_id"] for t in doc.texts] + [i["image_id"] for i in doc.images]
    return stable_id("doc-content", *content)


def parse_record(raw: str, fmt: str, base_dir: str, max_bytes: int) -> Doc:
    if len(raw) > max_bytes:
        raise BadRecord(RECORD_TOO_LARGE, f"{len(raw)} characters > {max_bytes}")
    _check_utf8(raw, "record")
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BadRecord(BAD_JSON, str(e)) from None
    if not isinstance(obj, dict):
        raise BadRecord(NOT_AN_OBJECT, f"record is a JSON {type(obj).__name__}")
    doc = PARSERS[fmt](obj, base_dir)
    if not doc.texts and not doc.images:
        raise BadRecord(EMPTY_DOC, "no text and no usable image")
    return doc


def make_parse_fn(fmt: str, max_record_bytes: int, raw_chars: int):
    """mapInPandas fn: batches of (source, record_no, raw, base_dir) -> PARSED_SCHEMA rows."""
    if fmt not in PARSERS:
        raise ValueError(f"unknown input format {fmt!r}")

    def bad(source: str, record_no: int, reason: str, detail: str, raw: str) -> dict:
        return {"kind": "bad", "source": source, "record_no": record_no, "source_format": fmt,
                "reason": reason, "detail": detail[:500], "raw": raw[:raw_chars]}

    def parse(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            rows = []
            for source, record_no, raw, base_dir in batch[["source", "record_no", "raw", "base_dir"]].itertuples(index=False):
                try:
                    doc = parse_record(raw, fmt, base_dir, max_record_bytes)
                except BadRecord as e:
                    rows.append(bad(source, record_no, e.reason, e.detail, raw))
                    continue
                rows.append({
                    "kind": "doc", "doc_id": _doc_id(doc), "url": doc.url, "title": doc.title,
                    "source_format": fmt, "source": source, "record_no": record_no,
                    "metadata": json.dumps(doc.metadata, ensure_ascii=False, sort_keys=True),
                    "texts": doc.texts, "images": doc.images,
                })
                rows.extend(bad(source, record_no, r, d, x) for r, d, x in doc.slot_errors)
            # Object columns keep None as None: an all-NaN float column does not convert to an
            # Arrow string array in Spark's serializer.
            yield pd.DataFrame({c: pd.Series([r.get(c) for r in rows], dtype=object) for c in PARSED_COLUMNS})

    return parse

