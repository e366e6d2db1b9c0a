"""The embedding and centroid tables: filling them, and which model, vectors and centroids to read.

Shared by the stages that write embeddings (embed; semantic_dedup with its own text encoder) and
those that consume them (semantic_dedup, cluster, retrieve), so they agree on what a usable
vector is.
"""
from __future__ import annotations

import time

import numpy as np
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl.context import StageContext, StageResult
from etl.gpu import map_in_pandas
from udfs.kmeans import as_matrix




def latest_model(df: DataFrame) -> str | None:
    """The model of the most recent embedding batch (ties: the larger model id)."""
    latest = df.agg(F.max(F.struct("batch_id", "model_id")).alias("m")).collect()[0]["m"]
    return latest["model_id"] if latest else None


def usable_vectors(ctx: StageContext, table: str, id_col: str, owner: str, model_id: str) -> DataFrame:
    """(id_col, vector) rows of one model that have a vector and whose item is still kept."""
    df = (ctx.read(table).where(F.col("vector").isNotNull() & F.col("error").isNull()
                                & (F.col("model_id") == model_id))
          .select(id_col, "vector").dropDuplicates([id_col]))
    if ctx.exists(owner):
        kept = ctx.read(owner).where(F.col("kept")).select(id_col)
        df = df.join(kept, id_col, "left_semi")
    return df


def latest_centroids(ctx: StageContext, model_id: str | None = None) -> tuple[int, str, np.ndarray] | None:
    """(version, model_id, (K, d) array) of the newest centroid version (of `model_id` if given)."""
    if not ctx.exists("text_centroids"):
        return None
    tc = ctx.read("text_centroids")
    if model_id is not None:
        tc = tc.where(F.col("model_id") == model_id)
    top = tc.agg(F.max("centroid_version").alias("v")).first()["v"]
    if top is None:
        return None
    rows = (tc.where(F.col("centroid_version") == top).select("cluster_id", "centroid", "model_id")
            .orderBy("cluster_id").toPandas())
    return int(top), str(rows["model_id"].iloc[0]), as_matrix(rows["centroid"])


def not_embedded(ctx: StageContext, todo: DataFrame, table: str, id_col: str, model_id: str) -> DataFrame:
    if not ctx.exists(table):
        return todo
    done = ctx.read(table).where(F.col("model_id") == model_id).select(id_col)
    return todo.join(done, id_col, "left_anti")


def embed_into(ctx: StageContext, result: StageResult, source: DataFrame | None, table: str, id_col: str,
               fn, schema: str, model_id: str, kind: str) -> None:
    """read what `table` lacks for this model -> embed (GPU tasks) -> MERGE -> record."""
    if source is None:
        result.notes[f"{kind}_skipped"] = "no input table yet"
        return
    started = time.perf_counter()
    # read
    todo = not_embedded(ctx, source, table, id_col, model_id)
    # transform. Persisted: the MERGE must not run the model a second time.
    partitions = ctx.cfg.embed.partitions or ctx.spark.sparkContext.defaultParallelism
    out = (map_in_pandas(ctx, todo.repartition(partitions), fn, schema)
           .withColumn("batch_id", F.lit(ctx.batch_id)).persist())
    try:
        # One pass computes (and caches) every vector; partitions with no new rows load no model.
        counts = {row["error"]: row["count"] for row in out.groupBy("error").count().collect()}
        # write
        written = ctx.merge_new(out, table, [id_col, "model_id"]) if counts else 0
    finally:
        out.unpersist()
    # record
    result.rows_in += sum(counts.values())
    result.rows_out += written
    result.add_drops({f"{kind}_{error}": n for error, n in counts.items() if error})
    result.metrics[f"{kind}_rows"] = float(written)
    result.metrics[f"{kind}_wall_s"] = time.perf_counter() - started
