"""balance: semantic balance sampling of the pairs into named subsets -> `image_centroids`,
`image_clusters`, `subsets(subset, image_id, cluster_id, method, cap)` (paper §3.3).

k-means on the image embeddings of the pairs (the cluster stage's k-means, etl/centroids.py: a
content-keyed sample that stays distributed, coarse-then-fine above `balance.two_level_above_k`,
images assigned through the centroid index); centroids are kept and reused while the model, K and seed stay the same, and only new images are
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
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from etl import centroids as km
from etl.context import StageContext, StageResult
from etl.embeddings import usable_vectors
from etl.retrieval import assign_clusters
from etl.stage import stage

CENTROIDS_SCHEMA = ("centroid_version int, cluster_id int, cell int, centroid array<float>, model_id string, "
                    "k_requested int, seed int, sample_rows bigint, batch_id string")
CLUSTERS_SCHEMA = "image_id string, cluster_id int, centroid_version int, batch_id string"
SUBSETS_SCHEMA = "subset string, image_id string, cluster_id int, method string, cap int"


def pair_vectors(ctx: StageContext) -> tuple[DataFrame, str]:
    """(image_id, vector) of the pairs, under the embedding model the pairs were retrieved with."""
    model_id = ctx.read("pairs").agg(F.max("embedding_model")).first()[0]
    vectors = usable_vectors(ctx, "image_embeddings", "image_id", "images", model_id)
    return vectors.join(ctx.read("pairs").select("image_id"), "image_id", "left_semi"), model_id


def centroids(ctx: StageContext, vectors: DataFrame, model_id: str, result: StageResult) -> tuple[int, km.CentroidIndex]:
    """The newest centroid version for this model, K and seed, or a newly trained one."""
    cfg = ctx.cfg.balance
    ctx.create_if_missing("image_centroids", CENTROIDS_SCHEMA)
    ctx.create_if_missing("image_centroid_cells", km.CELLS_SCHEMA)
    tc = ctx.read("image_centroids")
    top = tc.agg(F.max("centroid_version")).first()[0]
    if top is not None:
        first = tc.where(F.col("centroid_version") == top).select("model_id", "k_requested", "seed").first()
        if (first["model_id"], first["k_requested"], first["seed"]) == (model_id, cfg.image_clusters, cfg.seed):
            return int(top), km.load(ctx, "image_centroids", "image_centroid_cells", int(top))
    version = int(top or 0) + 1
    spec = km.spec(ctx, k=cfg.image_clusters, sample_size=cfg.sample_size, niter=cfg.niter, seed=cfg.seed,
                   two_level_above_k=cfg.two_level_above_k)
    trained = km.train(ctx, vectors, spec, id_col="image_id")
    k = km.save(ctx, trained, version, "image_centroids", "image_centroid_cells", model_id, {
        "k_requested": F.lit(cfg.image_clusters), "seed": F.lit(cfg.seed),
        "sample_rows": F.lit(trained.sample_rows).cast("bigint")})
    result.notes["trained"] = (f"version {version}: K={k} on {trained.sample_rows} sampled images "
                               f"(asked {cfg.image_clusters}, {trained.mode})")
    return version, km.load(ctx, "image_centroids", "image_centroid_cells", version)


def assign(ctx: StageContext, vectors: DataFrame, version: int, index: km.CentroidIndex) -> int:
    """Cluster ids for the images of the pairs not assigned under this centroid version yet."""
    ctx.create_if_missing("image_clusters", CLUSTERS_SCHEMA)
    done = ctx.read("image_clusters").where(F.col("centroid_version") == version).select("image_id")
    todo = vectors.join(done, "image_id", "left_anti")
    assigned = (assign_clusters(todo, index, id_col="image_id", ctx=ctx)
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


@stage(reads=("pairs", "image_embeddings"),
       optional_reads=("images", "image_centroids", "image_centroid_cells", "image_clusters", "subsets"),
       writes=("image_centroids", "image_centroid_cells", "image_clusters", "subsets"), config=("balance",), models=("embed.model",),
       steps=(km.KMEANS_TRAIN,))
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
    version, index = centroids(ctx, vectors, model_id, result)
    assign(ctx, vectors, version, index)

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
    result.metrics.update({"clusters": float(index.fine.count()), "largest_cluster": float(sizes.max())})
    return result
