"""Bounded, incremental dedup on real Spark + Delta: semantic dedup with several clusters and heavy
clusters split into chunks finds every planted near-duplicate pair, a second batch of
near-duplicates of old items is absorbed by the old survivors without re-judging them, and
perceptual dedup over two batches equals one run over all the images."""
from __future__ import annotations

import numpy as np
import pytest
from pyspark.sql import functions as F

from etl.runner import run_stages
from etl.stages.image_dedup import EDGES
from etl.stages.semantic_dedup import MEMBERS
from udfs.phash import near_duplicate_pairs

pytestmark = pytest.mark.spark

IMAGES = ("image_id string, kept boolean, drop_reason string, width int, height int, phash bigint, "
          "phash_group string, semantic_group string, semantic_model string, batch_id string")
EMB = "image_id string, model_id string, vector array<float>, dim int, error string, batch_id string"
D = 32


def _unit(v):
    return (np.asarray(v, dtype=np.float32) / np.linalg.norm(v)).tolist()


def _append(spark, ctx, images: list[tuple], vectors: dict[str, list[float]], batch: str) -> None:
    """images: (image_id, side) rows, kept and not yet judged; vectors: image_id -> vector."""
    spark.createDataFrame([(i, True, None, s, s, None, None, None, None, batch) for i, s in images], IMAGES) \
        .write.format("delta").mode("append").saveAsTable(ctx.table("images"))
    spark.createDataFrame([(i, "m1", vectors[i], D, None, batch) for i, _ in images], EMB) \
        .write.format("delta").mode("append").saveAsTable(ctx.table("image_embeddings"))


def test_bounded_semantic_dedup_finds_planted_pairs_and_absorbs_a_second_batch(spark, stage_ctx):
    # 8 blobs of 40 items (cosine ~0.5 inside a blob, at most 0.85: below the threshold), 40 of them with a
    # planted near-copy (cosine ~0.999). K = ceil(360 / 40) = 9 clusters of ~45 items, each cut
    # into chunks of at most 16: every cluster is heavy.
    ctx = stage_ctx(semantic_dedup={"images": {"threshold": 0.95, "target_cluster_size": 40, "clusters": None},
                                    "max_cluster_chunk": 16})
    rng = np.random.default_rng(1)
    blobs = rng.normal(size=(8, D))
    vec, first = {}, []
    for b in range(8):
        for j in range(40):
            vec[f"x{b}{j:02d}"] = _unit(blobs[b] + rng.normal(size=D))
            first.append((f"x{b}{j:02d}", 200))
    originals = [f"x{b}{j:02d}" for b in range(8) for j in range(5)]
    planted = {}
    for o in originals:
        planted[o] = "p" + o[1:]
        vec[planted[o]] = _unit(np.asarray(vec[o]) + 0.01 * rng.normal(size=D))
        first.append((planted[o], 100))  # smaller: the original survives
    _append(spark, ctx, first, vec, "b1")
    run_stages(spark, ctx.cfg, ["semantic_dedup"])

    img = {r["image_id"]: r.asDict() for r in ctx.read("images").collect()}
    for o, p in planted.items():
        assert img[o]["kept"] and img[o]["semantic_group"] == min(o, p), o
        assert (img[p]["kept"], img[p]["drop_reason"], img[p]["semantic_group"]) == (False, "semantic_duplicate",
                                                                                      min(o, p)), p
    assert sum(not r["kept"] for r in img.values()) == len(planted)
    members = ctx.read(MEMBERS).where(F.col("kind") == "image")
    sizes = [r["count"] for r in members.groupBy("cluster_id").count().collect()]
    assert len(sizes) >= 4 and max(sizes) > 16  # several clusters, heavy ones split
    assert members.count() == len(first)

    # Second batch: a larger near-copy of an old survivor (a full recompute would make it the
    # survivor: here the old one stays), a near-copy of an old loser, a new pair, a new single.
    second = [("n1", 900), ("n2", 900), ("n3", 300), ("n4", 200), ("n5", 200)]
    vec["n1"] = _unit(np.asarray(vec["x000"]) + 0.01 * rng.normal(size=D))
    vec["n2"] = _unit(np.asarray(vec[planted["x101"]]) + 0.01 * rng.normal(size=D))
    vec["n3"] = _unit(blobs[2] + rng.normal(size=D))
    vec["n4"] = _unit(np.asarray(vec["n3"]) + 0.01 * rng.normal(size=D))
    vec["n5"] = _unit(blobs[3] + rng.normal(size=D))
    old_images = ctx.read("images").orderBy("image_id").collect()
    old_members = members.orderBy("item_id").collect()
    _append(spark, ctx, second, vec, "b2")
    results = run_stages(spark, ctx.cfg, ["semantic_dedup"])

    img = {r["image_id"]: r.asDict() for r in ctx.read("images").collect()}
    assert img["x000"]["kept"] and (img["n1"]["kept"], img["n1"]["semantic_group"]) == (False, "p000")
    assert (img["n2"]["kept"], img["n2"]["semantic_group"]) == (False, min("x101", planted["x101"]))
    assert img["n3"]["kept"] and not img["n4"]["kept"] and img["n4"]["semantic_group"] == "n3"
    assert img["n5"]["kept"]
    # Old verdicts are not re-judged: their rows (verdicts, batch) and members rows are as they were.
    assert ctx.read("images").where(~F.col("image_id").startswith("n")).orderBy("image_id").collect() == old_images
    assert ctx.read(MEMBERS).where(~F.col("item_id").startswith("n")).orderBy("item_id").collect() == old_members
    assert results["semantic_dedup"].metrics["image_semantic_judged"] == len(second)
    assert results["semantic_dedup"].drops == {"image_semantic_duplicate": 3}

    # A changed threshold judges everything again under it.
    cfg = ctx.cfg.model_copy(deep=True)
    cfg.semantic_dedup.images.threshold = 0.9999
    results = run_stages(spark, cfg, ["semantic_dedup"])
    assert results["semantic_dedup"].metrics["image_semantic_judged"] == len(first) + len(second)
    assert ctx.read("images").where(~F.col("kept")).count() == 0


def _flip(h: int, bits: list[int]) -> int:
    u = h & (2**64 - 1)
    for b in bits:
        u ^= 1 << b
    return u - 2**64 if u >= 2**63 else u


def _verdicts(ctx) -> list[tuple]:
    return sorted((r["image_id"], r["kept"], r["drop_reason"], r["phash_group"])
                  for r in ctx.read("images").collect())


def test_incremental_perceptual_dedup_equals_a_full_recompute(spark, stage_ctx):
    rng = np.random.default_rng(2)
    base = [int(h) for h in rng.integers(-(2**63), 2**63 - 1, size=6, dtype=np.int64)]
    # (image_id, phash, side, batch)
    rows = [("a0", base[0], 200, 1), ("a1", _flip(base[0], [1, 9, 30]), 100, 1),
            ("b0", base[1], 200, 1), ("b1", base[1], 200, 1),  # identical hashes
            ("c0", base[2], 200, 1), ("c1", _flip(base[2], list(range(7))), 200, 1),  # 7 bits: beyond t = 6
            ("d0", base[3], 200, 1),
            ("a2", _flip(base[0], [2, 40]), 500, 2),  # larger near-copy: the new survivor of group a
            ("c2", _flip(base[2], [0, 1, 2, 3]), 200, 2),  # 4 from c0, 3 from c1: bridges them
            ("b2", base[1], 300, 2), ("e0", base[4], 200, 2), ("e1", _flip(base[4], [63]), 200, 2)]

    def write(ctx, batch_rows):
        spark.createDataFrame([(i, True, None, s, s, h, None, None, None, f"b{b}") for i, h, s, b in batch_rows],
                              IMAGES).write.format("delta").mode("append").saveAsTable(ctx.table("images"))

    incremental = stage_ctx()
    write(incremental, [r for r in rows if r[3] == 1])
    run_stages(spark, incremental.cfg, ["image_dedup"])
    write(incremental, [r for r in rows if r[3] == 2])
    results = run_stages(spark, incremental.cfg, ["image_dedup"])
    assert results["image_dedup"].metrics["new_hashes"] == 4  # b2 repeats a stored hash

    full = stage_ctx()
    write(full, rows)
    run_stages(spark, full.cfg, ["image_dedup"])
    assert _verdicts(incremental) == _verdicts(full)
    v = {i: (k, g) for i, k, _, g in _verdicts(full)}
    assert [i for i in ("a0", "a1", "a2") if v[i][0]] == ["a2"]
    assert {v[i][1] for i in ("c0", "c1", "c2")} == {"c0"}
    # The stored edges are exactly the near pairs among the distinct hashes (numpy reference).
    hashes = np.array(sorted({h for _, h, _, _ in rows}), dtype=np.int64)
    ref = {tuple(sorted((int(hashes[i]), int(hashes[j])))) for i, j in near_duplicate_pairs(hashes, 6)}
    for ctx in (incremental, full):
        assert {(r["src"], r["dst"]) for r in ctx.read(EDGES).collect()} == ref


def test_centroids_from_before_the_shared_kmeans_are_retrained(spark, stage_ctx):
    """A centroids table an older release made (no `cell`, no `batch_id`; its version cannot be
    loaded as a centroid index) gains the columns, and the stage trains a new version instead of
    assigning to the old one."""
    from etl.stages.semantic_dedup import CENTROIDS

    ctx = stage_ctx(semantic_dedup={"images": {"threshold": 0.95, "target_cluster_size": 40, "clusters": None}})
    old = "kind string, model_id string, centroid_version int, cluster_id int, centroid array<float>, " \
          "trained_on bigint, run_id string"
    spark.createDataFrame([("image", "m1", 1, c, _unit(np.eye(D)[c] + 0.1), 10**9, "old") for c in range(2)], old) \
        .write.format("delta").saveAsTable(ctx.table(CENTROIDS))
    rng = np.random.default_rng(2)
    vec = {f"y{j:02d}": _unit(rng.normal(size=D)) for j in range(30)}
    vec["copy"] = _unit(np.asarray(vec["y00"]) + 0.01 * rng.normal(size=D))
    _append(spark, ctx, [(i, 100 if i == "copy" else 200) for i in vec], vec, "b1")

    result = run_stages(spark, ctx.cfg, ["semantic_dedup"])["semantic_dedup"]

    assert result.notes["image_centroids"].startswith("version 2 trained"), result.notes
    centroids = ctx.read(CENTROIDS)
    assert {"cell", "batch_id"} <= set(centroids.columns)
    assert centroids.where("centroid_version = 1 AND cell IS NULL").count() == 2  # old rows kept, untouched
    assert centroids.where("centroid_version = 2 AND cell IS NULL").count() == 0
    members = ctx.read(MEMBERS).where(F.col("kind") == "image")
    assert {r["centroid_version"] for r in members.collect()} == {2}
    img = {r["image_id"]: r.asDict() for r in ctx.read("images").collect()}
    assert (img["copy"]["kept"], img["copy"]["semantic_group"]) == (False, "copy")
