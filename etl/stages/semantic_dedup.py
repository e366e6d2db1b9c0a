"""semantic_dedup: SemDeDup on embeddings, for images and for sentences, one code path.

Per kind: k-means (udfs/kmeans.py) on a deterministic sample of the eligible embeddings, every
item assigned to its nearest centroid, within each cluster every pair with cosine >= threshold is
an edge (udfs/semantic_dedup.py), edges -> connected components in Spark -> one survivor per group
(etl/dedup.py). Eligible: kept items plus earlier semantic losers (so groups can grow and a
survivor can change). The removal fraction goes into `runs` metrics for calibrating the threshold
(paper: ~30% of images removed by perceptual + semantic redundancy together).

Sentences are judged on the retrieval CLIP's text vectors (the paper's setting) unless
`semantic_dedup.sentences.encoder` names another text encoder in `models:` (the local profile's
MiniLM, since offline CLIP is a random init): then this stage encodes the eligible sentences the
`sentence_dedup_embeddings` table lacks for that encoder, and judges on those. Every verdict
records the model that made it (`semantic_model`); when the model changes, every eligible item
is judged again by the new one and a loser the new model cannot judge is kept again, so a table
never holds a mix of two models' verdicts.
"""
from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from etl.context import StageContext, StageResult
from etl.dedup import SEMANTIC, apply_verdicts, assign_groups
from etl.gpu import infer_into
from etl.stage import GPU, stage
from realsyn_models.clip import is_random_init
from realsyn_models.text_encoder import TextEncoderSpec
from udfs.embed import SENTENCE_EMBED_SCHEMA, make_sentence_encoder_fn
from udfs.kmeans import make_probe_fn, probe_schema, train_kmeans
from udfs.semantic_dedup import EDGE_SCHEMA, make_edges_fn

DEDUP_EMBEDDINGS = "sentence_dedup_embeddings"
MODEL_COL = "semantic_model"  # the model whose vectors made the row's semantic verdict


@dataclass(frozen=True)
class Target:
    kind: str  # "image" / "sentence": prefixes the run's notes and drops
    table: str
    embeddings: str
    id_col: str
    threshold: float
    clusters: int
    encoder: str | None = None  # a `models:` key: vectors made here, not by the embed stage

    def priority(self, table: DataFrame) -> list[Column]:
        """Survivor rule: the largest image / the most repeated sentence (then the smallest id)."""
        if self.kind == "image":
            return [F.desc(F.col("width") * F.col("height"))]
        return [F.desc("n_occurrences")] if "n_occurrences" in table.columns else []


def targets(ctx: StageContext) -> list[Target]:
    img, sen = ctx.cfg.semantic_dedup.images, ctx.cfg.semantic_dedup.sentences
    return [
        Target("image", "images", "image_embeddings", "image_id", img.threshold, img.clusters),
        Target("sentence", "sentences", DEDUP_EMBEDDINGS if sen.encoder else "sentence_embeddings", "sentence_id",
               sen.threshold, sen.clusters, sen.encoder),
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


def add_model_column(ctx: StageContext, table: str) -> None:
    """Tables made before verdicts recorded their model get the column (null: not judged yet)."""
    if ctx.exists(table) and MODEL_COL not in ctx.read(table).columns:
        ctx.spark.sql(f"ALTER TABLE {ctx.table(table)} ADD COLUMNS ({MODEL_COL} string)")


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


def encode_eligible(ctx: StageContext, t: Target, eligible: DataFrame, result: StageResult) -> str:
    """Vectors of t.encoder for the eligible sentences that lack one (GPU tasks); its model id."""
    model = ctx.cfg.models[t.encoder]
    spec = TextEncoderSpec(model.source, model.precision)
    model_id = spec.model_id
    result.models[t.encoder] = model_id
    fn = make_sentence_encoder_fn(spec, model_id, model.batch_size)
    # rows_in / rows_out of this stage count verdicts; the encoding is reported in metrics and drops.
    encoded = StageResult()
    infer_into(ctx, encoded, eligible.select(t.id_col, "text"), t.embeddings, t.id_col, fn, SENTENCE_EMBED_SCHEMA,
               model_id, f"{t.kind}_dedup_embed")
    result.metrics.update(encoded.metrics)
    result.add_drops(encoded.drops)
    result.notes.update(encoded.notes)
    return model_id


def dedup_target(ctx: StageContext, t: Target, result: StageResult) -> None:
    """read eligible items + their vectors -> edges -> groups -> verdicts -> write -> record."""
    if not ctx.exists(t.table) or (t.encoder is None and not ctx.exists(t.embeddings)):
        result.notes[f"{t.kind}_skipped"] = f"{t.table} or {t.embeddings} does not exist yet"
        return
    cfg = ctx.cfg.semantic_dedup
    # read (and, with its own encoder, encode what is new)
    table = ctx.read(t.table)
    eligible = table.where(F.col("kept") | (F.col("drop_reason") == SEMANTIC))
    wanted = encode_eligible(ctx, t, eligible, result) if t.encoder else cfg.model_id
    embeddings = ctx.read(t.embeddings).where(F.col("vector").isNotNull() & F.col("error").isNull())
    model = pick_model(embeddings, wanted)
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
    v = apply_verdicts(judged, groups, t.id_col, SEMANTIC, group_col, model_col=MODEL_COL, model_id=model)
    # A loser of another model that this one has no vector for: kept again rather than left
    # standing on the old model's word.
    orphans = (eligible.where((F.col("drop_reason") == SEMANTIC) & ~F.col(MODEL_COL).eqNullSafe(F.lit(model)))
               .join(items.select(F.col("item_id").alias(t.id_col)), t.id_col, "left_anti")
               .select(t.id_col, F.lit(True).alias("kept"), F.lit(None).cast("string").alias("drop_reason"),
                       *([F.lit(None).cast("string").alias(group_col)] if group_col else []),
                       F.lit(None).cast("string").alias(MODEL_COL)))

    # write
    written = ctx.update_columns(v.rows.unionByName(orphans), t.table, [t.id_col], v.columns)

    # record
    result.rows_in += v.eligible
    result.rows_out += written
    result.add_drops({f"{t.kind}_{SEMANTIC}": v.newly_dropped})
    result.metrics.update({
        f"{t.kind}_semantic_groups": float(v.groups),
        f"{t.kind}_semantic_dropped_total": float(v.dropped_total),
        f"{t.kind}_semantic_removed_fraction": v.dropped_total / v.eligible,
    })


# Every read is optional: each half (images, sentences) runs when its inputs exist and says so
# in the run's notes when they do not.
@stage(reads=(), optional_reads=("images", "image_embeddings", "sentences", "sentence_embeddings", DEDUP_EMBEDDINGS),
       writes=("images", "sentences", DEDUP_EMBEDDINGS), config=("semantic_dedup",),
       models=("embed.model", "semantic_dedup.sentences.encoder"), resources=GPU)
def semantic_dedup(ctx: StageContext) -> StageResult:
    result = StageResult()
    for t in targets(ctx):
        add_model_column(ctx, t.table)
        dedup_target(ctx, t, result)
    return result
