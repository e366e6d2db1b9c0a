"""SemDeDup-style semantic dedup: within one k-means cluster, pairs of items whose embeddings
have cosine >= a threshold become edges (then connected components pick one survivor per group).

The same function serves image and sentence embeddings. k-means training and nearest-centroid
assignment are udfs/kmeans.py's; etl/stages/semantic_dedup.py wires the pieces into Spark.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from udfs.kmeans import as_matrix, normalise

EDGE_SCHEMA = "src string, dst string, cosine float"

# Rows of the similarity matrix computed at once inside a cluster: bounds memory to block x n.
_BLOCK = 1024


def similar_pairs(ids: np.ndarray, vectors: np.ndarray, threshold: float) -> pd.DataFrame:
    """EDGE_SCHEMA rows (src < dst by id) for every pair whose cosine >= threshold."""
    ids = np.asarray(ids, dtype=object)
    x = normalise(as_matrix(vectors))
    src, dst, cos = [], [], []
    for start in range(0, len(x), _BLOCK):
        sims = x[start:start + _BLOCK] @ x.T
        i, j = np.nonzero(sims >= threshold)
        upper = i + start < j
        i, j = i[upper], j[upper]
        a, b = ids[i + start], ids[j]
        first = a < b
        src.append(np.where(first, a, b))
        dst.append(np.where(first, b, a))
        cos.append(sims[i, j])
    if not src:
        return pd.DataFrame({"src": pd.Series([], dtype=object), "dst": pd.Series([], dtype=object),
                             "cosine": np.array([], dtype=np.float32)})
    return pd.DataFrame({"src": np.concatenate(src), "dst": np.concatenate(dst),
                         "cosine": np.concatenate(cos).astype(np.float32)})


def make_edges_fn(threshold: float, id_col: str = "item_id",
                  vector_col: str = "vector") -> Callable[[pd.DataFrame], pd.DataFrame]:
    """applyInPandas fn over one cluster's rows (id_col, vector_col, ...) -> EDGE_SCHEMA rows."""

    def cluster_edges(pdf: pd.DataFrame) -> pd.DataFrame:
        return similar_pairs(pdf[id_col].to_numpy(), pdf[vector_col], threshold)

    return cluster_edges
