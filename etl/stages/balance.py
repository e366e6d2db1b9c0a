"""balance: semantic balance sampling of the pairs into named subsets -> `image_centroids`,
`image_clusters`, `subsets(subset, image_id, cluster_id, method, cap)` (paper §3.3).

k-means on the image embeddings of the pairs (the retrieval stage's k-means code: a
deterministic sample collected to the driver, coarse-then-fine above `balance.two_level_above_k`);
centroids are kept and reused while the model, K and seed stay the same, and only new images are
assigned. Every image gets one seeded draw, u = hash(image id, seed) in [0, 1), and its rank
inside its cluster by u; then:
- cap c: the images of rank <= c (clusters under the cap are kept whole);
- target size n: the smallest cap whose subset has at least n images (found on the cluster-size
  histogram, so the size lands within one cap step of n);
- probabilistic t (MetaCLIP): the images with u < min(1, t / cluster size);
- random baseline: the first images by u over all clusters, as many as the balanced subset has.
One ranking serves every subset, so subsets nest: a smaller cap's subset lies inside a larger
one's, and re-runs draw the same images. The table holds exactly the configured subsets.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from etl.context import StageContext, StageResult
from etl.embeddings import usable_vectors
from etl.retrieval import assign_clusters, share
from etl.stage import GPU, stage
from udfs.kmeans import as_matrix, faiss_gpus, train_kmeans

CENTROIDS_SCHEMA = ("centroid_version int, cluster_id int, centroid array<float>, model_id string, "
                    "k_requested int, seed int, sample_rows int, batch_id string")
CLUSTERS_SCHEMA = "image_id string, cluster_id int, centroid_version int, batch_id string"
SUBSETS_SCHEMA = "subset string, image_id string, cluster_id int, method string, cap int"


def pair_vectors(ctx: StageContext) -> tuple[DataFrame, str]:
    """(image_id, vector) of the pairs, under the embedding model the pairs were retrieved with."""
    model_id = ctx.read("pairs").agg(F.max("embedding_model")).first()[0]
    vectors = usable_vectors(ctx, "image_embeddings", "image_id", "images", model_id)
    return vectors.join(ctx.read("pairs").select("image_id"), "image_id", "left_semi"), model_id


def centroids(ctx: StageContext, vectors: DataFrame, model_id: str, result: StageResult) -> tuple[int, np.ndarray]:
    """The newest centroid version for this model, K and seed, or a newly trained one."""
    cfg = ctx.cfg.balance
    if ctx.exists("image_centroids"):
        tc = ctx.read("image_centroids")
        top = tc.agg(F.max("centroid_version")).first()[0]
        latest = tc.where(F.col("centroid_version") == top).orderBy("cluster_id").toPandas()
        first = latest.iloc[0] if len(latest) else None
        if first is not None and (first["model_id"], first["k_requested"], first["seed"]) == (
                model_id, cfg.image_clusters, cfg.seed):
            return int(top), as_matrix(latest["centroid"])
        version = int(top or 0) + 1
    else:
        version = 1
    sample = (vectors.withColumn("_h", F.xxhash64("image_id", F.lit(cfg.seed)))
              .orderBy("_h", "image_id").limit(cfg.sample_size).toPandas().sort_values("image_id"))
    x = as_matrix(sample["vector"])
    c = train_kmeans(x, cfg.image_clusters, niter=cfg.niter, seed=cfg.seed,
                     two_level_above_k=cfg.two_level_above_k, gpu=faiss_gpus() > 0)
    result.notes["trained"] = f"version {version}: K={len(c)} on {len(x)} sampled images (asked {cfg.image_clusters})"
    rows = pd.DataFrame({"centroid_version": version, "cluster_id": np.arange(len(c), dtype=np.int32),
                         "centroid": list(c), "model_id": model_id, "k_requested": cfg.image_clusters,
                         "seed": cfg.seed, "sample_rows": len(x), "batch_id": ctx.batch_id})
    ctx.merge_new(ctx.spark.createDataFrame(rows, CENTROIDS_SCHEMA), "image_centroids", ["centroid_version", "cluster_id"])
    return version, c


def assign(ctx: StageContext, vectors: DataFrame, version: int, c: np.ndarray) -> int:
    """Cluster ids for the images of the pairs not assigned under this centroid version yet."""
    ctx.create_if_missing("image_clusters", CLUSTERS_SCHEMA)
    done = ctx.read("image_clusters").where(F.col("centroid_version") == version).select("image_id")
    todo = vectors.join(done, "image_id", "left_anti")
    assigned = (assign_clusters(todo, share(ctx.spark, c), id_col="image_id", ctx=ctx)
                .select("image_id", "cluster_id", F.lit(version).alias("centroid_version"),
                        F.lit(ctx.batch_id).alias("batch_id")))
    return ctx.merge_new(assigned, "image_clusters", ["image_id", "centroid_version"])


def cap_for_size(sizes: np.ndarray, target: int) -> int:
    """The smallest per-cluster cap whose capped total reaches `target` (the largest cluster's
    size when the target exceeds every pair)."""
    sizes = np.sort(np.asarray(sizes, dtype=np.int64))
    lo, hi = 1, int(sizes.max()) if len(sizes) else 1
    while lo < hi:
        mid = (lo + hi) // 2
        if np.minimum(sizes, mid).sum() >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def subsets(ctx: StageContext, ranked: DataFrame, sizes: np.ndarray, result: StageResult) -> DataFrame:
    """SUBSETS_SCHEMA rows of every configured subset (and its random baseline)."""
    cfg = ctx.cfg.balance
    caps = dict(cfg.cluster_caps)
    for name, target in cfg.target_sizes.items():
        caps[name] = cap_for_size(sizes, target)
        result.notes[f"cap_{name}"] = f"{caps[name]} per cluster for a target of {target}"
    parts = [ranked.where(F.col("rank") <= cap).select(F.lit(name).alias("subset"), "image_id", "cluster_id",
                                                     F.lit("cap").alias("method"), F.lit(cap).alias("cap"))
             for name, cap in caps.items()]
    parts += [ranked.where(F.col("u") < F.least(F.lit(1.0), F.lit(float(t)) / F.col("cluster_size")))
              .select(F.lit(name).alias("subset"), "image_id", "cluster_id", F.lit("probabilistic").alias("method"),
                      F.lit(t).alias("cap"))
              for name, t in cfg.probabilistic.items()]
    if cfg.random_baseline:
        for name, part in list(zip([*caps, *cfg.probabilistic], parts)):
            parts.append(ranked.orderBy("u", "image_id").limit(part.count()).select(
                F.lit(f"{name}-random").alias("subset"), "image_id", "cluster_id", F.lit("random").alias("method"),
                F.lit(None).cast("int").alias("cap")))
    out = parts[0]
    for p in parts[1:]:
        out = out.unionByName(p)
    return out


@stage(reads=("pairs", "image_embeddings"), optional_reads=("images", "image_centroids", "image_clusters", "subsets"),
       writes=("image_centroids", "image_clusters", "subsets"), config=("balance",), models=("embed.model",),
       resources=GPU)
def balance(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.balance
    result = StageResult()
    ctx.create_if_missing("subsets", SUBSETS_SCHEMA)
    # read
    vectors, model_id = pair_vectors(ctx)
    if model_id is None or vectors.limit(1).count() == 0:
        result.notes["skipped"] = "no pairs with an image vector"
        return result
    result.models["image_embeddings"] = model_id
    version, c = centroids(ctx, vectors, model_id, result)
    assign(ctx, vectors, version, c)

    # transform: one seeded draw per image, its rank inside its cluster, the cluster's size
    clusters = (ctx.read("image_clusters").where(F.col("centroid_version") == version)
                .join(ctx.read("pairs").select("image_id"), "image_id", "left_semi"))
    u = (F.pmod(F.xxhash64("image_id", F.lit(cfg.seed)), F.lit(1 << 52)) / F.lit(float(1 << 52)))
    ranked = (clusters.withColumn("u", u)
              .withColumn("rank", F.row_number().over(Window.partitionBy("cluster_id").orderBy("u", "image_id")))
              .withColumn("cluster_size", F.count("*").over(Window.partitionBy("cluster_id")))
              .localCheckpoint())
    sizes = np.array([r["n"] for r in clusters.groupBy("cluster_id").agg(F.count("*").alias("n")).collect()])
    rows = subsets(ctx, ranked, sizes, result).localCheckpoint()

    # write: exactly the configured subsets
    result.rows_out = ctx.sync(rows, "subsets", ["subset", "image_id"], compare=["cluster_id", "method", "cap"])

    # record
    result.rows_in = int(sizes.sum())
    counts = {r["subset"]: r["n"] for r in rows.groupBy("subset").agg(F.count("*").alias("n")).collect()}
    result.metrics.update({f"subset_{k}": float(v) for k, v in counts.items()})
    result.metrics.update({"clusters": float(len(c)), "largest_cluster": float(sizes.max())})
    return result
