"""semantic_dedup: SemDeDup on embeddings, for images and for sentences, one code path; bounded
and incremental.

Per kind and embedding model, dedup centroids are trained once with the pipeline's one k-means
(etl/centroids.py: a content-keyed sample that stays distributed, trained in Spark tasks, never
collected to the driver), K = ceil(items / `target_cluster_size`) (`clusters` overrides it), and
kept in `semantic_dedup_centroids` + `semantic_dedup_centroid_cells` with a version; items reach
their cluster through the same centroid index as retrieval's. A new version is trained only when
the items outgrow `refit_growth` x the count the current one was trained on (the old survivors
are then re-assigned, their verdicts kept). Every judged item's cluster, verdict and group are kept in
`semantic_dedup_members`.

A run judges only the *new* items: eligible (kept, or a semantic loser of another model or
threshold) with a vector and no verdict for the current (model, threshold). Each goes to its
nearest centroid; inside a cluster the new items are range-searched (FAISS, cosine >= threshold,
udfs/semantic_dedup.py) against the cluster's new items and old survivors, heavy clusters cut into
chunks of at most `max_cluster_chunk` rows so each task holds two bounded chunks. Edges ->
connected components (etl/dedup.py) -> verdicts, with the survivor rule:

- An old survivor stays the survivor. A component that holds one keeps it, takes its group, and
  drops every new member as its duplicate (semantic_group = that group): groups absorb new
  near-duplicates, and nothing downstream loses an item it already points at. Two old survivors
  that a new item bridges both stay.
- A component of new items only keeps one survivor: the largest image / the most repeated
  sentence, then the smallest id (the full-recompute rule), group = its smallest id.
- Old verdicts are never re-judged. A changed model or threshold makes every eligible item new
  again (a full re-judge under the new one); a loser of another model that this one has no vector
  for is kept again, so a table never holds a mix of two models' verdicts. An old survivor that a
  later rule drops stops anchoring its group.

The removal fraction goes into `runs` metrics for calibrating the threshold (paper: ~30% of
images removed by perceptual + semantic redundancy together).

Sentences are judged on the retrieval CLIP's text vectors (the paper's setting) unless
`semantic_dedup.sentences.encoder` names another text encoder in `models:` (the local profile's
MiniLM, since offline CLIP is a random init): then this stage encodes the eligible sentences the
`sentence_dedup_embeddings` table lacks for that encoder, and judges on those. Every verdict
records the model that made it (`semantic_model`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from etl import centroids as km
from etl.context import StageContext, StageResult
from etl.dedup import SEMANTIC, apply_verdicts, assign_groups
from etl.gpu import grouped, infer_into, map_in_pandas
from etl.stage import Step, stage
from realsyn_models.clip import is_random_init
from realsyn_models.text_encoder import TextEncoderSpec
from udfs.embed import SENTENCE_EMBED_SCHEMA, make_sentence_encoder_fn
from udfs.semantic_dedup import EDGE_SCHEMA, GROUP_KEYS, MEMBER, QUERY, make_grouped_edges_fn

DEDUP_EMBEDDINGS = "sentence_dedup_embeddings"
CENTROIDS = "semantic_dedup_centroids"
MEMBERS = "semantic_dedup_members"
MODEL_COL = "semantic_model"  # the model whose vectors made the row's semantic verdict
CENTROID_CELLS = "semantic_dedup_centroid_cells"
CENTROIDS_SCHEMA = ("kind string, model_id string, centroid_version int, cluster_id int, cell int, "
                    "centroid array<float>, trained_on bigint, run_id string, batch_id string")
# Columns a table made before the shared k-means lacks (its versions have no cells: retrained).
CENTROIDS_ADDED = "cell int, batch_id string"
MEMBERS_SCHEMA = ("kind string, item_id string, model_id string, threshold double, centroid_version int, "
                  "cluster_id int, survivor boolean, semantic_group string, batch_id string")


@dataclass(frozen=True)
class Target:
    kind: str  # "image" / "sentence": prefixes the run's notes and drops
    table: str
    embeddings: str
    id_col: str
    threshold: float
    target_cluster_size: int
    clusters: int | None = None  # an explicit K instead of one from target_cluster_size
    encoder: str | None = None  # a `models:` key: vectors made here, not by the embed stage

    def priority(self, table: DataFrame) -> list[Column]:
        """Survivor rule: the largest image / the most repeated sentence (then the smallest id)."""
        if self.kind == "image":
            return [F.desc(F.col("width") * F.col("height"))]
        return [F.desc("n_occurrences")] if "n_occurrences" in table.columns else []

    def k_for(self, n_items: int) -> int:
        return self.clusters or max(1, math.ceil(n_items / self.target_cluster_size))


def targets(ctx: StageContext) -> list[Target]:
    img, sen = ctx.cfg.semantic_dedup.images, ctx.cfg.semantic_dedup.sentences
    return [
        Target("image", "images", "image_embeddings", "image_id", img.threshold, img.target_cluster_size,
               img.clusters),
        Target("sentence", "sentences", DEDUP_EMBEDDINGS if sen.encoder else "sentence_embeddings", "sentence_id",
               sen.threshold, sen.target_cluster_size, sen.clusters, sen.encoder),
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


def add_columns(ctx: StageContext, name: str, ddl: str) -> None:
    """Columns a table made by an older release lacks, added (null in its old rows)."""
    if not ctx.exists(name):
        return
    have = set(ctx.read(name).columns)
    missing = [c for c in ddl.split(", ") if c.split()[0] not in have]
    if missing:
        ctx.spark.sql(f"ALTER TABLE {ctx.table(name)} ADD COLUMNS ({', '.join(missing)})")


def dedup_centroids(ctx: StageContext, t: Target, model: str, items: DataFrame, n_items: int,
                    result: StageResult) -> tuple[int, km.CentroidIndex]:
    """(version, index) of this kind's centroids for `model`: the kept version, or a new one when
    there is none (or only one from before the shared k-means) or the items outgrew
    `refit_growth` x what it was trained on."""
    cfg = ctx.cfg.semantic_dedup
    scope = {"kind": t.kind}
    ctx.create_if_missing(CENTROIDS, CENTROIDS_SCHEMA)
    ctx.create_if_missing(CENTROID_CELLS, "kind string, " + km.CELLS_SCHEMA)
    add_columns(ctx, CENTROIDS, CENTROIDS_ADDED)
    kept = ctx.read(CENTROIDS).where(F.col("kind") == t.kind)
    latest = kept.agg(F.max("centroid_version").alias("any"),
                      F.max(F.when(F.col("model_id") == model, F.col("centroid_version"))).alias("mine")).first()
    if latest["mine"] is not None:
        mine = int(latest["mine"])
        trained_on = kept.where(F.col("centroid_version") == mine).select("trained_on").first()[0]
        index = km.load(ctx, CENTROIDS, CENTROID_CELLS, mine, scope)
        if index is not None and n_items <= cfg.refit_growth * int(trained_on):
            return mine, index
    version = (latest["any"] or 0) + 1
    spec = km.spec(ctx, k=t.k_for(n_items), sample_size=cfg.kmeans_sample, niter=cfg.kmeans_iters, seed=cfg.seed,
                   two_level_above_k=ctx.cfg.cluster.two_level_above_k)
    trained = km.train(ctx, items, spec, id_col="item_id")
    k = km.save(ctx, trained, version, CENTROIDS, CENTROID_CELLS, model,
                {"trained_on": F.lit(n_items).cast("bigint"), "run_id": F.lit(ctx.run_id)}, scope)
    result.notes[f"{t.kind}_centroids"] = (f"version {version} trained: K={k} in {len(trained.cells)} cells for "
                                           f"{n_items} items on {trained.sample_rows} sampled ({trained.mode})")
    return version, km.load(ctx, CENTROIDS, CENTROID_CELLS, version, scope)


def judged_members(ctx: StageContext, t: Target, model: str) -> DataFrame:
    """The members rows of items with a verdict of this model and threshold."""
    return ctx.read(MEMBERS).where((F.col("kind") == t.kind) & (F.col("model_id") == model)
                                   & (F.col("threshold") == float(t.threshold)))


def _chunk(df: DataFrame, sizes: dict[int, int], size: int, name: str) -> DataFrame:
    """Column `name`: 0 in light clusters; in heavy ones (more than `size` rows) the rows numbered
    by id and cut into chunks of at most `size`. Only heavy clusters pay for the numbering."""
    heavy = [c for c, n in sizes.items() if n > size]
    if not heavy:
        return df.withColumn(name, F.lit(0))
    is_heavy = F.col("cluster_id").isin(heavy)
    numbered = df.where(is_heavy).withColumn(
        name, F.floor((F.row_number().over(Window.partitionBy("cluster_id").orderBy("item_id")) - 1) / size)
        .cast("int"))
    return df.where(~is_heavy).withColumn(name, F.lit(0)).unionByName(numbered)


def _fan_out(df: DataFrame, sizes: dict[int, int], size: int, name: str) -> DataFrame:
    """One copy of each row per chunk `name` of the other side of its cluster (one in light ones)."""
    chunks = {c: math.ceil(n / size) for c, n in sizes.items() if n > size}
    if not chunks:
        return df.withColumn(name, F.lit(0))
    plan = df.sparkSession.createDataFrame(list(chunks.items()), "cluster_id int, n int")
    return (df.join(F.broadcast(plan), "cluster_id", "left")
            .withColumn(name, F.explode(F.sequence(F.lit(0), F.coalesce(F.col("n"), F.lit(1)) - 1))).drop("n"))


def _sizes(df: DataFrame) -> dict[int, int]:
    return {r["cluster_id"]: r["count"] for r in df.groupBy("cluster_id").count().collect()}


def new_edges(ctx: StageContext, new: DataFrame, anchors: DataFrame, threshold: float) -> DataFrame:
    """EDGE_SCHEMA rows: every new item's neighbours (cosine >= threshold) among the new items and
    old survivors of its cluster, from (item_id, vector, cluster_id) rows. Each chunk of a
    cluster's new items meets each chunk of its members once (udfs/semantic_dedup.py)."""
    size = ctx.cfg.semantic_dedup.max_cluster_chunk
    members = new.withColumn("is_new", F.lit(True)).unionByName(anchors.withColumn("is_new", F.lit(False)))
    n_new, n_members = _sizes(new), _sizes(members)
    queries = _fan_out(_chunk(new, n_new, size, "qchunk"), n_members, size, "cchunk")
    corpus = _fan_out(_chunk(members, n_members, size, "cchunk"), n_new, size, "qchunk")
    rows = (queries.select(*GROUP_KEYS, F.lit(QUERY).alias("side"), F.col("item_id").alias("id"), "vector",
                           F.lit(True).alias("is_new"))
            .unionByName(corpus.select(*GROUP_KEYS, F.lit(MEMBER).alias("side"), F.col("item_id").alias("id"),
                                       "vector", "is_new")))
    return map_in_pandas(ctx, grouped(rows, GROUP_KEYS, ["side"]), make_grouped_edges_fn(threshold), EDGE_SCHEMA)


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
               model_id, f"{t.kind}_dedup_embed", step="sentence_encoder")
    result.metrics.update(encoded.metrics)
    result.add_drops(encoded.drops)
    result.notes.update(encoded.notes)
    return model_id


def dedup_target(ctx: StageContext, t: Target, result: StageResult) -> None:
    """read new items + the old survivors of their clusters -> edges -> groups -> verdicts of the
    new items -> write (verdicts, then members) -> record."""
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
             .select(F.col(t.id_col).alias("item_id"), "vector").dropDuplicates(["item_id"]).localCheckpoint())
    n_items = items.count()
    if n_items == 0:
        result.notes[f"{t.kind}_skipped"] = "no eligible item has an embedding"
        return
    ctx.create_if_missing(MEMBERS, MEMBERS_SCHEMA)
    judged = judged_members(ctx, t, model)
    new = items.join(judged.select("item_id"), "item_id", "left_anti").localCheckpoint()
    if new.isEmpty():
        result.notes[f"{t.kind}_skipped"] = "every eligible item already has a verdict of this model and threshold"
        return
    version, index = dedup_centroids(ctx, t, model, items, n_items, result)
    old = (judged.where("survivor").select("item_id", "centroid_version", "cluster_id", "semantic_group")
           .join(items, "item_id"))
    stale = old.where(F.col("centroid_version") != version)

    # transform: assign the new items (and survivors of an older centroid version) to clusters
    group_col = "semantic_group" if "semantic_group" in table.columns else None
    assigned = (km.nearest(ctx, new.unionByName(stale.select("item_id", "vector")), index, 1, id_col="item_id")
                .select(F.col("qid").alias("item_id"), F.col("cluster_id").alias("_assigned")).localCheckpoint())
    new = new.join(assigned, "item_id").withColumnRenamed("_assigned", "cluster_id")
    old = (old.join(assigned, "item_id", "left")
           .withColumn("cluster_id", F.coalesce("_assigned", "cluster_id")).drop("_assigned", "centroid_version"))
    # Only the old survivors of clusters that received new items are searched.
    anchors = old.join(new.select("cluster_id").distinct(), "cluster_id", "left_semi").localCheckpoint()
    edges = new_edges(ctx, new.select("item_id", "vector", "cluster_id"),
                      anchors.select("item_id", "vector", "cluster_id"), t.threshold).localCheckpoint()
    ids = (new.select(F.col("item_id").alias(t.id_col), F.lit(None).cast("string").alias("_anchor"))
           .unionByName(anchors.select(F.col("item_id").alias(t.id_col), F.col("semantic_group").alias("_anchor"))))
    groups = (assign_groups(table.join(ids, t.id_col), edges, t.id_col, t.priority(table), anchor="_anchor")
              .join(new.select(F.col("item_id").alias(t.id_col)), t.id_col, "left_semi").localCheckpoint())
    v = apply_verdicts(eligible.join(groups.select(t.id_col), t.id_col, "left_semi"), groups, t.id_col, SEMANTIC,
                       group_col, model_col=MODEL_COL, model_id=model)
    # A loser of another model that this one has no vector for: kept again rather than left
    # standing on the old model's word.
    orphans = (eligible.where((F.col("drop_reason") == SEMANTIC) & ~F.col(MODEL_COL).eqNullSafe(F.lit(model)))
               .join(items.select(F.col("item_id").alias(t.id_col)), t.id_col, "left_anti")
               .select(t.id_col, F.lit(True).alias("kept"), F.lit(None).cast("string").alias("drop_reason"),
                       *([F.lit(None).cast("string").alias(group_col)] if group_col else []),
                       F.lit(None).cast("string").alias(MODEL_COL)))

    # write: the verdicts first, then the members that mark them judged (a run killed in between
    # judges the same new items again against the same survivors: the same verdicts)
    written = ctx.update_columns(v.rows.unionByName(orphans), t.table, [t.id_col], v.columns)
    ctx.upsert(groups.join(new, F.col(t.id_col) == F.col("item_id"))
               .select(F.lit(t.kind).alias("kind"), "item_id", F.lit(model).alias("model_id"),
                       F.lit(float(t.threshold)).alias("threshold"), F.lit(version).alias("centroid_version"),
                       "cluster_id", "survivor", F.col("group").alias("semantic_group"),
                       F.lit(ctx.batch_id).alias("batch_id")), MEMBERS, ["kind", "item_id"])
    ctx.update_columns(stale.select(F.lit(t.kind).alias("kind"), "item_id", F.lit(version).alias("centroid_version"))
                       .join(assigned.withColumnRenamed("_assigned", "cluster_id"), "item_id"),
                       MEMBERS, ["kind", "item_id"], ["centroid_version", "cluster_id"])

    # record
    totals = (judged_members(ctx, t, model)
              .agg(F.count("*").alias("n"), F.sum((~F.col("survivor")).cast("int")).alias("dropped")).first())
    result.rows_in += v.eligible
    result.rows_out += written
    result.add_drops({f"{t.kind}_{SEMANTIC}": v.newly_dropped})
    result.metrics.update({
        f"{t.kind}_semantic_judged": float(v.eligible),
        f"{t.kind}_semantic_groups": float(v.groups),
        f"{t.kind}_semantic_dropped_total": float(totals["dropped"] or 0),
        f"{t.kind}_semantic_removed_fraction": (totals["dropped"] or 0) / totals["n"] if totals["n"] else 0.0,
        f"{t.kind}_semantic_edges": float(edges.count()),
    })


# Every read is optional: each half (images, sentences) runs when its inputs exist and says so
# in the run's notes when they do not.
@stage(reads=(), optional_reads=("images", "image_embeddings", "sentences", "sentence_embeddings", DEDUP_EMBEDDINGS,
                                  CENTROIDS, CENTROID_CELLS, MEMBERS),
       writes=("images", "sentences", DEDUP_EMBEDDINGS, CENTROIDS, CENTROID_CELLS, MEMBERS), config=("semantic_dedup",),
       models=("embed.model", "semantic_dedup.sentences.encoder"),
       steps=(Step("sentence_encoder", "the sentence encoder (semantic_dedup.sentences.encoder), when set"),
              km.KMEANS_TRAIN))
def semantic_dedup(ctx: StageContext) -> StageResult:
    result = StageResult()
    for t in targets(ctx):
        add_columns(ctx, t.table, f"{MODEL_COL} string")
        dedup_target(ctx, t, result)
    return result
