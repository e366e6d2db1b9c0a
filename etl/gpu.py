"""mapInPandas for model stages: one GPU per task on GPU clusters, plain tasks elsewhere.

Spark 4 stage-level scheduling: the model stage's tasks carry a task-resource profile asking for
`spark.gpu.task_amount` of a GPU (1.0: a whole card), so Spark runs only as many of them per
executor as it has GPUs, while CPU stages of the same job keep using every core. Executors must
have been started with GPUs (`spark.executor.resource.gpu.amount` + discovery script, set from
the same config by etl/session.py).
"""
from __future__ import annotations

from collections.abc import Callable

from pyspark.sql import DataFrame

from etl.config import GpuConfig
from etl.context import StageContext


def gpu_profile(gpu: GpuConfig):
    """The task-resource profile for one GPU-stage task (GPU share, optionally CPU cores)."""
    from pyspark.resource import ResourceProfileBuilder, TaskResourceRequests

    task = TaskResourceRequests().resource("gpu", gpu.task_amount)
    if gpu.task_cpus:
        task = task.cpus(gpu.task_cpus)
    return ResourceProfileBuilder().require(task).build


def map_in_pandas(ctx: StageContext, df: DataFrame, fn: Callable, schema: str, gpu: bool = True) -> DataFrame:
    """df.mapInPandas(fn, schema), with the GPU profile when this stage wants a GPU and has one."""
    if gpu and ctx.cfg.spark.gpu.enabled:
        return df.mapInPandas(fn, schema, profile=gpu_profile(ctx.cfg.spark.gpu))
    return df.mapInPandas(fn, schema)
