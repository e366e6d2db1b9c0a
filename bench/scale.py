"""The global steps at growing N: cluster + retrieve on synthetic clustered embeddings.

    .venv/bin/python bench/scale.py                         # N = 250k, 1M, 4M at d = 64, then 250k at d = 512
    .venv/bin/python bench/scale.py --sizes 250000 --dims 64 # one quick case

Per case the real stages run (etl/stages/cluster.py, retrieve.py: Spark local[2], Delta tables in
a temporary warehouse) on N sentence vectors and N/4 image vectors drawn around K = N/420 planted
centres (the paper's 0.84B sentences / 2M clusters), with K = N/420 centroids. Printed per case:
- wall of each stage, and of the input generation (not counted);
- peak RSS of the Python driver, the JVM (driver + executors in local mode; its heap is fixed by
  spark.driver.memory, so it says little about growth) and the largest Python worker, sampled
  every 0.2 s while the stages run;
- similarity operations of the retrieval (centroid routing + in-cluster candidates, from the run's
  metrics) against brute force (images x sentences), and their ratio;
- recall@3 against an exact search (Spark brute force) for 1,000 hash-sampled images;
- probe recall: how often the index's nearest centroid is the exact nearest one (same images);
- query copies: how many blocks of routing cells a sampled image is sent to (at most the probe
  cells, `--probe-cells`; each centroid is filed in `--spill-cells` cells).
The JSON goes to bench/results/scale.json. Cost is expected to grow about linearly in N (every
step is a bounded per-cell or per-cluster task); the driver holds only sqrt(K) routing centres.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table  # noqa: E402

SENTENCES_PER_CLUSTER = 420  # paper: 0.84B sentences into 2M clusters
SAMPLED_IMAGES = 1000
NOISE = 0.6
K_TOP = 3


class PeakRss:
    """Samples this process, the JVM and every Python worker under it until stopped."""

    def __init__(self):
        self.me = psutil.Process()
        self.peak = {"driver_py": 0, "jvm": 0, "worker_py": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak["driver_py"] = max(self.peak["driver_py"], self.me.memory_info().rss)
            for child in self.me.children(recursive=True):
                try:  # one per child: short-lived workers end between listing and reading
                    name = " ".join(child.cmdline()[:3])
                    rss = child.memory_info().rss
                except psutil.Error:
                    continue
                key = "jvm" if "java" in name else "worker_py" if "python" in name else None
                if key:
                    self.peak[key] = max(self.peak[key], rss)
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def make_embeddings(spark, table: str, id_col: str, prefix: str, n: int, centres_seed: int, k_true: int, d: int,
                    seed: int) -> None:
    """n unit vectors around k_true planted centres, generated inside Spark tasks (the driver
    never holds them), written as an embeddings table of model 'synthetic'."""
    def gen(batches):
        import pandas as pd

        centres = np.random.default_rng(centres_seed).standard_normal((k_true, d)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        for pdf in batches:
            ids = pdf["id"].to_numpy()
            rng = np.random.default_rng([seed, int(ids[0]) if len(ids) else 0])
            # Noise of norm ~NOISE around each unit centre: members of one planted cluster sit at
            # cosine ~0.75 to each other, distinct clusters near 0 (d >= 64).
            x = centres[rng.integers(0, k_true, len(ids))] + NOISE / math.sqrt(d) * rng.standard_normal(
                (len(ids), d)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            yield pd.DataFrame({id_col: [f"{prefix}{i:09d}" for i in ids], "model_id": "synthetic",
                                "vector": list(x.astype(np.float32)), "dim": d, "error": None, "batch_id": "b0"})
    schema = f"{id_col} string, model_id string, vector array<float>, dim int, error string, batch_id string"
    (spark.range(n, numPartitions=max(2, n // 100_000)).mapInPandas(gen, schema)
     .write.format("delta").mode("overwrite").saveAsTable(table))


def run_case(n: int, d: int, nprobe: int, probe_cells: int, spill_cells: int, two_level_above_k: int | None) -> dict:
    from pyspark.sql import functions as F

    from etl.config import validate
    from etl.context import StageContext
    from etl.embeddings import latest_index
    from etl.retrieval import brute_force_search
    from etl.runner import new_batch_id, run_stages
    from etl.session import build_spark

    k = max(2, n // SENTENCES_PER_CLUSTER)
    warehouse = tempfile.mkdtemp(prefix="realsyn-scale-")
    cfg = validate({
        "spark": {"master": "local[2]", "warehouse_dir": warehouse, "shuffle_partitions": 8, "log_level": "ERROR",
                  "conf": {"spark.driver.memory": "6g", "spark.ui.showConsoleProgress": "false"}},
        "catalog": {"database": "scale"},
        "cluster": {"k": k, "sample_size": min(n, 128 * k), "niter": 10, "index_probe_cells": probe_cells,
                    "index_spill_cells": spill_cells,
                    **({"two_level_above_k": two_level_above_k, "index_above_k": two_level_above_k}
                       if two_level_above_k else {})},
        "retrieve": {"k": K_TOP, "nprobe": nprobe, "refresh": False},
    }, source="bench/scale.py")
    spark = build_spark(cfg, progress=False, metastore=False)
    spark.sql("CREATE DATABASE IF NOT EXISTS scale")
    started = time.perf_counter()
    make_embeddings(spark, "scale.sentence_embeddings", "sentence_id", "s", n, 7, k, d, 1)
    make_embeddings(spark, "scale.image_embeddings", "image_id", "i", n // 4, 7, k, d, 2)
    gen_s = time.perf_counter() - started

    walls = {}
    with PeakRss() as rss:
        for stage in ("cluster", "retrieve"):
            t0 = time.perf_counter()
            results = run_stages(spark, cfg, [stage])
            walls[stage] = time.perf_counter() - t0
    metrics = results["retrieve"].metrics

    # Evaluation (outside the measured window): exact top-3 and exact nearest centroid for a sample.
    ctx = StageContext(spark=spark, cfg=cfg, run_id="bench", batch_id=new_batch_id())
    images = spark.table("scale.image_embeddings").where(
        F.xxhash64("image_id") % max(1, (n // 4) // SAMPLED_IMAGES) == 0).limit(SAMPLED_IMAGES).localCheckpoint()
    sentences = spark.table("scale.sentence_embeddings").select("sentence_id", "vector")
    exact = brute_force_search(images, sentences, K_TOP, query_id="image_id", corpus_id="sentence_id",
                               max_cluster_chunk=200_000, max_query_chunk=SAMPLED_IMAGES).toPandas()
    got = (spark.table("scale.retrievals").join(images.select("image_id"), "image_id", "left_semi")
           .select("image_id", "sentence_id").toPandas())
    want = exact.groupby("query_id")["corpus_id"].apply(set).to_dict()
    have = got.groupby("image_id")["sentence_id"].apply(set).to_dict()
    recall = sum(len(want[q] & have.get(q, set())) for q in want) / max(1, sum(len(v) for v in want.values()))
    _, _, index = latest_index(ctx)
    fine = np.stack(index.fine.orderBy("cluster_id").toPandas()["centroid"]).astype(np.float32)
    sample = images.toPandas()
    q = np.stack(sample["vector"]).astype(np.float32)
    from etl.centroids import nearest

    probed = nearest(None, images.select("image_id", "vector"), index, 1, id_col="image_id").toPandas()
    probed = dict(zip(probed["qid"], probed["cluster_id"]))
    exact_c = np.argmax(q @ fine.T, axis=1)
    probe_recall = float(np.mean([probed[i] == c for i, c in zip(sample["image_id"], exact_c)]))
    # How many copies of a query the index shuffles: one per block its probe cells fall in.
    from udfs.kmeans import cell_blocks, nearest_centroids, normalise

    blocks = cell_blocks(index.cells)
    probe = nearest_centroids(normalise(q), index.cells, min(probe_cells, len(index.cells)))[0]
    copies = float(np.mean([len(set(blocks[row])) for row in probe]))
    spark.stop()
    shutil.rmtree(warehouse, ignore_errors=True)

    images_n = n // 4
    ops = metrics.get("similarity_ops", float("nan"))
    return {
        "N": n, "d": d, "K": k, "images": images_n, "nprobe": nprobe, "probe_cells": probe_cells,
        "spill_cells": spill_cells,
        "mode": "coarse-then-fine" if k > (two_level_above_k or 4_096) else "flat",
        "index_cells": int(len(index.cells)), "index_blocks": int(blocks.max()) + 1,
        "query_copies": round(copies, 2), "gen_s": round(gen_s, 1),
        "cluster_s": round(walls["cluster"], 1), "retrieve_s": round(walls["retrieve"], 1),
        "wall_s": round(walls["cluster"] + walls["retrieve"], 1),
        "driver_py_mib": rss.peak["driver_py"] >> 20, "jvm_mib": rss.peak["jvm"] >> 20,
        "worker_py_mib": rss.peak["worker_py"] >> 20,
        "similarity_ops": ops, "brute_force_ops": images_n * n, "ops_reduction": images_n * n / ops if ops else None,
        f"recall@{K_TOP}": round(recall, 4), "probe_recall": round(probe_recall, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="250000,1000000,4000000")
    ap.add_argument("--dims", default="64", help="dimensions for every size")
    ap.add_argument("--wide", default="512:250000", help="d:N extra case ('none' to skip)")
    ap.add_argument("--nprobe", type=int, default=8,
                    help="clusters each image searches (the stage's default is the paper's 1)")
    ap.add_argument("--probe-cells", type=int, default=8, help="cluster.index_probe_cells (its default)")
    ap.add_argument("--spill-cells", type=int, default=4, help="cluster.index_spill_cells (its default)")
    ap.add_argument("--two-level-above-k", type=int, default=None,
                    help="cluster.two_level_above_k and index_above_k (default: the config's 4,096). 512 "
                         "puts every size on the path the paper's K takes: coarse-then-fine + the index")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scale.json")
    args = ap.parse_args()
    cases = [(int(n), int(d)) for d in args.dims.split(",") for n in args.sizes.split(",")]
    if args.wide != "none":
        d, n = args.wide.split(":")
        cases.append((int(n), int(d)))
    rows = []
    for n, d in cases:
        rows.append(run_case(n, d, args.nprobe, args.probe_cells, args.spill_cells, args.two_level_above_k))
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    base = rows[0]
    growth = [{"from_N": a["N"], "to_N": b["N"], "d": b["d"], "wall_x": round(b["wall_s"] / a["wall_s"], 2),
               "driver_py_x": round(b["driver_py_mib"] / max(1, a["driver_py_mib"]), 2),
               "worker_py_x": round(b["worker_py_mib"] / max(1, a["worker_py_mib"]), 2)}
              for a, b in zip(rows, rows[1:]) if a["d"] == b["d"]]
    args.out.write_text(json.dumps({"cases": rows, "growth": growth, "base": base["N"]}, indent=2))
    print()
    cols = ["N", "d", "K", "mode", "index_cells", "index_blocks", "probe_cells", "spill_cells", "query_copies",
            "cluster_s", "retrieve_s", "driver_py_mib", "jvm_mib", "worker_py_mib", "ops_reduction",
            f"recall@{K_TOP}", "probe_recall"]
    print_table(cols, [[f"{r[c]:.0f}" if c == "ops_reduction" and r[c] else r[c] for c in cols] for r in rows])
    print()
    print_table(["from_N", "to_N", "d", "wall_x", "driver_py_x", "worker_py_x"],
                [[g[c] for c in ["from_N", "to_N", "d", "wall_x", "driver_py_x", "worker_py_x"]] for g in growth])
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
