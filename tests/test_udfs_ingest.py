"""Record parsing without Spark: every reader on real records, every quarantine reason, every string
field of every format checked, the per-record guard, no credential in any stored string."""
import json
import os
from pathlib import Path

import pandas as pd
import pytest

import hostile_corpus as H
from data_paths import TEST_DATA
from udfs import ingest as I

RECIPES = TEST_DATA / "recipes"  # bundled real pages and photos (tests/data/README.md)


def first_line(path: Path) -> str:
    with path.open() as f:
        return f.readline()


def test_interleaved_recipe_keeps_order_and_reads_local_bytes():
    doc = I.parse_record(first_line(RECIPES / "docs.jsonl"), "interleaved_jsonl", str(RECIPES), I.Limits())
    assert doc.url == "https://publicdomainrecipes.com/aelplermagronen/"
    assert doc.images[0]["position"] == 0 and doc.images[0]["bytes"][:4] == b"RIFF"
    assert [t["position"] for t in doc.texts] == sorted(t["position"] for t in doc.texts)
    assert doc.texts[0]["text"].startswith("A swiss favorite")


def test_mmc4_places_images_after_their_matched_sentence():
    raw = first_line(TEST_DATA / "mmc4_docs" / "docs.jsonl")
    obj = json.loads(raw)
    doc = I.parse_record(raw, "mmc4", ".", I.Limits())
    assert len(doc.texts) == sum(1 for t in obj["text_list"] if t.strip())
    assert len(doc.images) == len(obj["image_info"])
    by_pos = {t["position"]: t["text"] for t in doc.texts}
    for img in doc.images:
        matched = json.loads(img["metadata"])["matched_text_index"]
        before = max(p for p in by_pos if p < img["position"])
        assert by_pos[before] == obj["text_list"][matched]


def test_same_content_same_ids():
    raw = first_line(RECIPES / "docs.jsonl")
    a = I.parse_record(raw, "interleaved_jsonl", str(RECIPES), I.Limits())
    b = I.parse_record(raw, "interleaved_jsonl", str(RECIPES), I.Limits())
    assert I._doc_id(a) == I._doc_id(b)
    assert [t["text_id"] for t in a.texts] == [t["text_id"] for t in b.texts]


OBELICS_OK = {"images": ["https://x.org/a.jpg", None], "texts": [None, "hello world"],
              "metadata": json.dumps([{"alt_text": "a"}, None]), "general_metadata": json.dumps({"url": "https://x.org"})}

BAD = [
    ("obelics", '{"images": [', I.BAD_JSON),
    ("obelics", "[1, 2]", I.NOT_AN_OBJECT),
    ("obelics", json.dumps({"texts": ["a"]}), I.MISSING_FIELD),
    ("obelics", json.dumps({"images": "x", "texts": ["a"]}), I.WRONG_TYPE),
    ("obelics", json.dumps({**OBELICS_OK, "texts": ["a"]}), I.LENGTH_MISMATCH),
    ("obelics", json.dumps({**OBELICS_OK, "texts": ["both", "hello"]}), I.BAD_SLOT),
    ("obelics", json.dumps({**OBELICS_OK, "texts": [None, 7]}), I.WRONG_TYPE),
    ("mmc4", json.dumps({"text_list": ["a b c"], "image_info": [{"raw_url": "https://x/y.jpg", "matched_text_index": 4}]}), I.BAD_REFERENCE),
    ("mmc4", json.dumps({"text_list": ["caf\udce9"]}), I.NON_UTF8),
    ("mmc4", '{"text_list": ["bad \ufffd byte"]}', I.NON_UTF8),
    ("mmc4", json.dumps({"text_list": ["   ", ""], "image_info": []}), I.EMPTY_DOC),
    ("interleaved_jsonl", json.dumps({"blocks": [{"type": "video"}]}), I.WRONG_TYPE),
    ("interleaved_jsonl", json.dumps({"blocks": [{"type": "text", "text": "x" * 200}]}), I.RECORD_TOO_LARGE),
]


@pytest.mark.parametrize("fmt, raw, reason", BAD, ids=[f"{r}-{i}" for i, (_, _, r) in enumerate(BAD)])
def test_bad_records_get_their_reason(fmt, raw, reason):
    with pytest.raises(I.BadRecord) as e:
        I.parse_record(raw, fmt, ".", I.Limits(max_record_bytes=150 if reason == I.RECORD_TOO_LARGE else 1 << 26))
    assert e.value.reason == reason


def test_slot_errors_keep_the_page():
    raw = json.dumps({"url": "https://p.org/x", "blocks": [
        {"type": "text", "text": "Stir the soup slowly."},
        {"type": "image", "path": "no/such/file.webp"}]})
    doc = I.parse_record(raw, "interleaved_jsonl", ".", I.Limits())
    assert len(doc.texts) == 1 and not doc.images
    assert [e[0] for e in doc.slot_errors] == [I.MISSING_FILE]
    doc = I.parse_record(json.dumps({**OBELICS_OK, "images": ["ftp://x/a.jpg", None]}), "obelics", ".", I.Limits())
    assert [e[0] for e in doc.slot_errors] == [I.BAD_URL]


def test_parse_fn_emits_docs_and_bad_rows_with_object_columns():
    fn = I.make_parse_fn("obelics", I.Limits(max_record_bytes=1 << 20), raw_chars=10)
    batch = pd.DataFrame({"source": ["f"] * 2, "record_no": [0, 1],
                          "raw": [json.dumps(OBELICS_OK), "{nope"], "base_dir": ["."] * 2, "cut_length": [None] * 2})
    out = pd.concat(list(fn(iter([batch]))))
    assert list(out.columns) == I.PARSED_COLUMNS
    assert out["kind"].tolist() == ["doc", "bad"]
    assert out.iloc[1]["reason"] == I.BAD_JSON and out.iloc[1]["raw"] == "{nope"
    assert out["raw"].dtype == object


# --- every string that reaches a table is checked where it is parsed --------------------------------

PAGE, IMG = "https://p.example/page", "https://img.example/a.jpg"
GOOD = "A cook stirs the soup while the bread bakes."
# (kind, value, reason for a free-text field): a URL field says bad_url and a path bad_path for controls
BAD_STRINGS = [("surrogate", "x\ud800y", I.NON_UTF8), ("replacement", "x\ufffdy", I.NON_UTF8),
               ("nul", "x\x00y", I.CONTROL_CHAR), ("escape", "x\x1by", I.CONTROL_CHAR)]


def _obelics(set_field) -> dict:
    general = {"url": PAGE, "title": "Soup", "warc": "w.warc"}
    meta = [{"src": IMG, "alt_text": "a pot", "width": 300}, None]
    rec = {"images": [IMG, None], "texts": [None, GOOD]}
    set_field(rec, general, meta)
    return {**rec, "metadata": json.dumps(meta), "general_metadata": json.dumps(general)}


def _mmc4(set_field) -> dict:
    rec = {"url": PAGE, "text_list": [GOOD, GOOD],
           "image_info": [{"raw_url": IMG, "matched_text_index": 0, "image_name": "a.jpg"}]}
    set_field(rec)
    return rec


def _interleaved(set_field) -> dict:
    rec = {"url": PAGE, "title": "Soup", "author": "Ann", "tags": "food", "doc_id": "d1",
           "blocks": [{"type": "text", "text": GOOD}, {"type": "image", "path": "ok.png", "alt": "a pot"}]}
    set_field(rec)
    return rec


def _setter(path: list, *, key: bool = False, append: bool = False):
    """set_field(...) for _obelics/_mmc4/_interleaved: the string at `path` (in the first of the
    objects given) becomes the bad value; key=True adds it as a key, append=True appends it."""
    def make(bad):
        def set_field(*objs):
            obj = objs[path[0]] if isinstance(path[0], int) and len(objs) > 1 else objs[0]
            steps = path[1:] if isinstance(path[0], int) and len(objs) > 1 else path
            for step in steps[:-1]:
                obj = obj[step]
            if key:
                obj[steps[-1]][bad] = 1
            else:
                obj[steps[-1]] = obj[steps[-1]] + "/" + bad if append else bad
        return set_field
    return make


# (format, field, record builder, setter, record- or slot-level, the reason a control character gets)
FIELDS = [
    ("obelics", "general_metadata.url", _obelics, _setter([1, "url"], append=True), "record", I.BAD_URL),
    ("obelics", "general_metadata.title", _obelics, _setter([1, "title"]), "record", I.CONTROL_CHAR),
    ("obelics", "general_metadata value", _obelics, _setter([1, "warc"]), "record", I.CONTROL_CHAR),
    ("obelics", "general_metadata key", _obelics, lambda bad: lambda r, g, m: g.update({bad: 1}), "record",
     I.CONTROL_CHAR),
    ("obelics", "texts[1]", _obelics, _setter([0, "texts", 1]), "record", I.CONTROL_CHAR),
    ("obelics", "images[0]", _obelics, _setter([0, "images", 0], append=True), "slot", I.BAD_URL),
    ("obelics", "metadata[0].alt_text", _obelics, _setter([2, 0, "alt_text"]), "slot", I.CONTROL_CHAR),
    ("obelics", "metadata[0].src", _obelics, _setter([2, 0, "src"], append=True), "slot", I.CONTROL_CHAR),
    ("obelics", "metadata[0] key", _obelics, lambda bad: lambda r, g, m: m[0].update({bad: 1}), "slot",
     I.CONTROL_CHAR),
    ("mmc4", "url", _mmc4, _setter(["url"], append=True), "record", I.BAD_URL),
    ("mmc4", "text_list[1]", _mmc4, _setter(["text_list", 1]), "record", I.CONTROL_CHAR),
    ("mmc4", "image_info[0].raw_url", _mmc4, _setter(["image_info", 0, "raw_url"], append=True), "slot", I.BAD_URL),
    ("mmc4", "image_info[0] value", _mmc4, _setter(["image_info", 0, "image_name"]), "slot", I.CONTROL_CHAR),
    ("mmc4", "image_info[0] key", _mmc4, lambda bad: lambda r: r["image_info"][0].update({bad: 1}), "slot",
     I.CONTROL_CHAR),
    ("interleaved_jsonl", "url", _interleaved, _setter(["url"], append=True), "record", I.BAD_URL),
    ("interleaved_jsonl", "title", _interleaved, _setter(["title"]), "record", I.CONTROL_CHAR),
    ("interleaved_jsonl", "author", _interleaved, _setter(["author"]), "record", I.CONTROL_CHAR),
    ("interleaved_jsonl", "tags", _interleaved, _setter(["tags"]), "record", I.CONTROL_CHAR),
    ("interleaved_jsonl", "doc_id", _interleaved, _setter(["doc_id"]), "record", I.CONTROL_CHAR),
    ("interleaved_jsonl", "blocks[0].text", _interleaved, _setter(["blocks", 0, "text"]), "record", I.CONTROL_CHAR),
    ("interleaved_jsonl", "blocks[1].path", _interleaved, _setter(["blocks", 1, "path"]), "slot", I.BAD_PATH),
    ("interleaved_jsonl", "blocks[1].alt", _interleaved, _setter(["blocks", 1, "alt"]), "slot", I.CONTROL_CHAR),
]
FIELD_CASES = [(*f, kind, value, I.NON_UTF8 if reason == I.NON_UTF8 else f[5])
               for f in FIELDS for kind, value, reason in BAD_STRINGS]


def parse_batch(fmt: str, raws: list[str], base_dir: str = ".", limits: I.Limits | None = None,
                raw_chars: int = 2000) -> pd.DataFrame:
    """make_parse_fn over one batch; the output must be what Spark's worker can turn into Arrow."""
    fn = I.make_parse_fn(fmt, limits or I.Limits(), raw_chars)
    batch = pd.DataFrame({"source": ["in.jsonl"] * len(raws), "record_no": range(len(raws)), "raw": raws,
                          "base_dir": [base_dir] * len(raws), "cut_length": [None] * len(raws)})
    out = pd.concat(list(fn(iter([batch]))), ignore_index=True)
    H.to_arrow(out, I.PARSED_SCHEMA)
    return out


@pytest.fixture
def image_dir(tmp_path):
    (tmp_path / "ok.png").write_bytes(H.png())
    return tmp_path


@pytest.mark.parametrize("fmt, name, build, setter, level, _control, kind, value, reason", FIELD_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[6]}" for c in FIELD_CASES])
def test_a_bad_string_in_any_field_is_quarantined_and_the_rest_goes_on(
        fmt, name, build, setter, level, _control, kind, value, reason, image_dir):
    good = json.dumps(build(lambda *objs: None))
    raw = json.dumps(build(setter(value)))  # JSON-escaped: the raw line itself is clean ASCII
    out = parse_batch(fmt, [raw, good], str(image_dir))
    first, second = out[out["record_no"] == 0], out[out["record_no"] == 1]
    assert second["kind"].tolist() == ["doc"]  # the rest of the input goes on
    bad = first[first["kind"] == "bad"]
    assert bad["reason"].tolist() == [reason], bad[["reason", "detail"]].to_dict("records")
    if level == "record":
        assert (first["kind"] == "doc").sum() == 0
    else:  # the page stays, without that image
        doc = first[first["kind"] == "doc"].iloc[0]
        assert len(doc["texts"]) >= 1 and len(doc["images"]) == 0
    for text in H.strings_of(out, bytes_too=False):  # no stored text holds it, quarantine included
        assert "\x00" not in text and "\x1b" not in text
        text.encode("utf-8")


def test_a_nul_or_surrogate_path_never_reaches_the_os(monkeypatch, image_dir):
    seen = []
    real_realpath, real_open = os.path.realpath, os.open
    monkeypatch.setattr(os.path, "realpath", lambda p, **k: seen.append(p) or real_realpath(p, **k))
    monkeypatch.setattr(os, "open", lambda p, *a, **k: seen.append(p) or real_open(p, *a, **k))
    files = I.LocalFiles()
    for rel, reason in [("img/ok.webp\x00.x", I.BAD_PATH), ("absent-\udc80.png", I.NON_UTF8),
                        ("ok.png\n", I.BAD_PATH), ("", I.BAD_PATH), ("\x7f", I.BAD_PATH)]:
        with pytest.raises(I.BadRecord) as e:
            files.read(rel, str(image_dir))
        assert e.value.reason == reason, rel
    assert [p for p in seen if "ok.webp" in p or "absent" in p or p.endswith(("\n", "\x7f"))] == []
    # The two records: one slot each is quarantined, the pages are kept, and Arrow takes it all.
    raws = [json.dumps({"url": PAGE, "blocks": [{"type": "text", "text": GOOD},
                                                {"type": "image", "path": p}]})
            for p in ("img/ok.webp\u0000.x", "absent-\udc80.png")]
    out = parse_batch("interleaved_jsonl", raws, str(image_dir))
    assert sorted(out["kind"]) == ["bad", "bad", "doc", "doc"]
    assert sorted(out["reason"].dropna()) == [I.BAD_PATH, I.NON_UTF8]
    assert all(r.startswith("blocks[1]: ") for r in out["detail"].dropna())


def test_a_path_outside_the_input_names_the_settings_that_allow_it(image_dir):
    with pytest.raises(I.BadRecord) as e:
        I.LocalFiles().read("/etc/hostname", str(image_dir))
    assert e.value.reason == I.PATH_OUTSIDE_INPUT
    assert "set ingest.local_root" in e.value.detail and "ingest.allow_absolute_roots" in e.value.detail


def test_json_bombs_get_a_reason():
    raws = ["[" * 100_000 + "]" * 100_000,  # nested past the recursion limit
            '{"text_list": [' + "7" * 5000 + "]}",  # an integer of 5,000 digits
            json.dumps({"text_list": [GOOD], "image_info": [{"raw_url": IMG, "matched_text_index": 0,
                                                               "deep": json.loads("[" * 100 + "]" * 100)}]})]
    out = parse_batch("mmc4", raws)
    assert out["reason"].tolist()[:2] == [I.BAD_JSON, I.BAD_JSON]
    assert out[out["record_no"] == 2]["reason"].dropna().tolist() == [I.WRONG_TYPE]  # metadata too deep: slot


def test_an_unexpected_exception_is_one_quarantine_row_and_the_batch_goes_on(monkeypatch):
    def broken(obj, base_dir, limits):
        if obj.get("url") == "boom":
            raise RuntimeError(f"exploded at https://u:{H.PASSWORD}@h.example/x?token={H.TOKEN}\nsecond line")
        return parse_mmc4(obj, base_dir, limits)

    parse_mmc4 = I.PARSERS["mmc4"]
    monkeypatch.setitem(I.PARSERS, "mmc4", broken)
    out = parse_batch("mmc4", [json.dumps({"url": "boom", "text_list": [GOOD]}), json.dumps({"text_list": [GOOD]})])
    assert out["kind"].tolist() == ["bad", "doc"]
    row = out.iloc[0]
    assert row["reason"] == I.PARSE_ERROR
    assert row["detail"] == "RuntimeError: exploded at https://h.example/x?token=REDACTED"


def test_a_string_a_check_missed_is_caught_before_arrow(monkeypatch):
    monkeypatch.setattr(I, "_check_text", lambda text, *a, **k: text)  # every field check gone
    raw = json.dumps({"title": "x\ud800", "blocks": [{"type": "text", "text": GOOD}]})
    out = parse_batch("interleaved_jsonl", [raw])
    assert out["reason"].tolist() == [I.PARSE_ERROR]
    assert out["detail"].tolist() == ["ValueError: unchecked string in title"]


def test_quarantine_cells_are_escaped_and_redacted():
    raw = "{\x00 https://u:" + H.PASSWORD + "@h/\ud800"
    out = parse_batch("mmc4", [raw], raw_chars=1000)
    assert out["reason"].tolist() == [I.NON_UTF8]
    assert out["raw"].tolist() == ["{\\x00 https://h/\\ud800"]
    assert I.storable("x" * 50 + " https://u:" + H.PASSWORD + "@h/", 60) == "x" * 50 + " https://h"


def test_no_credential_in_any_stored_string(image_dir):
    secret_url = f"https://editor:{H.PASSWORD}@cdn.example/a.jpg?X-Amz-Signature={H.SIGNATURE}&Api-Key={H.TOKEN}"
    meta = [{"src": secret_url + f"#access_token={H.TOKEN}", "alt_text": f"see {secret_url}",
             "unformatted_src": f"//u:{H.PASSWORD}@cdn.example/a.jpg", "credentials": {"password": H.PASSWORD},
             "x-api-key": H.TOKEN}, None]
    obelics = {"images": [secret_url, None], "texts": [None, f"{GOOD} {secret_url}"], "metadata": json.dumps(meta),
               "general_metadata": json.dumps({"url": f"{PAGE}#access-token={H.TOKEN}", "title": secret_url,
                                               "auth_token": H.TOKEN})}
    mmc4 = {"url": f"{PAGE}?private_token={H.TOKEN}", "text_list": [GOOD],
            "image_info": [{"raw_url": secret_url, "matched_text_index": 0, "page": secret_url, "jwt": H.TOKEN}]}
    jsonl = {"url": PAGE + f"?code={H.TOKEN}", "title": secret_url, "author": secret_url,
             "blocks": [{"type": "text", "text": GOOD}, {"type": "image", "path": "ok.png", "alt": secret_url},
                        {"type": "image", "path": secret_url}]}
    outs = [parse_batch("obelics", [json.dumps(obelics), json.dumps({**obelics, "texts": [None, 7]})]),
            parse_batch("mmc4", [json.dumps(mmc4), json.dumps({**mmc4, "image_info": 3})]),
            parse_batch("interleaved_jsonl", [json.dumps(jsonl), json.dumps({**jsonl, "blocks": 1})], str(image_dir))]
    for out in outs:
        assert (out["kind"] == "doc").sum() == 1 and (out["kind"] == "bad").any()
        leaks = [t for t in H.strings_of(out) for s in (H.PASSWORD, H.TOKEN, H.SIGNATURE) if s in t]
        assert leaks == []


def test_every_quarantine_reason_is_documented():
    from data_paths import PROJECT

    readme = (PROJECT / "README.md").read_text()
    listed = readme[readme.index("Quarantine reasons:"):readme.index("## Hostile input")]
    assert [r for r in I.QUARANTINE_REASONS if f"`{r}`" not in listed] == []
    assert len(set(I.QUARANTINE_REASONS)) == len(I.QUARANTINE_REASONS)


def test_a_read_error_midway_is_one_unreadable_row_after_the_lines_read(tmp_path, monkeypatch):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": 3}\n')
    real = I.read_lines_capped

    def failing(f, max_bytes, keep):
        lines = real(f, max_bytes, keep)
        yield next(lines)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(I, "read_lines_capped", failing)
    rows = list(I._file_records(str(path), str(tmp_path), 1000, 100))
    assert [r[1] for r in rows] == [0, I.UNREADABLE_RECORD] and rows[1][2] == "read failed: Input/output error"
