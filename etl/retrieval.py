"""Two-level (inverted-file) retrieval as Spark joins, over any embeddings.

    two_level_search(queries, corpus, centroids, k, nprobe)   ->  query_id, rank, corpus_id, score, cluster_id
    brute_force_search(queries, corpus, k)                    ->  the same columns, exact

Inputs are any DataFrames with an id column and an array<float> vector column (unit length: scores
are inner products). The two-level plan:

1. each query's `nprobe` nearest centroids (mapInPandas, centroids broadcast), plus its next-nearest
   ones while the probed clusters hold fewer than k corpus rows (`fallback_probes`); the
   (query, cluster) ids are checkpointed, so the probe runs once and its per-cluster counts are known;
2. the (query, cluster) pairs and the corpus co-grouped by cluster id, heavy clusters split: corpus
   rows into chunks of at most `max_cluster_chunk`, a cluster's queries into chunks of at most
   `max_query_chunk`, each corpus chunk meeting each query chunk once, so no task holds an
   unbounded group (clusters within the limits, the usual case, take no extra step);
3. an exact inner-product top-k inside each group (udfs/topk.py) in one profiled mapInPandas over
   rows pre-grouped by key (etl/gpu.py): GPU tasks on the task's own GPU inside a GPU stage;
4. a per-query merge of the partial top-ks by (score desc, corpus_id asc): ties go to the smaller
   id and the answer is the same however the data was split or partitioned.

Brute force is the same plan with one cluster (cluster_id -1), i.e. a blocked exact search.
A query gets fewer than k rows only when `min_similarity` removes them or the corpus (or every
cluster it can probe) is smaller than k.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from etl.gpu import grouped, map_in_pandas
from udfs.kmeans import make_probe_fn, probe_schema
from udfs.topk import CORPUS, GROUP_KEYS, PARTIAL_SCHEMA, QUERY, make_grouped_topk_fn

if TYPE_CHECKING:
    from etl.context import StageContext

RESULT_COLUMNS = ["query_id", "rank", "corpus_id", "score", "cluster_id"]
BRUTE_FORCE_CLUSTER = -1


def share(spark: SparkSession, array: np.ndarray):
    """The array as something a UDF factory can take: a broadcast (shipped once per executor)
    where the session has a SparkContext, the array itself under Spark Connect."""
    try:
        bc = spark.sparkContext.broadcast(array)
    except Exception:  # Spark Connect: no SparkContext; the array travels with the function
        return array
    return lambda: bc.value


def assign_clusters(df: DataFrame, centroids, *, id_col: str = "id", vector: str = "vector",
                    ctx: StageContext | None = None) -> DataFrame:
    """(id_col, cluster_id, score): every row's nearest centroid. `centroids`: array or share()."""
    fn = make_probe_fn(centroids, 1, id_col=id_col, vector_col=vector)
    return map_in_pandas(ctx, df.select(id_col, vector), fn, probe_schema(id_col)).drop("probe")


def cluster_sizes(corpus: DataFrame, n_clusters: int) -> np.ndarray:
    """Rows per cluster id (K numbers, collected): they steer fallback probes and chunking."""
    sizes = np.zeros(n_clusters, dtype=np.int64)
    for row in corpus.groupBy("cluster_id").count().collect():
        sizes[row["cluster_id"]] = row["count"]
    return sizes


def probe(queries: DataFrame, centroids, sizes: np.ndarray, k: int, nprobe: int, fallback_probes: int,
          *, ctx: StageContext | None = None) -> DataFrame:
    """(query_id, vector) -> checkpointed (query_id, cluster_id): the clusters each query searches."""
    fn = make_probe_fn(centroids, nprobe, id_col="query_id", vector_col="vector", cluster_sizes=sizes,
                       min_candidates=k, max_probes=nprobe + fallback_probes)
    return (map_in_pandas(ctx, queries.select("query_id", "vector"), fn, probe_schema("query_id"))
            .select("query_id", "cluster_id").localCheckpoint())


def two_level_search(
    queries: DataFrame, corpus: DataFrame, centroids: np.ndarray, k: int = 3, nprobe: int = 1, *,
    query_id: str = "id", corpus_id: str = "id", vector: str = "vector", corpus_cluster: str | None = None,
    min_similarity: float | None = None, max_cluster_chunk: int = 50_000, max_query_chunk: int = 50_000,
    fallback_probes: int = 8, device: str | None = None, ctx: StageContext | None = None,
) -> DataFrame:
    """Each query's top-k corpus rows through its nearest cluster(s).

    `corpus_cluster`: the corpus column holding each row's cluster id under these centroids
    (e.g. from sentence_clusters); when None the corpus is assigned here. `device`: where the
    in-cluster top-k runs (None: each task's own device). `ctx`: inside a stage, the
    probe runs as a GPU task (etl/gpu.py).
    """
    spark = queries.sparkSession
    cents = np.ascontiguousarray(centroids, dtype=np.float32)
    shared = share(spark, cents)
    q = queries.select(F.col(query_id).cast("string").alias("query_id"), F.col(vector).alias("vector"))
    c = corpus.select(F.col(corpus_id).cast("string").alias("corpus_id"), F.col(vector).alias("vector"),
                      *([F.col(corpus_cluster).cast("int").alias("cluster_id")] if corpus_cluster else []))
    if corpus_cluster is None:
        assigned = assign_clusters(c, shared, id_col="corpus_id", ctx=ctx).select("corpus_id", "cluster_id")
        c = c.join(assigned.localCheckpoint(), "corpus_id")
    sizes = cluster_sizes(c, len(cents))
    probes = probe(q, shared, sizes, k, nprobe, fallback_probes, ctx=ctx)
    partial = grouped_topk(q, probes, c, dict(enumerate(sizes.tolist())), k, min_similarity=min_similarity,
                           max_cluster_chunk=max_cluster_chunk, max_query_chunk=max_query_chunk, device=device,
                           ctx=ctx)
    return merge_topk(partial, k)


def brute_force_search(
    queries: DataFrame, corpus: DataFrame, k: int = 3, *, query_id: str = "id", corpus_id: str = "id",
    vector: str = "vector", min_similarity: float | None = None, max_cluster_chunk: int = 50_000,
    max_query_chunk: int = 50_000, device: str | None = None,
) -> DataFrame:
    """Exact top-k of every query over the whole corpus (the evaluation baseline): blocked into
    corpus x query chunks by the same machinery, cluster_id = -1."""
    one = F.lit(BRUTE_FORCE_CLUSTER).cast("int").alias("cluster_id")
    q = queries.select(F.col(query_id).cast("string").alias("query_id"), F.col(vector).alias("vector"))
    c = corpus.select(F.col(corpus_id).cast("string").alias("corpus_id"), F.col(vector).alias("vector"), one)
    partial = grouped_topk(q, q.select("query_id", one), c, {BRUTE_FORCE_CLUSTER: c.count()}, k,
                           min_similarity=min_similarity, max_cluster_chunk=max_cluster_chunk,
                           max_query_chunk=max_query_chunk, device=device)
    return merge_topk(partial, k)


def _split(df: DataFrame, id_col: str, heavy: dict[int, int], size: int, name: str) -> DataFrame:
    """Column `name`: 0 in light clusters; in the `heavy` ones the rows numbered by id and cut into
    chunks of at most `size`. Only heavy clusters pay for the numbering."""
    if not heavy:
        return df.withColumn(name, F.lit(0))
    is_heavy = F.col("cluster_id").isin(list(heavy))
    w = Window.partitionBy("cluster_id").orderBy(id_col)
    numbered = df.where(is_heavy).withColumn(name, F.floor((F.row_number().over(w) - 1) / size).cast("int"))
    return df.where(~is_heavy).withColumn(name, F.lit(0)).unionByName(numbered)


def _replicate(df: DataFrame, counts: dict[int, int], name: str) -> DataFrame:
    """One copy of each row per chunk `name` of the other side of its cluster (one in light ones)."""
    if not counts:
        return df.withColumn(name, F.lit(0))
    spark = df.sparkSession
    plan = spark.createDataFrame(list(counts.items()), "cluster_id int, n int")
    return (df.join(F.broadcast(plan), "cluster_id", "left")
            .withColumn(name, F.explode(F.sequence(F.lit(0), F.coalesce(F.col("n"), F.lit(1)) - 1))).drop("n"))


def grouped_topk(queries: DataFrame, probes: DataFrame, corpus: DataFrame, corpus_sizes: dict[int, int], k: int,
                 *, min_similarity: float | None, max_cluster_chunk: int, max_query_chunk: int,
                 device: str | None = None, ctx: StageContext | None = None) -> DataFrame:
    """queries (query_id, vector), probes (query_id, cluster_id), corpus (corpus_id, vector, cluster_id)
    -> PARTIAL_SCHEMA rows: each query's k best inside every cluster it probes, heavy clusters split.

    Both sides go into one DataFrame grouped by (cluster, corpus chunk, query chunk) and scored by
    one profiled mapInPandas (etl/gpu.py): a GPU task per partition inside a GPU stage."""
    heavy_c = {c: math.ceil(n / max_cluster_chunk) for c, n in corpus_sizes.items() if n > max_cluster_chunk}
    heavy_q = {r["cluster_id"]: math.ceil(r["count"] / max_query_chunk)
               for r in probes.groupBy("cluster_id").count().where(F.col("count") > max_query_chunk).collect()}
    # Probes of empty clusters would only make empty groups (k-means leaves few or none).
    empty = [c for c, n in corpus_sizes.items() if n == 0]
    pairs = (probes.where(~F.col("cluster_id").isin(empty)) if empty else probes).join(queries, "query_id")
    pairs = _replicate(_split(pairs, "query_id", heavy_q, max_query_chunk, "qchunk"), heavy_c, "cchunk")
    corpus = _replicate(_split(corpus, "corpus_id", heavy_c, max_cluster_chunk, "cchunk"), heavy_q, "qchunk")
    rows = (pairs.select(*GROUP_KEYS, F.lit(QUERY).alias("side"), F.col("query_id").alias("id"), "vector")
            .unionByName(corpus.select(*GROUP_KEYS, F.lit(CORPUS).alias("side"), F.col("corpus_id").alias("id"),
                                       "vector")))
    fn = make_grouped_topk_fn(k, min_similarity=min_similarity, device=device)
    return map_in_pandas(ctx, grouped(rows, GROUP_KEYS, ["side"]), fn, PARTIAL_SCHEMA)


def merge_topk(partial: DataFrame, k: int) -> DataFrame:
    """Partial top-ks -> each query's final k, rank 1..k by (score desc, corpus_id asc)."""
    w = Window.partitionBy("query_id").orderBy(F.col("score").desc(), F.col("corpus_id").asc())
    return (partial.withColumn("rank", F.row_number().over(w).cast("int"))
            .where(F.col("rank") <= k).select(*RESULT_COLUMNS))
