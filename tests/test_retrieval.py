"""Two-level retrieval on Spark (etl/retrieval.py) and the cluster + retrieve stages on Delta."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import functions as F

from etl.retrieval import brute_force_search, two_level_search
from udfs.kmeans import normalise, train_kmeans
from udfs.topk import brute_force_local, two_level_local

pytestmark = pytest.mark.spark

VEC = "id string, vector array<float>"


def planted(n: int, n_clusters: int, d: int = 8, seed: int = 0, noise: float = 0.2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = normalise(rng.standard_normal((n_clusters, d)).astype(np.float32))
    return normalise(centres[rng.integers(0, n_clusters, n)] + noise * rng.standard_normal((n, d)).astype(np.float32))


def frame(spark, prefix: str, x: np.ndarray, **cols):
    pdf = pd.DataFrame({"id": [f"{prefix}{i:04d}" for i in range(len(x))], "vector": list(x), **cols})
    schema = VEC + "".join(f", {c} int" for c in cols)
    return spark.createDataFrame(pdf, schema)


def rows_of(df) -> list[tuple]:
    return sorted((r["query_id"], r["rank"], r["corpus_id"], round(r["score"], 5)) for r in df.collect())


@pytest.fixture(scope="module")
def data():
    both = planted(230, 5, seed=3)
    corpus = np.concatenate([both[:200], both[:10]])  # 10 exact duplicates: score ties
    return both[200:], corpus, train_kmeans(corpus, 5, niter=10)


def test_two_level_equals_brute_force_and_splitting_changes_nothing(spark, data):
    q, c, cents = data
    qdf, cdf = frame(spark, "q", q), frame(spark, "s", c)
    bf = rows_of(brute_force_search(qdf, cdf, 3, max_cluster_chunk=80, max_query_chunk=13))
    every = rows_of(two_level_search(qdf, cdf, cents, 3, nprobe=len(cents)))
    split = rows_of(two_level_search(qdf, cdf, cents, 3, nprobe=len(cents), max_cluster_chunk=25,
                                     max_query_chunk=12))
    assert bf == every == split
    assert len(bf) == 3 * len(q)
    # The brute-force rows are the exact answer, ties to the smaller id.
    exact, _, _ = brute_force_local(q, c, 3)
    got = np.array([int(cid[1:]) for _, _, cid, _ in bf]).reshape(len(q), 3)
    assert np.array_equal(got, exact)


def test_nprobe_one_matches_direct_path_deterministically(spark, data):
    q, c, cents = data
    qdf, cdf = frame(spark, "q", q), frame(spark, "s", c)
    first = rows_of(two_level_search(qdf, cdf, cents, 3, nprobe=1, max_cluster_chunk=23))
    again = rows_of(two_level_search(qdf.repartition(3), cdf.repartition(5), cents, 3, nprobe=1))
    assert first == again
    direct, _, _ = two_level_local(q, c, cents, 3, 1, fallback_probes=8)
    got = np.array([int(cid[1:]) for _, _, cid, _ in first]).reshape(len(q), 3)
    assert np.array_equal(got, direct)


def test_small_cluster_falls_back_to_next_clusters(spark, data):
    q, c, cents = data
    # The corpus's own cluster column puts a single sentence in cluster 0: its images must still get 3.
    labels = np.argmax(c @ cents.T, axis=1).astype(np.int32)
    lone = np.flatnonzero(labels == 0)[0]
    keep = (labels != 0) | (np.arange(len(c)) == lone)
    cdf = frame(spark, "s", c[keep], cluster_id=labels[keep])
    homed = np.flatnonzero(np.argmax(q @ cents.T, axis=1) == 0)
    qdf = frame(spark, "q", q[homed])
    out = two_level_search(qdf, cdf, cents, 3, nprobe=1, corpus_cluster="cluster_id")
    per_image = out.groupBy("query_id").agg(F.count("*").alias("n"), F.collect_set("cluster_id").alias("cl"))
    got = per_image.collect()
    assert len(got) == len(homed) > 0
    assert all(r["n"] == 3 and len(r["cl"]) >= 2 or r["cl"] != [0] for r in got)
    assert all(r["n"] == 3 for r in got)
    none = two_level_search(qdf, cdf, cents, 3, nprobe=1, corpus_cluster="cluster_id", fallback_probes=0)
    assert none.count() == len(homed)  # documented: without fallback probes, just the one sentence


# --- stages -------------------------------------------------------------------------------------

def _embeddings(spark, ctx, table: str, id_col: str, x: np.ndarray, prefix: str, model: str = "m1"):
    pdf = pd.DataFrame({id_col: [f"{prefix}{i:04d}" for i in range(len(x))], "model_id": model,
                        "vector": list(x), "dim": x.shape[1], "error": None, "batch_id": "b1"})
    df = spark.createDataFrame(pdf, f"{id_col} string, model_id string, vector array<float>, dim int, "
                                    "error string, batch_id string")
    ctx.merge_new(df, table, [id_col, "model_id"])


def test_cluster_and_retrieve_stages_incremental(spark, stage_ctx):
    from etl.runner import run_stages

    def run(name: str):
        return run_stages(spark, ctx.cfg, [name])[name]

    ctx = stage_ctx(cluster={"k": 4, "sample_size": 1000, "niter": 5}, retrieve={"k": 3, "nprobe": 1})
    both = planted(290, 5, seed=7)
    sents, extra, imgs = both[:200], both[200:260], both[260:]
    _embeddings(spark, ctx, "sentence_embeddings", "sentence_id", sents, "s")
    _embeddings(spark, ctx, "image_embeddings", "image_id", imgs, "i")
    # A sentence dropped by semantic dedup is never clustered nor retrieved.
    kept = pd.DataFrame({"sentence_id": [f"s{i:04d}" for i in range(200)], "kept": [i != 5 for i in range(200)]})
    ctx.merge_new(spark.createDataFrame(kept, "sentence_id string, kept boolean"), "sentences", ["sentence_id"])

    res = run("cluster")
    assert res.notes["centroid_version"] == "1" and res.metrics["k"] == 4 and res.rows_out == 199
    res = run("retrieve")
    assert res.rows_in == 30 and res.rows_out == 90 and res.drops.get("fewer_than_k", 0) == 0
    assert ctx.read("retrievals").where("sentence_id = 's0005'").count() == 0
    assert run("retrieve").rows_out == 0 and run("cluster").rows_out == 0  # re-runs add nothing

    # VACUUM with no retention: the incremental refresh below must not need the old versions.
    spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
    for table in ("sentence_clusters", "retrievals", "text_centroids"):
        spark.sql(f"VACUUM {ctx.table(table)} RETAIN 0 HOURS")
    spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "true")

    # New sentences: assigned to the kept centroids (no new version), and images re-ranked.
    before = {(r["image_id"], r["rank"]): r["sentence_id"] for r in ctx.read("retrievals").collect()}
    _embeddings(spark, ctx, "sentence_embeddings", "sentence_id", extra, "t")
    more = pd.DataFrame({"sentence_id": [f"t{i:04d}" for i in range(len(extra))], "kept": True})
    ctx.merge_new(spark.createDataFrame(more, "sentence_id string, kept boolean"), "sentences", ["sentence_id"])
    res = run("cluster")
    assert res.rows_out == len(extra) and res.notes["centroid_version"] == "1" and "trained" not in res.notes
    sizes = {r["cluster_id"]: r["size"] for r in ctx.read("text_centroids").collect()}
    assigned = {r["cluster_id"]: r["count"] for r in ctx.read("sentence_clusters").groupBy("cluster_id").count().collect()}
    assert sizes == {c: assigned.get(c, 0) for c in sizes} and sum(sizes.values()) == 199 + len(extra)
    res = run("retrieve")
    assert res.rows_in == 0 and res.metrics["refreshed_rows"] > 0
    after = ctx.read("retrievals").select("image_id", "rank", "sentence_id", "score")
    assert after.count() == 90
    changed = {(r["image_id"], r["rank"]): r["sentence_id"] for r in after.collect()}
    assert changed != before and any(s.startswith("t") for s in changed.values())

    # Same as searching everything from scratch with the same centroids and assignments.
    corpus = (ctx.read("sentence_clusters").join(ctx.read("sentence_embeddings"), "sentence_id")
              .select("sentence_id", "vector", "cluster_id"))
    cents = np.stack(ctx.read("text_centroids").orderBy("cluster_id").toPandas()["centroid"]).astype(np.float32)
    scratch = two_level_search(ctx.read("image_embeddings"), corpus, cents, 3, 1, query_id="image_id",
                               corpus_id="sentence_id", corpus_cluster="cluster_id")
    assert {(r["query_id"], r["rank"]): r["corpus_id"] for r in scratch.collect()} == changed

    # A later verdict drops a retrieved sentence: it leaves sentence_clusters and retrievals, and
    # its images are searched again without it (verdict propagation).
    victim = ctx.read("retrievals").where("rank = 1").orderBy("image_id").first()["sentence_id"]
    ctx.update_columns(spark.createDataFrame([(victim, False)], "sentence_id string, kept boolean"), "sentences",
                       ["sentence_id"], ["kept"])
    res = run("cluster")
    assert res.metrics["propagated_rows_deleted"] == 1 and res.rows_out == 0
    res = run("retrieve")
    assert res.metrics["propagated_rows_deleted"] >= 3 and res.rows_in >= 1
    assert ctx.read("retrievals").where(f"sentence_id = '{victim}'").count() == 0
    assert ctx.read("retrievals").count() == 90
    assert ctx.read("sentence_clusters").where(f"sentence_id = '{victim}'").count() == 0

    # Refit on request: a new centroid version, K clamped to the sentences there are.
    ctx.cfg.cluster.refit, ctx.cfg.cluster.k = True, 500
    res = run("cluster")
    assert res.notes["centroid_version"] == "2" and res.metrics["k"] == 258 and "k_clamped" in res.notes
    assert res.rows_out == 258
