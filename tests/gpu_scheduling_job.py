"""The job tests/test_gpu_scheduling.py runs in its own process (one SparkContext per process):
a Spark standalone `local-cluster` whose one worker has two fake GPUs, a GPU stage's model step
through etl/gpu.py beside a CPU step of the same stage; then the shapes that once killed the
SparkContext ("Multiple ResourceProfiles specified in the RDDs for this stage"): two model maps
in one Spark stage, and the centroid index (spilled, multi-cell) and coarse-then-fine k-means in
a GPU stage. Prints what each task saw as JSON.

usage: python gpu_scheduling_job.py DISCOVERY_SCRIPT
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

import pandas as pd
from pyspark.sql import SparkSession

from etl import centroids as km
from etl.config import load_config
from etl.context import StageContext, StageResult
from etl.gpu import map_in_pandas
from etl.session import cluster_settings
from etl.stage import Step, stage
from data_paths import PROJECT

MASTER = "local-cluster[1,4,1024]"  # one worker, 4 cores, two (fake) GPUs
MODEL_TASKS = 4
TASK_SECONDS = 4.0
SCHEMA = "kind string, partition int, addresses array<string>, cuda_index int, start double, end double"


def task_row(kind: str, started: str, wait_for: str | None = None):
    """A task that records what it holds and when it ran; `started`: a file it creates first;
    `wait_for`: a file it waits for (at most a minute) before its TASK_SECONDS, so that a loaded
    machine's slow worker start-up cannot make two jobs miss each other."""
    def fn(batches):
        from pyspark import TaskContext

        from realsyn_models.device import task_cuda_index, task_gpu_addresses

        for _ in batches:
            pass
        start = time.time()
        open(started, "a").close()
        deadline = start + 60
        while wait_for and not os.path.exists(wait_for) and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(TASK_SECONDS)
        yield pd.DataFrame([{"kind": kind, "partition": TaskContext.get().partitionId(),
                             "addresses": task_gpu_addresses(), "cuda_index": task_cuda_index(),
                             "start": start, "end": time.time()}])
    return fn


@stage(reads=(), writes=(), config=(), steps=(Step("model", "a fake model"), km.KMEANS_TRAIN))
def fake_model(ctx: StageContext) -> StageResult:
    return StageResult()


def main(script: str) -> None:
    cfg = load_config(str(PROJECT / "conf" / "local.yaml"), [
        f"spark.master={MASTER}", "spark.gpu.enabled=true", "spark.gpu.executor_amount=2",
        f"spark.gpu.discovery_script={script}"])
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = (SparkSession.builder.master(MASTER)
               .config("spark.executor.memory", "512m").config("spark.ui.enabled", "false")
               # The standalone worker offers the GPUs its own discovery script finds.
               .config("spark.worker.resource.gpu.amount", "2")
               .config("spark.worker.resource.gpu.discoveryScript", script))
    # The profile's executor GPU settings, as a cluster would get them (etl/session.py).
    for key, value in cluster_settings(cfg).items():
        builder = builder.config(key, value)
    spark = builder.config("spark.driver.memory", "1g").getOrCreate()
    ctx = StageContext(spark=spark, cfg=cfg, run_id="gpu-test", batch_id="b", stage=fake_model)
    src = spark.range(MODEL_TASKS).repartition(MODEL_TASKS)
    results: dict[str, list] = {}
    started = os.path.join(os.path.dirname(script), "model-task-started")
    cpu_started = os.path.join(os.path.dirname(script), "cpu-task-started")

    def model_job():
        results["model"] = map_in_pandas(ctx, src, task_row("model", started, wait_for=cpu_started), SCHEMA, step="model",
                                         with_device=True).collect()

    def cpu_job():
        # Submitted once model tasks hold the GPUs (two waves of TASK_SECONDS are left to overlap).
        deadline = time.time() + 120
        while not os.path.exists(started) and time.time() < deadline:
            time.sleep(0.1)
        # A step of the same GPU stage that names no GPU step: ordinary tasks.
        results["cpu"] = map_in_pandas(ctx, spark.range(4).repartition(4), task_row("cpu", cpu_started), SCHEMA,
                                       with_device=True).collect()

    threads = [threading.Thread(target=model_job), threading.Thread(target=cpu_job)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = [r.asDict() for k in ("model", "cpu") for r in results[k]]
    print("RESULT " + json.dumps({"tasks": rows, **one_spark_stage(ctx), **centroid_index(ctx)}))
    spark.stop()


def one_spark_stage(ctx: StageContext) -> dict:
    """Two maps of one model step, unioned and repartitioned: both sides feed one shuffle-map
    stage, which Spark runs only when they carry the same profile object."""
    def tag(name):
        def fn(batches):
            from realsyn_models.device import task_gpu_addresses

            for b in batches:
                yield b.assign(step=name, gpus=len(task_gpu_addresses()))
        return fn

    src = ctx.spark.range(8).repartition(4)
    a = map_in_pandas(ctx, src, tag("a"), "id long, step string, gpus int", step="model")
    b = map_in_pandas(ctx, src, tag("b"), "id long, step string, gpus int", step="model")
    rows = a.unionByName(b).repartition(3).collect()
    return {"union": sorted((r["step"], r["id"], r["gpus"]) for r in rows)}


def centroid_index(ctx: StageContext) -> dict:
    """An 8-cell centroid index (probe 2, spill 2) and a coarse-then-fine k-means (its profiled
    kmeans_train step next to the index's CPU steps) in the GPU stage."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cells, fine = x[:8], x[8:72]
    cell_of = np.argmax(fine @ cells.T, axis=1)
    fine_df = ctx.spark.createDataFrame(pd.DataFrame({
        "cluster_id": np.arange(len(fine), dtype=np.int32), "cell": cell_of.astype(np.int32),
        "centroid": list(fine)}), "cluster_id int, cell int, centroid array<float>")
    queries = ctx.spark.createDataFrame(pd.DataFrame({"id": [str(i) for i in range(len(x))], "vector": list(x)}),
                                        "id string, vector array<float>")
    hits = km.nearest(ctx, queries, km.CentroidIndex(fine_df, cells, probe_cells=2, spill_cells=2), 1).collect()
    trained = km.train(ctx, queries, km.KMeansSpec(k=16, sample_size=400, two_level_above_k=4, index_above_k=4,
                                                   refine_iters=1, probe_cells=2, spill_cells=2), id_col="id")
    exact = {str(i): int(c) for i, c in enumerate(np.argmax(x @ fine.T, axis=1))}
    return {"nearest": {r["qid"]: r["cluster_id"] for r in hits}, "exact": exact,
            "trained_k": trained.fine.count(), "trained_mode": trained.mode}


if __name__ == "__main__":
    main(sys.argv[1])
