"""image_dedup (perceptual): pHash near-duplicates -> groups -> one survivor per group; incremental.

Near-duplicates are pairs within Hamming distance t (image_dedup.phash_max_hamming). Candidates
come from joining on LSH band-subset keys of the 64-bit hash (udfs/phash.py: pigeonhole, so no pair
within t is missed). The keys of every hash seen are kept in `phash_band_keys` (phash, band, key)
and the verified pairs in `phash_edges` (src, dst, hamming; src < dst), both per key scheme (t and
the band count: a changed scheme starts over). A run keys only the hashes not stored yet and joins
them against the stored keys (and each other), never the whole corpus against itself; then the
groups come from every stored edge between eligible hashes. Keys and edges are per distinct hash,
so identical copies (a blank, a placeholder) cost one key set, and images sharing a hash are linked
to one representative (the smallest id) rather than to each other.

Groups are connected components in Spark; the survivor is the largest image (width x height), then
the smallest id, recomputed over every eligible image each run from the stored edges, so the
verdicts equal a full recompute over the same images (a later, larger copy becomes the survivor).
The group id (the smallest member id) is kept on every member in phash_group.
"""
from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl.context import StageContext, StageResult
from etl.dedup import PERCEPTUAL, SEMANTIC, apply_verdicts, assign_groups
from etl.stage import stage
from udfs.phash import band_masks

BAND_KEYS = "phash_band_keys"
EDGES = "phash_edges"
BAND_KEYS_SCHEMA = "scheme string, phash bigint, band int, key bigint"
EDGES_SCHEMA = "scheme string, src bigint, dst bigint, hamming int"


def band_keys(hashes: DataFrame, max_hamming: int, n_bands: int) -> DataFrame:
    """(phash, band, key) rows: one key per band subset of each hash."""
    keys = F.array(*[
        F.struct(F.lit(i).alias("band"), F.col("phash").bitwiseAND(F.lit(mask).cast("bigint")).alias("key"))
        for i, mask in enumerate(band_masks(max_hamming, n_bands))
    ])
    return hashes.select("phash", F.explode(keys).alias("bk")).select("phash", "bk.band", "bk.key")


def new_hash_edges(new_keys: DataFrame, stored_keys: DataFrame, max_hamming: int) -> DataFrame:
    """(src, dst, hamming) hash pairs within max_hamming with at least one new hash, src < dst:
    the new hashes' keys joined against the stored keys and their own."""
    a = new_keys.alias("a")
    b = stored_keys.unionByName(new_keys).alias("b")
    return (a.join(b, (F.col("a.band") == F.col("b.band")) & (F.col("a.key") == F.col("b.key"))
                   & (F.col("a.phash") != F.col("b.phash")))
            .select(F.least("a.phash", "b.phash").alias("src"), F.greatest("a.phash", "b.phash").alias("dst"))
            .distinct()
            .withColumn("hamming", F.bit_count(F.col("src").bitwiseXOR(F.col("dst"))).cast("int"))
            .where(F.col("hamming") <= max_hamming))


def image_edges(items: DataFrame, hash_edges: DataFrame) -> DataFrame:
    """(src, dst) image id edges from (image_id, phash) rows: each image to its hash's
    representative, and the representatives of every stored hash edge."""
    reps = items.groupBy("phash").agg(F.min("image_id").alias("rep"))
    same_hash = (items.join(reps, "phash").where(F.col("image_id") != F.col("rep"))
                 .select(F.col("image_id").alias("src"), F.col("rep").alias("dst")))
    near = (hash_edges.join(reps.select(F.col("phash").alias("src"), F.col("rep").alias("a")), "src")
            .join(reps.select(F.col("phash").alias("dst"), F.col("rep").alias("b")), "dst")
            .select(F.col("a").alias("src"), F.col("b").alias("dst")))
    return same_hash.unionByName(near)


@stage(reads=("images",), optional_reads=(BAND_KEYS, EDGES), writes=("images", BAND_KEYS, EDGES),
       config=("image_dedup",))
def image_dedup(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.image_dedup
    n_bands = cfg.phash_bands or cfg.phash_max_hamming + 2
    scheme = f"t={cfg.phash_max_hamming},bands={n_bands}"
    # read: every image that passed quality, including earlier dedup losers (groups can grow)
    images = ctx.read("images")
    eligible = images.where(F.col("phash").isNotNull()
                            & (F.col("kept") | F.col("drop_reason").isin(PERCEPTUAL, SEMANTIC)))
    ctx.create_if_missing(BAND_KEYS, BAND_KEYS_SCHEMA)
    ctx.create_if_missing(EDGES, EDGES_SCHEMA)
    stored_keys = ctx.read(BAND_KEYS).where(F.col("scheme") == scheme).select("phash", "band", "key")
    new_hashes = (eligible.select("phash").distinct()
                  .join(stored_keys.select("phash"), "phash", "left_anti").localCheckpoint())

    if new_hashes.isEmpty() and eligible.where(F.col("phash_group").isNull()).isEmpty():
        # Groups only change when hashed images arrive (eligibility never shrinks here).
        return StageResult(notes={"skipped": "no newly hashed images"})

    # transform: the new hashes' edges (written edges first, keys second: a run killed in between
    # keys the same hashes again and MERGEs the same edges)
    new_keys = band_keys(new_hashes, cfg.phash_max_hamming, n_bands).localCheckpoint()
    found = new_hash_edges(new_keys, stored_keys, cfg.phash_max_hamming).localCheckpoint()
    new_edges = ctx.merge_new(found.withColumn("scheme", F.lit(scheme)), EDGES, ["scheme", "src", "dst"])
    ctx.merge_new(new_keys.withColumn("scheme", F.lit(scheme)), BAND_KEYS, ["scheme", "phash", "band"])
    items = eligible.select("image_id", "phash", "width", "height")
    edges = image_edges(items, ctx.read(EDGES).where(F.col("scheme") == scheme).select("src", "dst"))
    groups = assign_groups(items, edges, "image_id", [F.desc(F.col("width") * F.col("height"))])
    v = apply_verdicts(eligible, groups, "image_id", PERCEPTUAL, group_col="phash_group")

    # write
    written = ctx.update_columns(v.rows, "images", ["image_id"], v.columns)

    # record
    result = StageResult(rows_in=v.eligible, rows_out=written)
    result.add_drops({PERCEPTUAL: v.newly_dropped})
    result.metrics = {
        "phash_groups": float(v.groups),
        "perceptual_dropped_total": float(v.dropped_total),
        "perceptual_removed_fraction": v.dropped_total / v.eligible if v.eligible else 0.0,
        "new_hashes": float(new_hashes.count()),
        "new_hash_edges": float(new_edges),
    }
    return result
