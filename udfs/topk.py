"""Top-k by inner product: the kernel under both the two-level search and the brute-force baseline.

`topk_ip` finds each query's k best corpus rows in two passes, so the fast pass may be inexact and
the answer is still the exact one:

1. candidates: a FAISS `knn` (IndexFlatIP's search, float32 BLAS) on CPU, or a torch matmul in
   float32 / float16 / bfloat16 on the task's GPU, fetches each query's k + slack best rows;
2. exact re-score: only those candidates are scored again in float64 (rounded to float32) and
   ordered by (score desc, corpus key asc), so ties go to the smaller key.

The fast pass's error on unit vectors is bounded (`score_tolerance`: the accumulation error of a
d-long float32 dot product, plus the input rounding of the half types). A row not fetched can only
belong in the top k if its fast score is within that tolerance of the k-th fetched one; when the
last fetched candidate is still that close, the query's candidates are fetched again with twice the
slack, until the gap is proven or the corpus is exhausted. So the result equals a full float64
search, ties included, at the cost of k + slack exact products per query instead of n.
float64 scores rounded to float32 are also the same however the data was split, so a pair never
scores differently in two groupings.

Around it: the mapInPandas function that runs it once per (cluster, corpus chunk, query chunk)
group of pre-grouped rows, the per-query merge of partial top-ks, and two local
(Spark-free) drivers, `brute_force_local` and `two_level_local`, that run the same kernel straight
over numpy arrays (the benchmark's 1M-vector path and the reference in tests).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pandas as pd

from udfs.grouping import by_group
from udfs.kmeans import as_matrix, nearest_centroids, normalise

# What one group produces: each query's best corpus rows inside that group.
PARTIAL_SCHEMA = "query_id string, corpus_id string, score float, cluster_id int"
# Cells per block, for both the fast scores and the gathered candidates of the exact pass
# (8M floats: 32-64 MiB, whatever the group's size).
BLOCK_CELLS = 1 << 23
# Extra candidates fetched beyond k before the exact re-score; doubled for a query whose
# candidates end inside the fast pass's error band.
SLACK = 16
PRECISIONS = ("float32", "float16", "bfloat16")
_UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}


def score_tolerance(d: int, precision: str = "float32") -> float:
    """Twice the largest error of a fast inner product of two unit vectors of dimension d: the
    float32 accumulation (d roundings, each at most one unit of a partial sum of magnitude <= 1)
    plus, for half types, the rounding of both inputs. Two fast scores further apart than this
    keep their exact order."""
    err = d * _UNIT_ROUNDOFF["float32"]
    if precision != "float32":
        err += 2 * _UNIT_ROUNDOFF[precision]
    return 2 * err


def _device(device: str | None) -> str:
    """"auto" / None: this task's device (its GPU, mapped through CUDA_VISIBLE_DEVICES), else CPU."""
    if device not in (None, "auto"):
        return device
    try:
        from realsyn_models.device import pick_device
    except ImportError:
        return "cpu"
    return pick_device()


class _Fast:
    """The candidate pass over one (key-sorted) corpus: fetch(q, f) -> each row's f best columns
    by fast score, best first, with those scores."""

    def __init__(self, c: np.ndarray, device: str, precision: str):
        self.device, self.n = device, len(c)
        # FAISS for the CPU float32 pass; torch on a GPU, and for half types (tests run them on CPU).
        self.faiss = device == "cpu" and precision == "float32"
        if self.faiss:
            self.c = np.ascontiguousarray(c, dtype=np.float32)
        else:
            import torch

            self.dtype = getattr(torch, precision)
            self.c = torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32)).to(device).to(self.dtype)

    def fetch(self, q: np.ndarray, f: int) -> tuple[np.ndarray, np.ndarray]:
        if self.faiss:
            import faiss

            scores, cols = faiss.knn(np.ascontiguousarray(q, dtype=np.float32), self.c, f,
                                     metric=faiss.METRIC_INNER_PRODUCT)
            return cols, scores
        import torch

        s = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)).to(self.device).to(self.dtype) @ self.c.T
        scores, cols = torch.topk(s.float(), f, dim=1, sorted=True)
        return cols.cpu().numpy(), scores.cpu().numpy()


def _candidates(fast: _Fast, q: np.ndarray, k: int, tol: float) -> np.ndarray:
    """(m, f) candidate columns per query such that every column outside them scores below the
    exact k-th best: fetched with slack, re-fetched with more for the queries whose last
    candidate is within `tol` of their k-th."""
    n = fast.n
    f = min(n, k + SLACK)
    cols, scores = fast.fetch(q, f)
    while f < n:
        unsure = np.flatnonzero(scores[:, -1] >= scores[:, k - 1] - tol)
        if len(unsure) == 0:
            break
        f = min(n, 2 * f)
        more, more_scores = fast.fetch(q[unsure], f)
        pad = f - cols.shape[1]
        cols = np.pad(cols, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        cols[unsure], scores[unsure] = more, more_scores
    return cols


def _exact_topk(q64: np.ndarray, c64: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k best of its candidate columns (-1 = none) by float64 score rounded to
    float32, ties to the smaller column. The sum runs along d for one pair at a time, so a pair's
    score never depends on which other rows share its block."""
    m, f = cand.shape
    scores = np.full((m, f), -np.inf, dtype=np.float32)
    step = max(1, BLOCK_CELLS // max(1, f * c64.shape[1]))
    for s0 in range(0, m, step):
        cb = cand[s0:s0 + step]
        prod = (q64[s0:s0 + step, None, :] * c64[np.maximum(cb, 0)]).sum(axis=-1)
        scores[s0:s0 + step] = np.where(cb >= 0, prod.astype(np.float32), -np.inf)
    big = np.iinfo(np.int64).max
    order = np.lexsort((np.where(cand < 0, big, cand), -scores), axis=1)[:, :k]
    return np.take_along_axis(cand, order, axis=1), np.take_along_axis(scores, order, axis=1)


def topk_ip(
    q: np.ndarray, c: np.ndarray, k: int, c_keys: np.ndarray | None = None, *,
    min_similarity: float | None = None, device: str | None = "cpu", precision: str = "float32",
    block_cells: int = BLOCK_CELLS,
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k best corpus rows by inner product (unit vectors).

    Returns (rows (m, k), scores (m, k)): row positions into `c`, best first, ties broken by the
    smaller `c_keys` value (by position when None). Slots beyond the corpus size, or below
    `min_similarity`, hold row -1 and score -inf. `precision` is the fast pass's type (float16 /
    bfloat16 for a GPU's tensor cores); the answer is the same for each.
    """
    m, n = len(q), len(c)
    rows = np.full((m, k), -1, dtype=np.int64)
    scores = np.full((m, k), -np.inf, dtype=np.float32)
    if m == 0 or n == 0:
        return rows, scores
    # Sorting the corpus by key once makes "smaller column" mean "smaller key" in the selection.
    perm = np.argsort(c_keys, kind="stable") if c_keys is not None else np.arange(n)
    cs = np.ascontiguousarray(c[perm], dtype=np.float32)
    c64 = cs.astype(np.float64)
    fast = _Fast(cs, _device(device), precision)
    tol = score_tolerance(c.shape[1], precision)
    step = max(1, block_cells // n)
    for s0 in range(0, m, step):
        qb = np.ascontiguousarray(q[s0:s0 + step], dtype=np.float32)
        cand = _candidates(fast, qb, min(k, n), tol)
        cols, vals = _exact_topk(qb.astype(np.float64), c64, cand, k)
        kk = cols.shape[1]
        rows[s0:s0 + step, :kk] = np.where(cols >= 0, perm[np.maximum(cols, 0)], -1)
        scores[s0:s0 + step, :kk] = vals
    if min_similarity is not None:
        low = scores < min_similarity
        rows[low], scores[low] = -1, -np.inf
    return rows, scores


def merge_topk(keys: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row best k of several partial top-ks laid side by side ((m, p) arrays; key -1 = empty),
    by (-score, key): the same order the kernel uses, so merging chunks equals not splitting."""
    big = np.iinfo(np.int64).max
    order = np.lexsort((np.where(keys < 0, big, keys), -scores), axis=1)[:, :k]
    return np.take_along_axis(keys, order, axis=1), np.take_along_axis(scores, order, axis=1)


GROUP_KEYS = ["cluster_id", "cchunk", "qchunk"]
QUERY, CORPUS = 0, 1  # the `side` of a row in the grouped input


def make_grouped_topk_fn(
    k: int, *, min_similarity: float | None = None, device: str | None = None, precision: str = "float32",
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """mapInPandas fn over rows (cluster_id, cchunk, qchunk, side, id, vector) grouped by the three
    keys and sorted by side within them (etl/gpu.py: `grouped`): each group's queries (side 0)
    against its corpus (side 1) -> PARTIAL_SCHEMA rows.

    Each group holds at most one corpus chunk and one query chunk (the caller splits heavy
    clusters), and the kernel scores it in bounded blocks, so memory per task stays bounded.
    `device` None: the task's own device (its GPU under stage-level scheduling, else CPU).
    """
    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from realsyn_models.device import pick_device

        dev = device or pick_device()
        for key, rows in by_group(batches, GROUP_KEYS):
            queries, corpus = rows[rows["side"] == QUERY], rows[rows["side"] == CORPUS]
            if queries.empty or corpus.empty:
                continue
            c_ids = corpus["id"].to_numpy()
            found, scores = topk_ip(
                normalise(as_matrix(queries["vector"])), normalise(as_matrix(corpus["vector"])), k,
                c_ids.astype(str), min_similarity=min_similarity, device=dev,
                precision=precision if dev != "cpu" else "float32",
            )
            qi, slot = np.nonzero(found >= 0)
            yield pd.DataFrame({
                "query_id": queries["id"].to_numpy()[qi],
                "corpus_id": c_ids[found[qi, slot]],
                "score": scores[qi, slot].astype(np.float32),
                "cluster_id": np.full(len(qi), int(key[0]), dtype=np.int32),
            })
    return run


# --- local drivers: the same kernel over in-memory arrays (benchmark, tests) ---------------------

def brute_force_local(
    q: np.ndarray, c: np.ndarray, k: int, *, chunk: int = 50_000, min_similarity: float | None = None,
    device: str | None = "cpu",
) -> tuple[np.ndarray, np.ndarray, int]:
    """Exact top-k of every query over the whole corpus, corpus in chunks with partial top-ks merged.
    Corpus keys are row positions. Returns (rows, scores, similarity computations)."""
    best_r = np.full((len(q), k), -1, dtype=np.int64)
    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    for s0 in range(0, len(c), chunk):
        r, s = topk_ip(q, c[s0:s0 + chunk], k, min_similarity=min_similarity, device=device)
        r = np.where(r >= 0, r + s0, -1)
        best_r, best_s = merge_topk(np.hstack([best_r, r]), np.hstack([best_s, s]), k)
    return best_r, best_s, len(q) * len(c)


def two_level_local(
    q: np.ndarray, c: np.ndarray, centroids: np.ndarray, k: int, nprobe: int, *,
    c_clusters: np.ndarray | None = None, chunk: int = 50_000, min_similarity: float | None = None,
    fallback_probes: int = 0, device: str | None = "cpu",
) -> tuple[np.ndarray, np.ndarray, int]:
    """Two-level search with the corpus keys = row positions: queries' nprobe nearest centroids
    (plus next-nearest ones while the probed clusters hold fewer than k rows, up to
    nprobe + fallback_probes), exact top-k inside each probed cluster chunk, per-query merge.
    Returns (rows, scores, similarity computations incl. the centroid scoring)."""
    n_k = len(centroids)
    if c_clusters is None:
        c_clusters = nearest_centroids(c, centroids, 1)[0][:, 0]
    sizes = np.bincount(c_clusters, minlength=n_k)
    limit = min(n_k, nprobe + fallback_probes)
    probe_ids, _ = nearest_centroids(q, centroids, limit)
    keep = np.zeros(probe_ids.shape, dtype=bool)
    keep[:, :nprobe] = True
    if limit > nprobe:
        before = np.cumsum(sizes[probe_ids], axis=1) - sizes[probe_ids]
        keep |= before < k
    qi, pj = np.nonzero(keep)
    pair_cluster = probe_ids[qi, pj]
    # Pairs and corpus grouped by cluster: the local stand-in for Spark's co-partitioning.
    pair_order = np.argsort(pair_cluster, kind="stable")
    pair_bounds = np.searchsorted(pair_cluster[pair_order], np.arange(n_k + 1))
    corp_order = np.argsort(c_clusters, kind="stable")
    corp_bounds = np.searchsorted(c_clusters[corp_order], np.arange(n_k + 1))
    acc_q, acc_r, acc_s = [], [], []
    sims = len(q) * n_k
    for cl in range(n_k):
        members = qi[pair_order[pair_bounds[cl]:pair_bounds[cl + 1]]]
        corpus_rows = corp_order[corp_bounds[cl]:corp_bounds[cl + 1]]
        if len(members) == 0 or len(corpus_rows) == 0:
            continue
        for s0 in range(0, len(corpus_rows), chunk):
            rows_chunk = corpus_rows[s0:s0 + chunk]
            r, s = topk_ip(q[members], c[rows_chunk], k, rows_chunk,
                           min_similarity=min_similarity, device=device)
            sims += len(members) * len(rows_chunk)
            mi, slot = np.nonzero(r >= 0)
            acc_q.append(members[mi])
            acc_r.append(rows_chunk[r[mi, slot]])
            acc_s.append(s[mi, slot])
    return (*_flat_topk(acc_q, acc_r, acc_s, len(q), k), sims)


def _flat_topk(acc_q: list, acc_r: list, acc_s: list, m: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidate triples (query, key, score) -> (m, k) best keys and scores per query."""
    rows = np.full((m, k), -1, dtype=np.int64)
    scores = np.full((m, k), -np.inf, dtype=np.float32)
    if not acc_q:
        return rows, scores
    qs, rs, ss = np.concatenate(acc_q), np.concatenate(acc_r), np.concatenate(acc_s)
    order = np.lexsort((rs, -ss, qs))
    qs, rs, ss = qs[order], rs[order], ss[order]
    rank = np.arange(len(qs)) - np.searchsorted(qs, qs)
    top = rank < k
    rows[qs[top], rank[top]] = rs[top]
    scores[qs[top], rank[top]] = ss[top]
    return rows, scores


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |found ∩ exact| / |exact| (empty slots -1 ignored)."""
    hits = total = 0
    for f, e in zip(found, exact):
        e = set(e[e >= 0].tolist())
        hits += len(e & set(f[f >= 0].tolist()))
        total += len(e)
    return hits / max(total, 1)

