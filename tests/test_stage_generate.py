"""Image semantic augmented generation on real Spark + Delta: caption (a tiny real captioner; the
offline no-weights path), tag (mining the bundled sample, zero-shot on a tiny CLIP), generate (a
tiny LM through transformers, an OpenAI-style server on 127.0.0.1; resume after a kill, prompt
versions) and similarity_band."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from data_paths import PROJECT
from etl.embeddings import resolved_clip
from etl.runner import run_stages
from etl.tables import version
from image_fixtures import DISTINCT_PHOTOS
from test_models_captioner import ved_captioner  # noqa: F401  (fixture)

pytestmark = pytest.mark.spark

SENTENCES = "sentence_id string, text string, kept boolean, drop_reason string, batch_id string"
RETRIEVALS = ("image_id string, rank int, sentence_id string, score float, cluster_id int, centroid_version int, "
              "model_id string, batch_id string")
EMB = "image_id string, model_id string, vector array<float>, dim int, error string, batch_id string"
SHORT_PROMPT = {"version": "t1", "system": "", "user": "{sentence} | {caption} | {tags}"}
STEPS = ["Cut onions into half-rings and let them sweat in the same pot.", "Serve with apple sauce.",
         "Peel potatoes and cut them into small cubes.", "Add some butter if your bacon was not fatty enough.",
         "When the onions have become sufficiently cooked, add potatoes."]


def _images(spark, ctx, n: int, with_bytes: bool = False) -> list[str]:
    ids = [f"img{i}" for i in range(n)]
    spark.createDataFrame([(i, True, None, "b0") for i in ids], "image_id string, kept boolean, drop_reason string, "
                          "batch_id string").write.format("delta").saveAsTable(ctx.table("images"))
    if with_bytes:
        photos = [p.read_bytes() for p in DISTINCT_PHOTOS]
        spark.createDataFrame([(i, photos[k % len(photos)]) for k, i in enumerate(ids)], "image_id string, bytes binary") \
            .write.format("delta").saveAsTable(ctx.table("image_bytes"))
    return ids


def _retrievals(spark, ctx, ids: list[str]) -> None:
    spark.createDataFrame([(f"s{k}", t, True, None, "b0") for k, t in enumerate(STEPS)], SENTENCES) \
        .write.format("delta").saveAsTable(ctx.table("sentences"))
    spark.createDataFrame([(i, r, f"s{(k + r) % len(STEPS)}", 0.5, 0, 1, "m", "b0") for k, i in enumerate(ids)
                           for r in (1, 2, 3)], RETRIEVALS).write.format("delta").saveAsTable(ctx.table("retrievals"))


def _texts(ctx) -> list:
    return ctx.read("synthetic_texts").orderBy("image_id", "prompt_version").collect()


def test_captions_from_a_tiny_model_and_none_offline(spark, stage_ctx, ved_captioner):  # noqa: F811
    ctx = stage_ctx(models={"captioner": {"source": ved_captioner, "precision": "fp32", "batch_size": 2}})
    ids = _images(spark, ctx, 3, with_bytes=True)
    results = run_stages(spark, ctx.cfg, ["caption"])
    rows = {r["image_id"]: r for r in ctx.read("captions").collect()}
    assert set(rows) == set(ids) and all(isinstance(r["caption"], str) and r["error"] is None for r in rows.values())
    assert results["caption"].models["captioner"] == rows["img0"]["model_id"]
    before = version(spark, ctx.table("captions"))
    run_stages(spark, ctx.cfg, ["caption"])
    assert version(spark, ctx.table("captions")) == before  # nothing new to caption

    offline = stage_ctx()  # the local profile: a hub id, offline, not cached
    _images(spark, offline, 2, with_bytes=True)
    results = run_stages(spark, offline.cfg, ["caption"])
    assert offline.read("captions").count() == 0
    assert any("NO CAPTIONS" in w for w in results["caption"].warnings)


def test_tags_from_the_vocabulary_mined_in_the_sample(spark, stage_ctx, tiny_clip):
    clip = {"name": "realsyn-tiny", "pretrained": tiny_clip.checkpoint, "model_config_dir": tiny_clip.config_dir,
            "offline": True, "precision": "fp32"}
    ctx = stage_ctx(models={"clip": clip}, tag={"mine_min_count": 3, "threshold": -1.0, "top_n": 4})
    texts = [t for row in pq.read_table(PROJECT / "sample" / "recipes.obelics.parquet").slice(0, 60)
             .column("texts").to_pylist() for t in row if t]
    sentences = [s.strip() + "." for t in texts for s in t.split(". ") if len(s.split()) >= 3]
    spark.createDataFrame([(f"s{k}", s, True, None, "b0") for k, s in enumerate(sentences)], SENTENCES) \
        .write.format("delta").saveAsTable(ctx.table("sentences"))
    ids = _images(spark, ctx, 5)
    model_id = resolved_clip(ctx.cfg)[0].model_id
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, 16))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    spark.createDataFrame([(i, model_id, v.tolist(), 16, None, "b0") for i, v in zip(ids, vectors)], EMB) \
        .write.format("delta").saveAsTable(ctx.table("image_embeddings"))

    results = run_stages(spark, ctx.cfg, ["tag"])
    vocab = ctx.read("tag_vocab")
    mined = {r["tag"] for r in vocab.where("mined").collect()}
    assert {"onion", "potato", "oven"} <= mined, sorted(mined)[:40]
    assert vocab.count() == results["tag"].metrics["vocab_size"] > 4585
    tags = {r["image_id"]: r for r in ctx.read("tags").collect()}
    assert set(tags) == set(ids) and all(len(r["tags"]) == 4 for r in tags.values())
    scores = [t["score"] for t in tags["img0"]["tags"]]
    assert scores == sorted(scores, reverse=True)
    before = (version(spark, ctx.table("tags")), version(spark, ctx.table("tag_vocab")))
    run_stages(spark, ctx.cfg, ["tag"])
    assert (version(spark, ctx.table("tags")), version(spark, ctx.table("tag_vocab"))) == before

    # Random-init CLIP weights: no tags, loudly.
    noisy = stage_ctx(models={"clip": {**clip, "pretrained": None, "allow_random_init": True}})
    spark.createDataFrame([], SENTENCES).write.format("delta").saveAsTable(noisy.table("sentences"))
    _images(spark, noisy, 1)
    spark.createDataFrame([], EMB).write.format("delta").saveAsTable(noisy.table("image_embeddings"))
    results = run_stages(spark, noisy.cfg, ["tag"])
    assert any("NO TAGS" in w for w in results["tag"].warnings) and noisy.read("tags").count() == 0


def test_generation_resumes_after_a_kill_and_a_new_prompt_is_a_new_version(spark, stage_ctx, tiny_lm,
                                                                            monkeypatch):
    import etl.stages.generate as G

    llm = {"backend": "transformers", "source": tiny_lm, "precision": "fp32", "batch_size": 4, "max_new_tokens": 6}
    ctx = stage_ctx(models={"llm": llm}, caption={"model": None},
                    generate={"commit_every": 3, "max_images": None, "prompt": SHORT_PROMPT})
    ids = _images(spark, ctx, 9)
    _retrievals(spark, ctx, ids)

    real, calls = G.generate_chunk, []

    def killed_after_one_chunk(*args):
        if calls:
            raise KeyboardInterrupt("simulated kill")
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(G, "generate_chunk", killed_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        run_stages(spark, ctx.cfg, ["generate"])
    first = {r["image_id"]: r for r in _texts(ctx)}
    assert 0 < len(first) < len(ids)
    monkeypatch.setattr(G, "generate_chunk", real)

    results = run_stages(spark, ctx.cfg, ["generate"])
    rows = _texts(ctx)
    assert sorted(r["image_id"] for r in rows) == ids  # every image once: nothing lost, nothing twice
    assert results["generate"].rows_in == len(ids) - len(first)
    assert all(r.asDict() == first[r["image_id"]].asDict() for r in rows if r["image_id"] in first)
    row = rows[0]
    assert row["model_id"] == tiny_lm and row["prompt_version"] == "t1" and row["tokens_in"] > 0
    assert row["source_sentence_id"] == "s1" and row["kept"] == (row["drop_reason"] is None)
    before = version(spark, ctx.table("synthetic_texts"))
    assert run_stages(spark, ctx.cfg, ["generate"])["generate"].rows_in == 0
    assert version(spark, ctx.table("synthetic_texts")) == before

    v2 = ctx.cfg.model_copy(deep=True)
    v2.generate.prompt.version, v2.generate.prompt.user = "t2", "Sentence: {sentence} ({caption}; {tags})"
    run_stages(spark, v2, ["generate"])
    by_version = {r["prompt_version"]: r["c"] for r in
                  ctx.read("synthetic_texts").groupBy("prompt_version").agg(F.count("*").alias("c")).collect()}
    assert by_version == {"t1": len(ids), "t2": len(ids)}


class _ChatServer(BaseHTTPRequestHandler):
    """Answers chat completions with the last user message, upper-cased; remembers the auth header."""
    seen: list[str] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append(self.headers.get("Authorization", ""))
        text = "A photo: " + body["messages"][-1]["content"].split("|")[0].strip().lower()
        out = json.dumps({"choices": [{"message": {"content": text}, "finish_reason": "stop"}],
                          "usage": {"prompt_tokens": 11, "completion_tokens": 7}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


def test_generation_through_an_openai_style_endpoint_keeps_the_key_out(spark, stage_ctx, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    secret = "sk-test-5ecret-do-not-store"
    monkeypatch.setenv("REALSYN_TEST_LLM_KEY", secret)
    # The key reaches the Python workers as a cluster would pass it: an executor environment
    # variable (spark.executorEnv.*, a Databricks secret-backed variable), never the config.
    monkeypatch.setitem(spark.sparkContext.environment, "REALSYN_TEST_LLM_KEY", secret)
    try:
        llm = {"backend": "openai", "source": "served-model", "base_url": f"http://127.0.0.1:{server.server_port}/v1",
               "api_key_env": "REALSYN_TEST_LLM_KEY", "retries": 0, "timeout_s": 10}
        ctx = stage_ctx(models={"llm": llm}, caption={"model": None}, generate={"prompt": SHORT_PROMPT})
        ids = _images(spark, ctx, 3)
        _retrievals(spark, ctx, ids)
        run_stages(spark, ctx.cfg, ["generate"])
    finally:
        server.shutdown()
    rows = _texts(ctx)
    assert [r["text"] for r in rows] == [f"A photo: {STEPS[(k + 1) % len(STEPS)].lower()}" for k in range(3)]
    assert all(r["tokens_in"] == 11 and r["tokens_out"] == 7 and r["model_id"] == "served-model" for r in rows)
    assert _ChatServer.seen and all(h == f"Bearer {secret}" for h in _ChatServer.seen)
    stored = json.dumps([r.asDict() for r in rows] + [r.asDict() for r in ctx.read("runs").collect()], default=str)
    assert secret not in stored


def test_similarity_band_keeps_pairs_inside_and_rejudges_a_new_band_without_a_model_run(spark, stage_ctx,
                                                                                        tiny_clip):
    from realsyn_models.clip import get_encoder

    clip = {"name": "realsyn-tiny", "pretrained": tiny_clip.checkpoint, "model_config_dir": tiny_clip.config_dir,
            "offline": True, "precision": "fp32", "min_similarity": -0.5, "max_similarity": 0.95}
    ctx = stage_ctx(models={"clip": clip})
    spec, _ = resolved_clip(ctx.cfg)
    texts = {"same": "a red apple on a table", "opposite": "a dog in the snow", "between": "onions in a pot",
             "dropped": "as an AI I cannot"}
    t = dict(zip(texts, get_encoder(spec).encode_texts(list(texts.values()))))

    def tilt(v, cos):
        """A unit vector at cosine `cos` to the unit vector v."""
        orth = np.roll(v, 3) - (np.roll(v, 3) @ v) * v
        return cos * v + np.sqrt(1 - cos ** 2) * orth / np.linalg.norm(orth)

    image = {"same": tilt(t["same"], 0.97), "opposite": tilt(t["opposite"], -0.9),
             "between": tilt(t["between"], 0.5), "dropped": t["dropped"]}
    _images(spark, ctx, 0)
    spark.createDataFrame([(f"img-{k}", True, None, "b0") for k in texts], "image_id string, kept boolean, "
                          "drop_reason string, batch_id string").write.format("delta").mode("append") \
        .saveAsTable(ctx.table("images"))
    spark.createDataFrame([(f"img-{k}", spec.model_id, image[k].tolist(), 16, None, "b0") for k in texts], EMB) \
        .write.format("delta").saveAsTable(ctx.table("image_embeddings"))
    from etl.stages.generate import SYNTHETIC_TEXTS_SCHEMA
    spark.createDataFrame([(f"id-{k}", f"img-{k}", "s", text, "llm", "v1", "h", 1, 1, "stop", None,
                            "refusal" if k == "dropped" else None, 1, k != "dropped", None, None, "b0")
                           for k, text in texts.items()], SYNTHETIC_TEXTS_SCHEMA) \
        .write.format("delta").saveAsTable(ctx.table("synthetic_texts"))

    results = run_stages(spark, ctx.cfg, ["similarity_band"])
    rows = {r["synthetic_id"][3:]: r for r in ctx.read("synthetic_texts").collect()}
    assert rows["same"]["similarity"] == pytest.approx(0.97, abs=1e-3)
    assert rows["opposite"]["similarity"] == pytest.approx(-0.9, abs=1e-3)
    assert (rows["same"]["kept"], rows["same"]["drop_reason"]) == (False, "above_band")
    assert (rows["opposite"]["kept"], rows["opposite"]["drop_reason"]) == (False, "below_band")
    assert rows["between"]["kept"] and rows["between"]["drop_reason"] is None
    assert rows["dropped"]["drop_reason"] == "refusal" and rows["dropped"]["similarity"] is None
    assert results["similarity_band"].drops == {"above_band": 1, "below_band": 1}

    wider = ctx.cfg.model_copy(deep=True)
    wider.models["clip"].max_similarity = 1.0
    results = run_stages(spark, wider, ["similarity_band"])
    assert results["similarity_band"].rows_in == 0  # nothing embedded again
    assert {r["synthetic_id"][3:] for r in ctx.read("synthetic_texts").where("kept").collect()} == {"same", "between"}
