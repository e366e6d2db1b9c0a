"""cluster: k-means over the sentence embeddings -> text_centroids + text_centroid_cells (versioned)
+ sentence_clusters.

Centroids are trained once (etl/centroids.py: off the driver, coarse-then-fine for a large K) on
a content-keyed sample and kept: later runs only assign new sentences to the latest version,
through the centroid index. A new version is trained on `cluster.refit`, or when the embedding
model changed. K is clamped to the sample size when the sample is smaller (noted in the run).
Assignments of sentences that a later verdict dropped are deleted (and the sizes refreshed).
"""
from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl import centroids as km
from etl.context import StageContext, StageResult
from etl.embeddings import latest_index, latest_model, usable_vectors
from etl.retrieval import assign_clusters
from etl.stage import stage
from realsyn_models.clip import is_random_init

CENTROIDS_SCHEMA = (
    "centroid_version int, cluster_id int, cell int, centroid array<float>, size bigint, model_id string, "
    "k_requested int, sample_rows bigint, seed int, batch_id string"
)
CLUSTERS_SCHEMA = (
    "sentence_id string, cluster_id int, centroid_version int, score float, model_id string, batch_id string"
)


def kmeans_spec(ctx: StageContext) -> km.KMeansSpec:
    cc = ctx.cfg.cluster
    return km.spec(ctx, k=cc.k, sample_size=cc.sample_size, niter=cc.niter, seed=cc.seed,
                   two_level_above_k=cc.two_level_above_k)


def _train(ctx: StageContext, vectors: DataFrame, version: int, model_id: str, result: StageResult) -> None:
    cc = ctx.cfg.cluster
    trained = km.train(ctx, vectors, kmeans_spec(ctx), id_col="sentence_id")
    k = trained.fine.count()
    if k < cc.k:
        result.notes["k_clamped"] = f"cluster.k={cc.k} > {trained.sample_rows} sampled sentences; K={k}"
    result.notes.update({
        "trained": f"version {version}: K={k} in {len(trained.cells)} cells on {trained.sample_rows} "
                   "sampled sentences",
        # The train fn runs FAISS on a GPU only in a task that holds one (udfs/kmeans.py: faiss_on_gpu).
        "kmeans_device": ("GPU tasks (FAISS on the task's GPU where faiss-gpu is installed)"
                          if ctx.gpu_step(km.KMEANS_TRAIN.name) else "CPU tasks"),
        "kmeans_mode": trained.mode,
    })
    result.metrics.update({"trained_k": float(k), "sample_rows": float(trained.sample_rows),
                           "index_cells": float(len(trained.cells))})
    km.save(ctx, trained, version, "text_centroids", "text_centroid_cells", model_id, {
        "size": F.lit(0).cast("bigint"), "k_requested": F.lit(cc.k), "seed": F.lit(cc.seed),
        "sample_rows": F.lit(trained.sample_rows).cast("bigint")})


def index_to_use(ctx: StageContext, vectors: DataFrame, model_id: str,
                 result: StageResult) -> tuple[int, km.CentroidIndex] | None:
    """The latest centroid version of this model, or a newly trained one (first run, another
    model, or cluster.refit). None when there is nothing to train on."""
    current = latest_index(ctx)
    if current is not None and current[1] == model_id and not ctx.cfg.cluster.refit:
        return current[0], current[2]
    if vectors.limit(1).count() == 0:
        return None
    version = current[0] + 1 if current is not None else 1
    _train(ctx, vectors, version, model_id, result)
    return version, latest_index(ctx, version=version)[2]


@stage(reads=("sentence_embeddings",), optional_reads=("sentences", "text_centroids", "text_centroid_cells",
                                                       "sentence_clusters"),
       writes=("text_centroids", "text_centroid_cells", "sentence_clusters"), config=("cluster",),
       models=("embed.model",), steps=(km.KMEANS_TRAIN,))
def cluster(ctx: StageContext) -> StageResult:
    result = StageResult()
    ctx.create_if_missing("sentence_clusters", CLUSTERS_SCHEMA)
    ctx.create_if_missing("text_centroids", CENTROIDS_SCHEMA)
    ctx.create_if_missing("text_centroid_cells", km.CELLS_SCHEMA)
    # read
    model_id = ctx.cfg.cluster.model_id or latest_model(ctx.read("sentence_embeddings"))
    if model_id is None:
        result.notes["skipped"] = "no sentence embeddings"
        return result
    result.models["sentence_embeddings"] = model_id
    if is_random_init(model_id):
        result.warn(f"clusters are built on RANDOM-INIT embeddings ({model_id}): not meaningful")
    vectors = usable_vectors(ctx, "sentence_embeddings", "sentence_id", "sentences", model_id)
    chosen = index_to_use(ctx, vectors, model_id, result)
    if chosen is None:
        result.notes["skipped"] = f"no usable sentence vectors for model {model_id}"
        return result
    version, index = chosen
    result.notes["centroid_version"] = str(version)
    result.metrics["k"] = float(index.fine.count())
    assigned_before = ctx.read("sentence_clusters").where(F.col("centroid_version") == version)
    # propagate: a sentence a later verdict dropped leaves its cluster (and the cluster's size)
    dropped = assigned_before.join(vectors, "sentence_id", "left_anti").select("sentence_id", "centroid_version")
    removed = ctx.delete_keys(dropped, "sentence_clusters", ["sentence_id", "centroid_version"])
    result.metrics["propagated_rows_deleted"] = float(removed)
    todo = vectors.join(assigned_before.select("sentence_id"), "sentence_id", "left_anti")
    result.rows_in = todo.count()
    if result.rows_in == 0:
        if removed:
            _refresh_sizes(ctx, version)
        return result

    # transform
    assigned = (assign_clusters(todo, index, id_col="sentence_id", ctx=ctx)
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
