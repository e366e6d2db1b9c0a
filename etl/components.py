"""Connected components of an edge list, in Spark (no driver-side union-find of the corpus).

Alternating large-star / small-star (Kiveris et al., "Connected Components in MapReduce and
Beyond", SoCC 2014): each round is a few joins and group-bys over the edges, the number of rounds
grows like log^2 of the component size, and the fixed point is one star per component centred on
its smallest node id, which is the component's id.

Edges are kept canonical (lo < hi). Each round's edges are checkpointed so the plan does not
grow with the number of rounds.
"""
from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import Window
from pyspark.sql import functions as F

COMPONENTS_SCHEMA = "node string, component string"


def _canonical(edges: DataFrame) -> DataFrame:
    return (edges.where(F.col("u") != F.col("v"))
            .select(F.least("u", "v").alias("lo"), F.greatest("u", "v").alias("hi"))
            .distinct())


def _large_star(e: DataFrame) -> DataFrame:
    """Connect every larger neighbour of u to the smallest node of u's neighbourhood (u included)."""
    both = e.select(F.col("lo").alias("u"), F.col("hi").alias("v")).unionByName(
        e.select(F.col("hi").alias("u"), F.col("lo").alias("v")))
    m = F.least(F.min("v").over(Window.partitionBy("u")), F.col("u"))
    out = both.withColumn("m", m).where(F.col("v") > F.col("u")).select(F.col("m").alias("u"), "v")
    return _canonical(out)


def _small_star(e: DataFrame) -> DataFrame:
    """Connect u and its smaller neighbours to the smallest of them."""
    joined = e.withColumn("m", F.min("lo").over(Window.partitionBy("hi")))
    out = joined.select(F.col("m").alias("u"), F.col("lo").alias("v")).unionByName(
        joined.select(F.col("m").alias("u"), F.col("hi").alias("v")))
    return _canonical(out)


def _is_star_forest(e: DataFrame) -> bool:
    """True when every node is either a centre (only ever `lo`) or hangs off exactly one centre:
    then each star is a whole component and its centre is the component's smallest id."""
    roles = e.select(F.col("hi").alias("x"), F.lit(1).alias("as_hi"), F.lit(0).alias("as_lo")).unionByName(
        e.select(F.col("lo").alias("x"), F.lit(0).alias("as_hi"), F.lit(1).alias("as_lo")))
    bad = roles.groupBy("x").agg(F.sum("as_hi").alias("h"), F.max("as_lo").alias("l")).where(
        (F.col("h") > 1) | ((F.col("h") > 0) & (F.col("l") > 0)))
    return bad.isEmpty()


def connected_components(edges: DataFrame, src: str = "src", dst: str = "dst",
                         max_rounds: int = 100) -> DataFrame:
    """(node, component) for every node that appears on an edge; component = smallest node id.

    Nodes on no edge are their own component; callers left-join and coalesce to the node id.
    Dedup graphs are mostly already stars (pairs, a few copies of one image), which need no round.
    """
    e = _canonical(edges.select(F.col(src).cast("string").alias("u"),
                                F.col(dst).cast("string").alias("v"))).localCheckpoint()
    rounds = 0
    while not _is_star_forest(e):
        if rounds == max_rounds:
            raise RuntimeError(f"connected components did not converge in {max_rounds} rounds")
        e = _small_star(_large_star(e)).localCheckpoint()
        rounds += 1
    centres = e.select(F.col("lo").alias("node"), F.col("lo").alias("component")).distinct()
    members = e.select(F.col("hi").alias("node"), F.col("lo").alias("component"))
    return centres.unionByName(members)
