"""k-means off the driver and the centroid index (etl/centroids.py), on a real local Spark."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from etl import centroids as km
from udfs.kmeans import as_matrix, normalise, train_kmeans


def planted(n: int, n_clusters: int, d: int = 16, noise: float = 0.12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = normalise(rng.standard_normal((n_clusters, d)).astype(np.float32))
    labels = rng.integers(0, n_clusters, n)
    return normalise(centres[labels] + noise * rng.standard_normal((n, d)).astype(np.float32))


def frame(spark, x: np.ndarray, prefix: str = "s"):
    pdf = pd.DataFrame({"id": [f"{prefix}{i:05d}" for i in range(len(x))], "vector": list(x)})
    return spark.createDataFrame(pdf, "id string, vector array<float>")


def inertia(x: np.ndarray, c: np.ndarray) -> float:
    """Spherical k-means objective: sum of squared distances to the nearest centroid."""
    return float((2 - 2 * (x @ c.T).max(axis=1)).sum())


def fine_of(trained: km.Trained) -> np.ndarray:
    return as_matrix(trained.fine.orderBy("cluster_id").toPandas()["centroid"])


@pytest.fixture(scope="module")
def data():
    return planted(6000, 120, seed=2)


def test_coarse_then_fine_inertia_within_two_percent_of_flat(spark, data):
    spec = km.KMeansSpec(k=120, sample_size=10**6, niter=20, seed=0, two_level_above_k=16, points_per_centroid=1000)
    trained = km.train(None, frame(spark, data), spec, id_col="id")
    assert trained.mode == "coarse-then-fine" and len(trained.cells) == 10
    fine = fine_of(trained)
    assert fine.shape == (120, 16) and np.allclose(np.linalg.norm(fine, axis=1), 1, atol=1e-5)
    assert sorted(trained.fine.toPandas()["cluster_id"]) == list(range(120))
    flat = train_kmeans(data, 120, niter=20, seed=0)
    assert inertia(data, fine) <= 1.02 * inertia(data, flat)
    # Deterministic: the same sample and centroids however the input is partitioned.
    again = km.train(None, frame(spark, data).repartition(5), spec, id_col="id")
    assert np.array_equal(fine_of(again), fine)


def test_flat_training_in_one_task_files_centroids_into_cells(spark, data):
    spec = km.KMeansSpec(k=120, sample_size=10**6, niter=10, index_above_k=64)
    trained = km.train(None, frame(spark, data), spec, id_col="id")
    assert trained.mode == "flat" and len(trained.cells) == 10  # isqrt(120)
    cells = trained.fine.toPandas()["cell"]
    assert set(cells) == set(range(10))
    # The sample is content-keyed: a smaller sample_size draws a subset of a larger one.
    small = km.train(None, frame(spark, data), km.KMeansSpec(k=4, sample_size=600, niter=2), id_col="id")
    assert 400 < small.sample_rows < 800


def test_index_is_exact_when_probing_every_cell_and_meets_the_recall_floor(spark, data):
    spec = km.KMeansSpec(k=120, sample_size=10**6, niter=10, two_level_above_k=16, points_per_centroid=1000)
    trained = km.train(None, frame(spark, data), spec, id_col="id")
    fine = fine_of(trained)
    queries = planted(800, 120, seed=2)[:800]
    exact = np.argmax(queries @ fine.T, axis=1)
    qdf = frame(spark, queries, "q")

    def nearest_ids(probe_cells: int, spill_cells: int = 1) -> np.ndarray:
        index = km.CentroidIndex(trained.fine, trained.cells, probe_cells, max_query_chunk=150,
                                 spill_cells=spill_cells)
        got = km.nearest(None, qdf, index, 3).toPandas()
        # Spilled centroids reach a query from several cells and blocks: still one row per centroid.
        assert not got.duplicated(["qid", "cluster_id"]).any() and (got.groupby("qid").size() == 3).all()
        got = got[got["rank"] == 1].sort_values("qid")
        assert len(got) == len(queries)
        return got["cluster_id"].to_numpy()

    assert np.array_equal(nearest_ids(len(trained.cells)), exact)
    assert np.array_equal(nearest_ids(len(trained.cells), spill_cells=3), exact)
    recall = float((nearest_ids(8) == exact).mean())
    assert recall >= 0.99, recall
    # Spilling lifts a small m: probing 2 of 10 cells with centroids filed in 3 finds more.
    alone, spilled = ((nearest_ids(2, s) == exact).mean() for s in (1, 3))
    assert spilled > alone and spilled >= 0.99, (alone, spilled)


def test_nearest_ranks_n_centroids_with_ties_to_the_smaller_id(spark):
    c = normalise(np.array([[1, 0], [1, 0], [0, 1], [-1, 0]], dtype=np.float32))
    q = normalise(np.array([[1, 0.1]], dtype=np.float32))
    got = km.nearest(None, frame(spark, q, "q"), km.exact_index(c), 3).orderBy("rank").toPandas()
    assert list(got["cluster_id"]) == [0, 1, 2] and list(got["rank"]) == [1, 2, 3]


def test_a_query_travels_once_per_block_with_its_probe_cells_there():
    from udfs.kmeans import cell_blocks, make_route_fn

    cells = normalise(np.array([[1, 0], [1, 0.2], [-1, 0], [-1, 0.2]], dtype=np.float32))
    blocks = cell_blocks(cells)  # 4 cells -> 2 blocks of neighbours
    assert blocks[0] == blocks[1] and blocks[2] == blocks[3] and blocks[0] != blocks[2]
    q = pa.RecordBatch.from_pydict({"id": ["a", "b"], "vector": [[1, 0.1], [-1, 0.1]]},
                                   schema=pa.schema([("id", pa.string()), ("vector", pa.list_(pa.float32()))]))
    out = pa.Table.from_batches(list(make_route_fn(cells, blocks, 3)(iter([q])))).to_pandas()
    assert np.allclose(np.stack(out["vector"]), [[1, 0.1] if q == "a" else [-1, 0.1] for q in out["qid"]])
    assert sorted(out["qid"]) == ["a", "a", "b", "b"]  # 3 cells in 2 blocks: two copies, not three
    probes = {}
    for qid, block, probe in zip(out["qid"], out["block"], out["probe"]):
        cells_here = [int(c) for c in probe if c >= 0]
        assert cells_here and all(blocks[c] == block for c in cells_here)
        probes.setdefault(qid, []).extend(cells_here)
    assert {k: sorted(v) for k, v in probes.items()} == {"a": [0, 1, 3], "b": [1, 2, 3]}


def test_a_centroid_is_filed_in_its_own_cell_and_its_nearest_others():
    from udfs.kmeans import make_spill_fn

    cells = normalise(np.array([[1, 0], [0.8, 0.6], [0, 1], [-1, 0]], dtype=np.float32))
    # Centroid 7 was filed under cell 2 in training, though cell 0 is now nearer.
    fine = pd.DataFrame({"cluster_id": [5, 7], "cell": [0, 2],
                         "centroid": [np.array([1, 0.1], np.float32), np.array([1, 0.05], np.float32)]})
    out = pd.concat(make_spill_fn(cells, 2)(iter([fine])))
    assert sorted(zip(out["cluster_id"], out["cell"])) == [(5, 0), (5, 1), (7, 0), (7, 2)]
    assert all(np.array_equal(c, fine.set_index("cluster_id").loc[i, "centroid"])
               for i, c in zip(out["cluster_id"], out["centroid"]))


def test_arrow_vectors_round_trip_and_ragged_or_null_vectors_are_refused():
    from udfs.kmeans import arrow_matrix, arrow_vectors

    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert np.array_equal(arrow_matrix(arrow_vectors(x)), x)
    assert np.array_equal(arrow_matrix(arrow_vectors(x).slice(1)), x[1:])  # offsets of a slice are honoured
    for bad in ([[1, 2], [3]], [[1, 2], None]):
        with pytest.raises(ValueError, match="non-null and of one length"):
            arrow_matrix(pa.array(bad, pa.list_(pa.float32())))
