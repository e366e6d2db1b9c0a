"""Spherical k-means over L2-normalised embeddings, and nearest-centroid assignment.

Training runs on the driver over a sample (FAISS, on GPU when this FAISS build sees one). For a
very large K it goes coarse-then-fine: sqrt(K) coarse clusters first, then each coarse cluster's
points get their own small k-means with a share of K proportional to their count, so no step ever
scores the whole sample against all K centroids (the paper's 2M clusters would not fit otherwise).

Assignment is a mapInPandas function with the centroids passed in (an array, or a zero-argument
callable such as `lambda: broadcast.value` so Spark ships a large table once per executor).
Scores are inner products: embeddings and centroids are unit length, so the largest inner product
is the nearest centroid.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

def faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def faiss_on_gpu() -> bool:
    """Whether FAISS here should run on a GPU: inside a Spark task only when the task holds one,
    outside a task when FAISS has one. For GPU steps only: on a GPU cluster every SQL or CPU-step
    task also holds a share (`spark.task.resource.gpu.amount`) and so an address, which is why CPU
    steps (spill, route, cell search) pass gpu=False rather than ask this."""
    if faiss_gpus() == 0:
        return False
    from realsyn_models.device import in_spark_task, task_cuda_index

    return task_cuda_index() is not None if in_spark_task() else True


def _flat_ip(d: int, gpu: bool):
    """An exact inner-product index, on the task's GPU (mapped through CUDA_VISIBLE_DEVICES like
    torch's) when `gpu`, never every card of the host."""
    import faiss

    index = faiss.IndexFlatIP(d)
    if gpu:
        from realsyn_models.device import task_cuda_index

        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, task_cuda_index() or 0, index)
        index.gpu_resources = res  # the resources must live as long as the index
    return index


def as_matrix(vectors: pd.Series | list | np.ndarray) -> np.ndarray:
    """A column of float arrays (what Arrow hands pandas for array<float>) -> contiguous float32 (n, d)."""
    if isinstance(vectors, np.ndarray) and vectors.ndim == 2:
        return np.ascontiguousarray(vectors, dtype=np.float32)
    values = list(vectors)
    if not values:
        return np.zeros((0, 0), dtype=np.float32)
    return np.ascontiguousarray(np.stack(values), dtype=np.float32)


def arrow_matrix(column) -> np.ndarray:
    """A list<float> Arrow column of equal-length vectors -> float32 (n, d), read from its one
    values buffer (no Python object per row)."""
    if len(column) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    lengths = np.diff(column.offsets.to_numpy())
    if column.null_count or (lengths != lengths[0]).any():
        raise ValueError("vectors must be non-null and of one length")
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(column), -1)


def arrow_vectors(x: np.ndarray):
    """(n, d) -> a list<item> Arrow array over one buffer: what Spark reads as array<float> (or
    array<int>) from a mapInArrow function."""
    n, d = x.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * d + 1, d, dtype=np.int32)), pa.array(x.ravel()))


def normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def _flat_kmeans(x: np.ndarray, k: int, niter: int, seed: int, gpu: bool) -> np.ndarray:
    import faiss

    # faiss.Kmeans(gpu=True) would spread over every card of the host: its Clustering with our
    # own index keeps the training on the task's GPU.
    cp = faiss.ClusteringParameters()
    cp.niter, cp.seed, cp.spherical, cp.verbose = niter, seed, True, False
    # The caller already sampled; FAISS must not subsample again (or warn about it).
    cp.max_points_per_centroid, cp.min_points_per_centroid = max(1, math.ceil(len(x) / k)), 1
    clus = faiss.Clustering(x.shape[1], k, cp)
    clus.train(np.ascontiguousarray(x, dtype=np.float32), _flat_ip(x.shape[1], gpu))
    return normalise(faiss.vector_to_array(clus.centroids).reshape(k, x.shape[1]))


def split_k(counts: np.ndarray, k: int) -> np.ndarray:
    """Share K among coarse clusters in proportion to their sizes (largest remainder), each
    getting at least one centroid when it has points and never more centroids than points."""
    counts = np.asarray(counts, dtype=np.int64)
    nonempty = counts > 0
    share = np.zeros_like(counts)
    share[nonempty] = 1
    rest = k - int(share.sum())
    if rest > 0:
        room = counts - share
        ideal = room / max(int(room.sum()), 1) * rest
        extra = np.minimum(np.floor(ideal).astype(np.int64), room)
        share += extra
        left = k - int(share.sum())
        # Largest remainders first; ties by index so the split is deterministic.
        order = np.lexsort((np.arange(len(counts)), -(ideal - np.floor(ideal))))
        while left > 0:
            progressed = False
            for i in order:
                if left == 0:
                    break
                if share[i] < counts[i]:
                    share[i] += 1
                    left -= 1
                    progressed = True
            if not progressed:
                break
    return share


def train_kmeans(
    x: np.ndarray, k: int, *, niter: int = 20, seed: int = 0, two_level_above_k: int = 65_536,
    gpu: bool | None = None,
) -> np.ndarray:
    """K unit-length centroids (float32, (K', d), K' = min(K, len(x))) for the rows of x.

    Deterministic for a fixed seed and input order. `gpu=None`: `faiss_on_gpu()`.
    """
    x = normalise(as_matrix(x))
    if len(x) == 0:
        raise ValueError("k-means needs at least one vector")
    k = min(k, len(x))
    gpu = faiss_on_gpu() if gpu is None else gpu
    if k <= two_level_above_k:
        return _flat_kmeans(x, k, niter, seed, gpu)
    coarse_k = max(2, math.isqrt(k))
    coarse = _flat_kmeans(x, coarse_k, niter, seed, gpu)
    labels = nearest_centroids(x, coarse, 1)[0][:, 0]
    shares = split_k(np.bincount(labels, minlength=coarse_k), k)
    parts = []
    for c in range(coarse_k):
        if shares[c] == 0:
            continue
        members = x[labels == c]
        parts.append(_flat_kmeans(members, int(shares[c]), niter, seed + 1 + c, gpu)
                     if shares[c] > 1 else normalise(members.mean(axis=0, keepdims=True)))
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def centroid_index(centroids: np.ndarray, gpu: bool | None = None):
    """Exact inner-product index over the centroids (built once per worker, reused per batch)."""
    index = _flat_ip(centroids.shape[1], faiss_on_gpu() if gpu is None else gpu)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index


def nearest_centroids(x: np.ndarray, centroids, nprobe: int, *, gpu: bool | None = None,
                      block: int = 16_384) -> tuple[np.ndarray, np.ndarray]:
    """(cluster ids (n, p), scores (n, p)) of each row's p = min(nprobe, K) nearest centroids,
    best first; exact flat search. `centroids`: an array or a `centroid_index`."""
    index = centroids if hasattr(centroids, "search") else centroid_index(centroids, gpu)
    p = min(nprobe, index.ntotal)
    ids = np.empty((len(x), p), dtype=np.int64)
    scores = np.empty((len(x), p), dtype=np.float32)
    for s in range(0, len(x), block):
        d, i = index.search(np.ascontiguousarray(x[s:s + block], dtype=np.float32), p)
        scores[s:s + block], ids[s:s + block] = d, i
    return ids, scores


# --- the distributed pieces (etl/centroids.py): per-cell training and the centroid index -------

# level 0: a routing cell's centre (cluster_id = its cell); level 1: a fine centroid and its cell.
TRAINED_SCHEMA = "level int, cluster_id int, cell int, centroid array<float>"
# An index's fine level: a centroid and a cell it is filed in (several rows once spilled).
FINE_SCHEMA = "cluster_id int, cell int, centroid array<float>"
# A query's copy for one block of routing cells: the cells of its m nearest that lie in the block.
ROUTED_SCHEMA = "qid string, block int, probe array<int>, vector array<float>"
# Up to n centroids of one block for a query (the blocks' answers are merged by score).
CELL_HITS_SCHEMA = "qid string, cluster_id int, score float"


def make_train_fn(shares: dict[int, int], offsets: dict[int, int], *, niter: int, seed: int,
                  index_cells: int = 1) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """mapInPandas fn over sample rows (cell, vector) grouped by cell and sorted by id within it
    (etl/gpu.py `grouped`): k-means with shares[cell] centres on each cell's rows, numbered from
    offsets[cell] -> TRAINED_SCHEMA level-1 rows. One task holds one cell's sample, never all of it.

    `index_cells` > 1 (flat training, one cell): the routing level is also built here, a k-means
    of the K centroids into that many cells, each centroid filed under its nearest cell."""
    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from udfs.grouping import by_group

        for (cell,), rows in by_group(batches, ["cell"]):
            cell, k = int(cell), shares.get(int(cell), 0)
            if k == 0:
                continue
            x = normalise(as_matrix(rows["vector"]))
            c = (_flat_kmeans(x, k, niter, seed + 1 + cell, gpu=faiss_on_gpu()) if k > 1
                 else normalise(x.mean(axis=0, keepdims=True)))
            cells = np.full(len(c), cell, dtype=np.int32)
            if index_cells > 1:
                centres = _flat_kmeans(c, min(index_cells, len(c)), niter, seed, gpu=False)
                cells = nearest_centroids(c, centres, 1, gpu=False)[0][:, 0].astype(np.int32)
                yield pd.DataFrame({"level": 0, "cluster_id": np.arange(len(centres), dtype=np.int32),
                                    "cell": np.arange(len(centres), dtype=np.int32), "centroid": list(centres)})
            yield pd.DataFrame({"level": 1, "cluster_id": offsets[cell] + np.arange(len(c), dtype=np.int32),
                                "cell": cells, "centroid": list(c)})
    return run


def cell_blocks(cells: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each routing cell's block: about sqrt(C) blocks of neighbouring cells (a k-means of the C
    cell centres), so a query's nearest cells fall in few blocks. Blocks only group the work:
    a query is scored against its own probe cells whichever blocks hold them."""
    n_blocks = math.isqrt(len(cells))
    if n_blocks <= 1:
        return np.zeros(len(cells), dtype=np.int32)
    centres = _flat_kmeans(normalise(as_matrix(cells)), n_blocks, 20, seed, gpu=False)
    return nearest_centroids(cells, centres, 1, gpu=False)[0][:, 0].astype(np.int32)


def make_spill_fn(cells: np.ndarray, s: int) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """mapInPandas fn: fine centroids (cluster_id, cell, centroid) -> each filed under its own cell
    and its nearest other cells, s cells in all (`cells`: the routing centres). A query that probes
    its m nearest cells then finds a centroid lying near a cell boundary from either side: on the
    structureless vectors of bench/scale.py, m = 8 with s = 3 reaches the probe recall of m = 24
    with s = 1 (0.997 against 0.998, simulated) at 5.3 query copies instead of 8.4. Spilling copies
    centroids (K rows), which is cheap next to copying queries (N rows)."""
    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        index = centroid_index(cells, gpu=False)  # a CPU step (spill, route)
        for pdf in batches:
            if pdf.empty:
                continue
            near, _ = nearest_centroids(normalise(as_matrix(pdf["centroid"])), index, s)
            filed = np.concatenate([pdf["cell"].to_numpy().astype(np.int64)[:, None], near], axis=1)
            repeat = np.zeros(filed.shape, dtype=bool)
            for j in range(1, filed.shape[1]):
                repeat[:, j] = (filed[:, :j] == filed[:, j:j + 1]).any(axis=1)
            keep = ~repeat & (np.cumsum(~repeat, axis=1) <= s)
            rows, cols = np.nonzero(keep)
            yield pd.DataFrame({"cluster_id": pdf["cluster_id"].to_numpy()[rows],
                                "cell": filed[rows, cols].astype(np.int32), "centroid": pdf["centroid"].to_numpy()[rows]})
    return run


def make_route_fn(cells: np.ndarray, blocks: np.ndarray, m: int, *, id_col: str = "id",
                  vector_col: str = "vector") -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """mapInArrow fn: rows (id_col, vector_col) -> ROUTED_SCHEMA: a query's m nearest routing cells
    (`cells`: about sqrt(K) centres), one row per block they fall in (`blocks[cell]`), carrying
    its probe cells in that block (the others -1). A query travels once per block, not once per
    cell. Arrow, not pandas: this step emits about N x copies vectors."""
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        index = centroid_index(cells, gpu=False)  # a CPU step (spill, route)
        for batch in batches:
            if batch.num_rows == 0:
                continue
            x = arrow_matrix(batch.column(vector_col))
            probe, _ = nearest_centroids(normalise(x), index, m)
            probe = probe.astype(np.int32)
            by_block = blocks[probe]  # (n, m)
            rows, block, cells_of = [], [], []
            for b in np.unique(by_block):
                inside = by_block == b
                hit = np.flatnonzero(inside.any(axis=1))
                rows.append(hit)
                block.append(np.full(len(hit), b, dtype=np.int32))
                cells_of.append(np.where(inside[hit], probe[hit], -1))  # -1: a probe cell of another block
            rows = np.concatenate(rows)
            yield pa.RecordBatch.from_arrays(
                [batch.column(id_col).take(pa.array(rows)), pa.array(np.concatenate(block)),
                 arrow_vectors(np.concatenate(cells_of).astype(np.int32)), arrow_vectors(x[rows])],
                names=["qid", "block", "probe", "vector"])
    return run


def make_cell_search_fn(n: int) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """mapInPandas fn over rows (block, salt, side, cluster_id, cell, qid, probe, vector) grouped by
    (block, salt) and sorted by side: the fine centroids of the block's cells (side 0, each with
    its cell), then one salt's share of the queries routed to the block (side 1, each with its
    probe cells there) -> CELL_HITS_SCHEMA, each query's n best centroids among its probe cells'.
    A task holds one block (about sqrt(C) cells of about sqrt(K) centroids each) and one salt of
    its queries; a query's answer does not depend on which other queries share the task."""
    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from udfs.grouping import by_group

        for _, rows in by_group(batches, ["block", "salt"]):
            side = rows["side"].to_numpy()
            cents, queries = rows[side == 0], rows[side == 1]
            if cents.empty or queries.empty:
                continue
            cluster_ids = cents["cluster_id"].to_numpy().astype(np.int32)
            cent_cells = cents["cell"].to_numpy().astype(np.int32)
            vectors = as_matrix(cents["vector"])
            x = normalise(as_matrix(queries["vector"]))
            probe = np.stack(queries["probe"].to_numpy())
            found = []
            for cell in np.unique(cent_cells):
                qi = np.flatnonzero((probe == cell).any(axis=1))
                if len(qi) == 0:
                    continue
                own = cent_cells == cell
                ids, scores = nearest_centroids(x[qi], vectors[own], n, gpu=False)
                found.append((np.repeat(qi, ids.shape[1]), cluster_ids[own][ids].ravel(), scores.ravel()))
            if not found:
                continue
            qi, cid, score = (np.concatenate(parts) for parts in zip(*found))
            # A spilled centroid sits in several cells: a query probing two of them scores it twice.
            _, once = np.unique(qi.astype(np.int64) * (int(cid.max()) + 1) + cid, return_index=True)
            qi, cid, score = qi[once], cid[once], score[once]
            order = np.lexsort((cid, -score, qi))  # per query: best first, ties to the smaller id
            qi, cid, score = qi[order], cid[order], score[order]
            first = np.flatnonzero(np.r_[True, qi[1:] != qi[:-1]])
            keep = np.arange(len(qi)) - np.repeat(first, np.diff(np.r_[first, len(qi)])) < n
            yield pd.DataFrame({"qid": queries["qid"].to_numpy()[qi[keep]], "cluster_id": cid[keep],
                                "score": score[keep].astype(np.float32)})
    return run


def make_mean_fn() -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """mapInPandas fn over rows (cluster_id, vector) grouped by cluster_id (sorted by id within
    it, so the sum's order is fixed) -> (cluster_id, centroid): a Lloyd update, the unit mean."""
    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from udfs.grouping import by_group

        for (cluster_id,), rows in by_group(batches, ["cluster_id"]):
            mean = normalise(as_matrix(rows["vector"]).astype(np.float64).mean(axis=0, keepdims=True))
            yield pd.DataFrame({"cluster_id": [int(cluster_id)], "centroid": [mean[0].astype(np.float32)]})
    return run
