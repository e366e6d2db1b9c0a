"""cluster: k-means over the sentence embeddings -> text_centroids (versioned) + sentence_clusters.

Centroids are trained once on a deterministic sample (the sentences with the smallest
hash(sentence_id, seed)) and kept: later runs only assign new sentences to the latest version.
A new version is trained on `cluster.refit`, or when the embedding model changed. K is clamped to
the sample size when the sample is smaller (noted in the run).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl.context import StageContext, StageResult
from etl.stage import GPU, stage
from etl.embeddings import latest_centroids, latest_model, usable_vectors
from etl.retrieval import assign_clusters, share
from realsyn_models.clip import is_random_init
from udfs.kmeans import as_matrix, faiss_gpus, train_kmeans

CENTROIDS_SCHEMA = (
    "centroid_version int, cluster_id int, centroid array<float>, size bigint, model_id string, "
    "k_requested int, sample_rows bigint, seed int, batch_id string"
)
CLUSTERS_SCHEMA = (
    "sentence_id string, cluster_id int, centroid_version int, score float, model_id string, batch_id string"
)


def _train(ctx: StageContext, vectors: DataFrame, version: int, model_id: str, result: StageResult) -> np.ndarray:
    cc = ctx.cfg.cluster
    # A content-keyed sample: the same sentences are drawn whatever the partitioning.
    sample = (vectors.withColumn("_h", F.xxhash64("sentence_id", F.lit(cc.seed)))
              .orderBy("_h", "sentence_id").limit(cc.sample_size).toPandas())
    x = as_matrix(sample.sort_values("sentence_id")["vector"])
    if len(x) < cc.k:
        result.notes["k_clamped"] = f"cluster.k={cc.k} > {len(x)} sampled sentences; K={len(x)}"
    gpus = faiss_gpus()
    centroids = train_kmeans(x, cc.k, niter=cc.niter, seed=cc.seed, two_level_above_k=cc.two_level_above_k,
                             gpu=gpus > 0)
    result.notes.update({
        "trained": f"version {version}: K={len(centroids)} on {len(x)} sampled sentences",
        "kmeans_device": f"faiss GPU x{gpus}" if gpus else "faiss CPU",
        "kmeans_mode": "coarse-then-fine" if len(centroids) > cc.two_level_above_k else "flat",
    })
    result.metrics.update({"trained_k": float(len(centroids)), "sample_rows": float(len(x))})
    rows = pd.DataFrame({
        "centroid_version": version, "cluster_id": np.arange(len(centroids), dtype=np.int32),
        "centroid": list(centroids), "size": 0, "model_id": model_id, "k_requested": cc.k,
        "sample_rows": len(x), "seed": cc.seed, "batch_id": ctx.batch_id,
    })
    ctx.merge_new(ctx.spark.createDataFrame(rows, CENTROIDS_SCHEMA), "text_centroids",
                  ["centroid_version", "cluster_id"])
    return centroids


def centroids_to_use(ctx: StageContext, vectors: DataFrame, model_id: str,
                     result: StageResult) -> tuple[int, np.ndarray] | None:
    """The latest centroid version of this model, or a newly trained one (first run, another
    model, or cluster.refit). None when there is nothing to train on."""
    current = latest_centroids(ctx)
    if current is not None and current[1] == model_id and not ctx.cfg.cluster.refit:
        return current[0], current[2]
    if vectors.limit(1).count() == 0:
        return None
    version = current[0] + 1 if current is not None else 1
    return version, _train(ctx, vectors, version, model_id, result)


@stage(reads=("sentence_embeddings",), optional_reads=("sentences", "text_centroids", "sentence_clusters"),
       writes=("text_centroids", "sentence_clusters"), config=("cluster",), models=("embed.model",),
       resources=GPU)
def cluster(ctx: StageContext) -> StageResult:
    result = StageResult()
    ctx.create_if_missing("sentence_clusters", CLUSTERS_SCHEMA)
    # read
    model_id = ctx.cfg.cluster.model_id or latest_model(ctx.read("sentence_embeddings"))
    if model_id is None:
        result.notes["skipped"] = "no sentence embeddings"
        return result
    result.models["sentence_embeddings"] = model_id
    if is_random_init(model_id):
        result.warn(f"clusters are built on RANDOM-INIT embeddings ({model_id}): not meaningful")
    vectors = usable_vectors(ctx, "sentence_embeddings", "sentence_id", "sentences", model_id)
    chosen = centroids_to_use(ctx, vectors, model_id, result)
    if chosen is None:
        result.notes["skipped"] = f"no usable sentence vectors for model {model_id}"
        return result
    version, centroids = chosen
    result.notes["centroid_version"] = str(version)
    result.metrics["k"] = float(len(centroids))
    done = ctx.read("sentence_clusters").where(F.col("centroid_version") == version).select("sentence_id")
    todo = vectors.join(done, "sentence_id", "left_anti")
    result.rows_in = todo.count()
    if result.rows_in == 0:
        return result

    # transform
    assigned = (assign_clusters(todo, share(ctx.spark, centroids), id_col="sentence_id", ctx=ctx)
                .withColumn("centroid_version", F.lit(version))
                .withColumn("model_id", F.lit(model_id))
                .withColumn("batch_id", F.lit(ctx.batch_id))
                .select("sentence_id", "cluster_id", "centroid_version", "score", "model_id", "batch_id"))

    # write
    result.rows_out = ctx.merge_new(assigned, "sentence_clusters", ["sentence_id", "centroid_version"])
    _refresh_sizes(ctx, version)
    return result


def _refresh_sizes(ctx: StageContext, version: int) -> None:
    """text_centroids.size = sentences assigned to each centroid of this version so far."""
    counts = (ctx.read("sentence_clusters").where(F.col("centroid_version") == version)
              .groupBy("cluster_id").agg(F.count("*").alias("n")))
    rows = (ctx.read("text_centroids").where(F.col("centroid_version") == version)
            .join(counts, "cluster_id", "left")
            .withColumn("size", F.coalesce(F.col("n"), F.lit(0)).cast("bigint")).drop("n"))
    ctx.update_columns(rows, "text_centroids", ["centroid_version", "cluster_id"], ["size"])
