"""sentences stage on real local Spark + Delta, real paragraphs bundled in tests/data, the real spaCy
parser and a tiny causal LM: reasons per rule, exact dedup with provenance, the two-pass unigram
entropy, perplexity only for survivors, and re-runs / new batches that add only what is new."""
from __future__ import annotations

import json
import math

import pytest
from pyspark.sql import functions as F

from etl.runner import run_stages
from etl.stages import sentences as stage
from realsyn_models.causal_lm import load_scorer
from data_paths import TEST_DATA
from udfs import sentences as S

pytestmark = pytest.mark.spark

DOC_TEXTS = "doc_id string, position int, text_id string, text string, batch_id string"


def _recipe(doc_id: str) -> list[str]:
    for line in (TEST_DATA / "recipes" / "docs.jsonl").open():
        doc = json.loads(line)
        if doc["doc_id"] == doc_id:
            return [b["text"] for b in doc["blocks"] if b["type"] == "text"]
    raise KeyError(doc_id)


def _mmc4(n_docs: int) -> list[list[str]]:
    with (TEST_DATA / "mmc4_docs" / "docs.jsonl").open() as f:
        return [json.loads(next(f))["text_list"] for _ in range(n_docs)]


def _add_doc_texts(ctx, docs: dict[str, list[str]], batch_id: str) -> None:
    rows = [(doc, pos, S.sentence_id(text or ""), text, batch_id)
            for doc, texts in docs.items() for pos, text in enumerate(texts)]
    ctx.spark.createDataFrame(rows, DOC_TEXTS).write.format("delta").mode("append").saveAsTable(ctx.table("doc_texts"))


def _count(ctx, table: str) -> int:
    return ctx.read(table).count()


def test_sentence_funnel_dedup_and_incremental_runs(stage_ctx, tiny_lm):
    alpine = _recipe("aelplermagronen")
    docs = {
        "alpine": alpine,
        # the same prose on a second page, plus emoji/URL lines and empty text
        "copy": [alpine[0], "", "   ", "- 🍳 Cook time: ~30 minutes\nSee both at www.knifecenter.com.", "&nbsp;"],
        **{f"mmc4-{i}": texts for i, texts in enumerate(_mmc4(2))},
    }
    # The band's upper end just under one known survivor's score (the tiny model is random, so
    # its scores are bunched): that sentence must fall out as high_perplexity, others stay.
    text = "Cut onions into half-rings and let them sweat in the same pot."
    probe = load_scorer(tiny_lm, device="cpu").perplexity([text])
    ctx = stage_ctx(models={"perplexity_lm": {"source": tiny_lm, "precision": "fp32", "batch_size": 8,
                                              "min_perplexity": 1.0, "max_perplexity": float(probe[0]) * 0.999}})
    _add_doc_texts(ctx, docs, "b1")

    first = run_stages(ctx.spark, ctx.cfg, ["sentences"], batch_id="b1")["sentences"]
    rows = ctx.read("sentences").toPandas().set_index("sentence_id")
    occ = ctx.read("sentence_occurrences").toPandas()
    expected_occ = sum(1 for texts in docs.values() for t in texts for s in S.split_sentences(t)
                       if S.normalise_sentence(s))  # `&nbsp;` normalises to nothing
    assert len(occ) == expected_occ == int(first.metrics["occurrences"])
    assert first.rows_in == sum(len(t) for t in docs.values()) - 2  # blank text is not read
    assert first.rows_out == len(rows)

    # exact dedup: one row per normalised text, occurrences keep every page
    swiss = S.sentence_id("It's the definition of comfort food for the Swiss.")
    assert rows.loc[swiss, "n_occurrences"] == 2
    assert sorted(occ[occ.sentence_id == swiss].doc_id) == ["alpine", "copy"]
    assert first.drops[stage.EXACT_DUPLICATE] == len(occ) - len(rows)
    assert (rows.n_occurrences.sum()) == len(occ)

    # one reason per drop, the first failing rule; kept iff no reason
    reason = rows.drop_reason
    assert reason[S.sentence_id("🍳 Cook time: ~30 minutes")] == S.EMOJI
    assert reason[S.sentence_id("See both at www.knifecenter.com.")] == S.URL
    assert reason[S.sentence_id("Ingredients")] == S.TOO_FEW_WORDS
    assert reason[S.sentence_id("~150g (1/3 lb) bacon cubes")] == S.NO_ACTION
    assert (rows.kept == reason.isna()).all()
    assert {r: n for r, n in first.drops.items() if r != stage.EXACT_DUPLICATE} == reason.value_counts().to_dict()
    assert set(reason.dropna()) <= set(S.QUALITY_REASONS + S.SEMANTIC_REASONS)

    # entropy: -sum p ln p over the sentence's words, p from the stored unigram table
    unigrams = ctx.read("word_unigrams").toPandas()
    assert unigrams["count"].sum() == sum(len(S.words(t)) for t in rows.text)  # distinct sentences count once
    p = unigrams.groupby("word")["count"].sum() / unigrams["count"].sum()
    theta = -sum(p[w] * math.log(p[w]) for w in S.words(text))
    assert rows.loc[S.sentence_id(text), "entropy"] == pytest.approx(theta)
    assert (reason[rows.entropy < 0.3].isin(list(S.QUALITY_REASONS) + [S.LOW_ENTROPY])).all()

    # perplexity: only for sentences that passed every cheaper rule
    scored = rows.perplexity.notna()
    assert scored.sum() == int(first.metrics["perplexity_scored"]) > 0
    assert (reason[scored].isna() | reason[scored].isin([S.LOW_PERPLEXITY, S.HIGH_PERPLEXITY])).all()
    assert reason[~scored].notna().all()
    assert rows.loc[S.sentence_id(text), "perplexity"] == pytest.approx(probe[0], rel=1e-3)
    ppl = rows.perplexity[scored]
    band = ctx.cfg.models["perplexity_lm"]
    assert (reason[scored] == S.HIGH_PERPLEXITY).equals(ppl > band.max_perplexity)
    assert (reason[scored] == S.LOW_PERPLEXITY).equals(ppl < band.min_perplexity)
    assert reason[S.sentence_id(text)] == S.HIGH_PERPLEXITY and rows.kept.any()

    # runs table: the funnel per reason
    runs = ctx.read("runs").where("stage = 'sentences'").collect()
    assert len(runs) == 1 and runs[0]["drops"] == first.drops

    # a paragraph that splits into nothing is recorded as done, so it is not split again
    assert [(r["doc_id"], r["position"]) for r in ctx.read("empty_paragraphs").collect()] == [("copy", 4)]

    # a re-run adds nothing anywhere (and reads nothing)
    versions = {t: _count(ctx, t) for t in stage.sentences.writes}
    again = stage.sentences(ctx)
    assert (again.rows_in, again.rows_out) == (0, 0)
    assert {t: _count(ctx, t) for t in stage.sentences.writes} == versions

    # a later stage's verdict survives; a new batch adds only its new sentences and words
    ctx.spark.sql(f"UPDATE {ctx.table('sentences')} SET kept = false, drop_reason = 'semantic_duplicate' "
                  f"WHERE sentence_id = '{swiss}'")
    new_text = "Whisk the eggs with a fork until the yolks break."
    _add_doc_texts(ctx, {"later": [alpine[0], new_text]}, "b2")
    third = stage.sentences(ctx)
    assert third.rows_out == 1
    after = ctx.read("sentences").toPandas().set_index("sentence_id")
    assert after.loc[swiss, "n_occurrences"] == 3
    assert after.loc[swiss, "drop_reason"] == "semantic_duplicate" and not after.loc[swiss, "kept"]
    b2 = ctx.read("word_unigrams").where(F.col("batch_id") == "b2").toPandas()
    assert b2["count"].sum() == len(S.words(new_text))
    assert after.loc[S.sentence_id(new_text), "batch_id"] == "b2"


def test_missing_perplexity_model_fails_before_any_work(stage_ctx):
    ctx = stage_ctx(models={"perplexity_lm": {"source": "/nonexistent/model.gguf"}})
    _add_doc_texts(ctx, {"d": ["Whisk the eggs with a fork until the yolks break."]}, "b1")
    with pytest.raises(FileNotFoundError, match="model.gguf"):
        stage.sentences(ctx)
    assert _count(ctx, "sentences") == 0 and _count(ctx, "word_unigrams") == 0
