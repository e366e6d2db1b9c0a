"""A hostile input corpus, built fresh in a temporary folder: every way an input file has tried to
read outside its folder, exhaust memory or smuggle credentials into the tables. Kept as
regression cases: a new attack found later gets a line here.

`build(tmp, server_url)` returns the corpus; its `secrets` are byte strings that must never appear
in any table after ingest + fetch (file contents from outside the input folder, passwords, tokens).
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

# Unique markers: finding one in a table is finding a leak.
OUTSIDE_MARKER = b"OUTSIDE-THE-INPUT-FOLDER-7f3a9c"
PASSWORD = "hunter2-pw-5e1d"
TOKEN = "tok-9b8c7d6e5f"
SIGNATURE = "sig0a1b2c3d4e5f"
CREDENTIAL = "AKIAHOSTILE4CRED"  # an S3 access key id (X-Amz-Credential)

FILE_CAP = 50_000  # fetch.max_bytes in the hostile test: local files are held to the same cap
RECORD_CAP = 8_000  # ingest.max_record_bytes
TEXT_CAP = 500  # ingest.max_text_chars


def png(size: tuple[int, int] = (160, 120), color: tuple[int, int, int] = (200, 90, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@dataclass
class Corpus:
    root: Path  # the input folder
    jsonl: Path  # interleaved_jsonl input
    mmc4: Path  # mmc4 input (URLs with credentials)
    obelics: Path  # OBELICS parquet: credentials in per-image metadata (`src`...), alt texts, titles
    # image path -> the quarantine reason it must get
    expected_paths: dict[str, str] = field(default_factory=dict)
    secrets: list[bytes] = field(default_factory=list)


def build(tmp: Path, server_url) -> Corpus:
    """server_url(path) -> an http URL of the loopback test server."""
    outside = tmp / "SECRET.txt"
    outside.write_bytes(OUTSIDE_MARKER + b"\n")
    root = tmp / "input"
    (root / "sub").mkdir(parents=True)
    (root / "ok.png").write_bytes(png())
    (root / "sub" / "nested.png").write_bytes(png(color=(10, 120, 200)))
    os.symlink(outside, root / "link-out.png")
    os.symlink(root / "ok.png", root / "link-in.png")  # a symlink that stays inside is fine
    os.mkfifo(root / "pipe.png")
    (root / "dir.png").mkdir()
    (root / "big.png").write_bytes(png() + b"\0" * FILE_CAP)
    passwd = Path("/etc/passwd").read_bytes()[:24]  # "root:x:0:0:root:/root:..."

    expected = {
        "ok.png": "ok", "sub/nested.png": "ok", "link-in.png": "ok",
        "../SECRET.txt": "path_outside_input",
        "../../../../../../etc/passwd": "path_outside_input",
        "/etc/hostname": "path_outside_input",
        str(outside): "path_outside_input",
        "link-out.png": "path_outside_input",
        "sub/../../SECRET.txt": "path_outside_input",
        "/dev/zero": "path_outside_input",
        "/proc/self/environ": "path_outside_input",
        "pipe.png": "not_a_regular_file",
        "dir.png": "not_a_regular_file",
        "big.png": "too_large",
        "absent.png": "missing_file",
        # checked before any OS call: NUL made os.path.realpath raise and stopped the run
        "ok.png\x00.x": "bad_path", "ok.png\n": "bad_path", "absent-\udc80.png": "non_utf8",
    }
    credential_page = f"https://editor:{PASSWORD}@example.com/post?token={TOKEN}&id=7"
    blocks = [{"type": "text", "text": "A cook stirs the pot while the soup simmers on the stove."}]
    blocks += [{"type": "image", "path": p, "alt": f"photo from {credential_page}" if p == "ok.png" else p}
               for p in expected]
    docs = [
        {"url": credential_page, "title": f"hostile page, see {credential_page}", "author": credential_page,
         "blocks": blocks},
        {"url": "https://example.com/long", "blocks": [{"type": "text", "text": "word " * TEXT_CAP},
                                                        {"type": "text", "text": "A short paragraph stays."}]},
    ]
    lines = [json.dumps(d) for d in docs]
    lines.append(json.dumps({"url": "https://example.com/huge", "blocks": [{"type": "text", "text": "x" * (3 * RECORD_CAP)}]}))
    jsonl = root / "docs.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")

    image_urls = [
        server_url("/good.jpg").replace("://", f"://user:{PASSWORD}@") + f"?X-Amz-Signature={SIGNATURE}",
        server_url("/missing.jpg").replace("://", f"://admin:{PASSWORD}@") + f"?token={TOKEN}",
        f"https://user:{PASSWORD}@[2002:a00:1::]/x.jpg?sig={SIGNATURE}",  # 6to4 form of 10.0.0.1
    ]
    mmc4_doc = {"url": f"https://reader:{PASSWORD}@example.org/a?access_token={TOKEN}",
                "text_list": ["A dog runs across the wet sand of the beach."],
                "image_info": [{"raw_url": u, "matched_text_index": 0} for u in image_urls]}
    mmc4 = root / "mmc4.jsonl"
    mmc4.write_text(json.dumps(mmc4_doc) + "\n")

    # OBELICS repeats each image URL in its per-image metadata (`src`, `unformatted_src`); credentials
    # hide there, in alt texts, in titles, in fragments, under secret-named keys.
    signed = (f"https://uploader:{PASSWORD}@b.s3.amazonaws.com/a.jpg?X-Amz-Credential={CREDENTIAL}"
              f"&X-Amz-Signature={SIGNATURE}&w=640")
    meta = [None, {"src": f"{signed}#access_token={TOKEN}",
                   "unformatted_src": f"//u:{PASSWORD}@b.s3.amazonaws.com/a.jpg", "alt_text": f"a pot, from {signed}", "document_url": credential_page,
                   "formatted_filename": f"a.jpg?API-Key={TOKEN}", "api_key": TOKEN}]
    general = {"url": f"https://example.net/p#access_token={TOKEN}",
               "title": f"Soup https://editor:{PASSWORD}@x.example/",
               "warc_filename": f"s3://crawl/x.warc?X-Amz-Signature={SIGNATURE}"}
    import pyarrow as pa
    import pyarrow.parquet as pq

    obelics = root / "obelics.parquet"
    pq.write_table(pa.Table.from_pylist([{
        "images": [None, signed], "texts": ["A cook stirs the pot while the soup simmers.", None],
        "metadata": json.dumps(meta), "general_metadata": json.dumps(general)}]), obelics)
    secrets = [OUTSIDE_MARKER, passwd, PASSWORD.encode(), TOKEN.encode(), SIGNATURE.encode(), CREDENTIAL.encode()]
    return Corpus(root=root, jsonl=jsonl, mmc4=mmc4, obelics=obelics, expected_paths=expected, secrets=secrets)


def all_cells(ctx) -> list[tuple[str, bytes]]:
    """(table, value as bytes) for every string/binary value, nested ones included, of every table."""
    def walk(v):
        if v is None:
            return
        if isinstance(v, (bytes, bytearray)):
            yield bytes(v)
        elif isinstance(v, str):
            yield v.encode("utf-8", "surrogatepass")
        elif isinstance(v, dict):
            for k, x in v.items():
                yield from walk(k)
                yield from walk(x)
        elif isinstance(v, (list, tuple)) or hasattr(v, "asDict"):
            for x in (v.asDict().values() if hasattr(v, "asDict") else v):
                yield from walk(x)

    out = []
    for t in ctx.spark.catalog.listTables(ctx.cfg.catalog.database):
        for row in ctx.read(t.name).collect():
            out.extend((t.name, b) for b in walk(list(row)))
    return out


# --- the bad-input corpus: every kind of bad document, image and text, in all three formats ----------

GOOD_TEXT = "The cook slowly stirs the thick soup while the bread bakes in the oven."
BAD_TEXT_CAP = 100_000  # ingest.max_text_chars in the bad-input test: a 1 MB paragraph is over it
BAD_RECORD_CAP = 4 << 20  # ingest.max_record_bytes: the 1 MB paragraph's record fits, a 5 MB one not
MANY_IMAGES = 5_000


@dataclass
class BadCorpus:
    root: Path
    inputs: dict[str, Path]  # format -> input path (a file or a folder)
    recrawl: Path  # interleaved_jsonl: a later crawl of a page, changed
    # kind -> (table, reason): each bad kind must leave at least one row with that reason there
    kinds: dict[str, tuple[str, str]]


def _jsonl(path: Path, records: list) -> Path:
    path.write_bytes(b"\n".join(r if isinstance(r, bytes) else json.dumps(r).encode() for r in records) + b"\n")
    return path


def build_bad(tmp: Path, server_url) -> BadCorpus:
    """Bad input in every format; `kinds` says where each bad item must end up. The server is the
    loopback one of tests/image_fixtures.py (its routes: /good.jpg, /gone.jpg, /page.html, ...)."""
    from image_fixtures import bad_images

    root = tmp / "bad"
    img = root / "jsonl" / "img"  # local image paths resolve against the jsonl file's folder
    img.mkdir(parents=True)
    (tmp / "OUTSIDE.txt").write_bytes(OUTSIDE_MARKER)
    os.symlink(tmp / "OUTSIDE.txt", img / "escape.png")
    os.mkfifo(img / "fifo.png")
    images = bad_images()
    for reason, data in images.items():
        (img / f"{reason}.img").write_bytes(data)
    (img / "ok.png").write_bytes(png())

    def page(url, *blocks):
        return {"url": url, "blocks": list(blocks)}

    def text(t):
        return {"type": "text", "text": t}

    def image(p):
        return {"type": "image", "path": p}

    dup = page("https://bad.example/dup", text(GOOD_TEXT))
    jsonl = [
        page("https://bad.example/good", text(GOOD_TEXT), image("img/ok.png")),
        b'{"url": "https://bad.example/cut", "blocks": [',                           # bad_json
        b"[1, 2, 3]",                                                                 # not_an_object
        {"url": None, "title": None, "blocks": None},                                 # null everywhere
        page("https://bad.example/nulltext", {"type": "text", "text": None}),          # null inside
        page("https://bad.example/num", {"type": "text", "text": 7}),                  # wrong_type
        page("https://bad.example/kind", {"type": "video", "src": "x.mp4"}),           # wrong_type
        b'{"url": "https://bad.example/latin1", "blocks": [{"type": "text", "text": "cr\xe8me br\xfbl\xe9e"}]}',
        page("https://bad.example/empty"),                                            # empty_doc
        page("https://bad.example/blank", text("   ")),                               # empty_doc
        page("https://bad.example/mb", text("word " * 210_000), text(GOOD_TEXT)),     # 1 MB paragraph
        page("https://bad.example/huge", text("x" * (5 << 20))),                      # record_too_large
        page("https://bad.example/paths", text(GOOD_TEXT), image("../../OUTSIDE.txt"), image("/etc/passwd"),
             image("img/escape.png"), image("img/fifo.png"), image("img/absent.png"), image("img")),
        page("https://bad.example/images", text(GOOD_TEXT),
             *[image(f"img/{r}.img") for r in images]),                              # every bad image kind
        page("https://bad.example/many", text(GOOD_TEXT), *[image("img/ok.png")] * MANY_IMAGES),
        page("https://bad.example/texts", text("🍳🔥😋 🎉🎉"), text("&nbsp;"), text("www.bad.example/x"),
             text(" ".join(["ingredient"] * 120) + "."), text("Soup.")),
        dup, dup,                                                                    # duplicate docs
        page(f"https://editor:{PASSWORD}@bad.example/cred?token={TOKEN}", text(GOOD_TEXT)),
        # strings no table can hold, each in the field it came in: quarantined, the rest goes on
        page("https://bad.example/nul-path", text(GOOD_TEXT), image("img/ok.png\x00.x")),      # bad_path
        page("https://bad.example/surrogate-path", text(GOOD_TEXT), image("img/absent-\udc80.png")),
        {**page("https://bad.example/surrogate-title", text(GOOD_TEXT)), "title": "Soup \ud800"},
        {**page("https://bad.example/escape-title", text(GOOD_TEXT)), "title": "Soup \x1b[31m"},  # control_char
        page("https://bad.example/surrogate-text", text("caf\udce9 au lait")),
        page("https://bad.example/recrawl", text("The old version of this page says this."), text(GOOD_TEXT),
             text("A third paragraph that the new version drops.")),
    ]
    _jsonl(root / "jsonl" / "docs.jsonl", jsonl)
    recrawl = _jsonl(root / "recrawl.jsonl", [page("https://bad.example/recrawl", text(GOOD_TEXT))])

    url = server_url
    mmc4 = [
        {"url": "https://bad.example/m/good", "text_list": [GOOD_TEXT],
         "image_info": [{"raw_url": url("/good.jpg").replace("://", f"://u:{PASSWORD}@") + f"?sig={SIGNATURE}",
                         "matched_text_index": 0}]},
        {"url": "https://bad.example/m/ref", "text_list": [GOOD_TEXT],
         "image_info": [{"raw_url": url("/good.jpg"), "matched_text_index": 5}]},    # bad_reference
        {"url": "https://bad.example/m/info", "text_list": [GOOD_TEXT], "image_info": "nope"},  # wrong_type
        {"url": "https://bad.example/m/nolist"},                                     # missing_field
        {"url": "https://bad.example/m/schemes", "text_list": [GOOD_TEXT, GOOD_TEXT],
         "image_info": [{"raw_url": u, "matched_text_index": 0} for u in
                        ("javascript:alert(1)", "file:///etc/passwd", "data:image/png;base64,AAAA", None)]},
        {"url": "https://bad.example/m/\ud800", "text_list": [GOOD_TEXT]},                 # non_utf8
        {"url": "https://bad.example/m/nul", "text_list": [GOOD_TEXT],                      # bad_url slot
         "image_info": [{"raw_url": "https://bad.example/a\x00.jpg", "matched_text_index": 0}]},
        {"url": "https://bad.example/m/http", "text_list": [GOOD_TEXT],
         "image_info": [{"raw_url": url(p), "matched_text_index": 0} for p in
                        ("/gone.jpg", "/page.html", "/fake.jpg", "/redirect-private", "/tiny.png")]},
    ]
    (root / "mmc4").mkdir()
    _jsonl(root / "mmc4" / "docs.jsonl", mmc4)

    import base64

    import pyarrow as pa
    import pyarrow.parquet as pq

    b64 = base64.b64encode(images["undecodable"]).decode()
    rows = [
        {"images": [None, "https://bad.example/o/1.jpg"], "texts": [GOOD_TEXT, None],
         "metadata": "[null, null]", "general_metadata": json.dumps({"url": "https://bad.example/o/ok"}),
         "image_bytes": [None, base64.b64encode(png()).decode()]},
        {"images": [None], "texts": [GOOD_TEXT, GOOD_TEXT], "metadata": None,             # length_mismatch
         "general_metadata": json.dumps({"url": "https://bad.example/o/len"}), "image_bytes": None},
        {"images": ["https://bad.example/o/2.jpg"], "texts": [GOOD_TEXT], "metadata": None,  # bad_slot (both)
         "general_metadata": json.dumps({"url": "https://bad.example/o/both"}), "image_bytes": None},
        {"images": [None], "texts": [None], "metadata": None, "general_metadata": None,      # bad_slot (neither)
         "image_bytes": None},
        {"images": [None], "texts": [GOOD_TEXT], "metadata": "{not json",                    # wrong_type
         "general_metadata": json.dumps({"url": "https://bad.example/o/meta"}), "image_bytes": None},
        {"images": [None, "https://bad.example/o/3.jpg"], "texts": [GOOD_TEXT, None], "metadata": None,
         "general_metadata": json.dumps({"url": "https://bad.example/o/inline-bad"}), "image_bytes": [None, b64]},
        {"images": ["javascript:void(0)"], "texts": [None], "metadata": None,             # bad_url, then empty
         "general_metadata": json.dumps({"url": "https://bad.example/o/js"}), "image_bytes": None},
        {"images": [None], "texts": [GOOD_TEXT], "metadata": None, "image_bytes": None,     # non_utf8 title
         "general_metadata": json.dumps({"url": "https://bad.example/o/title", "title": "Soup \ud800"})},
        {"images": [None, "https://bad.example/o/4.jpg"], "texts": [GOOD_TEXT, None],      # control_char alt
         "metadata": json.dumps([None, {"alt_text": "a\x00pot", "src": "https://bad.example/o/4.jpg"}]),
         "general_metadata": json.dumps({"url": "https://bad.example/o/alt"}), "image_bytes": None},
    ]
    (root / "obelics").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), root / "obelics" / "part-0.parquet")
    (root / "obelics" / "part-1.parquet").write_bytes(b"PAR1 not a parquet file at all PAR1")

    q, i, s = "quarantine", "images", "sentences"
    kinds = {
        "truncated JSON": (q, "bad_json"), "JSON array record": (q, "not_an_object"),
        "null everywhere": (q, "missing_field"), "null text in a block": (q, "missing_field"),
        "number as text": (q, "wrong_type"), "unknown block type": (q, "wrong_type"),
        "non-UTF-8 bytes": (q, "non_utf8"), "no blocks": (q, "empty_doc"),
        "1 MB paragraph": (q, "text_too_long"), "5 MB record": (q, "record_too_large"),
        "path traversal": (q, "path_outside_input"), "absolute path": (q, "path_outside_input"),
        "symlink out": (q, "path_outside_input"), "fifo": (q, "not_a_regular_file"),
        "missing image file": (q, "missing_file"), "duplicate doc": ("drops", "superseded_in_run"),
        "matched_text_index out of range": (q, "bad_reference"), "image_info not a list": (q, "wrong_type"),
        "no text_list": (q, "missing_field"), "javascript:/file:/data: URLs": (q, "bad_url"),
        "wrong list lengths": (q, "length_mismatch"), "text and image in one slot": (q, "bad_slot"),
        "metadata not JSON": (q, "wrong_type"), "corrupt parquet file": (q, "unreadable_file"),
        "NUL in a local path": (q, "bad_path"), "lone surrogate in a title, URL, path or text": (q, "non_utf8"),
        "control character in a title or alt text": (q, "control_char"),
        **{f"{r.replace('_', ' ')} image": (i, r) for r in images},
        "emoji-only text": (s, "emoji"), "URL-only text": (s, "url"), "120-word sentence": (s, "too_many_words"),
        "one-word text": (s, "too_few_words"),
    }
    return BadCorpus(root=root, inputs={"interleaved_jsonl": root / "jsonl", "mmc4": root / "mmc4",
                                        "obelics": root / "obelics"}, recrawl=recrawl, kinds=kinds)


# --- what a table could not hold --------------------------------------------------------------------

_SIMPLE_TYPES = {"string": "StringType", "bigint": "LongType", "int": "IntegerType", "binary": "BinaryType",
                 "boolean": "BooleanType", "double": "DoubleType", "float": "FloatType",
                 "timestamp": "TimestampType"}


def _split_top(text: str, sep: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [p.strip() for p in parts + [text[start:]] if p.strip()]


def _spark_type(ddl_type: str):
    from pyspark.sql import types as T

    t = ddl_type.strip()
    if t.startswith("array<"):
        return T.ArrayType(_spark_type(t[6:-1]))
    if t.startswith("struct<"):
        return T.StructType([T.StructField(f.split(":", 1)[0].strip(), _spark_type(f.split(":", 1)[1]))
                             for f in _split_top(t[7:-1], ",")])
    return getattr(T, _SIMPLE_TYPES[t])()


def spark_schema(ddl: str):
    """A DDL schema string of this project (`udfs.ingest.PARSED_SCHEMA`, ...) as a StructType,
    without a SparkSession (pyspark's own parser needs one)."""
    from pyspark.sql import types as T

    return T.StructType([T.StructField(c.split(None, 1)[0], _spark_type(c.split(None, 1)[1]))
                         for c in _split_top(ddl, ",")])


def to_arrow(df, ddl: str):
    """The Arrow batch Spark's Python worker makes of a mapInPandas output frame (the same
    serializer and settings), so a value that would fail the stage there fails here: a lone
    surrogate in any string, a wrong type."""
    from pyspark.sql.pandas.serializers import ArrowStreamPandasUDFSerializer
    from pyspark.sql.pandas.types import to_arrow_type

    ser = ArrowStreamPandasUDFSerializer("UTC", False, True, df_for_struct=True)
    return ser._create_batch((df, to_arrow_type(spark_schema(ddl))))


def strings_of(value, bytes_too: bool = True) -> list[str]:
    """Every string inside a value (frames, rows, dicts, lists), keys included; bytes decoded
    (surrogate escapes for what is not UTF-8) unless bytes_too is False."""
    import pandas as pd

    out, todo = [], [value]
    while todo:
        v = todo.pop()
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, (bytes, bytearray)) and bytes_too:
            out.append(bytes(v).decode("utf-8", "surrogateescape"))
        elif isinstance(v, pd.DataFrame):
            todo.extend(v.itertuples(index=False))
        elif isinstance(v, dict):
            todo.extend(v.keys())
            todo.extend(v.values())
        elif isinstance(v, (list, tuple)) or hasattr(v, "tolist"):
            todo.extend(v.tolist() if hasattr(v, "tolist") else v)
    return out
