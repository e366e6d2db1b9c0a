"""k-means, probing and the exact top-k kernel, without Spark."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from udfs.kmeans import nearest_centroids, normalise, split_k, train_kmeans
from udfs.topk import (
    SLACK,
    brute_force_local,
    CORPUS,
    QUERY,
    make_grouped_topk_fn,
    recall_at_k,
    topk_ip,
    two_level_local,
)


def planted(n: int, n_clusters: int, d: int = 16, noise: float = 0.15, seed: int = 0) -> np.ndarray:
    """Unit vectors scattered around random unit centres: clusters a k-means can find."""
    rng = np.random.default_rng(seed)
    centres = normalise(rng.standard_normal((n_clusters, d)).astype(np.float32))
    labels = rng.integers(0, n_clusters, n)
    return normalise(centres[labels] + noise * rng.standard_normal((n, d)).astype(np.float32))


@pytest.fixture(scope="module")
def data():
    both = planted(4200, 40, seed=1)  # queries drawn around the same centres as the corpus
    return both[4000:], both[:4000]


def exact(q, c, k):
    s = q @ c.T
    return np.lexsort((np.broadcast_to(np.arange(c.shape[0]), s.shape), -s), axis=1)[:, :k]


# --- k-means ---------------------------------------------------------------------------------

def test_kmeans_deterministic_unit_and_clamped(data):
    _, c = data
    a = train_kmeans(c, 40, niter=8, seed=3)
    b = train_kmeans(c, 40, niter=8, seed=3)
    assert a.shape == (40, 16) and np.array_equal(a, b)
    assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert train_kmeans(c[:10], 32, niter=2).shape == (10, 16)  # K clamped to the sample


def test_two_level_kmeans_gives_exactly_k(data):
    _, c = data
    cents = train_kmeans(c, 300, niter=5, two_level_above_k=100)
    assert cents.shape == (300, 16)
    assert np.allclose(np.linalg.norm(cents, axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("counts,k", [([10, 0, 3, 100], 20), ([1, 1, 1], 3), ([5, 5], 7), ([2, 50], 10)])
def test_split_k(counts, k):
    share = split_k(np.array(counts), k)
    assert share.sum() == min(k, sum(counts))
    assert (share <= np.array(counts)).all() and (share[np.array(counts) > 0] >= 1).all()


# --- exact top-k -------------------------------------------------------------------------------

def test_topk_matches_full_sort_and_blocks(data):
    q, c = data
    rows, scores = topk_ip(q, c, 5, block_cells=3000)  # a few queries per block
    assert np.array_equal(rows, exact(q, c, 5))
    assert np.allclose(scores, np.take_along_axis(q @ c.T, rows, axis=1))


def test_ties_go_to_the_smaller_key():
    c = np.repeat(np.eye(4, dtype=np.float32), 3, axis=0)  # every vector three times
    keys = np.array([9, 3, 5, 8, 1, 7, 2, 0, 6, 11, 10, 4])
    q = np.eye(4, dtype=np.float32)
    rows, _ = topk_ip(q, c, 2, keys)
    assert [sorted(keys[r]) for r in rows] == [[3, 5], [1, 7], [0, 2], [4, 10]]
    # Same answer whatever the corpus order.
    perm = np.random.default_rng(0).permutation(len(c))
    rows2, _ = topk_ip(q, c[perm], 2, keys[perm])
    assert np.array_equal(keys[perm][rows2], keys[rows])


def exact64(q, c, k, keys=None):
    """The reference: every pair in float64, rounded to float32, ordered by (-score, key)."""
    s = (q.astype(np.float64) @ c.astype(np.float64).T).astype(np.float32)
    keys = np.arange(len(c)) if keys is None else keys
    order = np.lexsort((np.broadcast_to(keys, s.shape), -s), axis=1)[:, :k]
    return order, np.take_along_axis(s, order, axis=1)


@pytest.mark.parametrize("precision", ["float32", "float16", "bfloat16"])
def test_fast_pass_plus_exact_rescore_equals_float64_search_ties_included(precision):
    """Near-ties closer than float32 (or half) resolution, and exact ties wider than k + slack:
    the candidates are re-fetched until the gap is proven, so the answer is the float64 one."""
    rng = np.random.default_rng(4)
    base = normalise(rng.standard_normal((60, 32)).astype(np.float32))
    c = np.concatenate([base, np.repeat(base[:1], 3 * SLACK, axis=0),  # a wide exact tie
                        normalise(base[1:2] + 1e-4 * rng.standard_normal((SLACK, 32)).astype(np.float32))])
    keys = rng.permutation(len(c))
    q = np.concatenate([base[:2], normalise(rng.standard_normal((20, 32)).astype(np.float32))])
    rows, scores = topk_ip(q, c, 5, keys, precision=precision)
    ref_rows, ref_scores = exact64(q, c, 5, keys)
    assert np.array_equal(rows, ref_rows) and np.array_equal(scores, ref_scores)


def test_small_corpus_and_min_similarity(data):
    q, c = data
    rows, scores = topk_ip(q[:3], c[:2], 4)
    assert (rows[:, 2:] == -1).all() and np.isneginf(scores[:, 2:]).all()
    rows, scores = topk_ip(q, c, 3, min_similarity=0.9)
    assert ((scores >= 0.9) | (rows == -1)).all() and (rows == -1).any()


def test_chunked_brute_force_equals_unchunked(data):
    q, c = data
    r1, s1, _ = brute_force_local(q, c, 3, chunk=len(c))
    r2, s2, n = brute_force_local(q, c, 3, chunk=333)
    assert np.array_equal(r1, r2) and np.array_equal(r1, exact(q, c, 3)) and n == len(q) * len(c)


def test_two_level_equals_brute_force_when_probing_every_cluster(data):
    q, c = data
    cents = train_kmeans(c, 40, niter=8)
    bf, bs, _ = brute_force_local(q, c, 3)
    tl, ts, _ = two_level_local(q, c, cents, 3, nprobe=40)
    assert np.array_equal(tl, bf) and np.allclose(ts, bs)


def test_recall_on_planted_clusters_and_fewer_computations(data):
    q, c = data
    cents = train_kmeans(c, 40, niter=10)
    bf, _, n_bf = brute_force_local(q, c, 3)
    tl, _, n_tl = two_level_local(q, c, cents, 3, nprobe=2)
    assert recall_at_k(tl, bf) >= 0.95
    assert n_tl < n_bf / 5


def test_heavy_cluster_split_gives_same_answer(data):
    q, c = data
    cents = train_kmeans(c, 8, niter=8)
    whole = two_level_local(q, c, cents, 3, nprobe=2, chunk=10**9)
    split = two_level_local(q, c, cents, 3, nprobe=2, chunk=37)
    assert np.array_equal(whole[0], split[0]) and np.allclose(whole[1], split[1])


def test_small_cluster_borrows_from_next_clusters(data):
    q, c = data
    cents = train_kmeans(c, 40, niter=8)
    labels = nearest_centroids(c, cents, 1)[0][:, 0]
    # Leave the first query's nearest cluster with a single corpus row.
    home = nearest_centroids(q[:1], cents, 1)[0][0, 0]
    keep = (labels != home) | (np.arange(len(c)) == np.flatnonzero(labels == home)[0])
    corpus = c[keep]
    rows, _, _ = two_level_local(q[:1], corpus, cents, 3, nprobe=1, fallback_probes=0)
    assert (rows[0] >= 0).sum() == 1  # no fallback: only what the one cluster has
    rows, _, _ = two_level_local(q[:1], corpus, cents, 3, nprobe=1, fallback_probes=4)
    assert (rows[0] >= 0).sum() == 3


def merge_partials(df: pd.DataFrame, k: int) -> pd.DataFrame:
    """What etl/retrieval.py's merge_topk does in Spark: best k per query by (-score, corpus_id)."""
    df = df.sort_values(["query_id", "score", "corpus_id"], ascending=[True, False, True])
    return df.groupby("query_id").head(k).reset_index(drop=True)


def _grouped_rows(queries: pd.DataFrame, corpus: pd.DataFrame, cluster: int, chunks: int) -> pd.DataFrame:
    """The grouped mapInPandas input: the corpus cut into `chunks`, each meeting every query."""
    rows = []
    for j, part in enumerate(np.array_split(np.arange(len(corpus)), chunks)):
        rows += [(cluster, j, 0, QUERY, q, v) for q, v in zip(queries["query_id"], queries["vector"])]
        rows += [(cluster, j, 0, CORPUS, c, v) for c, v in zip(corpus["corpus_id"].iloc[part],
                                                              corpus["vector"].iloc[part])]
    return pd.DataFrame(rows, columns=["cluster_id", "cchunk", "qchunk", "side", "id", "vector"])


def test_grouped_fn_chunks_merge_to_the_unsplit_answer():
    rng = np.random.default_rng(0)
    qv, cv = normalise(rng.standard_normal((6, 8)).astype(np.float32)), normalise(
        rng.standard_normal((30, 8)).astype(np.float32))
    queries = pd.DataFrame({"query_id": [f"q{i}" for i in range(6)], "vector": list(qv)})
    corpus = pd.DataFrame({"corpus_id": [f"c{i:02d}" for i in range(30)], "vector": list(cv)})
    fn = make_grouped_topk_fn(3, device="cpu")
    merged = merge_partials(pd.concat(fn(iter([_grouped_rows(queries, corpus, 7, 3)]))), 3)
    whole = merge_partials(pd.concat(fn(iter([_grouped_rows(queries, corpus, 7, 1)]))), 3)
    pd.testing.assert_frame_equal(merged, whole)
    assert (merged["cluster_id"] == 7).all() and len(merged) == 18
    assert list(fn(iter([_grouped_rows(queries, corpus.iloc[:0], 1, 1)]))) == []
