"""retrieve: each kept image's top-k realistic sentences by the two-level search -> retrievals.

Uses the newest text_centroids version and its model. Incremental:
- new work: images without retrievals for the current centroid version;
- refresh (`retrieve.refresh`): sentences assigned since the last retrieve run (the newest
  sentence_clusters batch id it consumed is its watermark in `runs.watermarks`: batch ids are
  time-ordered, and no Delta time travel is needed, so VACUUM cannot break it) can only beat an
  existing top-k inside the clusters they joined, so the images probing those clusters are
  searched against the new sentences only and their top-k re-ranked with the old rows (MERGE).
  Cluster sizes only grow, so a probe set can only shrink (fewer fallback probes needed): an old
  row from a cluster no longer probed stays if it still ranks, never a worse answer than a
  from-scratch search.

Verdict propagation: retrieval rows of an image no longer kept, or naming a sentence no longer kept
(a later dedup verdict, say), are deleted at the start of the run, all rows of that image at once;
a still-kept image is then "without retrievals" and searched again (`propagated_rows_deleted`).

An image gets fewer than k rows only when `retrieve.min_similarity` removes candidates or even
its fallback probes reach fewer than k sentences; such images are counted in the notes and tried
again next run.
"""
from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl.context import StageContext, StageResult
from etl.embeddings import latest_index, usable_vectors
from etl.retrieval import TOPK, cluster_sizes, grouped_topk, merge_topk, probe
from etl.stage import stage
from realsyn_models.clip import is_random_init

RETRIEVALS_SCHEMA = (
    "image_id string, rank int, sentence_id string, score float, cluster_id int, centroid_version int, "
    "model_id string, batch_id string"
)
KEYS = ["image_id", "centroid_version", "rank"]


@stage(reads=("image_embeddings", "text_centroids", "text_centroid_cells", "sentence_clusters",
              "sentence_embeddings"),
       optional_reads=("images", "sentences", "retrievals"), writes=("retrievals",), config=("retrieve",),
       models=("embed.model",), steps=(TOPK,))
def retrieve(ctx: StageContext) -> StageResult:
    result = StageResult()
    rc = ctx.cfg.retrieve
    # read
    current = latest_index(ctx)
    if current is None:
        result.notes["skipped"] = "text_centroids is empty (cluster found no sentence vectors)"
        return result
    version, model_id, index = current
    result.models["embeddings"] = model_id
    if is_random_init(model_id):
        result.warn(f"retrievals are ranked on RANDOM-INIT embeddings ({model_id}): not meaningful")
    result.notes["centroid_version"] = str(version)
    result.metrics.update({"k": float(rc.k), "nprobe": float(rc.nprobe)})
    # One snapshot of the assignments for the whole run; its newest batch id is the watermark.
    assignments = (ctx.read("sentence_clusters").where(F.col("centroid_version") == version)
                   .select("sentence_id", "cluster_id", "batch_id").localCheckpoint())
    newest = assignments.agg(F.max("batch_id")).first()[0]
    if newest is not None:
        result.watermarks["sentence_clusters"] = newest
    sentence_vectors = usable_vectors(ctx, "sentence_embeddings", "sentence_id", "sentences", model_id)
    corpus = (assignments.join(sentence_vectors, "sentence_id")
              .withColumnRenamed("sentence_id", "corpus_id"))
    images = (usable_vectors(ctx, "image_embeddings", "image_id", "images", model_id)
              .withColumnRenamed("image_id", "query_id"))
    sizes = cluster_sizes(corpus).localCheckpoint()
    n_centroids = index.fine.count()

    def search(queries: DataFrame, sentences: DataFrame, sentence_sizes) -> DataFrame:
        """Top-k of `queries` among `sentences` in the clusters they probe (probes steered by the
        full corpus's sizes; probes of clusters without such sentences are dropped)."""
        probes = probe(queries, index, sizes, rc.k, rc.nprobe, rc.fallback_probes, ctx=ctx)
        # Similarity operations against brute force (bench/scale.py): in-cluster candidates, plus
        # the routing (all cells, then the fine centroids of the probed cells, about m x s / C of K
        # with each centroid spilled into s cells).
        in_cluster = probes.join(sentence_sizes, "cluster_id").agg(F.sum("size")).first()[0] or 0
        cells = len(index.cells) if n_centroids > 1 else 0
        reach = min(index.probe_cells, max(cells, 1)) * min(index.spill_cells, max(cells, 1)) / max(cells, 1)
        routing = probes.select("query_id").distinct().count() * (cells + n_centroids * min(1.0, reach))
        result.metrics["similarity_ops"] = result.metrics.get("similarity_ops", 0.0) + in_cluster + routing
        return grouped_topk(queries, probes, sentences.drop("batch_id"), sentence_sizes, rc.k,
                            min_similarity=rc.min_similarity, max_cluster_chunk=rc.max_cluster_chunk,
                            max_query_chunk=rc.max_query_chunk, precision=rc.precision, ctx=ctx)

    def to_rows(found: DataFrame) -> DataFrame:
        return (found.select(F.col("query_id").alias("image_id"), "rank", F.col("corpus_id").alias("sentence_id"),
                             "score", "cluster_id")
                .withColumn("centroid_version", F.lit(version)).withColumn("model_id", F.lit(model_id))
                .withColumn("batch_id", F.lit(ctx.batch_id)))

    ctx.create_if_missing("retrievals", RETRIEVALS_SCHEMA)
    # propagate: an image or sentence a later verdict dropped leaves the retrievals; the image's
    # rows go whole, so a still-kept image is searched again below without the dropped sentence.
    existing = ctx.read("retrievals").where(F.col("centroid_version") == version)
    stale = (existing.join(corpus.select(F.col("corpus_id").alias("sentence_id")), "sentence_id", "left_anti")
             .unionByName(existing.join(images.select(F.col("query_id").alias("image_id")), "image_id", "left_anti"))
             .select("image_id", "centroid_version"))
    result.metrics["propagated_rows_deleted"] = float(ctx.delete_keys(stale, "retrievals",
                                                                      ["image_id", "centroid_version"]))
    previous = ctx.last_watermark("sentence_clusters")
    existing = ctx.read("retrievals").where(F.col("centroid_version") == version)
    done = existing.select(F.col("image_id").alias("query_id")).distinct()

    # refresh: images whose probed clusters received sentences since the last run (write: MERGE)
    if rc.refresh and previous is not None and newest is not None and previous < newest:
        added = corpus.where(F.col("batch_id") > previous).localCheckpoint()
        added_sizes = cluster_sizes(added)
        if added.limit(1).count():
            old = (existing.select(F.col("image_id").alias("query_id"), F.col("sentence_id").alias("corpus_id"),
                                   "score", "cluster_id"))
            fresh = search(images.join(done, "query_id", "left_semi"), added, added_sizes)
            affected = fresh.select("query_id").distinct()
            merged = merge_topk(fresh.unionByName(old.join(affected, "query_id", "left_semi")), rc.k)
            result.metrics["refreshed_rows"] = float(ctx.upsert(to_rows(merged), "retrievals", KEYS))

    # new images (pinned before the write: afterwards they are no longer "without retrievals")
    todo_ids = images.join(done, "query_id", "left_anti").select("query_id").localCheckpoint()
    result.rows_in = todo_ids.count()
    if result.rows_in:
        todo = images.join(todo_ids, "query_id", "left_semi")
        result.rows_out = ctx.merge_new(to_rows(merge_topk(search(todo, corpus, sizes), rc.k)), "retrievals", KEYS)
        # record
        got = (ctx.read("retrievals").where(F.col("centroid_version") == version)
               .groupBy(F.col("image_id").alias("query_id")).count())
        short = (todo_ids.join(got, "query_id", "left")
                 .where(F.coalesce(F.col("count"), F.lit(0)) < rc.k).count())
        result.add_drops({"fewer_than_k": short})
    return result
