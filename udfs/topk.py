"""Exact inner-product top-k: the kernel under both the two-level search and the brute-force baseline.

`topk_ip` scores queries against a corpus in bounded blocks (a matrix product) and keeps each
query's k best, ties broken by the smaller corpus key so a result never depends on row order.
Products accumulate in float64 and are rounded to float32 before selection: a float32 product's
last bits depend on the block shape, so the same pair could score a hair differently in two
groupings and flip a tie; rounded float64 scores are the same however the data was split.
On a GPU (torch with CUDA) the product and the selection run on the device and only k columns per
query come back; on CPU it is numpy over BLAS.

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
# Score matrix cells per block: 8M doubles = 64 MiB, whatever the group's size.
BLOCK_CELLS = 1 << 23


def _device(device: str | None) -> str:
    """"auto" / None: this task's device (its GPU, mapped through CUDA_VISIBLE_DEVICES), else CPU."""
    if device not in (None, "auto"):
        return device
    try:
        from realsyn_models.device import pick_device
    except ImportError:
        return "cpu"
    return pick_device()


def _select_numpy(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Columns and values of each row's k largest, by (-score, column). Columns are the tie key."""
    n = s.shape[1]
    if n <= k:
        cols = np.broadcast_to(np.arange(n), s.shape).copy()
    else:
        cols = np.argpartition(-s, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(s, cols, axis=1)
        kth = vals.min(axis=1)
        # argpartition picks arbitrarily among values equal to the k-th; redo those rows exactly.
        tied = np.nonzero((s >= kth[:, None]).sum(axis=1) > k)[0]
        for r in tied:
            cand = np.nonzero(s[r] >= kth[r])[0]
            cand = cand[np.lexsort((cand, -s[r, cand]))][:k]
            cols[r] = cand
    vals = np.take_along_axis(s, cols, axis=1)
    order = np.lexsort((cols, -vals), axis=1)
    return np.take_along_axis(cols, order, axis=1), np.take_along_axis(vals, order, axis=1)


def _select_torch(s, k: int) -> tuple[np.ndarray, np.ndarray]:
    """As _select_numpy on a torch tensor (any device); only (rows, k) leaves the device."""
    import torch

    n = s.shape[1]
    kk = min(k, n)
    vals, cols = torch.topk(s, kk, dim=1, sorted=True)
    tied = torch.nonzero((s >= vals[:, -1:]).sum(dim=1) > kk).flatten().tolist()
    vals, cols = vals.cpu().numpy(), cols.cpu().numpy()
    for r in tied:
        row = s[r].cpu().numpy()
        cand = np.nonzero(row >= vals[r, -1])[0]
        cols[r] = cand[np.lexsort((cand, -row[cand]))][:kk]
        vals[r] = row[cols[r]]
    order = np.lexsort((cols, -vals), axis=1)
    return np.take_along_axis(cols, order, axis=1), np.take_along_axis(vals, order, axis=1)


def topk_ip(
    q: np.ndarray, c: np.ndarray, k: int, c_keys: np.ndarray | None = None, *,
    min_similarity: float | None = None, device: str | None = "cpu", block_cells: int = BLOCK_CELLS,
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k best corpus rows by inner product.

    Returns (rows (m, k), scores (m, k)): row positions into `c`, best first, ties broken by the
    smaller `c_keys` value (by position when None). Slots beyond the corpus size, or below
    `min_similarity`, hold row -1 and score -inf.
    """
    m, n = len(q), len(c)
    rows = np.full((m, k), -1, dtype=np.int64)
    scores = np.full((m, k), -np.inf, dtype=np.float32)
    if m == 0 or n == 0:
        return rows, scores
    # Sorting the corpus by key once makes "smaller column" mean "smaller key" in the selection.
    perm = np.argsort(c_keys, kind="stable") if c_keys is not None else np.arange(n)
    cs = np.ascontiguousarray(c[perm], dtype=np.float64)
    step = max(1, block_cells // n)
    dev = _device(device)
    if dev != "cpu":
        import torch

        ct = torch.from_numpy(cs).to(dev)
    for s0 in range(0, m, step):
        qb = np.ascontiguousarray(q[s0:s0 + step], dtype=np.float64)
        if dev == "cpu":
            cols, vals = _select_numpy((qb @ cs.T).astype(np.float32), k)
        else:
            cols, vals = _select_torch((torch.from_numpy(qb).to(dev) @ ct.T).float(), k)
        kk = cols.shape[1]
        rows[s0:s0 + step, :kk] = perm[cols]
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
    k: int, *, min_similarity: float | None = None, device: str | None = None,
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

