"""retrieve: each kept image's top-k realistic sentences by the two-level search -> retrievals.

Uses the newest text_centroids version and its model. Incremental:
- new work: images without retrievals for the current centroid version;
- refresh (`retrieval.refresh`): sentences assigned since the last retrieve run (the Delta version
  of sentence_clusters consumed is kept as a property of the retrievals table) can only beat an
  existing top-k inside the clusters they joined, so the images probing those clusters are
  searched against the new sentences only and their top-k re-ranked with the old rows (MERGE).
  Cluster sizes only grow, so a probe set can only shrink (fewer fallback probes needed): an old
  row from a cluster no longer probed stays if it still ranks, never a worse answer than a
  from-scratch search.

An image gets fewer than k rows only when `retrieval.min_similarity` removes candidates or even
its fallback probes reach fewer than k sentences; such images are counted in the notes and tried
again next run.
"""
from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl import tables
from etl.context import StageContext, StageResult
from etl.retrieval import cluster_sizes, grouped_topk, merge_topk, probe, share
from etl.embeddings import latest_centroids, usable_vectors

NAME = "retrieve"
READS = ("image_embeddings", "images", "text_centroids", "sentence_clusters", "sentence_embeddings", "sentences")
WRITES = ("retrievals",)
GPU = True

RETRIEVALS_SCHEMA = (
    "image_id string, rank int, sentence_id string, score float, cluster_id int, centroid_version int, "
    "model_id string, batch_id string"
)
KEYS = ["image_id", "centroid_version", "rank"]
WATERMARK = "realsyn.retrieve.sentence_clusters_version"


def _watermark(ctx: StageContext) -> int | None:
    from delta.tables import DeltaTable

    props = DeltaTable.forName(ctx.spark, ctx.table("retrievals")).detail().first()["properties"] or {}
    return int(props[WATERMARK]) if WATERMARK in props else None


def _clusters_at(ctx: StageContext, delta_version: int, centroid_version: int) -> DataFrame:
    return (ctx.spark.sql(f"SELECT * FROM {ctx.table('sentence_clusters')} VERSION AS OF {delta_version}")
            .where(F.col("centroid_version") == centroid_version).select("sentence_id", "cluster_id"))


def run(ctx: StageContext) -> StageResult:
    result = StageResult()
    current = latest_centroids(ctx)
    if current is None or not ctx.exists("image_embeddings") or not ctx.exists("sentence_clusters"):
        result.notes["skipped"] = "needs text_centroids, sentence_clusters and image_embeddings"
        return result
    version, model_id, centroids = current
    rc = ctx.cfg.retrieval
    result.notes.update({"centroid_version": str(version), "model_id": model_id,
                         "k": str(rc.k), "nprobe": str(rc.nprobe)})
    # One snapshot of the assignments for the whole run; its version becomes the new watermark.
    sc_version = tables.version(ctx.spark, ctx.table("sentence_clusters"))
    sentence_vectors = usable_vectors(ctx, "sentence_embeddings", "sentence_id", "sentences", model_id)
    corpus = (_clusters_at(ctx, sc_version, version).join(sentence_vectors, "sentence_id")
              .withColumnRenamed("sentence_id", "corpus_id"))
    images = (usable_vectors(ctx, "image_embeddings", "image_id", "images", model_id)
              .withColumnRenamed("image_id", "query_id"))
    centroids_shared = share(ctx.spark, centroids)
    sizes = cluster_sizes(corpus, len(centroids))

    def search(queries: DataFrame, sentences: DataFrame, sentence_sizes) -> DataFrame:
        """Top-k of `queries` among `sentences` in the clusters they probe (probes steered by the
        full corpus's sizes; probes of clusters without such sentences are dropped)."""
        probes = probe(queries, centroids_shared, sizes, rc.k, rc.nprobe, rc.fallback_probes, ctx=ctx)
        return grouped_topk(queries, probes, sentences, dict(enumerate(sentence_sizes.tolist())), rc.k,
                            min_similarity=rc.min_similarity, max_cluster_chunk=rc.max_cluster_chunk,
                            max_query_chunk=rc.max_query_chunk,
                            device="auto" if ctx.cfg.spark.gpu.enabled else "cpu")

    def to_rows(found: DataFrame) -> DataFrame:
        return (found.select(F.col("query_id").alias("image_id"), "rank", F.col("corpus_id").alias("sentence_id"),
                             "score", "cluster_id")
                .withColumn("centroid_version", F.lit(version)).withColumn("model_id", F.lit(model_id))
                .withColumn("batch_id", F.lit(ctx.batch_id)))

    ctx.create_if_missing("retrievals", RETRIEVALS_SCHEMA)
    previous = _watermark(ctx)
    existing = ctx.read("retrievals").where(F.col("centroid_version") == version)
    done = existing.select(F.col("image_id").alias("query_id")).distinct()

    if rc.refresh and previous is not None and previous < sc_version:
        added = corpus.join(_clusters_at(ctx, previous, version).withColumnRenamed("sentence_id", "corpus_id"),
                            "corpus_id", "left_anti")
        added_sizes = cluster_sizes(added, len(centroids))
        if added_sizes.any():
            old = (existing.select(F.col("image_id").alias("query_id"), F.col("sentence_id").alias("corpus_id"),
                                   "score", "cluster_id"))
            fresh = search(images.join(done, "query_id", "left_semi"), added, added_sizes)
            affected = fresh.select("query_id").distinct()
            merged = merge_topk(fresh.unionByName(old.join(affected, "query_id", "left_semi")), rc.k)
            result.notes["refreshed_rows"] = str(ctx.upsert(to_rows(merged), "retrievals", KEYS))

    # Pinned before the write: afterwards these images are no longer "without retrievals".
    todo_ids = images.join(done, "query_id", "left_anti").select("query_id").localCheckpoint()
    result.rows_in = todo_ids.count()
    if result.rows_in:
        todo = images.join(todo_ids, "query_id", "left_semi")
        result.rows_out = ctx.merge_new(to_rows(merge_topk(search(todo, corpus, sizes), rc.k)), "retrievals", KEYS)
        got = (ctx.read("retrievals").where(F.col("centroid_version") == version)
               .groupBy(F.col("image_id").alias("query_id")).count())
        short = (todo_ids.join(got, "query_id", "left")
                 .where(F.coalesce(F.col("count"), F.lit(0)) < rc.k).count())
        result.add_drops({"fewer_than_k": short})
    if previous != sc_version:
        ctx.spark.sql(f"ALTER TABLE {ctx.table('retrievals')} SET TBLPROPERTIES ('{WATERMARK}' = '{sc_version}')")
    return result
