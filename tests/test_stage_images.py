"""Image path on real Spark + Delta: fetch (from a loopback server) -> image_quality ->
image_dedup (perceptual) -> semantic_dedup (images and sentences). The same stages on the bundled
sample run in tests/test_packaging.py (in process and through spark-submit)."""
from __future__ import annotations

import numpy as np
import pytest
from pyspark.sql import functions as F

from etl.runner import run_stages
from etl.tables import version
from image_fixtures import DATAJUICER, DISTINCT_PHOTOS, RECIPE_PIX, bad_images, server, variants  # noqa: F401
from udfs.ids import normalise_url, stable_id

pytestmark = pytest.mark.spark

DOC_IMAGES = ("doc_id string, position int, image_id string, url string, path string, alt_text string, "
              "metadata string, bytes binary, batch_id string")
CAT = DATAJUICER / "cat.jpg"
PIE = RECIPE_PIX / "apple-pie.webp"


def _doc_images(spark, ctx, inline: dict[str, bytes], urls: dict[str, str]) -> None:
    rows = [("d-inline", i, stable_id("image-bytes", data), None, None, None, name, data, "b0")
            for i, (name, data) in enumerate(inline.items())]
    rows += [("d-web", i, stable_id("image-url", normalise_url(url)), url, None, None, name, None, "b0")
             for i, (name, url) in enumerate(urls.items())]
    spark.createDataFrame(rows, DOC_IMAGES).write.format("delta").saveAsTable(ctx.table("doc_images"))


def _images(ctx) -> dict[str, dict]:
    """metadata name -> images row."""
    names = ctx.read("doc_images").select("image_id", F.col("metadata").alias("name"))
    rows = ctx.read("images").join(names, "image_id").collect()
    return {r["name"]: r.asDict() for r in rows}


def _runs(ctx, stage):
    return ctx.read("runs").where(F.col("stage") == stage).orderBy("started_at").collect()


def test_fetch_decode_filter_dedup_and_rerun(spark, stage_ctx, server):  # noqa: F811
    ctx = stage_ctx(
        fetch={"allow_hosts": ["127.0.0.1"], "retries": 1, "backoff_s": 0.01, "max_bytes": 1 << 20,
               "read_timeout_s": 2.0, "max_attempts_total": 3},
    )
    inline = {p.stem: p.read_bytes() for p in DISTINCT_PHOTOS}
    inline.update({f"cat_{k}": v for k, v in variants(CAT).items()})
    inline.update({f"pie_{k}": v for k, v in variants(PIE).items()})
    inline.update({f"bad_{k}": v for k, v in bad_images().items()})
    urls = {name: server.url(path) for name, path in {
        "web_cat": "/good.jpg", "web_404": "/missing.jpg", "web_private": "/redirect-private",
        "web_noai": "/noai.jpg", "web_big": "/big.png", "web_flaky": "/flaky.jpg",
        "web_500": "/always-500.jpg", "web_html": "/page.html", "web_tiny": "/tiny.png",
    }.items()}
    _doc_images(spark, ctx, inline, urls)

    stages = ["fetch", "image_quality", "image_dedup"]
    run_stages(spark, ctx.cfg, stages)
    img = _images(ctx)
    assert len(img) == len(inline) + len(urls)

    # fetch: one status, code and reason per URL
    expect_fetch = {
        "web_cat": ("ok", 200), "web_404": ("http_error", 404), "web_private": ("blocked_address", None),
        "web_noai": ("opted_out", 200), "web_big": ("too_large", 200), "web_flaky": ("server_error", 503),
        "web_500": ("server_error", 500), "web_html": ("bad_content_type", 200), "web_tiny": ("ok", 200),
    }
    for name, (status, code) in expect_fetch.items():
        assert (img[name]["fetch_status"], img[name]["http_status"]) == (status, code), img[name]
        if status != "ok":
            assert not img[name]["kept"] and img[name]["drop_reason"] == f"fetch_{status}"
    assert img["web_500"]["fetch_attempts"] == 2 and img["web_404"]["fetch_attempts"] == 1
    assert all(img[n]["fetch_status"] == "inline" for n in inline)

    # quality: every crafted bad kind with its reason; the tiny web image too
    for reason in bad_images():
        assert (img[f"bad_{reason}"]["kept"], img[f"bad_{reason}"]["drop_reason"]) == (False, reason)
    assert img["web_tiny"]["drop_reason"] == "too_small" and img["web_tiny"]["width"] == 20

    # perceptual dedup: copies of a photo form one group with one survivor (largest, then id)
    cats = ["cat", "web_cat"] + [f"cat_{k}" for k in variants(CAT)]
    assert len({img[n]["phash_group"] for n in cats}) == 1
    assert [n for n in cats if img[n]["kept"]] == ["cat_upscaled_jpeg"]
    assert {img[n]["drop_reason"] for n in cats if not img[n]["kept"]} == {"perceptual_duplicate"}
    pies = ["apple-pie"] + [f"pie_{k}" for k in variants(PIE)]
    assert len({img[n]["phash_group"] for n in pies}) == 1 and sum(img[n]["kept"] for n in pies) == 1
    # different photos do not group
    distinct = [p.stem for p in DISTINCT_PHOTOS]
    assert len({img[n]["phash_group"] for n in distinct}) == len(distinct)
    assert all(img[n]["kept"] or n in ("cat", "apple-pie") for n in distinct)
    assert img["cat"]["phash_group"] == min(img[n]["image_id"] for n in cats)

    # bytes live in image_bytes, once per image that has them; images rows carry none
    assert "bytes" not in ctx.read("images").columns
    with_bytes = {k for k, v in img.items() if v["fetch_status"] in ("ok", "inline")}
    assert ctx.read("image_bytes").count() == len(with_bytes)
    assert version(spark, ctx.table("image_bytes")) == 1  # one commit: verdicts never rewrite bytes

    # runs: per-reason counts
    q = _runs(ctx, "image_quality")[-1]
    assert q["drops"] == {**{r: 1 for r in bad_images() if r != "too_small"}, "too_small": 2}
    d = _runs(ctx, "image_dedup")[-1]
    assert d["drops"]["perceptual_duplicate"] == len(cats) - 1 + len(pies) - 1
    f = _runs(ctx, "fetch")[-1]
    assert f["drops"]["fetch_server_error"] == 2 and f["drops"]["fetch_opted_out"] == 1

    # re-run: only retryable failures are fetched again, within the attempt budget (3): flaky
    # now succeeds, the 500 spends its last attempt, the 404 is final. The recovered image is
    # judged and deduped.
    hits = dict(server.hits)
    run_stages(spark, ctx.cfg, stages)
    assert server.hits["/flaky.jpg"] == hits["/flaky.jpg"] + 1
    assert server.hits["/always-500.jpg"] == hits["/always-500.jpg"] + 1
    assert server.hits["/missing.jpg"] == hits["/missing.jpg"]
    again = _images(ctx)
    assert (again["web_flaky"]["fetch_status"], again["web_flaky"]["fetch_attempts"]) == ("ok", 3)
    assert again["web_flaky"]["phash_group"] == again["cat"]["phash_group"]  # it serves the cat
    assert again["web_flaky"]["drop_reason"] == "perceptual_duplicate"
    assert (again["web_500"]["fetch_status"], again["web_500"]["fetch_attempts"]) == ("server_error", 3)
    # The group id is the smallest member id, so the cat group may be relabelled when the
    # recovered image (its id hashes the server's random port) joins it; nothing else changes.
    cat_group = {k for k, v in img.items() if v["phash_group"] == img["cat"]["phash_group"]}
    assert {again[k]["phash_group"] for k in cat_group} == {again["cat"]["phash_group"]}
    drop_group = lambda rows: {k: {**v, "phash_group": None} for k, v in rows.items()  # noqa: E731
                               if k not in ("web_flaky", "web_500")}
    assert drop_group(again) == drop_group(img)

    # a third run has nothing to do: no requests, no writes, no new table version
    v0, hits = version(spark, ctx.table("images")), dict(server.hits)
    run_stages(spark, ctx.cfg, stages)
    assert version(spark, ctx.table("images")) == v0 and server.hits == hits
    assert [r["rows_out"] for r in (_runs(ctx, s)[-1] for s in stages)] == [0, 0, 0]


IMAGES_SEM = ("image_id string, kept boolean, drop_reason string, width int, height int, "
              "semantic_group string, batch_id string")
EMB = "{id} string, model_id string, vector array<float>, dim int, error string, batch_id string"


def _unit(v):
    v = np.asarray(v, dtype=np.float32)
    return (v / np.linalg.norm(v)).tolist()


def test_semantic_dedup_images_and_sentences(spark, stage_ctx):
    # Sentences on the (here: given) CLIP text vectors, the paper's setting, not the local
    # profile's own encoder (tests/test_sentence_dedup.py covers that).
    ctx = stage_ctx(semantic_dedup={"images": {"threshold": 0.95, "clusters": 3},
                                    "sentences": {"threshold": 0.9, "clusters": 2, "encoder": None}})
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 32))
    # Three near-copies of centre 0 (the 300x300 one must survive), two of centre 1, two singles,
    # one image already dropped upstream (must stay as it is).
    imgs = [("a0", 100), ("a1", 300), ("a2", 200), ("b0", 150), ("b1", 150), ("c", 120), ("d", 120), ("z", 500)]
    base = {"a": 0, "b": 1, "c": 2, "d": 3, "z": 0}
    vec = {i: _unit(centres[base[i[0]]] + 0.05 * rng.normal(size=32)) for i, _ in imgs}
    spark.createDataFrame(
        [(i, i != "z", None if i != "z" else "too_small", s, s, None, "b0") for i, s in imgs], IMAGES_SEM,
    ).write.format("delta").saveAsTable(ctx.table("images"))
    spark.createDataFrame([(i, "m1", vec[i], 32, None, "b0") for i, _ in imgs if i != "c"]
                          + [("c", "m1", None, None, "decode_error", "b0")],
                          EMB.format(id="image_id")).write.format("delta").saveAsTable(ctx.table("image_embeddings"))
    # Sentences: their table has no semantic_group column; the most repeated copy survives.
    sents = [("s1", 1), ("s2", 5), ("s3", 2), ("t1", 1)]
    svec = {"s1": _unit(centres[2]), "s2": _unit(centres[2] + 0.1), "s3": _unit(centres[2] - 0.1),
            "t1": _unit(centres[3])}
    spark.createDataFrame([(s, f"text {s}", n, True, None, "b0") for s, n in sents],
                          "sentence_id string, text string, n_occurrences int, kept boolean, drop_reason string, "
                          "batch_id string").write.format("delta").saveAsTable(ctx.table("sentences"))
    spark.createDataFrame([(s, "m1", svec[s], 32, None, "b0") for s, _ in sents], EMB.format(id="sentence_id")) \
        .write.format("delta").saveAsTable(ctx.table("sentence_embeddings"))

    run_stages(spark, ctx.cfg, ["semantic_dedup"])
    img = {r["image_id"]: r for r in ctx.read("images").collect()}
    assert [i for i in ("a0", "a1", "a2") if img[i]["kept"]] == ["a1"]
    assert {img[i]["semantic_group"] for i in ("a0", "a1", "a2")} == {"a0"}
    assert img["a0"]["drop_reason"] == img["a2"]["drop_reason"] == "semantic_duplicate"
    assert (img["b0"]["kept"], img["b1"]["kept"], img["b1"]["drop_reason"]) == (True, False, "semantic_duplicate")
    assert img["c"]["kept"] and img["c"]["semantic_group"] is None  # no usable embedding: not judged
    assert img["d"]["kept"] and img["d"]["semantic_group"] == "d"
    assert (img["z"]["kept"], img["z"]["drop_reason"]) == (False, "too_small")
    sen = {r["sentence_id"]: r for r in ctx.read("sentences").collect()}
    assert [s for s in ("s1", "s2", "s3") if sen[s]["kept"]] == ["s2"]
    assert sen["s1"]["drop_reason"] == "semantic_duplicate" and sen["t1"]["kept"]
    run = _runs(ctx, "semantic_dedup")[-1]
    assert run["drops"] == {"image_semantic_duplicate": 3, "sentence_semantic_duplicate": 2}
    assert run["metrics"]["image_semantic_removed_fraction"] == pytest.approx(3 / 6)

    # re-run: nothing changes
    versions = (version(spark, ctx.table("images")), version(spark, ctx.table("sentences")))
    run_stages(spark, ctx.cfg, ["semantic_dedup"])
    assert (version(spark, ctx.table("images")), version(spark, ctx.table("sentences"))) == versions
    assert _runs(ctx, "semantic_dedup")[-1]["rows_out"] == 0

    # embeddings from a random-init model (offline, no weights) are not deduped on
    rand = "tiny@random-init-seed0"
    for table, id_col, ident in (("image_embeddings", "image_id", "a0"), ("sentence_embeddings", "sentence_id", "s1")):
        spark.createDataFrame([(ident, rand, vec["a0"], 32, None, "b1")], EMB.format(id=id_col)) \
            .write.format("delta").mode("append").saveAsTable(ctx.table(table))
    cfg = ctx.cfg.model_copy(deep=True)
    cfg.semantic_dedup.model_id = rand
    run_stages(spark, cfg, ["semantic_dedup"])
    assert (version(spark, ctx.table("images")), version(spark, ctx.table("sentences"))) == versions
    assert any("random-init" in w for w in _runs(ctx, "semantic_dedup")[-1]["warnings"])

