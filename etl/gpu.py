"""The one GPU execution path: every model or GPU step goes through `map_in_pandas` here.

Spark 4 stage-level scheduling: when the stage declares a GPU (`Resources(gpus=...)` in its
`@stage`) and the profile enables GPUs, the step's tasks carry a task-resource profile asking for
`spark.gpu.task_amount` of a GPU (1.0: a whole card) and `spark.gpu.task_cpus` cores, so Spark runs
only as many of them per executor as it has GPUs while CPU stages of the same job keep every core.
The udf then takes its device from the task's GPU address, mapped through CUDA_VISIBLE_DEVICES
(realsyn_models/device.py: pick_device), never GPU 0 by default. Executors must have been started
with GPUs (`spark.executor.resource.gpu.amount` + discovery script, set by etl/session.py).

There is no resource profile for `applyInPandas`, so grouped GPU work (the within-cluster top-k)
is a `mapInPandas` over rows pre-grouped by key (`grouped`): shuffled by key, sorted within each
partition, read back one group at a time by udfs/grouping.py.
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


def map_in_pandas(ctx: StageContext | None, df: DataFrame, fn: Callable, schema: str) -> DataFrame:
    """df.mapInPandas(fn, schema), as GPU tasks when the stage declares a GPU and GPUs are enabled
    (CPU tasks otherwise, and outside a stage)."""
    if ctx is not None and ctx.gpu:
        return df.mapInPandas(fn, schema, profile=gpu_profile(ctx.cfg.spark.gpu))
    return df.mapInPandas(fn, schema)


def grouped(df: DataFrame, keys: list[str], order: list[str]) -> DataFrame:
    """Rows of one key together and in `order` inside each partition: what udfs/grouping.py's
    `by_group` reads back as one group at a time."""
    return df.repartition(*keys).sortWithinPartitions(*keys, *order)
