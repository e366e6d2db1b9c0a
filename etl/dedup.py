"""Shared dedup machinery: edges -> groups -> one survivor per group -> kept / drop_reason.

Perceptual (pHash) and semantic (embedding) dedup of images, and semantic dedup of sentences, all
end here. Only rows whose verdict or group changed are written, so a re-run with nothing new
writes nothing. Perceptual groups are recomputed each run from the stored edges (only a new
hash's edges are searched for). Semantic dedup judges only new items: the old survivors they meet
are passed as anchors (`assign_groups`), which stay survivors and absorb their component.

Verdict rule, per dedup reason R: a non-survivor gets drop_reason R (kept=false); a survivor that
was dropped for R before is kept again; any other earlier reason stays (first failing rule wins,
and pipeline order is perceptual before semantic).
"""
from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from etl.components import connected_components

PERCEPTUAL = "perceptual_duplicate"
SEMANTIC = "semantic_duplicate"


def assign_groups(items: DataFrame, edges: DataFrame, id_col: str, priority: list[Column],
                  anchor: str | None = None) -> DataFrame:
    """(id_col, group, survivor) for every item: group = smallest id of its connected component
    (an item on no edge is its own group); survivor = first by `priority`, then by id.

    `anchor`: a column set (to its stored group) on items that are settled survivors. A component
    holding one keeps every anchor a survivor, takes the smallest anchor as its group, and every
    other member is a duplicate; components without one follow the rule above."""
    comps = connected_components(edges).withColumnRenamed("node", id_col)
    grouped = (items.join(comps, id_col, "left")
               .withColumn("_component", F.coalesce("component", id_col)).drop("component"))
    first = F.row_number().over(Window.partitionBy("_component").orderBy(*priority, F.col(id_col))) == 1
    if anchor is None:
        return grouped.select(id_col, F.col("_component").alias("group"), first.alias("survivor"))
    settled = F.min(anchor).over(Window.partitionBy("_component"))
    return grouped.select(id_col, F.coalesce(settled, "_component").alias("group"),
                          (F.col(anchor).isNotNull() | (settled.isNull() & first)).alias("survivor"))


@dataclass
class Verdicts:
    rows: DataFrame  # (id, kept, drop_reason[, group]) of the rows that changed, checkpointed
    columns: list[str]  # the verdict columns in `rows`, for tables.update_columns
    newly_dropped: int
    dropped_total: int
    eligible: int
    groups: int


def apply_verdicts(table: DataFrame, groups: DataFrame, id_col: str, reason: str,
                   group_col: str | None, model_col: str | None = None, model_id: str | None = None) -> Verdicts:
    """Changed rows of `table` after applying `groups` (see module doc). group_col None: the
    table has no column to record the group in; model_col: where to record `model_id`, the model
    whose vectors made these verdicts."""
    extra = [c for c in (group_col, model_col) if c]
    g = groups.select(F.col(id_col), F.col("group").alias("_group"), F.col("survivor").alias("_survivor"))
    new_reason = (F.when(~F.col("_survivor"), F.lit(reason))
                  .when(F.col("drop_reason") == reason, F.lit(None).cast("string"))
                  .otherwise(F.col("drop_reason")))
    # Verdicts on the narrow columns first (checkpointed: the stats and the write both read it).
    narrow = (table.select(id_col, "kept", "drop_reason", *extra)
              .join(g, id_col).withColumn("_reason", new_reason).localCheckpoint())
    changed = ~F.col("drop_reason").eqNullSafe(F.col("_reason")) | ~F.col("kept").eqNullSafe(F.col("_reason").isNull())
    if group_col:
        changed = changed | ~F.col(group_col).eqNullSafe(F.col("_group"))
    if model_col:
        changed = changed | ~F.col(model_col).eqNullSafe(F.lit(model_id))
    stats = narrow.agg(
        F.count("*").alias("eligible"),
        F.countDistinct("_group").alias("groups"),
        F.sum((F.col("_reason") == reason).cast("int")).alias("dropped"),
        F.sum(((F.col("_reason") == reason)
               & ~F.col("drop_reason").eqNullSafe(F.lit(reason))).cast("int")).alias("new"),
    ).collect()[0]
    columns = ["kept", "drop_reason", *extra]
    rows = (narrow.where(changed)
            .select(id_col, F.col("_reason").isNull().alias("kept"), F.col("_reason").alias("drop_reason"),
                    *([F.col("_group").alias(group_col)] if group_col else []),
                    *([F.lit(model_id).cast("string").alias(model_col)] if model_col else []))
            .localCheckpoint())
    return Verdicts(rows=rows, columns=columns, newly_dropped=int(stats["new"] or 0), dropped_total=int(stats["dropped"] or 0),
                    eligible=int(stats["eligible"]), groups=int(stats["groups"]))
