"""The job tests/test_gpu_scheduling.py runs in its own process (one SparkContext per process):
a Spark standalone `local-cluster` whose one worker has two fake GPUs, a GPU stage's model step
through etl/gpu.py beside a CPU job. Prints what each task saw as JSON.

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

from etl.config import load_config
from etl.context import StageContext, StageResult
from etl.gpu import map_in_pandas
from etl.session import cluster_settings
from etl.stage import GPU, stage
from data_paths import PROJECT

MASTER = "local-cluster[1,4,1024]"  # one worker, 4 cores, two (fake) GPUs
MODEL_TASKS = 4
TASK_SECONDS = 4.0
SCHEMA = "kind string, partition int, addresses array<string>, cuda_index int, start double, end double"


def task_row(kind: str, started: str | None = None):
    """A task that records what it holds and when it ran; `started`: a file it creates first."""
    def fn(batches):
        from pyspark import TaskContext

        from realsyn_models.device import task_cuda_index, task_gpu_addresses

        for _ in batches:
            pass
        start = time.time()
        if started:
            open(started, "a").close()
        time.sleep(TASK_SECONDS)
        yield pd.DataFrame([{"kind": kind, "partition": TaskContext.get().partitionId(),
                             "addresses": task_gpu_addresses(), "cuda_index": task_cuda_index(),
                             "start": start, "end": time.time()}])
    return fn


@stage(reads=(), writes=(), config=(), resources=GPU)
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

    def model_job():
        results["model"] = map_in_pandas(ctx, src, task_row("model", started), SCHEMA, with_device=True).collect()

    def cpu_job():
        # Submitted once model tasks hold the GPUs (two waves of TASK_SECONDS are left to overlap).
        deadline = time.time() + 120
        while not os.path.exists(started) and time.time() < deadline:
            time.sleep(0.1)
        results["cpu"] = map_in_pandas(None, spark.range(4).repartition(4), task_row("cpu"), SCHEMA,
                                       with_device=True).collect()

    threads = [threading.Thread(target=model_job), threading.Thread(target=cpu_job)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = [r.asDict() for k in ("model", "cpu") for r in results[k]]
    print("RESULT " + json.dumps(rows))
    spark.stop()


if __name__ == "__main__":
    main(sys.argv[1])
