"""Property-based fuzzing of ingest (hypothesis): generated records of every input format through
the parse step and, for a bounded sample, through the `ingest` stage on a real local Spark + Delta.

Records are random JSON structures shaped like each format, with random unicode (lone surrogates,
NUL and other controls, U+FFFD, bidi, separators), wrong types at any field, huge and empty values,
hostile local paths, and credentials planted where they hide (userinfo, secret parameters with any
case and separator, fragments, percent-encoded inside a proxy URL, secret-named metadata keys);
lines are those records serialized, cut short, byte-mutated, or random bytes. Properties: nothing
raises, no record hits the `parse_error` guard (a guard hit is a check missing), every record is
a document or quarantined (in = kept + quarantined), every output frame converts to Arrow as Spark's
worker does it, and no planted credential is stored anywhere (quarantine `raw` included).

Budget: REALSYN_FUZZ_EXAMPLES examples per parse property (tests/conftest.py's profile; 100 by
default), and per 100 of them one Spark example per format and one whole ingest run. A generated line is a `Line`: the text the
parse step sees, the bytes a file holds, and the credentials planted in it that must never be
stored (none for a line cut or mutated at random: a cut can leave `https://user:pw` without the `@`
that marks `pw` as a password).
"""
from __future__ import annotations

import base64
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pandas as pd
import pytest

from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import hostile_corpus as H  # noqa: E402
from udfs import ingest as I  # noqa: E402

# --- strings ---------------------------------------------------------------------------------------

# The characters that broke or could break a stage: NUL and other controls, C1, lone surrogates,
# U+FFFD, line and paragraph separators, bidi override, BOM, and what URLs and JSON are made of.
AWKWARD = ["\x00", "\x01", "\x08", "\x1b", "\x7f", "\x85", "\x9b", "\ud800", "\udbff", "\udc80", "\udfff",
           "\ufffd", "\u2028", "\u2029", "\u202e", "\ufeff", "\u200b", "\n", "\r", "\t", "\\", '"', "'",
           "@", ":", "/", "?", "#", "&", "=", "%", " ", "\U0001f373", "\u0301", "ﬁ", "İ"]
chars = st.one_of(st.characters(exclude_categories=()), st.sampled_from(AWKWARD),
                  st.characters(max_codepoint=127), st.characters(categories=["Cs"]))
text = st.text(chars, max_size=30)
clean_text = st.text(st.characters(exclude_categories=("Cs", "Cc")), max_size=30)
json_leaf = (st.none() | st.booleans() | st.integers() | st.integers(-(10 ** 30), 10 ** 30)
             | st.floats(allow_nan=True, allow_infinity=True) | text)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(text, inner, max_size=4), max_leaves=10)
GOOD_TEXT = "The cook slowly stirs the thick soup while the bread bakes in the oven."
GOOD_URLS = ["https://cdn.example/a.jpg", "http://img.example/p/b c.png", "https://x.example/i?id=1&w=640",
             "HTTPS://UPPER.example/A.JPG", "https://[2001:db8::1]:8443/x.webp#frag"]
BAD_URLS = ["javascript:alert(1)", "file:///etc/passwd", "data:image/png;base64,AAAA", "ftp://x/y.jpg",
            "https://", "http:/x", "//cdn.example/a.jpg", "", " ", "https://x.example/\x00a.jpg",
            "https://x.example/\ud800.jpg", "https://x.example/a\n.jpg", "https://x.example/a\ufffd.jpg"]

# --- credentials --------------------------------------------------------------------------------------

# Secret parameter names as they are spelled in the wild: case and separators vary.
SECRET_NAMES = ["api_key", "api-key", "apikey", "API_KEY", "Api.Key", "x-api-key", "X-Amz-Signature",
                "x_amz_signature", "X-AMZ-CREDENTIAL", "X-Amz-Security-Token", "token", "Token",
                "access_token", "access-token", "ACCESS.TOKEN", "auth_token", "authToken", "private_token",
                "sig", "Signature", "password", "passwd", "secret", "client_secret", "key", "jwt", "hmac",
                "code", "refresh_token", "session_token", "X-Goog-Signature", "id_token", "sessionid"]
# A value nothing else generated can contain: found in a table, it is a leak.
secret_value = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=8, max_size=14).map(lambda s: f"Zq{s}9Q")


# Where a credential hides in a URL (besides userinfo and a proxied URL, built below).
URL_SHAPES = {
    "query": "https://{host}/a.jpg?{name}={secret}",
    "second-param": "https://{host}/a.jpg?w=1&{name}={secret}&h=2",
    "amp": "https://{host}/a.jpg?w=1&amp;{name}={secret}",
    "fragment": "https://{host}/cb#{name}={secret}&state=1",
    "fragment-route": "https://{host}/#/callback?{name}={secret}",
    "relative": "//u:{secret}@{host}/a.jpg",
}


@st.composite
def secret_url(draw, secrets: list[str]) -> str:
    """A URL with a credential in it, in one of the places one hides."""
    secret = draw(secret_value)
    secrets.append(secret)
    host = draw(st.sampled_from(["cdn.example", "127.0.0.1:8080", "[::1]", "b.s3.amazonaws.com"]))
    name = draw(st.sampled_from(SECRET_NAMES))
    kind = draw(st.sampled_from(["userinfo", "query", "second-param", "fragment", "relative", "proxied",
                                 "amp", "fragment-route"]))
    if kind == "userinfo":
        scheme = draw(st.sampled_from(["https", "http", "HTTPS", "s3", "ftp"]))
        return f"{scheme}://{draw(st.sampled_from(['user', 'u', '']))}:{secret}@{host}/a.jpg"
    if kind in URL_SHAPES:
        return URL_SHAPES[kind].format(host=host, name=name, secret=secret)
    inner = f"https://u:{secret}@{host}/a.jpg?{name}={secret}"
    return "https://site.example/_next/image?url=" + quote(inner, safe="") + "&w=640"


@st.composite
def free_text(draw, secrets: list[str]) -> str:
    """A title, alt text, paragraph or metadata string: random, clean, empty, huge, or carrying a
    credential between random words."""
    kind = draw(st.sampled_from(["random"] * 2 + ["clean"] * 3 + ["good"] * 3 + ["secret"] * 3 + ["empty", "huge"]))
    if kind == "random":
        return draw(text)
    if kind == "clean":
        return draw(clean_text)
    if kind == "good":
        return GOOD_TEXT
    if kind == "empty":
        return ""
    if kind == "huge":
        return draw(st.sampled_from(["word ", "x", "é", "\U0001f373"])) * draw(st.integers(200, 1500))
    return f"{draw(text)} {draw(secret_url(secrets))} {draw(text)}"


@st.composite
def url_value(draw, secrets: list[str]) -> str:
    kind = draw(st.sampled_from(["good"] * 3 + ["secret"] * 3 + ["bad", "random", "weird"]))
    if kind == "good":
        return draw(st.sampled_from(GOOD_URLS))
    if kind == "bad":
        return draw(st.sampled_from(BAD_URLS))
    if kind == "secret":
        return draw(secret_url(secrets))
    if kind == "weird":
        return draw(st.sampled_from(GOOD_URLS)) + draw(text)
    return draw(text)


@st.composite
def metadata(draw, secrets: list[str], url_key: str | None = None) -> dict:
    """A metadata object: a URL (OBELICS repeats the image URL as `src`), an alt text, random
    keys and values, and perhaps a credential under a secret-named key."""
    meta = draw(st.dictionaries(text, json_value, max_size=3))
    if url_key:
        meta[url_key] = draw(url_value(secrets))
    if draw(st.booleans()):
        meta["alt_text"] = draw(free_text(secrets))
    if draw(st.booleans()):
        secret = draw(secret_value)
        secrets.append(secret)
        meta[draw(st.sampled_from(SECRET_NAMES))] = secret
    if draw(st.booleans()):
        meta["page"] = draw(secret_url(secrets))
    return meta


def _paths(value, prefix=()):
    """Every (path, value) in a JSON value, the root included."""
    out, todo = [], [(prefix, value)]
    while todo:
        path, v = todo.pop()
        out.append(path)
        if isinstance(v, dict):
            todo.extend(((*path, k), x) for k, x in v.items())
        elif isinstance(v, list):
            todo.extend(((*path, i), x) for i, x in enumerate(v))
    return out


@st.composite
def wrong_types(draw, record):
    """The record with a few of its fields, at any depth, replaced by random JSON of any type or
    removed."""
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):
        paths = [p for p in _paths(record) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = record
        for step in path[:-1]:
            parent = parent[step]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_value)
    return record


# --- records of each format ---------------------------------------------------------------------------

HOSTILE_PATHS = ["ok.png", "sub/nested.png", "link-in.png", "../OUTSIDE.txt", "/etc/passwd", "link-out.png",
                 "pipe.png", "dir.png", "big.png", "absent.png", "ok.png\x00.x", "absent-\udc80.png",
                 "ok.png\n", "", "/dev/zero", "sub/../../OUTSIDE.txt", "undecodable.png"]


@st.composite
def obelics(draw, secrets: list[str]) -> dict:
    n = draw(st.integers(0, 5))
    slots = draw(st.lists(st.sampled_from(["text"] * 9 + ["image"] * 9 + ["both", "neither"]), min_size=n, max_size=n))
    images = [draw(url_value(secrets)) if s in ("image", "both") else None for s in slots]
    texts = [draw(free_text(secrets)) if s in ("text", "both") else None for s in slots]
    meta = [draw(metadata(secrets, "src")) if s == "image" and draw(st.booleans()) else None for s in slots]
    general = draw(metadata(secrets))
    if draw(st.booleans()):
        general["url"] = draw(url_value(secrets))
    if draw(st.booleans()):
        general["title"] = draw(free_text(secrets))
    record = {"images": images, "texts": texts, "metadata": meta, "general_metadata": general}
    if draw(st.booleans()):
        inline = [None, base64.b64encode(b"\x89PNG\r\n\x1a\n").decode(), "###", ""]
        record["image_bytes"] = [draw(st.sampled_from(inline)) for _ in slots]
    record = draw(wrong_types(record))
    # OBELICS keeps metadata as JSON strings (a parsed list is taken too)
    for name in ("metadata", "general_metadata"):
        if name in record and draw(st.integers(0, 3)):
            record[name] = json.dumps(record[name], ensure_ascii=draw(st.booleans()))
    return record


@st.composite
def mmc4(draw, secrets: list[str]) -> dict:
    text_list = draw(st.lists(free_text(secrets), max_size=5))
    infos = []
    for _ in range(draw(st.integers(0, 3))):
        info = draw(metadata(secrets, "raw_url"))
        valid = st.integers(0, len(text_list) - 1) if text_list else st.just(0)
        info["matched_text_index"] = draw(st.one_of(valid, valid, valid, st.integers(-1, len(text_list))))
        infos.append(info)
    record = {"text_list": text_list, "image_info": infos}
    if draw(st.booleans()):
        record["url"] = draw(url_value(secrets))
    return draw(wrong_types(record))


@st.composite
def interleaved(draw, secrets: list[str]) -> dict:
    blocks = []
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.booleans()):
            blocks.append({"type": "text", "text": draw(free_text(secrets))})
        else:
            path = draw(st.one_of(st.sampled_from(HOSTILE_PATHS), st.sampled_from(HOSTILE_PATHS), text,
                                  secret_url(secrets)))
            block = {"type": "image", "path": path}
            if draw(st.booleans()):
                block["alt"] = draw(free_text(secrets))
            blocks.append(block)
    record = {"blocks": blocks}
    for name in ("url", "title", "author", "tags", "doc_id"):
        if draw(st.booleans()):
            record[name] = draw(url_value(secrets)) if name == "url" else draw(free_text(secrets))
    return draw(wrong_types(record))


RECORDS = {"obelics": obelics, "mmc4": mmc4, "interleaved_jsonl": interleaved}


# --- lines --------------------------------------------------------------------------------------------

@dataclass
class Line:
    raw: str  # what the parse step is given
    data: bytes  # the line as a file holds it
    secrets: list[str] = field(default_factory=list)  # must not be stored (empty: not checked)
    record: object = None  # the generated record (structured lines)


def _as_read(data: bytes) -> str:
    return data.decode("utf-8", "replace")  # what the capped reader and Spark's text reader make of it


@st.composite
def line(draw, fmt: str) -> Line:
    """One input line: a record of `fmt` serialized (escaped or raw UTF-8, lone surrogates as the
    bytes a careless writer would emit), cut short, its bytes mutated, random JSON, or random bytes."""
    kind = draw(st.sampled_from(["record"] * 6 + ["cut", "mutated", "json", "bytes"]))
    if kind == "bytes":
        data = draw(st.binary(max_size=200)).replace(b"\n", b" ")
        return Line(_as_read(data), data)
    if kind == "json":
        data = json.dumps(draw(json_value)).encode()
        return Line(data.decode(), data)
    secrets: list[str] = []
    record = draw(RECORDS[fmt](secrets))
    text_ = json.dumps(record, ensure_ascii=draw(st.booleans()))
    data = text_.encode("utf-8", "surrogatepass")
    if kind == "record":
        return Line(_as_read(data), data, secrets, record)
    if kind == "cut":
        data = data[:draw(st.integers(0, len(data)))]
    else:
        at = st.integers(0, max(len(data) - 1, 0))
        edits = draw(st.lists(st.tuples(at, st.integers(0, 255)), min_size=1, max_size=4))
        buf = bytearray(data)
        for at, byte in edits:
            if buf:
                buf[at % len(buf)] = byte
        data = bytes(buf).replace(b"\n", b" ")
    return Line(_as_read(data), data)


# --- the parse step -------------------------------------------------------------------------------------

# Small caps, so that too-large records and too-long paragraphs are generated too.
LIMITS = dict(max_record_bytes=6000, max_text_chars=400)
RAW_CHARS = 300
FILE_CAP = 4000


@pytest.fixture(scope="module")
def input_dir(tmp_path_factory) -> Path:
    """The folder generated interleaved records name their images in: good files, and every kind
    of hostile file the containment tests know."""
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "OUTSIDE.txt").write_bytes(H.OUTSIDE_MARKER)
    root = tmp / "input"
    (root / "sub").mkdir(parents=True)
    (root / "ok.png").write_bytes(H.png())
    (root / "sub" / "nested.png").write_bytes(H.png(color=(1, 2, 3)))
    (root / "undecodable.png").write_bytes(b"\x89PNG not really")
    (root / "big.png").write_bytes(H.png() + b"\0" * FILE_CAP)
    os.symlink(tmp / "OUTSIDE.txt", root / "link-out.png")
    os.symlink(root / "ok.png", root / "link-in.png")
    os.mkfifo(root / "pipe.png")
    (root / "dir.png").mkdir()
    return root


def _limits() -> I.Limits:
    return I.Limits(**LIMITS, files=I.LocalFiles(max_bytes=FILE_CAP))


def check_parsed(out: pd.DataFrame, lines: list[Line], n_records: int) -> None:
    """The properties of one parse output: Arrow takes it, every record is accounted for once, no
    guard hit, documented reasons only, clean strings, no planted credential, nothing from outside."""
    H.to_arrow(out, I.PARSED_SCHEMA)
    docs, bad = out[out["kind"] == "doc"], out[out["kind"] == "bad"]
    guarded = bad[bad["reason"] == I.PARSE_ERROR]
    assert guarded.empty, guarded[["record_no", "detail"]].to_dict("records")
    assert set(bad["reason"]) <= set(I.QUARANTINE_REASONS)
    assert docs["record_no"].is_unique
    assert set(docs["record_no"]) | set(bad["record_no"]) == set(range(n_records))
    for text in H.strings_of(out, bytes_too=False):
        assert "\x00" not in text
        text.encode("utf-8")
    for t in H.strings_of(docs.drop(columns=["source"]), bytes_too=False):
        assert not I._TEXT_CONTROL.search(t), repr(t)
    for record_no, ln in enumerate(lines):  # per record: hypothesis reuses values across lines
        cells = H.strings_of(out[out["record_no"] == record_no])
        assert [(s, c) for c in cells for s in ln.secrets if s in c] == []
    assert not any(H.OUTSIDE_MARKER.decode() in c for c in H.strings_of(out))


@pytest.mark.parametrize("fmt", I.INPUT_FORMATS)
@given(data=st.data())
def test_parse_step_on_generated_records(fmt, data, input_dir):
    lines = data.draw(st.lists(line(fmt), min_size=1, max_size=6), label="lines")
    fn = I.make_parse_fn(fmt, _limits(), RAW_CHARS)
    batch = pd.DataFrame({"source": ["in.jsonl"] * len(lines), "record_no": range(len(lines)),
                          "raw": [ln.raw for ln in lines], "base_dir": [str(input_dir)] * len(lines),
                          "cut_length": [None] * len(lines)})
    out = pd.concat(list(fn(iter([batch]))), ignore_index=True)
    check_parsed(out, lines, len(lines))


# --- the ingest stage on a real local Spark + Delta: a bounded sample ---------------------------------

STAGE_EXAMPLES = max(1, settings().max_examples // 100)  # one Spark example per 100 parse examples


def _unchecked_strings(values):
    """A parquet string column that may hold invalid UTF-8 (a lone surrogate written as the bytes a
    careless writer emits): pyarrow would refuse it, a file on the web need not."""
    import pyarrow as pa

    data = [None if v is None else v.encode("utf-8", "surrogatepass") for v in values]
    return pa.array(data, pa.binary()).view(pa.string())


def _unchecked_lists(lists):
    import pyarrow as pa

    offsets, flat = [0], []
    for items in lists:
        flat.extend(items or [])
        offsets.append(len(flat))
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), _unchecked_strings(flat),
                                    mask=pa.array([items is None for items in lists]))


def _obelics_parquet(records: list, path: Path) -> None:
    """Generated OBELICS records as HF's parquet types (list<string> images/texts, string metadata):
    a value of another type is dropped (None) or JSON-encoded (metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def str_list(v):
        return [x if isinstance(x, str) else None for x in v] if isinstance(v, list) else None

    def json_str(v):
        return v if isinstance(v, str) or v is None else json.dumps(v)

    recs = [r if isinstance(r, dict) else {} for r in records]
    table = pa.table({
        "images": _unchecked_lists([str_list(r.get("images")) for r in recs]),
        "texts": _unchecked_lists([str_list(r.get("texts")) for r in recs]),
        "metadata": _unchecked_strings([json_str(r.get("metadata")) for r in recs]),
        "general_metadata": _unchecked_strings([json_str(r.get("general_metadata")) for r in recs]),
        "image_bytes": _unchecked_lists([str_list(r.get("image_bytes")) for r in recs]),
    })
    pq.write_table(table, path)


def planted(lines: list[Line]) -> list[bytes]:
    """The credentials that must not be stored: those of whole records, unless a cut or mutated
    line (which hypothesis may build from the same values) holds one too."""
    loose = b"\n".join(ln.data for ln in lines if not ln.secrets)
    return [s.encode() for ln in lines for s in ln.secrets if s.encode() not in loose]


def write_input(fmt: str, lines: list[Line], input_dir: Path) -> tuple[Path, list[Line], int]:
    """The generated lines as an input of `fmt`: (path for ingest.paths, the lines it holds, how
    many records a reader finds). jsonl lines go next to the hostile files their image paths name;
    OBELICS rows are the structured records as parquet, plus a corrupt parquet file."""
    name = f"gen-{uuid.uuid4().hex[:8]}"
    if fmt == "obelics":
        path = input_dir.parent / name
        path.mkdir()
        lines = [ln for ln in lines if ln.record is not None]
        _obelics_parquet([ln.record for ln in lines], path / "part-0.parquet")
        (path / "part-1.parquet").write_bytes(b"PAR1" + os.urandom(64) + b"PAR1")
        return path, lines, len(lines) + 1
    path = input_dir / f"{name}.jsonl"
    path.write_bytes(b"\n".join(ln.data for ln in lines) + b"\n")
    return path, lines, len(lines)


def _ctx(stage_ctx, fmt: str, path: Path):
    return stage_ctx(ingest={"format": fmt, "paths": [str(path)], "quarantine_raw_chars": RAW_CHARS, **LIMITS},
                     fetch={"max_bytes": FILE_CAP})


def check_no_guard_hit(reasons: set[str], quarantine) -> None:
    assert reasons <= set(I.QUARANTINE_REASONS), reasons
    assert I.PARSE_ERROR not in reasons, quarantine.where(f"reason = '{I.PARSE_ERROR}'").select("detail").collect()


@pytest.mark.spark
@pytest.mark.parametrize("fmt", I.INPUT_FORMATS)
@settings(max_examples=STAGE_EXAMPLES, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_readers_and_parse_step_on_spark(fmt, data, input_dir, stage_ctx):
    """The real readers (capped jsonl reader, parquet + to_json) and Spark's own Arrow conversion
    of the parse output, shaped into the four bronze tables' rows (no Delta write: cheap)."""
    from etl.stages.ingest import limits, read_raw, tables_from

    path, lines, n_records = write_input(fmt, data.draw(st.lists(line(fmt), min_size=10, max_size=25), label="lines"),
                                         input_dir)
    ctx = _ctx(stage_ctx, fmt, path)
    raw, unreadable, _ = read_raw(ctx)
    parsed = raw.mapInPandas(I.make_parse_fn(fmt, limits(ctx), RAW_CHARS), I.PARSED_SCHEMA).cache()
    records = parsed.select("source", "record_no").distinct().count() + len(unreadable)
    assert records == n_records
    rows = {name: df.collect() for name, df in tables_from(parsed, unreadable, ctx).items()}
    reasons = {r["reason"] for r in rows["quarantine"]}
    check_no_guard_hit(reasons, tables_from(parsed, unreadable, ctx)["quarantine"])
    cells = [c.encode("utf-8", "surrogatepass") if isinstance(c, str) else c
             for table in rows.values() for row in table for c in H.strings_of(list(row))]
    secrets = planted(lines) + [H.OUTSIDE_MARKER]
    assert [s for s in secrets for c in cells if s in c] == []
    parsed.unpersist()


@pytest.mark.spark
@settings(max_examples=STAGE_EXAMPLES, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_ingest_stage_on_generated_input(data, input_dir, stage_ctx):
    """The whole `ingest` stage (Delta MERGEs, `runs`) on generated input of a generated format:
    the run succeeds, its counts add up, no guard hit, no planted credential in any cell."""
    from etl.runner import run_stages

    fmt = data.draw(st.sampled_from(I.INPUT_FORMATS), label="format")
    path, lines, n_records = write_input(fmt, data.draw(st.lists(line(fmt), min_size=15, max_size=30), label="lines"),
                                         input_dir)
    ctx = _ctx(stage_ctx, fmt, path)
    result = run_stages(ctx.spark, ctx.cfg, ["ingest"])["ingest"]

    run = ctx.read("runs").first()
    note(f"drops: {run['drops']}")
    assert run["status"] == "ok" and run["rows_in"] == n_records
    superseded = (run["drops"] or {}).get("superseded_in_run", 0)
    assert run["rows_in"] == run["rows_out"] + superseded + run["metrics"]["records_quarantined"]
    quarantine = ctx.read("quarantine")
    check_no_guard_hit({r["reason"] for r in quarantine.select("reason").distinct().collect()}, quarantine)
    assert result.rows_out == ctx.read("documents").count()
    secrets = planted(lines) + [H.OUTSIDE_MARKER]
    assert [(table, s) for table, cell in H.all_cells(ctx) for s in secrets if s in cell] == []
