"""Connected components in Spark agree with a reference union-find on small graphs."""
from __future__ import annotations

import random

from etl.components import connected_components


def _reference(edges: list[tuple[str, str]]) -> dict[str, str]:
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x: find(x) for x in parent}


def _spark_components(spark, edges):
    df = spark.createDataFrame(edges, "src string, dst string")
    return {r["node"]: r["component"] for r in connected_components(df).collect()}


def test_chain_star_cycle_and_isolated_pairs(spark):
    # A long chain is the slow case for plain min-label propagation (rounds = diameter).
    chain = [(f"c{i:03d}", f"c{i + 1:03d}") for i in range(16)]
    star = [("s0", f"s{i}") for i in range(1, 8)]
    cycle = [("y1", "y2"), ("y2", "y3"), ("y3", "y1")]
    edges = chain[::-1] + star + cycle + [("p2", "p1"), ("q", "q")]  # a self loop is no edge
    got = _spark_components(spark, edges)
    want = _reference([e for e in edges if e[0] != e[1]])
    assert got == want
    assert got["c016"] == "c000" and got["y3"] == "y1" and got["p2"] == "p1"
    assert "q" not in got


def test_random_graph_matches_union_find(spark):
    rng = random.Random(1)
    nodes = [f"n{i:04d}" for i in range(400)]
    edges = [(rng.choice(nodes), rng.choice(nodes)) for _ in range(300)]
    edges = [(a, b) for a, b in edges if a != b]
    assert _spark_components(spark, edges) == _reference(edges)


def test_empty_edges(spark):
    assert _spark_components(spark, []) == {}
