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
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

import pandas as pd

from udfs.ids import normalise_text, normalise_url, stable_id
from udfs.redact import DEFAULT_SECRET_PARAMS, redact_text, redact_url

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
TEXT_TOO_LONG = "text_too_long"  # one paragraph over ingest.max_text_chars; the page keeps the rest
UNREADABLE_FILE = "unreadable_file"  # a whole input file that cannot be read (set by the stage)
# Local image paths (interleaved_jsonl): the file must be a regular file inside the input's root.
PATH_OUTSIDE_INPUT = "path_outside_input"
NOT_A_REGULAR_FILE = "not_a_regular_file"
FILE_TOO_LARGE = "too_large"  # the same word fetch uses for a body over the cap

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


@dataclass(frozen=True)
class LocalFiles:
    """Where a local image path may lead and how much of it may be read.

    A path is resolved against `root` (ingest.local_root) or, when that is unset, the folder of
    the input file that names it; symlinks and `..` are resolved before the check, so the file
    actually opened lies inside that folder or under one of `allow_roots` (absolute paths elsewhere,
    off by default). Only regular files are read, never more than `max_bytes`.
    """
    root: str | None = None
    allow_roots: tuple[str, ...] = ()
    max_bytes: int = 20 << 20

    def _roots(self, base_dir: str) -> list[str]:
        return [os.path.realpath(r) for r in (self.root or base_dir, *self.allow_roots)]

    def read(self, rel: str, base_dir: str) -> tuple[str, bytes]:
        """(resolved path, bytes) of an image path named by a record; BadRecord when refused."""
        roots = self._roots(base_dir)
        path = os.path.realpath(os.path.join(roots[0], rel))  # an absolute `rel` replaces the root
        if not any(_inside(path, r) for r in roots):
            raise BadRecord(PATH_OUTSIDE_INPUT, f"{rel!r} resolves outside the input folder")
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: the resolved path
            # has no symlink left, so one appearing now is a swap under our feet.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise BadRecord(MISSING_FILE, f"{rel}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BadRecord(NOT_A_REGULAR_FILE, f"{rel!r} is not a regular file")
            opened = _opened_path(fd)
            if opened is not None and not any(_inside(opened, r) for r in roots):
                raise BadRecord(PATH_OUTSIDE_INPUT, f"{rel!r} was swapped for a path outside the input folder")
            if st.st_size > self.max_bytes:
                raise BadRecord(FILE_TOO_LARGE, f"{rel}: {st.st_size} bytes > {self.max_bytes}")
            f = os.fdopen(fd, "rb", buffering=0)
        except BaseException:
            os.close(fd)
            raise
        with f:
            data = read_capped(f, self.max_bytes)
        if data is None:  # grew while being read, or its size was a lie
            raise BadRecord(FILE_TOO_LARGE, f"{rel}: more than {self.max_bytes} bytes")
        return path, data


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _opened_path(fd: int) -> str | None:
    """What the kernel says the descriptor points at (Linux); None where /proc is absent."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


@dataclass(frozen=True)
class Limits:
    """Every size a hostile record could abuse, bounded (ingest.* in config)."""
    max_record_bytes: int = 64 << 20
    max_text_chars: int = 1 << 20
    files: LocalFiles = LocalFiles()
    # Query parameters whose values are credentials (signed URLs): never stored (udfs/redact.py).
    secret_params: tuple[str, ...] = tuple(DEFAULT_SECRET_PARAMS)

    def url(self, url: str) -> str:
        """A page or image URL as stored (and hashed into ids): credentials removed."""
        return redact_url(url, self.secret_params)

    def text(self, text: str | None) -> str | None:
        return redact_text(text, self.secret_params)


_READ_CHUNK = 1 << 20


def read_capped(f, max_bytes: int) -> bytes | None:
    """All of a binary stream, or None as soon as it passes max_bytes (never holds more)."""
    chunks, size = [], 0
    while chunk := f.read(min(_READ_CHUNK, max_bytes + 1 - size)):
        size += len(chunk)
        if size > max_bytes:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


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


def _web_url(url: str, limits: "Limits") -> str:
    # Crawls carry raw spaces in paths (MMC4 does); browsers send them as %20.
    return limits.url(url.strip().replace(" ", "%20"))


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


def _text_slot(doc: Doc, position: int, text: str, limits: "Limits") -> None:
    text = _check_utf8(text, f"text at position {position}")
    if len(text) > limits.max_text_chars:
        doc.slot_errors.append((TEXT_TOO_LONG, f"text at position {position}: {len(text)} characters > "
                                f"{limits.max_text_chars}", text[:200]))
        return
    if text.strip():
        doc.texts.append({"position": position, "text_id": stable_id("text", normalise_text(text)),
                          "text": text})


def parse_obelics(obj: dict, base_dir: str, limits: Limits) -> Doc:
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
    url = limits.url(general["url"]) if isinstance(general.get("url"), str) else None
    doc = Doc(url=url, title=general.get("title") if isinstance(general.get("title"), str) else None,
              metadata=general)
    for pos, (image, text, meta, data) in enumerate(zip(images, texts, metadata, inline)):
        if (image is None) == (text is None):
            raise BadRecord(BAD_SLOT, f"position {pos} holds {'both' if image else 'neither'} text and image")
        if text is not None:
            if not isinstance(text, str):
                raise BadRecord(WRONG_TYPE, f"texts[{pos}] is {type(text).__name__}")
            _text_slot(doc, pos, text, limits)
            continue
        if not isinstance(image, str):
            raise BadRecord(WRONG_TYPE, f"images[{pos}] is {type(image).__name__}")
        if not _is_web_url(image):
            doc.slot_errors.append((BAD_URL, f"images[{pos}] is not an http(s) URL", image))
            continue
        meta = meta if isinstance(meta, dict) else None
        alt = meta.get("alt_text") if meta and isinstance(meta.get("alt_text"), str) else None
        blob = base64.b64decode(data) if isinstance(data, str) else None
        doc.images.append(_image_slot(pos, _web_url(image, limits), None, alt, meta, blob))
    return doc


def parse_mmc4(obj: dict, base_dir: str, limits: Limits) -> Doc:
    """MMC4 page: `text_list` (sentences in order), `image_info` (each with `raw_url` and the
    `matched_text_index` it was aligned to), `url`. Images are placed right after their
    matched sentence, keeping MMC4's own order among images matched to the same sentence."""
    text_list = _require(obj, "text_list", list)
    infos = obj.get("image_info") or []
    if not isinstance(infos, list):
        raise BadRecord(WRONG_TYPE, "field 'image_info' is not a list")
    url = _optional_str(obj, "url")
    url = limits.url(url) if url else url
    doc = Doc(url=url, title=None, metadata={"url": url} if url else {})
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
        _text_slot(doc, position, text, limits)
        position += 1
        for info in after.get(i, []):
            raw_url = info.get("raw_url")
            if not isinstance(raw_url, str) or not _is_web_url(raw_url):
                doc.slot_errors.append((BAD_URL, f"image at position {position} has no http(s) raw_url",
                                        json.dumps(info)[:500]))
            else:
                meta = {k: v for k, v in info.items() if k != "raw_url"}
                doc.images.append(_image_slot(position, _web_url(raw_url, limits), None, None, meta, None))
            position += 1
    return doc


def parse_interleaved(obj: dict, base_dir: str, limits: Limits) -> Doc:
    """Our plain interleaved form (the shape of the recipes' docs.jsonl): `blocks` in reading
    order, each {type: text, text} or {type: image, path (relative to the file), alt}. Paths are
    contained and capped by `limits.files` (LocalFiles)."""
    blocks = _require(obj, "blocks", list)
    url = _optional_str(obj, "url")
    url = limits.url(url) if url else url
    meta = {k: obj[k] for k in ("doc_id", "tags", "author") if isinstance(obj.get(k), str)}
    doc = Doc(url=url, title=_optional_str(obj, "title"), metadata=meta)
    for pos, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") not in ("text", "image"):
            raise BadRecord(WRONG_TYPE, f"blocks[{pos}] is not a text or image block")
        if block["type"] == "text":
            text = _require(block, "text", str)
            _text_slot(doc, pos, text, limits)
            continue
        rel = _require(block, "path", str)
        try:
            path, data = limits.files.read(rel, base_dir)
        except BadRecord as e:
            doc.slot_errors.append((e.reason, f"blocks[{pos}]: {e.detail}", json.dumps(block)))
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


def parse_record(raw: str, fmt: str, base_dir: str, limits: Limits) -> Doc:
    if len(raw) > limits.max_record_bytes:
        raise BadRecord(RECORD_TOO_LARGE, f"{len(raw)} characters > {limits.max_record_bytes}")
    _check_utf8(raw, "record")
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BadRecord(BAD_JSON, str(e)) from None
    if not isinstance(obj, dict):
        raise BadRecord(NOT_AN_OBJECT, f"record is a JSON {type(obj).__name__}")
    doc = PARSERS[fmt](obj, base_dir, limits)
    if not doc.texts and not doc.images:
        raise BadRecord(EMPTY_DOC, "no text and no usable image")
    return doc


def make_parse_fn(fmt: str, limits: Limits, raw_chars: int):
    """mapInPandas fn: batches of RAW_SCHEMA rows -> PARSED_SCHEMA rows.

    URLs are stored redacted and every quarantined or metadata text goes through the same
    redaction, so no credential reaches a table."""
    if fmt not in PARSERS:
        raise ValueError(f"unknown input format {fmt!r}")
    redact = limits.text

    def bad(source: str, record_no: int, reason: str, detail: str, raw: str) -> dict:
        return {"kind": "bad", "source": source, "record_no": record_no, "source_format": fmt,
                "reason": reason, "detail": redact(detail[:500]), "raw": redact(raw[:raw_chars])}

    def parse(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            rows = []
            cols = batch[["source", "record_no", "raw", "base_dir", "cut_length"]].itertuples(index=False)
            for source, record_no, raw, base_dir, cut_length in cols:
                # A remote file read by Spark is named by its own URI (s3a://key:secret@...).
                source = limits.url(source) if "://" in source else source
                if record_no == UNREADABLE_RECORD:
                    rows.append(bad(source, None, UNREADABLE_FILE, raw, ""))
                    continue
                try:
                    if pd.notna(cut_length):  # cut by the capped reader: only its head came
                        raise BadRecord(RECORD_TOO_LARGE, f"{int(cut_length)} bytes > {limits.max_record_bytes}")
                    doc = parse_record(raw, fmt, base_dir, limits)
                except BadRecord as e:
                    rows.append(bad(source, record_no, e.reason, e.detail, raw))
                    continue
                rows.append({
                    "kind": "doc", "doc_id": _doc_id(doc), "url": doc.url, "title": doc.title,
                    "source_format": fmt, "source": source, "record_no": record_no,
                    "metadata": redact(json.dumps(doc.metadata, ensure_ascii=False, sort_keys=True)),
                    "texts": doc.texts, "images": doc.images,
                })
                rows.extend(bad(source, record_no, r, d, x) for r, d, x in doc.slot_errors)
            # Object columns keep None as None: an all-NaN float column does not convert to an
            # Arrow string array in Spark's serializer.
            yield pd.DataFrame({c: pd.Series([r.get(c) for r in rows], dtype=object) for c in PARSED_COLUMNS})

    return parse


# --- the capped line reader ----------------------------------------------------------------------

RAW_SCHEMA = "source string, record_no bigint, raw string, base_dir string, cut_length bigint"
FILES_SCHEMA = "source string, base_dir string"


def read_lines_capped(f, max_bytes: int, keep: int) -> Iterator[tuple[str, int | None]]:
    """(line, cut_length) per line of a binary stream, the line ending removed as Spark's text
    reader does. A line longer than max_bytes yields only its first `keep` bytes and its true
    length in bytes, and is skimmed past in chunks, so no line is ever held whole in memory;
    cut_length is None for every whole line."""
    while line := f.readline(max_bytes + 1):
        cut = None
        if len(line) > max_bytes and not line.endswith(b"\n"):
            cut = len(line)
            line = line[:keep]
            while (more := f.readline(_READ_CHUNK)) and not more.endswith(b"\n"):
                cut += len(more)
            cut += len(more)
        text = line.decode("utf-8", errors="replace")
        yield text.removesuffix("\n").removesuffix("\r"), cut


def make_read_fn(max_record_bytes: int, raw_chars: int, batch_rows: int = 1024):
    """mapInPandas fn: (source, base_dir) file rows -> RAW_SCHEMA rows, record_no = line number.

    Reads local jsonl inputs streaming, each line capped at max_record_bytes (Spark's text reader
    would hold any line whole, however long). A file that is not a regular file, or cannot be
    opened, yields one row with record_no -1 and the error as `raw`."""

    def read(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            for source, base_dir in batch[["source", "base_dir"]].itertuples(index=False):
                rows: list[tuple] = []
                for row in _file_records(source, base_dir, max_record_bytes, raw_chars):
                    rows.append(row)
                    if len(rows) == batch_rows:
                        yield _raw_frame(rows)
                        rows = []
                if rows:
                    yield _raw_frame(rows)

    return read


RAW_COLUMNS = [f.split()[0] for f in RAW_SCHEMA.split(", ")]


def _raw_frame(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=RAW_COLUMNS).astype({"record_no": "int64", "cut_length": "Int64"})
UNREADABLE_RECORD = -1  # record_no of the row that says a whole file could not be read


def _file_records(source: str, base_dir: str, max_bytes: int, raw_chars: int) -> Iterator[tuple]:
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        yield source, UNREADABLE_RECORD, f"cannot open: {e.strerror}", base_dir, None
        return
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        yield source, UNREADABLE_RECORD, "not a regular file", base_dir, None
        return
    with os.fdopen(fd, "rb") as f:
        for i, (text, cut) in enumerate(read_lines_capped(f, max_bytes, raw_chars)):
            yield source, i, text, base_dir, cut
