"""image_dedup (perceptual): pHash near-duplicates -> groups -> one survivor per group.

Near-duplicates are pairs within Hamming distance t (image_dedup.phash_max_hamming). Candidates
come from joining on LSH band-subset keys of the 64-bit hash (udfs/phash.py: pigeonhole, so no pair
within t is missed); images with an identical hash are linked to one representative first so a popular
hash (blank, placeholder) does not make a quadratic bucket. Groups are connected components in
Spark; the survivor is the largest image (width x height), then the smallest id. The group id (the
smallest member id) is kept on every member in phash_group.
"""
from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl.context import StageContext, StageResult
from etl.stage import stage
from etl.dedup import PERCEPTUAL, SEMANTIC, apply_verdicts, assign_groups
from udfs.phash import band_masks


def phash_edges(items: DataFrame, max_hamming: int, n_bands: int) -> DataFrame:
    """(src, dst) image id pairs within max_hamming, from (image_id, phash) rows."""
    reps = items.groupBy("phash").agg(F.min("image_id").alias("rep"))
    same_hash = (items.join(reps, "phash").where(F.col("image_id") != F.col("rep"))
                 .select(F.col("image_id").alias("src"), F.col("rep").alias("dst")))
    keys = F.array(*[
        F.struct(F.lit(i).alias("band"), F.col("phash").bitwiseAND(F.lit(mask).cast("bigint")).alias("key"))
        for i, mask in enumerate(band_masks(max_hamming, n_bands))
    ])
    keyed = reps.select("rep", "phash", F.explode(keys).alias("bk")).select("rep", "phash", "bk.band", "bk.key")
    a, b = keyed.alias("a"), keyed.alias("b")
    near = (a.join(b, (F.col("a.band") == F.col("b.band")) & (F.col("a.key") == F.col("b.key"))
                   & (F.col("a.rep") < F.col("b.rep")))
            .where(F.bit_count(F.col("a.phash").bitwiseXOR(F.col("b.phash"))) <= max_hamming)
            .select(F.col("a.rep").alias("src"), F.col("b.rep").alias("dst"))
            .distinct())
    return same_hash.unionByName(near)


@stage(reads=("images",), writes=("images",), config=("image_dedup",))
def image_dedup(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.image_dedup
    # read: every image that passed quality, including earlier dedup losers (groups can grow)
    images = ctx.read("images")
    eligible = images.where(F.col("phash").isNotNull()
                            & (F.col("kept") | F.col("drop_reason").isin(PERCEPTUAL, SEMANTIC)))

    if eligible.where(F.col("phash_group").isNull()).isEmpty():
        # Groups only change when hashed images arrive (eligibility never shrinks here).
        return StageResult(notes={"skipped": "no newly hashed images"})

    # transform
    items = eligible.select("image_id", "phash", "width", "height")
    edges = phash_edges(items, cfg.phash_max_hamming, cfg.phash_bands or cfg.phash_max_hamming + 2)
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
    }
    return result
