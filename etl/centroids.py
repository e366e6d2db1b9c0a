"""k-means without the driver, and the centroid index every nearest-centroid query goes through.

    train(ctx, vectors, spec)              -> Trained(fine, cells): K centroids and their routing cells
    nearest(ctx, queries, index, n)        -> (qid, rank, cluster_id, score): each row's n nearest centroids
    save / load                            -> a trained version as two Delta tables (fine + cells)

Used by cluster (sentences), balance (images) and semantic_dedup (both kinds).

Training (paper §3.2: 2M centres for 0.84B sentences):
- the sample is content-keyed (hash of the id below a rate), so the same rows are drawn whatever
  the partitioning, and it stays a distributed DataFrame;
- flat (K <= two_level_above_k): one task trains on at most K x points_per_centroid rows (what
  FAISS would subsample to anyway), on its GPU inside a GPU stage, and files the centroids into
  about sqrt(K) routing cells when K is above index_above_k;
- coarse-then-fine (larger K): one task trains sqrt(K) coarse centres on a small sample
  (points_per_centroid each); the sample is assigned to them; the driver splits K among the
  cells in proportion to their counts (sqrt(K) numbers); then every cell trains its own
  k-means in a parallel task that holds only that cell's rows; then `refine_iters` Lloyd
  iterations over the whole sample (assignment through the index, one mean per cluster) repair
  the clusters a cell boundary cut in two. The coarse centres are the cells.

The index: queries never meet all K centroids. A query finds its `probe_cells` nearest cells (the
cells are small: sqrt(K) x d, shipped with the function) and is searched against the fine
centroids of those cells only. Each centroid is filed in its `spill_cells` nearest cells, so a
query near a cell boundary finds it from either side at a small m (centroid rows are copied, K of
them, instead of query rows, N of them). The cells are grouped into about sqrt(C) blocks of
neighbouring cells; a task holds one block's centroids (about K^0.75, times the spill) and one
salt of the queries routed to it, and a query is copied once per block its cells fall in (not
once per cell: on real, clustered vectors its nearest cells are neighbours). The blocks' answers
merge by (score desc, cluster_id asc), one copy per centroid. With one cell (small K) it is an
exact search. No driver step grows with K.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from etl.context import StageContext
from etl.gpu import grouped, map_in_arrow, map_in_pandas
from etl.stage import Step
from udfs.kmeans import (CELL_HITS_SCHEMA, FINE_SCHEMA, ROUTED_SCHEMA, TRAINED_SCHEMA, as_matrix, cell_blocks,
                         make_cell_search_fn, make_mean_fn, make_route_fn, make_spill_fn, make_train_fn, split_k)


# The one k-means step that can use a GPU (FAISS k-means, with faiss-gpu on the task's card): every
# stage that trains centroids declares it. Routing, spilling, the cell search and the Lloyd means
# are CPU steps (numpy / CPU FAISS) and run as ordinary tasks.
KMEANS_TRAIN = Step("kmeans_train", "FAISS k-means of each cell's sample (on the task's GPU with faiss-gpu)")


@dataclass(frozen=True)
class KMeansSpec:
    k: int
    sample_size: int
    niter: int = 20
    seed: int = 0
    two_level_above_k: int = 65_536
    points_per_centroid: int = 128
    index_above_k: int = 4_096
    # Lloyd iterations over the whole sample after coarse-then-fine: they move the centroids that
    # a coarse boundary cut in two (the test holds the result within 2% of flat k-means' inertia).
    refine_iters: int = 4
    probe_cells: int = 8
    spill_cells: int = 4


@dataclass
class Trained:
    fine: DataFrame  # cluster_id int, cell int, centroid array<float>
    cells: np.ndarray  # (C, d) routing centres
    sample_rows: int
    mode: str  # "flat" | "coarse-then-fine"


@dataclass(frozen=True)
class CentroidIndex:
    """What `nearest` needs: the fine centroids as a DataFrame (cluster_id, cell, centroid), the
    routing cells as a small array, how many cells each query visits and in how many cells each
    centroid is filed."""
    fine: DataFrame
    cells: np.ndarray
    probe_cells: int
    max_query_chunk: int = 50_000
    spill_cells: int = 1


def uniform(id_col: str, seed: int) -> Column:
    """A number in [0, 1) from the row's id alone: `uniform < rate` is a sample that does not
    depend on partitioning or order, and a lower rate draws a subset of a higher one."""
    return F.xxhash64(F.col(id_col), F.lit(seed)).bitwiseAND(F.lit((1 << 62) - 1)) / F.lit(float(1 << 62))


def _train_cells(ctx: StageContext | None, rows: DataFrame, id_col: str, shares: dict[int, int],
                 offsets: dict[int, int], spec: KMeansSpec, index_cells: int = 1) -> DataFrame:
    fn = make_train_fn(shares, offsets, niter=spec.niter, seed=spec.seed, index_cells=index_cells)
    return map_in_pandas(ctx, grouped(rows.select("cell", id_col, "vector"), ["cell"], [id_col]), fn, TRAINED_SCHEMA,
                         step=KMEANS_TRAIN.name)


def train(ctx: StageContext | None, vectors: DataFrame, spec: KMeansSpec, *, id_col: str) -> Trained:
    """K' = min(K, sample) unit centroids for the rows (id_col, vector) of `vectors`; deterministic
    for a seed. `fine` is checkpointed (the caller writes it)."""
    n = vectors.count()
    if n == 0:
        raise ValueError("k-means needs at least one vector")
    keyed = vectors.select(id_col, "vector", uniform(id_col, spec.seed).alias("_u"))
    sample = keyed.where(F.col("_u") < spec.sample_size / n)
    sample_rows = sample.count()
    k = max(1, min(spec.k, sample_rows))
    if k <= spec.two_level_above_k:
        flat = sample.where(F.col("_u") < k * spec.points_per_centroid / n).withColumn("cell", F.lit(0))
        index_cells = math.isqrt(k) if k > spec.index_above_k else 1
        out = _train_cells(ctx, flat, id_col, {0: k}, {0: 0}, spec, index_cells).localCheckpoint()
        cells = out.where("level = 0").orderBy("cluster_id").toPandas()
        fine = out.where("level = 1").select("cluster_id", "cell", "centroid")
        if cells.empty:  # one cell: its centre is never used to route, any unit vector will do
            d = len(fine.first()["centroid"])
            return Trained(fine, np.eye(1, d, dtype=np.float32), sample_rows, "flat")
        return Trained(fine, as_matrix(cells["centroid"]), sample_rows, "flat")

    n_cells = max(2, math.isqrt(k))
    coarse_rows = sample.where(F.col("_u") < n_cells * spec.points_per_centroid / n).withColumn("cell", F.lit(0))
    coarse = _train_cells(ctx, coarse_rows, id_col, {0: n_cells}, {0: 0}, spec).orderBy("cluster_id").toPandas()
    cells = as_matrix(coarse["centroid"])
    routed = nearest(ctx, sample.select(id_col, "vector"), CentroidIndex(_as_fine(ctx, cells), cells[:1], 1),
                     1, id_col=id_col).select(F.col("qid").alias(id_col), F.col("cluster_id").alias("cell"))
    routed = routed.localCheckpoint()
    counts = {r["cell"]: r["count"] for r in routed.groupBy("cell").count().collect()}  # sqrt(K) rows
    shares = split_k(np.array([counts.get(c, 0) for c in range(len(cells))]), k)
    offsets = np.concatenate([[0], np.cumsum(shares)[:-1]])
    members = sample.join(routed, id_col)
    fine = _train_cells(ctx, members, id_col, {c: int(s) for c, s in enumerate(shares)},
                        {c: int(o) for c, o in enumerate(offsets)}, spec)
    fine = fine.select("cluster_id", "cell", "centroid").localCheckpoint()
    for _ in range(spec.refine_iters):
        fine = _lloyd(ctx, sample.select(id_col, "vector"), fine, cells, spec, id_col)
    return Trained(fine, cells, sample_rows, "coarse-then-fine")


def _lloyd(ctx: StageContext | None, sample: DataFrame, fine: DataFrame, cells: np.ndarray, spec: KMeansSpec,
           id_col: str) -> DataFrame:
    """One Lloyd iteration over the distributed sample: assign through the index, move each
    centroid to its members' unit mean (one task per group of clusters), file it under its
    nearest cell again. A centroid that lost every member stays where it was."""
    labels = nearest(ctx, sample, CentroidIndex(fine, cells, spec.probe_cells, spill_cells=spec.spill_cells), 1,
                     id_col=id_col)
    members = sample.join(labels.select(F.col("qid").alias(id_col), "cluster_id"), id_col)
    means = map_in_pandas(ctx, grouped(members.select("cluster_id", id_col, "vector"), ["cluster_id"], [id_col]),
                          make_mean_fn(), "cluster_id int, centroid array<float>")
    moved = (fine.join(means.withColumnRenamed("centroid", "_new"), "cluster_id", "left")
             .select("cluster_id", F.coalesce("_new", "centroid").alias("centroid"))
             .localCheckpoint())  # K rows; refiling counts and reads them, and must not redo the pass
    refiled = nearest(ctx, moved.select(F.col("cluster_id").cast("string").alias("cid"), F.col("centroid")),
                      exact_index(cells, ctx), 1, id_col="cid", vector="centroid")
    return (moved.join(refiled.select(F.col("qid").cast("int").alias("cluster_id"), F.col("cluster_id").alias("cell")),
                       "cluster_id")
            .select("cluster_id", "cell", "centroid").localCheckpoint())


def _as_fine(ctx: StageContext | None, centroids: np.ndarray) -> DataFrame:
    """An in-memory centroid array as an index's fine level, all in cell 0 (exact search)."""
    import pandas as pd

    spark = ctx.spark if ctx is not None else _active()
    pdf = pd.DataFrame({"cluster_id": np.arange(len(centroids), dtype=np.int32), "cell": 0,
                        "centroid": list(np.asarray(centroids, dtype=np.float32))})
    return spark.createDataFrame(pdf, FINE_SCHEMA)


def _active():
    from pyspark.sql import SparkSession

    return SparkSession.active()


def exact_index(centroids: np.ndarray, ctx: StageContext | None = None) -> CentroidIndex:
    """A small in-memory centroid array as a one-cell index: nearest() is then an exact search."""
    return CentroidIndex(_as_fine(ctx, centroids), np.asarray(centroids, dtype=np.float32)[:1], 1)


def nearest(ctx: StageContext | None, queries: DataFrame, index: CentroidIndex, n: int, *,
            id_col: str = "id", vector: str = "vector") -> DataFrame:
    """(qid, rank, cluster_id, score): each query row's n nearest centroids (rank 1 = nearest),
    searched only in its `probe_cells` nearest cells, each centroid filed in its `spill_cells`
    nearest cells. Ties go to the smaller cluster id."""
    n_cells = len(index.cells)
    m = min(index.probe_cells, n_cells)
    spill = min(index.spill_cells, n_cells)
    fine = index.fine.select("cluster_id", "cell", "centroid")
    if spill > 1:
        fine = map_in_pandas(ctx, fine, make_spill_fn(index.cells, spill), FINE_SCHEMA)
    q = queries.select(F.col(id_col).cast("string").alias(id_col), F.col(vector).alias("vector"))
    blocks = cell_blocks(index.cells)
    n_blocks = int(blocks.max()) + 1
    if n_cells == 1:
        routed = q.select(F.col(id_col).alias("qid"), F.lit(0).alias("block"), F.array(F.lit(0)).alias("probe"),
                          "vector")
    else:
        routed = map_in_arrow(ctx, q, make_route_fn(index.cells, blocks, m, id_col=id_col), ROUTED_SCHEMA)
    # Salt: a block's queries are cut into tasks of at most about max_query_chunk rows (a query
    # is in at most min(m, blocks) blocks); the block's centroids are copied into each.
    salts = max(1, math.ceil(q.count() * min(m, n_blocks) / (n_blocks * index.max_query_chunk)))
    queries_side = routed.select("block", F.pmod(F.xxhash64("qid"), F.lit(salts)).cast("int").alias("salt"),
                                 F.lit(1).alias("side"), F.lit(None).cast("int").alias("cluster_id"),
                                 F.lit(None).cast("int").alias("cell"), "qid", "probe", "vector")
    block_of = q.sparkSession.createDataFrame([(i, int(b)) for i, b in enumerate(blocks)], "cell int, block int")
    cents_side = (fine.join(F.broadcast(block_of), "cell")
                  .select("block", F.explode(F.sequence(F.lit(0), F.lit(salts - 1))).alias("salt"),
                          F.lit(0).alias("side"), "cluster_id", "cell", F.lit(None).cast("string").alias("qid"),
                          F.lit(None).cast("array<int>").alias("probe"), F.col("centroid").alias("vector")))
    rows = grouped(cents_side.unionByName(queries_side), ["block", "salt"], ["side"])
    hits = map_in_pandas(ctx, rows, make_cell_search_fn(n), CELL_HITS_SCHEMA)
    if spill > 1:  # a spilled centroid can reach a query from two blocks: one copy, its best score
        hits = hits.repartition("qid")  # the one exchange both windows use
        copy = Window.partitionBy("qid", "cluster_id").orderBy(F.col("score").desc())
        hits = hits.withColumn("_copy", F.row_number().over(copy)).where("_copy = 1").drop("_copy")
    w = Window.partitionBy("qid").orderBy(F.col("score").desc(), F.col("cluster_id").asc())
    return hits.withColumn("rank", F.row_number().over(w).cast("int")).where(F.col("rank") <= n).select(
        "qid", "rank", "cluster_id", "score")


# --- persistence: a trained version as two Delta tables (fine centroids + routing cells) -------

CELLS_SCHEMA = "centroid_version int, cell int, centroid array<float>, model_id string, batch_id string"


def spec(ctx: StageContext, *, k: int, sample_size: int, niter: int, seed: int,
         two_level_above_k: int) -> KMeansSpec:
    """A stage's k-means (its K, sample, iterations, seed) on the index settings every stage shares
    (`cluster.points_per_centroid`, `index_above_k`, `index_probe_cells`, `index_spill_cells`)."""
    cc = ctx.cfg.cluster
    return KMeansSpec(k=k, sample_size=sample_size, niter=niter, seed=seed, two_level_above_k=two_level_above_k,
                      points_per_centroid=cc.points_per_centroid, index_above_k=cc.index_above_k,
                      probe_cells=cc.index_probe_cells, spill_cells=cc.index_spill_cells)


def save(ctx: StageContext, trained: Trained, version: int, fine_table: str, cells_table: str, model_id: str,
         extra: dict[str, Column], scope: dict[str, str] | None = None) -> int:
    """MERGE one trained version: cells first, then the fine centroids (a version counts as
    written once its fine rows exist). `extra`: the fine table's other columns; `scope`: key
    columns (name -> value) of tables that hold several independent version series, such as
    semantic dedup's per kind. Returns K."""
    scope = scope or {}
    keys = [F.lit(v).alias(k) for k, v in scope.items()]
    cells = ctx.spark.createDataFrame(
        [(version, i, c.tolist(), model_id, ctx.batch_id) for i, c in enumerate(trained.cells)], CELLS_SCHEMA)
    ctx.merge_new(cells.select(*keys, "*"), cells_table, [*scope, "centroid_version", "cell"])
    fine = trained.fine.select(*keys, F.lit(version).alias("centroid_version"), "cluster_id", "cell", "centroid",
                               F.lit(model_id).alias("model_id"), F.lit(ctx.batch_id).alias("batch_id"),
                               *[c.alias(name) for name, c in extra.items()])
    return ctx.merge_new(fine, fine_table, [*scope, "centroid_version", "cluster_id"])


def load(ctx: StageContext, fine_table: str, cells_table: str, version: int,
         scope: dict[str, str] | None = None) -> CentroidIndex | None:
    """The index of one stored version (None when its cells are missing). Only the routing cells
    (about sqrt(K)) are collected."""
    where = F.col("centroid_version") == version
    for k, v in (scope or {}).items():
        where = where & (F.col(k) == v)
    fine = ctx.read(fine_table).where(where).select("cluster_id", "cell", "centroid")
    cells = ctx.read(cells_table).where(where).orderBy("cell").select("centroid").toPandas()
    if cells.empty:
        return None
    return CentroidIndex(fine, as_matrix(cells["centroid"]), ctx.cfg.cluster.index_probe_cells,
                         ctx.cfg.retrieve.max_query_chunk, ctx.cfg.cluster.index_spill_cells)
