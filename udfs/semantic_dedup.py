"""SemDeDup-style semantic dedup: inside one k-means cluster, pairs of items whose embeddings have
cosine >= a threshold become edges (then connected components pick one survivor per group).

The same functions serve image and sentence embeddings. Neighbours come from a FAISS range search
(IndexFlatIP over one chunk of a cluster's members, the new items' chunk as queries), so a task
holds two bounded chunks, never a cluster's full pairwise matrix. k-means training and
nearest-centroid assignment are udfs/kmeans.py's; etl/stages/semantic_dedup.py wires the pieces
into Spark.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import pandas as pd

from udfs.grouping import by_group
from udfs.kmeans import as_matrix, normalise

EDGE_SCHEMA = "src string, dst string, cosine float"
# Rows of one (cluster, query chunk, member chunk) group: the new items of the chunk are the
# queries (side QUERY), the chunk's members (old survivors and new items alike) the corpus.
GROUP_KEYS = ["cluster_id", "qchunk", "cchunk"]
QUERY, MEMBER = 0, 1

# Queries searched at once: bounds the range search's scratch memory.
_BLOCK = 4096


def _empty_edges() -> pd.DataFrame:
    return pd.DataFrame({"src": pd.Series([], dtype=object), "dst": pd.Series([], dtype=object),
                         "cosine": np.array([], dtype=np.float32)})


def range_pairs(query_ids: np.ndarray, queries: np.ndarray, member_ids: np.ndarray, members: np.ndarray,
                threshold: float, member_is_new: np.ndarray | None = None) -> pd.DataFrame:
    """EDGE_SCHEMA rows (src < dst by id): every (query, member) pair with cosine >= threshold,
    the pair of an item with itself left out. With `member_is_new`, a pair of two new items is
    reported once (from the query with the smaller id), a pair of a new and an old item always."""
    import faiss

    query_ids, member_ids = np.asarray(query_ids, dtype=object), np.asarray(member_ids, dtype=object)
    if len(query_ids) == 0 or len(member_ids) == 0:
        return _empty_edges()
    q, m = normalise(as_matrix(queries)), normalise(as_matrix(members))
    index = faiss.IndexFlatIP(m.shape[1])
    index.add(m)
    # FAISS keeps inner products strictly above the radius; the rule is cosine >= threshold.
    radius = float(np.nextafter(np.float32(threshold), np.float32(-2)))
    src, dst, cos = [], [], []
    for start in range(0, len(q), _BLOCK):
        lims, dist, idx = index.range_search(q[start:start + _BLOCK], radius)
        qi = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims.astype(np.int64)))
        a, b = query_ids[qi], member_ids[idx]
        keep = a != b
        if member_is_new is not None:
            keep &= ~np.asarray(member_is_new, dtype=bool)[idx] | (a < b)
        a, b = a[keep], b[keep]
        first = a < b
        src.append(np.where(first, a, b))
        dst.append(np.where(first, b, a))
        cos.append(dist[keep])
    if not sum(len(s) for s in src):
        return _empty_edges()
    return pd.DataFrame({"src": np.concatenate(src), "dst": np.concatenate(dst),
                         "cosine": np.concatenate(cos).astype(np.float32)})


def similar_pairs(ids: np.ndarray, vectors: np.ndarray, threshold: float) -> pd.DataFrame:
    """Every pair of one set with cosine >= threshold (EDGE_SCHEMA rows, src < dst)."""
    new = np.ones(len(ids), dtype=bool)
    return range_pairs(ids, vectors, ids, vectors, threshold, member_is_new=new)


def make_grouped_edges_fn(threshold: float) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """mapInPandas fn over rows (GROUP_KEYS, side, id, vector, is_new) pre-grouped by GROUP_KEYS
    (etl/gpu.py: grouped) -> EDGE_SCHEMA rows of each group's range search."""

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for _, rows in by_group(batches, GROUP_KEYS):
            q, m = rows[rows["side"] == QUERY], rows[rows["side"] == MEMBER]
            out = range_pairs(q["id"].to_numpy(), q["vector"], m["id"].to_numpy(), m["vector"], threshold,
                              member_is_new=m["is_new"].to_numpy())
            if not out.empty:
                yield out

    return run
