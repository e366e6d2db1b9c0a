"""Semantic balance sampling on real Spark + Delta: exact caps (clusters under the cap whole),
a target size within one cap step, nested and seeded subsets, MetaCLIP-style probabilistic
subsets, random baselines of the same size, and a re-run that commits nothing. (pairs and
export run end to end in tests/test_e2e.py.)"""
from __future__ import annotations

import numpy as np
import pytest
from pyspark.sql import functions as F

from etl.runner import run_stages
from etl.stages.balance import cap_for_size
from etl.stages.pairs import PAIRS_SCHEMA
from etl.tables import version

pytestmark = pytest.mark.spark

EMB = "image_id string, model_id string, vector array<float>, dim int, error string, batch_id string"
SIZES = {0: 30, 1: 20, 2: 10}  # three well-separated clusters of images


def test_cap_search_hits_the_target_within_one_cap_step():
    sizes = np.array([30, 20, 10])
    assert cap_for_size(sizes, 33) == 12  # 12+12+10 = 34 >= 33; 11+11+10 = 32 < 33
    assert cap_for_size(sizes, 60) == 30 and cap_for_size(sizes, 1000) == 30 and cap_for_size(sizes, 1) == 1


def _pairs(spark, ctx) -> dict[str, int]:
    rng = np.random.default_rng(0)
    centres = np.eye(16)[:3]
    rows, truth = [], {}
    for c, n in SIZES.items():
        for i in range(n):
            v = centres[c] + 0.05 * rng.normal(size=16)
            image_id = f"c{c}-{i:02d}"
            truth[image_id] = c
            rows.append((image_id, "m", (v / np.linalg.norm(v)).tolist(), 16, None, "b0"))
    spark.createDataFrame(rows, EMB).write.format("delta").saveAsTable(ctx.table("image_embeddings"))
    names = [c.split()[0] for c in PAIRS_SCHEMA.split(", ")]
    pair_rows = [tuple(i if c == "image_id" else "m" if c == "embedding_model" else None for c in names)
                 for i in truth]
    spark.createDataFrame(pair_rows, PAIRS_SCHEMA).write.format("delta").saveAsTable(ctx.table("pairs"))
    return truth


def _members(ctx) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in ctx.read("subsets").collect():
        out.setdefault(r["subset"], set()).add(r["image_id"])
    return out


def test_balance_caps_nests_and_reruns_to_the_same_subsets(spark, stage_ctx):
    ctx = stage_ctx(balance={"image_clusters": 3, "cluster_caps": {"cap-5": 5, "cap-15": 15},
                             "target_sizes": {"size-33": 33}, "probabilistic": {"metaclip-10": 10}})
    truth = _pairs(spark, ctx)
    results = run_stages(spark, ctx.cfg, ["balance"])
    m = _members(ctx)
    clusters = {r["image_id"]: r["cluster_id"] for r in ctx.read("image_clusters").collect()}
    assert set(clusters) == set(truth) and len(set(clusters.values())) == 3
    sizes = np.bincount(list(clusters.values()))

    def per_cluster(members):
        return np.bincount([clusters[i] for i in members], minlength=len(sizes)).tolist()

    # Every cluster capped exactly; clusters under the cap kept whole.
    assert per_cluster(m["cap-5"]) == np.minimum(sizes, 5).tolist()
    assert per_cluster(m["cap-15"]) == np.minimum(sizes, 15).tolist()
    cap = cap_for_size(sizes, 33)
    assert len(m["size-33"]) == np.minimum(sizes, cap).sum() >= 33 > np.minimum(sizes, cap - 1).sum()
    assert results["balance"].notes["cap_size-33"].startswith(f"{cap} per cluster")
    assert m["cap-5"] <= m["cap-15"] <= set(truth)  # nested
    assert (m["cap-5"] <= m["size-33"]) and (m["size-33"] <= m["cap-15"] or cap > 15)
    for c, size in enumerate(sizes):  # MetaCLIP: min(1, 10 / size) of each cluster
        if size <= 10:
            assert {i for i in clusters if clusters[i] == c} <= m["metaclip-10"]
    for name in ("cap-5", "cap-15", "size-33", "metaclip-10"):
        assert len(m[f"{name}-random"]) == len(m[name])
    assert results["balance"].metrics["subset_cap-15"] == np.minimum(sizes, 15).sum()

    before = version(spark, ctx.table("subsets"))
    run_stages(spark, ctx.cfg, ["balance"])
    assert version(spark, ctx.table("subsets")) == before and _members(ctx) == m  # seeded: the same draw

    reseeded = ctx.cfg.model_copy(deep=True)
    reseeded.balance.seed = 7
    run_stages(spark, reseeded, ["balance"])
    again = _members(ctx)
    clusters = {r["image_id"]: r["cluster_id"] for r in ctx.read("image_clusters")
                .where(F.col("centroid_version") == 2).collect()}
    sizes = np.bincount(list(clusters.values()))
    assert per_cluster(again["cap-5"]) == np.minimum(sizes, 5).tolist() and again["cap-5"] != m["cap-5"]
    assert ctx.read("subsets").where(F.col("subset") == "cap-5").count() == np.minimum(sizes, 5).sum()
