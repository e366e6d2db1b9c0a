"""Two-level (inverted-file) retrieval as Spark joins, over any embeddings.

    two_level_search(queries, corpus, centroids, k, nprobe)   ->  query_id, rank, corpus_id, score, cluster_id
    brute_force_search(queries, corpus, k)                    ->  the same columns, exact

Inputs are any DataFrames with an id column and an array<float> vector column (unit length: scores
are inner products). The two-level plan:

1. each query's `nprobe` nearest centroids through the centroid index (etl/centroids.py: routed
   by the coarse cells, never meeting all K), plus its next-nearest ones while the probed clusters
   hold fewer than k corpus rows (`fallback_probes`, a running sum over the cluster sizes as a
   window, not a collected array); the (query, cluster) ids are checkpointed, so the probe runs once;
2. the (query, cluster) pairs and the corpus co-grouped by cluster id, heavy clusters split: corpus
   rows into chunks of at most `max_cluster_chunk`, a cluster's queries into chunks of at most
   `max_query_chunk`, each corpus chunk meeting each query chunk once, so no task holds an
   unbounded group (clusters within the limits, the usual case, take no extra step);
3. a top-k inside each group (udfs/topk.py: a FAISS / half-precision candidate pass, then an exact
   float64 re-score of the candidates) in one profiled mapInPandas over rows pre-grouped by key
   (etl/gpu.py): GPU tasks on the task's own GPU inside a GPU stage;
4. a per-query merge of the partial top-ks by (score desc, corpus_id asc): ties go to the smaller
   id and the answer is the same however the data was split or partitioned.

Brute force is the same plan with one cluster (cluster_id -1), i.e. a blocked exact search.
A query gets fewer than k rows only when `min_similarity` removes them or the corpus (or every
cluster it can probe) is smaller than k.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from etl.centroids import CentroidIndex, exact_index, nearest
from etl.gpu import grouped, map_in_pandas
from etl.stage import Step
from udfs.topk import CORPUS, GROUP_KEYS, PARTIAL_SCHEMA, QUERY, make_grouped_topk_fn

# The within-cluster top-k: a matrix product on the task's GPU (torch), CPU FAISS otherwise. The
# routing to centroids before it and the per-query merge after it are CPU steps.
TOPK = Step("topk", "exact inner-product top-k inside each (cluster, chunk) group (torch on the task's GPU)")

if TYPE_CHECKING:
    from etl.context import StageContext

RESULT_COLUMNS = ["query_id", "rank", "corpus_id", "score", "cluster_id"]
BRUTE_FORCE_CLUSTER = -1


def assign_clusters(df: DataFrame, index: CentroidIndex, *, id_col: str = "id", vector: str = "vector",
                    ctx: StageContext | None = None) -> DataFrame:
    """(id_col, cluster_id, score): every row's nearest centroid, through the centroid index."""
    return (nearest(ctx, df, index, 1, id_col=id_col, vector=vector)
            .select(F.col("qid").alias(id_col), "cluster_id", "score"))


def cluster_sizes(corpus: DataFrame) -> DataFrame:
    """(cluster_id, size) of the clusters holding corpus rows: a DataFrame, never collected (K rows)."""
    return corpus.groupBy("cluster_id").agg(F.count("*").alias("size"))


def probe(queries: DataFrame, index: CentroidIndex, sizes: DataFrame, k: int, nprobe: int, fallback_probes: int,
          *, ctx: StageContext | None = None) -> DataFrame:
    """(query_id, vector) -> checkpointed (query_id, cluster_id): the clusters each query searches.

    Its `nprobe` nearest centroids, plus its next-nearest ones (up to `fallback_probes` more) while
    the clusters before them hold fewer than k corpus rows (`sizes`), so it still gets k."""
    near = nearest(ctx, queries.select("query_id", "vector"), index, nprobe + fallback_probes, id_col="query_id")
    w = (Window.partitionBy("qid").orderBy("rank")
         .rowsBetween(Window.unboundedPreceding, Window.currentRow))
    with_sizes = near.join(sizes, "cluster_id", "left").withColumn(
        "size", F.coalesce(F.col("size"), F.lit(0)))
    before = F.sum("size").over(w) - F.col("size")
    return (with_sizes.withColumn("before", before)
            .where((F.col("rank") <= nprobe) | (F.col("before") < k))
            .select(F.col("qid").alias("query_id"), "cluster_id").localCheckpoint())


def two_level_search(
    queries: DataFrame, corpus: DataFrame, centroids: np.ndarray | CentroidIndex, k: int = 3, nprobe: int = 1, *,
    query_id: str = "id", corpus_id: str = "id", vector: str = "vector", corpus_cluster: str | None = None,
    min_similarity: float | None = None, max_cluster_chunk: int = 50_000, max_query_chunk: int = 50_000,
    fallback_probes: int = 8, device: str | None = None, precision: str = "float32",
    ctx: StageContext | None = None,
) -> DataFrame:
    """Each query's top-k corpus rows through its nearest cluster(s).

    `centroids`: a CentroidIndex, or a small array (searched exactly). `corpus_cluster`: the corpus
    column holding each row's cluster id under these centroids (e.g. from sentence_clusters); when
    None the corpus is assigned here. `device`: where the in-cluster top-k runs (None: each task's
    own device). `ctx`: inside a stage, the steps run as GPU tasks (etl/gpu.py).
    """
    index = centroids if isinstance(centroids, CentroidIndex) else exact_index(centroids, ctx)
    q = queries.select(F.col(query_id).cast("string").alias("query_id"), F.col(vector).alias("vector"))
    c = corpus.select(F.col(corpus_id).cast("string").alias("corpus_id"), F.col(vector).alias("vector"),
                      *([F.col(corpus_cluster).cast("int").alias("cluster_id")] if corpus_cluster else []))
    if corpus_cluster is None:
        assigned = assign_clusters(c, index, id_col="corpus_id", ctx=ctx).select("corpus_id", "cluster_id")
        c = c.join(assigned.localCheckpoint(), "corpus_id")
    sizes = cluster_sizes(c).localCheckpoint()
    probes = probe(q, index, sizes, k, nprobe, fallback_probes, ctx=ctx)
    partial = grouped_topk(q, probes, c, sizes, k, min_similarity=min_similarity,
                           max_cluster_chunk=max_cluster_chunk, max_query_chunk=max_query_chunk, device=device,
                           precision=precision, ctx=ctx)
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
    sizes = c.groupBy("cluster_id").agg(F.count("*").alias("size"))
    partial = grouped_topk(q, q.select("query_id", one), c, sizes, k,
                           min_similarity=min_similarity, max_cluster_chunk=max_cluster_chunk,
                           max_query_chunk=max_query_chunk, device=device)
    return merge_topk(partial, k)


def _split(df: DataFrame, id_col: str, heavy: DataFrame, size: int, name: str) -> DataFrame:
    """Column `name`: 0 in light clusters; in the `heavy` ones (a DataFrame of their ids) the rows
    numbered by id and cut into chunks of at most `size`. Only heavy clusters pay for the numbering."""
    marked = df.join(F.broadcast(heavy.select("cluster_id", F.lit(True).alias("_heavy"))), "cluster_id", "left")
    w = Window.partitionBy("cluster_id").orderBy(id_col)
    numbered = (marked.where(F.col("_heavy"))
                .withColumn(name, F.floor((F.row_number().over(w) - 1) / size).cast("int")))
    return (marked.where(F.col("_heavy").isNull()).withColumn(name, F.lit(0)).unionByName(numbered)
            .drop("_heavy"))


def _replicate(df: DataFrame, chunks: DataFrame, name: str) -> DataFrame:
    """One copy of each row per chunk `name` of the other side of its cluster (one in light ones).
    `chunks`: (cluster_id, n) of the heavy clusters only."""
    return (df.join(F.broadcast(chunks), "cluster_id", "left")
            .withColumn(name, F.explode(F.sequence(F.lit(0), F.coalesce(F.col("n"), F.lit(1)) - 1))).drop("n"))


def grouped_topk(queries: DataFrame, probes: DataFrame, corpus: DataFrame, corpus_sizes: DataFrame, k: int,
                 *, min_similarity: float | None, max_cluster_chunk: int, max_query_chunk: int,
                 device: str | None = None, precision: str = "float32",
                 ctx: StageContext | None = None) -> DataFrame:
    """queries (query_id, vector), probes (query_id, cluster_id), corpus (corpus_id, vector, cluster_id),
    corpus_sizes (cluster_id, size) -> PARTIAL_SCHEMA rows: each query's k best inside every
    cluster it probes, heavy clusters split.

    Both sides go into one DataFrame grouped by (cluster, corpus chunk, query chunk) and scored by
    one profiled mapInPandas (etl/gpu.py): a GPU task per partition inside a GPU stage. Only the
    heavy clusters' ids reach the driver's plan (as small broadcast tables), never all K."""
    heavy_c = (corpus_sizes.where(F.col("size") > max_cluster_chunk)
               .select("cluster_id", F.ceil(F.col("size") / max_cluster_chunk).cast("int").alias("n")))
    heavy_q = (probes.groupBy("cluster_id").count().where(F.col("count") > max_query_chunk)
               .select("cluster_id", F.ceil(F.col("count") / max_query_chunk).cast("int").alias("n")))
    heavy_c, heavy_q = heavy_c.localCheckpoint(), heavy_q.localCheckpoint()
    # Probes of clusters without corpus rows would only make empty groups.
    nonempty = corpus_sizes.where(F.col("size") > 0).select("cluster_id")
    pairs = probes.join(nonempty, "cluster_id", "left_semi").join(queries, "query_id")
    pairs = _replicate(_split(pairs, "query_id", heavy_q, max_query_chunk, "qchunk"), heavy_c, "cchunk")
    corpus = _replicate(_split(corpus, "corpus_id", heavy_c, max_cluster_chunk, "cchunk"), heavy_q, "qchunk")
    rows = (pairs.select(*GROUP_KEYS, F.lit(QUERY).alias("side"), F.col("query_id").alias("id"), "vector")
            .unionByName(corpus.select(*GROUP_KEYS, F.lit(CORPUS).alias("side"), F.col("corpus_id").alias("id"),
                                       "vector")))
    fn = make_grouped_topk_fn(k, min_similarity=min_similarity, device=device, precision=precision)
    return map_in_pandas(ctx, grouped(rows, GROUP_KEYS, ["side"]), fn, PARTIAL_SCHEMA, step=TOPK.name)


def merge_topk(partial: DataFrame, k: int) -> DataFrame:
    """Partial top-ks -> each query's final k, rank 1..k by (score desc, corpus_id asc)."""
    w = Window.partitionBy("query_id").orderBy(F.col("score").desc(), F.col("corpus_id").asc())
    return (partial.withColumn("rank", F.row_number().over(w).cast("int"))
            .where(F.col("rank") <= k).select(*RESULT_COLUMNS))
