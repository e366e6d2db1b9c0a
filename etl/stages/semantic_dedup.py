"""semantic_dedup: SemDeDup on embeddings, for images and for sentences, one code path.

Per kind: k-means (udfs/kmeans.py) on a deterministic sample of the eligible embeddings, every
item assigned to its nearest centroid, within each cluster every pair with cosine >= threshold is
an edge (udfs/semantic_dedup.py), edges -> connected components in Spark -> one survivor per group
(etl/dedup.py). Eligible: kept items plus earlier semantic losers (so groups can grow and a
survivor can change). The removal fraction goes into `runs` notes for calibrating the threshold
(paper: ~30% of images removed by perceptual + semantic redundancy together).
"""
from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from etl.context import StageContext, StageResult
from etl.stage import stage
from etl.dedup import SEMANTIC, apply_verdicts, assign_groups
from realsyn_models.clip import is_random_init
from udfs.kmeans import make_probe_fn, probe_schema, train_kmeans
from udfs.semantic_dedup import EDGE_SCHEMA, make_edges_fn


@dataclass(frozen=True)
class Target:
    kind: str  # "image" / "sentence": prefixes the run's notes and drops
    table: str
    embeddings: str
    id_col: str
    threshold: float
    clusters: int

    def priority(self, table: DataFrame) -> list[Column]:
        """Survivor rule: the largest image / the most repeated sentence (then the smallest id)."""
        if self.kind == "image":
            return [F.desc(F.col("width") * F.col("height"))]
        return [F.desc("n_occurrences")] if "n_occurrences" in table.columns else []


def targets(ctx: StageContext) -> list[Target]:
    img, sen = ctx.cfg.semantic_dedup.images, ctx.cfg.semantic_dedup.sentences
    return [
        Target("image", "images", "image_embeddings", "image_id", img.threshold, img.clusters),
        Target("sentence", "sentences", "sentence_embeddings", "sentence_id", sen.threshold, sen.clusters),
    ]


def pick_model(embeddings: DataFrame, wanted: str | None) -> str | None:
    models = sorted(r["model_id"] for r in embeddings.select("model_id").distinct().collect())
    if wanted is not None:
        if wanted not in models:
            raise ValueError(f"semantic_dedup.model_id={wanted!r} not among embedded models {models}")
        return wanted
    if len(models) > 1:
        raise ValueError(f"embeddings of several models {models}: set semantic_dedup.model_id")
    return models[0] if models else None


def semantic_edges(ctx: StageContext, items: DataFrame, clusters: int, threshold: float) -> DataFrame:
    """(src, dst, cosine) from (item_id, vector) rows: k-means clusters, then within-cluster pairs."""
    cfg = ctx.cfg.semantic_dedup
    # Deterministic sample (hash order, then id order) so a re-run trains the same centroids.
    sample = (items.orderBy(F.xxhash64("item_id"), "item_id").limit(cfg.kmeans_sample)
              .orderBy("item_id").select("vector").collect())
    centroids = train_kmeans([r["vector"] for r in sample], clusters, niter=cfg.kmeans_iters,
                             seed=cfg.seed, gpu=False)
    assign = make_probe_fn(centroids, 1, id_col="item_id", gpu=False)
    assigned = items.mapInPandas(assign, probe_schema("item_id")).select("item_id", "cluster_id")
    return (assigned.join(items, "item_id")
            .groupBy("cluster_id").applyInPandas(make_edges_fn(threshold), EDGE_SCHEMA))


def dedup_target(ctx: StageContext, t: Target, result: StageResult) -> None:
    """read eligible items + their vectors -> edges -> groups -> verdicts -> write -> record."""
    if not (ctx.exists(t.table) and ctx.exists(t.embeddings)):
        result.notes[f"{t.kind}_skipped"] = f"{t.table} or {t.embeddings} does not exist yet"
        return
    cfg = ctx.cfg.semantic_dedup
    # read
    table = ctx.read(t.table)
    eligible = table.where(F.col("kept") | (F.col("drop_reason") == SEMANTIC))
    embeddings = ctx.read(t.embeddings).where(F.col("vector").isNotNull() & F.col("error").isNull())
    model = pick_model(embeddings, cfg.model_id)
    if model is None:
        result.notes[f"{t.kind}_skipped"] = f"{t.embeddings} is empty"
        return
    result.models[f"{t.kind}_embeddings"] = model
    if is_random_init(model) and not cfg.on_random_init:
        result.warn(f"{t.kind} semantic dedup skipped: {model} is a random-init model whose embeddings carry "
                    "no semantics (set semantic_dedup.on_random_init to force)")
        return
    items = (eligible.select(t.id_col).join(embeddings.where(F.col("model_id") == model), t.id_col)
             .select(F.col(t.id_col).alias("item_id"), "vector").localCheckpoint())
    if items.isEmpty():
        result.notes[f"{t.kind}_skipped"] = "no eligible item has an embedding"
        return

    # transform: items without an embedding (not embedded yet) are left as they are
    edges = semantic_edges(ctx, items, t.clusters, t.threshold)
    judged = eligible.join(items.select(F.col("item_id").alias(t.id_col)), t.id_col)
    groups = assign_groups(judged, edges, t.id_col, t.priority(judged))
    group_col = "semantic_group" if "semantic_group" in table.columns else None
    v = apply_verdicts(judged, groups, t.id_col, SEMANTIC, group_col)

    # write
    written = ctx.update_columns(v.rows, t.table, [t.id_col], v.columns)

    # record
    result.rows_in += v.eligible
    result.rows_out += written
    result.add_drops({f"{t.kind}_{SEMANTIC}": v.newly_dropped})
    result.metrics.update({
        f"{t.kind}_semantic_groups": float(v.groups),
        f"{t.kind}_semantic_dropped_total": float(v.dropped_total),
        f"{t.kind}_semantic_removed_fraction": v.dropped_total / v.eligible,
    })


@stage(reads=("image_embeddings", "sentence_embeddings"), optional_reads=("images", "sentences"),
       writes=("images", "sentences"), config=("semantic_dedup",), models=("embed.model",))
def semantic_dedup(ctx: StageContext) -> StageResult:
    result = StageResult()
    for t in targets(ctx):
        dedup_target(ctx, t, result)
    return result
