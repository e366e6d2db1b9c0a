"""Record parsing without Spark: every reader on real records, every quarantine reason."""
import json
from pathlib import Path

import pandas as pd
import pytest

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
