"""The one GPU execution path: every model or GPU step goes through `map_in_pandas` (or
`map_in_arrow`, for steps that emit many vectors) here.

Spark 4 stage-level scheduling, per step (not per stage): a stage declares its model steps
(`@stage(steps=(Step("clip_image", ...),))`) and passes the step's name to `map_in_pandas`. When the
step holds a GPU and the profile enables GPUs, that map's tasks carry the session's one
task-resource profile (`gpu_profile`): `spark.gpu.task_amount` of a GPU (1.0: a whole card) and
`model_task_cpus` cores (by default the executor's cores per GPU, for the decode threads). Every
other map of the stage (routing, CPU FAISS search, Lloyd means, range search) and its joins and
writes run as ordinary tasks on every core. The udf takes its device from the task's GPU address,
mapped through CUDA_VISIBLE_DEVICES (realsyn_models/device.py: pick_device), never GPU 0 by
default. Executors must have been started with GPUs (`spark.executor.resource.gpu.amount` +
discovery script, set by etl/session.py); etl/check.py refuses settings under which GPU
scheduling cannot apply, before any Spark work.

There is no resource profile for `applyInPandas`, so grouped GPU work (the within-cluster top-k)
is a `mapInPandas` over rows pre-grouped by key (`grouped`): shuffled by key, sorted within each
partition, read back one group at a time by udfs/grouping.py.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import to_arrow_schema

from etl.config import GpuConfig
from etl.context import StageContext, StageResult
from etl.session import is_connect
from etl.tables import crash_point


def model_task_cpus(gpu: GpuConfig, executor_cores: int | None) -> int | None:
    """Cores a model task holds beside its GPU share: `spark.gpu.task_cpus` when set, else the same
    share of the executor's cores as of its GPUs (a whole GPU on a one-GPU executor: every core,
    which its decode threads use). None when the executor's cores are unknown (spark.task.cpus)."""
    if gpu.task_cpus:
        return gpu.task_cpus
    if not executor_cores:
        return None
    return max(1, int(executor_cores * gpu.task_amount / gpu.executor_amount))


# One profile per (session, request): Spark compares profiles by id, and a Spark stage whose
# RDDs carry two different profile objects is refused ("Multiple ResourceProfiles specified in the
# RDDs for this stage") and the SparkContext shut down. Built on first use, reused by every step.
_PROFILES: dict[tuple, object] = {}


def executor_cores(spark) -> int | None:
    value = spark.conf.get("spark.executor.cores", None)
    return int(value) if value else None


def _session_key(spark) -> str:
    return spark.session_id if is_connect(spark) else spark.sparkContext.applicationId


def model_task_request(gpu: GpuConfig, executor_cores: int | None) -> str:
    """What one model task holds, as `realsyn stages`, `runs.resources` and the check say it."""
    return f"GPU x{gpu.task_amount:g} + {model_task_cpus(gpu, executor_cores) or 'spark.task.cpus'} CPU"


def gpu_profile(spark, gpu: GpuConfig):
    """The task-resource profile of a model step (a GPU share and model_task_cpus cores), one per
    session and request."""
    from pyspark.resource import ResourceProfileBuilder, TaskResourceRequests

    cores = model_task_cpus(gpu, executor_cores(spark))
    key = (_session_key(spark), gpu.task_amount, cores)
    if key not in _PROFILES:
        task = TaskResourceRequests().resource("gpu", gpu.task_amount)
        if cores:
            task = task.cpus(cores)
        _PROFILES[key] = ResourceProfileBuilder().require(task).build
    return _PROFILES[key]


# The column `map_in_pandas(..., with_device=True)` adds: the device each row's task computed on.
DEVICE = "task_device"


def map_in_pandas(ctx: StageContext | None, df: DataFrame, fn: Callable, schema: str, *,
                  step: str | None = None, with_device: bool = False) -> DataFrame:
    """df.mapInPandas(fn, schema). `step`: the stage's declared step this map is (`@stage(steps=...)`);
    it runs as GPU tasks when that step holds a GPU and the profile enables GPUs. Without a step,
    and outside a stage, ordinary CPU tasks. with_device: each row also carries DEVICE, which the
    model stages count into `runs.notes` (`devices_used`): which GPU each step used."""
    if with_device:
        fn, schema = _labelled(fn), f"{schema}, {DEVICE} string"
    return _map(ctx, df.mapInPandas, fn, schema, step)


def map_in_arrow(ctx: StageContext | None, df: DataFrame, fn: Callable, schema: str, *,
                 step: str | None = None) -> DataFrame:
    """df.mapInArrow(fn, schema) on map_in_pandas' terms. For steps whose output carries a vector
    per row (the centroid index's query copies): pandas hands array<float> back to Arrow row by
    row through Python lists, Arrow takes the whole matrix as one buffer (udfs/kmeans.py:
    `arrow_vectors`)."""
    return _map(ctx, df.mapInArrow, fn, schema, step)


def _map(ctx: StageContext | None, method: Callable, fn: Callable, schema: str, step: str | None) -> DataFrame:
    if ctx is not None and ctx.stage is not None:
        fn = _worker_crash_point(fn, f"worker:{ctx.stage.name}")
    if ctx is not None and step is not None and ctx.gpu_step(step):
        return method(fn, schema, profile=gpu_profile(ctx.spark, ctx.cfg.spark.gpu))
    return method(fn, schema)


def _labelled(fn: Callable) -> Callable:
    def run(batches):
        from realsyn_models.device import task_device_label

        label = task_device_label()
        for out in fn(batches):
            yield out.assign(**{DEVICE: label})
    return run


def _worker_crash_point(fn: Callable, point: str) -> Callable:
    """Test hook (tests/test_kill_rerun.py): REALSYN_CRASH_AT=worker:<stage> kills the Python worker
    running the stage's udf, not the driver. Wrapped only when the hook is set: no cost otherwise."""
    if os.environ.get("REALSYN_CRASH_AT") != point:
        return fn

    def run(batches):
        crash_point(point)
        yield from fn(batches)
    return run


def devices_used(rows) -> str:
    """`runs.notes` text from (device, count) pairs: "cuda:0 (Spark GPU 0): 512 rows; cuda:1 (Spark GPU 1): 498 rows"."""
    counts: dict[str, int] = {}
    for device, n in rows:
        counts[device] = counts.get(device, 0) + n
    return "; ".join(f"{d}: {n} rows" for d, n in sorted(counts.items()))


def grouped(df: DataFrame, keys: list[str], order: list[str]) -> DataFrame:
    """Rows of one key together and in `order` inside each partition: what udfs/grouping.py's
    `by_group` reads back as one group at a time."""
    return df.repartition(*keys).sortWithinPartitions(*keys, *order)


def not_done(ctx: StageContext, todo: DataFrame, table: str, id_col: str, model_id: str) -> DataFrame:
    if not ctx.exists(table):
        return todo
    done = ctx.read(table).where(F.col("model_id") == model_id).select(id_col)
    return todo.join(done, id_col, "left_anti")


def staging_folder(ctx: StageContext, table: str, model_id: str) -> str:
    """Where one table's output of one model waits between the model and its MERGE."""
    root = ctx.cfg.model_output.staging_dir
    if root is None:  # one machine: under the warehouse, absolute (workers run elsewhere)
        root = str(Path(ctx.cfg.spark.warehouse_dir).resolve() / "staging")
    digest = hashlib.sha256(model_id.encode()).hexdigest()[:12]
    return f"{root.rstrip('/')}/{ctx.cfg.catalog.database}/{table}/{digest}"


def infer_into(ctx: StageContext, result: StageResult, source: DataFrame | None, table: str, id_col: str,
               fn, schema: str, model_id: str, kind: str, *, step: str) -> None:
    """read what `table` lacks for this model -> run the model (`fn`, the GPU step `step`), each
    task staging its rows as one parquet shard -> MERGE every shard -> record.

    The shape every per-item model step shares (embeddings, captions): `schema` has id_col,
    model_id and an `error` column (the reason a row got no output); rows are keyed by (id_col,
    model_id), so a re-run or a new batch costs only the new items, and a new model id does
    everything again. Tasks hold at most `model_output.rows_per_task` rows. Shards left by a killed
    run are not computed again: they are MERGEd with this run's, then removed."""
    from udfs.staging import SUMMARY_SCHEMA, has_shards, make_staging_fn, remove_shards

    if source is None:
        result.notes[f"{kind}_skipped"] = "no input table yet"
        return
    started = time.perf_counter()
    folder = staging_folder(ctx, table, model_id)
    struct = ctx.spark.createDataFrame([], schema).schema
    # read
    todo = not_done(ctx, source, table, id_col, model_id)
    resumed = has_shards(folder)
    if resumed:
        todo = todo.join(_staged(ctx, folder, struct).select(id_col), id_col, "left_anti")
    n = todo.count()
    if n == 0 and not resumed:
        return
    # transform: one job computes and stages every row; only counts come back.
    tally = []
    tasks = max(1, math.ceil(n / ctx.cfg.model_output.rows_per_task))
    if n:
        stage_fn = make_staging_fn(_labelled(fn), folder, to_arrow_schema(struct), id_col, DEVICE)
        tally = (map_in_pandas(ctx, todo.repartition(tasks), stage_fn, SUMMARY_SCHEMA, step=step)
                 .groupBy("error", "task_device").agg(F.sum("rows").alias("count")).collect())
    # write: this run's shards and any a killed run left
    staged = _staged(ctx, folder, struct).dropDuplicates([id_col, "model_id"])
    written = ctx.merge_new(staged.withColumn("batch_id", F.lit(ctx.batch_id)), table, [id_col, "model_id"])
    remove_shards(folder)
    # record
    counts: dict[str | None, int] = {}
    for row in tally:
        counts[row["error"]] = counts.get(row["error"], 0) + row["count"]
    result.rows_in += sum(counts.values())
    result.rows_out += written
    result.add_drops({f"{kind}_{error}": n for error, n in counts.items() if error})
    result.metrics[f"{kind}_rows"] = float(written)
    result.metrics[f"{kind}_tasks"] = float(tasks if n else 0)
    result.metrics[f"{kind}_wall_s"] = time.perf_counter() - started
    if resumed:
        result.notes[f"{kind}_resumed"] = "merged shards a killed run had staged; their rows were not computed again"
    if tally:
        result.notes[f"{kind}_devices"] = devices_used((r["task_device"], r["count"]) for r in tally)


def _staged(ctx: StageContext, folder: str, struct) -> DataFrame:
    return ctx.spark.read.schema(struct).parquet(folder)
