"""The bad-input corpus (tests/hostile_corpus.py: build_bad) through ingest (all three formats and a
re-crawl), fetch (loopback server), image_quality and sentences on real Spark + Delta: the pipeline
finishes, every bad kind lands in `quarantine` or carries its drop reason, the counts of every
stage run add up (in = kept + dropped + quarantined), a re-crawled page replaces its old version,
and nothing from outside the input folder nor any credential reaches a table."""
from __future__ import annotations

import hostile_corpus as H
import pytest
from pyspark.sql import functions as F

from etl.runner import run_stages
from etl.stages.sentences import EXACT_DUPLICATE
from image_fixtures import server  # noqa: F401  (fixture)

pytestmark = pytest.mark.spark


def _with_input(cfg, fmt: str, path) -> object:
    return cfg.model_copy(update={"ingest": cfg.ingest.model_copy(update={"format": fmt, "paths": [str(path)]})})


def check_accounting(run) -> None:
    """One `runs` row: every item the stage took in is kept, dropped or quarantined, once."""
    drops, m = run["drops"] or {}, run["metrics"] or {}
    if run["stage"] == "ingest":
        kept_or_superseded = run["rows_out"] + drops.get("superseded_in_run", 0)
        assert run["rows_in"] == kept_or_superseded + m["records_quarantined"], run
    elif run["stage"] in ("fetch", "image_quality"):
        kept = run["rows_in"] - sum(drops.values())
        assert kept >= 0 and run["rows_out"] == run["rows_in"], run
    elif run["stage"] == "sentences":
        new = m["new_sentences"]
        assert m["occurrences"] == new + drops.get(EXACT_DUPLICATE, 0), run
        assert new == m["kept"] + sum(n for r, n in drops.items() if r != EXACT_DUPLICATE), run


def test_bad_input_corpus_is_accounted_for_at_every_stage(stage_ctx, tmp_path, server, tiny_lm):  # noqa: F811
    corpus = H.build_bad(tmp_path, server.url)
    ctx = stage_ctx(
        ingest={"max_text_chars": H.BAD_TEXT_CAP, "max_record_bytes": H.BAD_RECORD_CAP},
        fetch={"allow_hosts": ["127.0.0.1"], "retries": 0, "connect_timeout_s": 1.0, "read_timeout_s": 2.0},
        models={"perplexity_lm": {"source": tiny_lm, "precision": "fp32", "batch_size": 8,
                                  "min_perplexity": 1.0, "max_perplexity": 1e9}})
    for fmt, path in corpus.inputs.items():
        run_stages(ctx.spark, _with_input(ctx.cfg, fmt, path), ["ingest"])
    run_stages(ctx.spark, _with_input(ctx.cfg, "interleaved_jsonl", corpus.recrawl), ["ingest"])
    run_stages(ctx.spark, ctx.cfg, ["fetch", "image_quality", "sentences"])

    runs = ctx.read("runs").collect()
    assert [r["status"] for r in runs] == ["ok"] * 7
    for run in runs:
        check_accounting(run)

    # every bad kind is where it must be, with its reason
    found = {
        "quarantine": {r[0] for r in ctx.read("quarantine").select("reason").distinct().collect()},
        "images": {r[0] for r in ctx.read("images").select("drop_reason").distinct().collect()},
        "sentences": {r[0] for r in ctx.read("sentences").select("drop_reason").distinct().collect()},
        "drops": {k for r in runs for k in (r["drops"] or {})},
    }
    missing = {kind: where for kind, where in corpus.kinds.items() if where[1] not in found[where[0]]}
    assert missing == {} and len(corpus.kinds) >= 25
    # every reason a stage counted has its one-line way out beside it in `runs.notes`
    unexplained = {(r["stage"], k) for r in runs for k, n in (r["drops"] or {}).items()
                   if n and len((r["notes"] or {}).get(f"hint:{k}", "")) < 20}
    assert unexplained == set()
    # every image without bytes in hand carries a reason; the fetched ones were judged
    assert ctx.read("images").where("NOT kept AND drop_reason IS NULL").count() == 0
    assert ctx.read("images").where("kept AND width IS NULL").count() == 0

    # paragraphs: every one split is an occurrence or recorded empty; the `&nbsp;` one is empty
    texts = ctx.read("doc_texts").where(F.col("text").rlike(r"(?U)\S"))
    split = (ctx.read("sentence_occurrences").select("doc_id", "position").distinct()
             .unionByName(ctx.read("empty_paragraphs").select("doc_id", "position")))
    assert texts.join(split, ["doc_id", "position"], "left_anti").count() == 0

    # the 5,000-image page is whole; the re-crawled page is its new version only
    many = ctx.spark.sql(f"SELECT n_images FROM {ctx.table('documents')} WHERE url LIKE '%/many'").first()
    assert many["n_images"] == H.MANY_IMAGES
    recrawled = ctx.spark.sql(
        f"SELECT t.position, t.text FROM {ctx.table('doc_texts')} t JOIN {ctx.table('documents')} d USING (doc_id) "
        "WHERE d.url LIKE '%/recrawl'").collect()
    assert [(r["position"], r["text"]) for r in recrawled] == [(0, H.GOOD_TEXT)]

    # nothing from outside the input folder, no credential
    secrets = [H.OUTSIDE_MARKER, b"root:x:0:0", H.PASSWORD.encode(), H.TOKEN.encode(), H.SIGNATURE.encode()]
    assert [(t, s) for t, cell in H.all_cells(ctx) for s in secrets if s in cell] == []
