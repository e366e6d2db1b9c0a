"""Raw records -> normalised documents, one mapInPandas pass for every input format.

Every reader first turns its input into one JSON string per record (OBELICS parquet rows via
`to_json`, jsonl lines as they are), so validation is the same code for all formats. A record
either becomes a document (kind "doc") or a quarantine row (kind "bad") with a reason; a document
can also carry per-slot quarantine rows (a missing image file drops that slot, not the page).

Every string that reaches a table is checked where it is parsed: no invalid UTF-8 (U+FFFD), no
lone surrogate (a JSON `\\ud800` escape), no NUL or other control character (`_check_text`). A bad
field of the page (url, title, page metadata, a paragraph) quarantines the record; a bad field of
an image (url, local path, alt text, its metadata) quarantines that image's slot. Paths are
checked before any OS call. Whatever else goes wrong parsing one record becomes a `parse_error`
quarantine row (`make_parse_fn`'s guard): no record stops the run. Every URL, title, alt text,
paragraph and metadata key or value is redacted (udfs/redact.py) before it is stored.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

import pandas as pd

from udfs.ids import normalise_text, normalise_url, stable_id
from udfs.redact import DEFAULT_SECRET_PARAMS, redact_json, redact_text, redact_url

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
BAD_PATH = "bad_path"  # empty, or a control character (NUL...) in it: refused before any OS call
CONTROL_CHAR = "control_char"  # NUL or another control character in a text, title, alt or metadata
PARSE_ERROR = "parse_error"  # anything else that failed parsing a record: the exception's type and line
QUARANTINE_REASONS = (BAD_JSON, NOT_AN_OBJECT, MISSING_FIELD, WRONG_TYPE, LENGTH_MISMATCH, BAD_SLOT,
                      BAD_REFERENCE, NON_UTF8, CONTROL_CHAR, EMPTY_DOC, MISSING_FILE, BAD_URL, BAD_PATH,
                      RECORD_TOO_LARGE, TEXT_TOO_LONG, UNREADABLE_FILE, PATH_OUTSIDE_INPUT, NOT_A_REGULAR_FILE,
                      FILE_TOO_LARGE, PARSE_ERROR)  # every one is listed in README.md

# Controls never stored in a text, title, alt text or metadata string: C0 but tab, LF and CR, and
# DEL. (C1 controls stay: they are what mojibake is made of, and the sentences stage repairs it.)
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# In a URL or a path every control is refused (tab, LF and CR, C1 too).
_ANY_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_JSON_DEPTH = 64  # metadata nested deeper is refused (wrong_type): it could not be written back

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
        """(resolved path, bytes) of an image path named by a record; BadRecord when refused.

        The path is checked before any OS call (`check_path`: NUL, controls, lone surrogates),
        and so is the path it resolves to (a symlink inside the folder may name anything)."""
        check_path(rel)
        roots = self._roots(base_dir)
        try:
            path = os.path.realpath(os.path.join(roots[0], rel))  # an absolute `rel` replaces the root
        except ValueError as e:  # what the OS refuses to be asked (embedded NUL), should one slip by
            raise BadRecord(BAD_PATH, f"{rel!r}: {e}") from None
        if not any(_inside(path, r) for r in roots):
            raise BadRecord(PATH_OUTSIDE_INPUT, f"{rel!r} resolves outside the input folder (to read it, set "
                            "ingest.local_root to a folder above it, or list its folder in ingest.allow_absolute_roots)")
        check_path(path, f"the path {rel!r} resolves to")
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: the resolved path
            # has no symlink left, so one appearing now is a swap under our feet.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise BadRecord(MISSING_FILE, f"{rel}: {e.strerror}") from None
        except ValueError as e:
            raise BadRecord(BAD_PATH, f"{rel!r}: {e}") from None
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


def check_path(path: str, what: str = "the path") -> str:
    """A local path as a record names it, before the OS sees it: not empty, valid UTF-8 (a lone
    surrogate is `non_utf8`), no control character (`bad_path`: NUL would make every OS call
    raise, a newline forges log lines)."""
    if not path:
        raise BadRecord(BAD_PATH, f"{what} is empty")
    _check_utf8(path, what)
    if m := _ANY_CONTROL.search(path):
        raise BadRecord(BAD_PATH, f"{what} holds control character U+{ord(m.group()):04X}")
    return path


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

    def json(self, value: object) -> object:
        """Metadata as stored: every key and string redacted, secret-named keys' values too."""
        return redact_json(value, self.secret_params)


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
    if text.isascii():  # O(1) in CPython: nothing to decode wrongly
        return text
    if "\ufffd" in text:
        raise BadRecord(NON_UTF8, f"{where}: invalid UTF-8 (replacement character)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRecord(NON_UTF8, f"{where}: lone surrogate") from None
    return text


def _check_text(text: str, where: str, reason: str = CONTROL_CHAR, controls: re.Pattern = _TEXT_CONTROL) -> str:
    """A string fit to store: valid UTF-8 (`non_utf8`) and none of `controls` (`reason`)."""
    _check_utf8(text, where)
    if m := controls.search(text):
        raise BadRecord(reason, f"{where}: control character U+{ord(m.group()):04X}")
    return text


def _check_json(value: object, where: str) -> object:
    """Every key and string of a parsed JSON value checked (`_check_text`), at most
    MAX_JSON_DEPTH levels deep. Iterative: no nesting exhausts the stack."""
    todo = [(value, 0)]
    while todo:
        v, depth = todo.pop()
        if isinstance(v, str):
            _check_text(v, where)
        elif isinstance(v, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                raise BadRecord(WRONG_TYPE, f"{where} is nested deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(v, dict):
                for k in v:
                    _check_text(k, f"{where} key")
                todo.extend((x, depth + 1) for x in v.values())
            else:
                todo.extend((x, depth + 1) for x in v)
    return value


def _stored_text(value: str | None, where: str, limits: "Limits") -> str | None:
    """A title or alt text as stored: checked, then redacted (a URL in it keeps no credential)."""
    return None if value is None else limits.text(_check_text(value, where))


def _is_web_url(url: str) -> bool:
    url = url.strip()
    return url.startswith(("http://", "https://")) and len(url.split("://", 1)[1]) > 0


def _web_url(url: str, limits: "Limits", where: str = "url") -> str:
    # Crawls carry raw spaces in paths (MMC4 does); browsers send them as %20. Any other control
    # or blank inside a URL (tab, newline, NUL) is refused: bad_url.
    url = _check_text(url.strip(), where, BAD_URL, _ANY_CONTROL)
    return limits.url(url.replace(" ", "%20"))


def _page_url(url: str | None, limits: "Limits") -> str | None:
    """A page URL as stored: trimmed, checked like an image URL (bad_url: the whole record),
    redacted. (Inner spaces stay: the page's id is hashed from its URL as it always was.)"""
    if not url:
        return url
    return limits.url(_check_text(url.strip(), "url", BAD_URL, _ANY_CONTROL))


def _metadata(value: object, where: str, limits: "Limits") -> object:
    """Page or image metadata as stored: every key and string checked, then redacted."""
    return limits.json(_check_json(value, where))


def _dump(value: object) -> str:
    """Any value as quarantine text (JSON, non-ASCII escaped); never raises."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return repr(type(value))


def _json_field(value: object, key: str) -> object:
    """OBELICS stores metadata as JSON strings; accept an already-parsed value too."""
    if value is None or not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
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
    """A paragraph: a bad character quarantines the record (non_utf8, control_char); an over-long
    one only its slot. Stored redacted (a URL with a password in running text loses it)."""
    text = _check_text(text, f"text at position {position}")
    if len(text) > limits.max_text_chars:
        doc.slot_errors.append((TEXT_TOO_LONG, f"text at position {position}: {len(text)} characters > "
                                f"{limits.max_text_chars}", text[:200]))
        return
    if text.strip():
        text = limits.text(text)
        doc.texts.append({"position": position, "text_id": stable_id("text", normalise_text(text)),
                          "text": text})


def _image_or_slot_error(doc: Doc, where: str, raw, build) -> None:
    """One image slot: `build()` -> its row, or a BadRecord that quarantines only this slot."""
    try:
        doc.images.append(build())
    except BadRecord as e:
        doc.slot_errors.append((e.reason, f"{where}: {e.detail}", raw() if callable(raw) else raw))


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
    url = _page_url(general["url"], limits) if isinstance(general.get("url"), str) else None
    title = general.get("title") if isinstance(general.get("title"), str) else None
    doc = Doc(url=url, title=_stored_text(title, "title", limits),
              metadata=_metadata(general, "general_metadata", limits))
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
        if _is_web_url(image):
            _image_or_slot_error(doc, f"images[{pos}]", lambda: _dump({"image": image, "metadata": meta}),
                                 lambda: _obelics_image(pos, image, meta, data, limits))
        else:
            doc.slot_errors.append((BAD_URL, f"images[{pos}] is not an http(s) URL", image))
    return doc


def _obelics_image(pos: int, image: str, meta: object, data: object, limits: Limits) -> dict:
    url = _web_url(image, limits, "url")
    meta = _metadata(meta, "metadata", limits) if isinstance(meta, dict) else None
    alt = meta.get("alt_text") if meta and isinstance(meta.get("alt_text"), str) else None
    blob = None
    if isinstance(data, str):
        try:
            blob = base64.b64decode(data)
        except (binascii.Error, ValueError):
            raise BadRecord(WRONG_TYPE, "image_bytes is not base64") from None
    return _image_slot(pos, url, None, alt, meta, blob)


def parse_mmc4(obj: dict, base_dir: str, limits: Limits) -> Doc:
    """MMC4 page: `text_list` (sentences in order), `image_info` (each with `raw_url` and the
    `matched_text_index` it was aligned to), `url`. Images are placed right after their
    matched sentence, keeping MMC4's own order among images matched to the same sentence."""
    text_list = _require(obj, "text_list", list)
    infos = obj.get("image_info") or []
    if not isinstance(infos, list):
        raise BadRecord(WRONG_TYPE, "field 'image_info' is not a list")
    url = _page_url(_optional_str(obj, "url"), limits)
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
                                        _dump(info)))
            else:
                _image_or_slot_error(doc, f"image at position {position}", lambda: _dump(info),
                                     lambda: _mmc4_image(position, raw_url, info, limits))
            position += 1
    return doc


def _mmc4_image(position: int, raw_url: str, info: dict, limits: Limits) -> dict:
    url = _web_url(raw_url, limits, "raw_url")
    meta = _metadata({k: v for k, v in info.items() if k != "raw_url"}, "image_info", limits)
    return _image_slot(position, url, None, None, meta, None)


def parse_interleaved(obj: dict, base_dir: str, limits: Limits) -> Doc:
    """Our plain interleaved form (the shape of the recipes' docs.jsonl): `blocks` in reading
    order, each {type: text, text} or {type: image, path (relative to the file), alt}. Paths are
    contained and capped by `limits.files` (LocalFiles)."""
    blocks = _require(obj, "blocks", list)
    url = _page_url(_optional_str(obj, "url"), limits)
    meta = {k: obj[k] for k in ("doc_id", "tags", "author") if isinstance(obj.get(k), str)}
    doc = Doc(url=url, title=_stored_text(_optional_str(obj, "title"), "title", limits),
              metadata=_metadata(meta, "metadata", limits))
    for pos, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") not in ("text", "image"):
            raise BadRecord(WRONG_TYPE, f"blocks[{pos}] is not a text or image block")
        if block["type"] == "text":
            text = _require(block, "text", str)
            _text_slot(doc, pos, text, limits)
            continue
        rel = _require(block, "path", str)
        _image_or_slot_error(doc, f"blocks[{pos}]", lambda: _dump(block),
                             lambda: _local_image(pos, rel, block, base_dir, limits))
    return doc


def _local_image(pos: int, rel: str, block: dict, base_dir: str, limits: Limits) -> dict:
    path, data = limits.files.read(rel, base_dir)  # the path is checked before it is opened
    alt = block.get("alt") if isinstance(block.get("alt"), str) else None
    return _image_slot(pos, None, path, _stored_text(alt, "alt", limits), None, data)


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
    except (ValueError, RecursionError) as e:  # also: nested too deep, an integer of 5,000 digits
        raise BadRecord(BAD_JSON, _first_line(e)) from None
    if not isinstance(obj, dict):
        raise BadRecord(NOT_AN_OBJECT, f"record is a JSON {type(obj).__name__}")
    doc = PARSERS[fmt](obj, base_dir, limits)
    if not doc.texts and not doc.images:
        raise BadRecord(EMPTY_DOC, "no text and no usable image")
    return doc


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


def error_detail(e: BaseException) -> str:
    """An unexpected exception as a quarantine detail: its type and first line (escaped, redacted
    and then cut by `storable` as the row is made: a cut before redaction could split a password
    from the `@` that marks it)."""
    line = _first_line(e)
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


# Escapes for what a quarantine cell must not hold raw: C0 controls but tab/LF/CR, and DEL.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F)}


def storable(text: object, limit: int, secret_params=DEFAULT_SECRET_PARAMS) -> str:
    """Any text (a record, an error) as a quarantine cell: lone surrogates and control characters
    escaped (`\\udc80`, `\\x00`: the cell is valid UTF-8 and shows what was there), credentials
    redacted, at most `limit` characters. Redacted before the final cut, so a cut cannot separate
    a password from the `@` that marks it; only a margin past `limit` is looked at."""
    if not isinstance(text, str):
        text = "" if text is None else repr(text)
    text = text[:2 * limit + 4096]
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    text = redact_text(text.translate(_ESCAPES), secret_params)
    return text[:limit]


def _unchecked_field(row: dict) -> str | None:
    """The first string of a document row that could not be stored (a lone surrogate, NUL): a
    check missed it. None when the row is clean. `isascii` is O(1): ASCII text costs a NUL scan."""
    def bad(s) -> bool:
        if not isinstance(s, str):
            return False
        if "\x00" in s:
            return True
        if s.isascii():
            return False
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False

    for name in ("url", "title", "metadata"):
        if bad(row[name]):
            return name
    for t in row["texts"]:
        if bad(t["text"]):
            return f"texts[{t['position']}]"
    for i in row["images"]:
        for name in ("url", "path", "alt_text", "metadata"):
            if bad(i[name]):
                return f"images[{i['position']}].{name}"
    return None


def make_parse_fn(fmt: str, limits: Limits, raw_chars: int):
    """mapInPandas fn: batches of RAW_SCHEMA rows -> PARSED_SCHEMA rows.

    URLs are stored redacted and every quarantined or metadata text goes through the same
    redaction, so no credential reaches a table. One guard per record: an exception no check
    foresaw becomes a `parse_error` quarantine row (its type and first line) and the batch goes
    on; a document row with a string Arrow could not take (a check missed it) becomes one too."""
    if fmt not in PARSERS:
        raise ValueError(f"unknown input format {fmt!r}")
    redact = limits.text
    params = limits.secret_params

    def bad(source: str, record_no: int, reason: str, detail: str, raw: str) -> dict:
        return {"kind": "bad", "source": source, "record_no": record_no, "source_format": fmt,
                "reason": reason, "detail": storable(detail, 500, params),
                "raw": storable(raw, raw_chars, params)}

    def record_rows(source: str, record_no: int, raw: str, base_dir: str, cut_length) -> list[dict]:
        if record_no == UNREADABLE_RECORD:
            return [bad(source, None, UNREADABLE_FILE, raw, "")]
        try:
            if pd.notna(cut_length):  # cut by the capped reader: only its head came
                raise BadRecord(RECORD_TOO_LARGE, f"{int(cut_length)} bytes > {limits.max_record_bytes}")
            if not isinstance(raw, str):
                raise BadRecord(MISSING_FIELD, f"record is {type(raw).__name__}, not text")
            doc = parse_record(raw, fmt, base_dir, limits)
        except BadRecord as e:
            return [bad(source, record_no, e.reason, e.detail, raw)]
        row = {
            "kind": "doc", "doc_id": _doc_id(doc), "url": doc.url, "title": doc.title,
            "source_format": fmt, "source": source, "record_no": record_no,
            "metadata": redact(json.dumps(doc.metadata, ensure_ascii=False, sort_keys=True)),
            "texts": doc.texts, "images": doc.images,
        }
        if (field_name := _unchecked_field(row)) is not None:
            raise ValueError(f"unchecked string in {field_name}")
        return [row, *(bad(source, record_no, r, d, x) for r, d, x in doc.slot_errors)]

    def parse(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            rows = []
            cols = batch[["source", "record_no", "raw", "base_dir", "cut_length"]].itertuples(index=False)
            for source, record_no, raw, base_dir, cut_length in cols:
                # A remote file read by Spark is named by its own URI (s3a://key:secret@...).
                source = limits.url(source) if isinstance(source, str) and "://" in source else source
                try:
                    rows.extend(record_rows(source, record_no, raw, base_dir, cut_length))
                except Exception as e:  # noqa: BLE001 - the guard: no record stops the run
                    rows.append(bad(source, record_no, PARSE_ERROR, error_detail(e), raw))
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
    opened, yields one row with record_no -1 and the error as `raw`; one whose read fails midway
    yields the lines read, then that row."""

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
        lines = enumerate(read_lines_capped(f, max_bytes, raw_chars))
        while True:
            try:
                i, (text, cut) = next(lines)
            except StopIteration:
                return
            except OSError as e:  # a read error midway (EIO, a network mount gone): the lines read stay
                yield source, UNREADABLE_RECORD, f"read failed: {e.strerror or e}", base_dir, None
                return
            yield source, i, text, base_dir, cut
