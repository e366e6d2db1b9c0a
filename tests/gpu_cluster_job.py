"""The job tests/test_gpu_cluster_pipeline.py runs in its own process (a process has one SparkContext
at a time, and the suite's shared session is a local[2] one): the whole pipeline through the real
runner (`etl.runner.run_stages` on a session from `etl.session.build_spark`) under the spec's
`--set` items (the simulated GPU cluster's), in the database they name.

Beside the pipeline it records, for every map that goes through etl/gpu.py (`map_in_pandas` /
`map_in_arrow`: the model steps, and the CPU steps of the centroid index, the Lloyd means, the range
search...), what each task held: Spark's GPU addresses and cores (`TaskContext`), the rows and chunk
numbers it read, one JSON file per task in the spec's `records` folder. It wraps the udf, not the
plan: the resource profile a map gets is etl/gpu.py's own. After the run it asks the driver's status
store which resource profile each of those tasks' Spark stages ran under (`stage_profiles`).

After the run it pickles every table of the run's database (pandas) into the spec's `out` folder,
and prints one `RESULT {json}` line: its wall times, an error (Spark's reason line and the
traceback) if it failed, its executors, the Spark settings that matter here and the stage profiles.

usage: python gpu_cluster_job.py SPEC.json
SPEC: {"name", "sets": [--set items], "records": folder, "out": folder}
"""
from __future__ import annotations

import json
import os
import pickle
import sys
import time
import traceback
from pathlib import Path

from data_paths import PROJECT

SETTINGS = ("spark.master", "spark.executor.cores", "spark.task.resource.gpu.amount",
            "spark.executor.resource.gpu.amount", "spark.worker.resource.gpu.amount",
            "spark.worker.resource.gpu.discoveryScript", "spark.executor.resource.gpu.discoveryScript",
            "spark.sql.shuffle.partitions", "spark.sql.adaptive.enabled")


RECORDS = {"folder": None}


def record_tasks(folder: str) -> None:
    """Wrap every udf etl/gpu.py maps (`_map`, the one place both map_in_pandas and map_in_arrow
    go through) with a recorder of the task's resources. The profile decision stays etl/gpu.py's."""
    import etl.gpu

    RECORDS["folder"] = folder
    original = getattr(etl.gpu, "_map", None)
    if original is None:
        raise RuntimeError("etl/gpu.py has no _map any more: update tests/gpu_cluster_job.py's recorder")

    def _map(ctx, method, fn, schema, step):
        stage = ctx.stage.name if ctx is not None and ctx.stage is not None else None
        gpu_step = bool(ctx is not None and step is not None and ctx.gpu_step(step))
        what = {"stage": stage, "step": step, "gpu_step": gpu_step,
                "fn": getattr(fn, "__qualname__", repr(fn)).split(".<locals>")[0]}
        return original(ctx, method, _recorded(fn, folder, what), schema, step)

    etl.gpu._map = _map


def _recorded(fn, folder: str, what: dict):
    def run(batches):
        import uuid

        from pyspark import TaskContext

        tc = TaskContext.get()
        gpu = tc.resources().get("gpu")
        rec = {**what, "stage_id": tc.stageId(), "partition": tc.partitionId(), "attempt": tc.attemptNumber(),
               "addresses": list(gpu.addresses) if gpu is not None else [], "cpus": tc.cpus(),
               "pid": os.getpid(), "start": time.time(), "end": None, "rows": 0, "chunks": {}}
        path = Path(folder) / f"{uuid.uuid4().hex}.json"
        path.write_text(json.dumps(rec))

        def seen(batches):
            # Rows, and the largest chunk number of grouped rows (heavy clusters cut in chunks).
            for b in batches:
                rec["rows"] += b.num_rows if hasattr(b, "num_rows") else len(b)
                for col in ("qchunk", "cchunk"):
                    if hasattr(b, "iloc") and col in b.columns and len(b):  # pandas batches
                        rec["chunks"][col] = max(rec["chunks"].get(col, 0), int(b[col].max()))
                yield b

        yield from fn(seen(batches))
        rec["end"] = time.time()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, path)
    return run


def stage_profiles(sc, folder: Path) -> dict[str, dict]:
    """Spark stage id -> the resource profile its tasks ran under (id, GPU share and cores per
    task), from the driver's status store, for the stages the recorded tasks ran in."""
    jsc = sc._jsc.sc()
    store, manager = jsc.statusStore(), jsc.resourceProfileManager()
    ids = {json.loads(p.read_text())["stage_id"] for p in folder.glob("*.json")}
    out = {}
    for sid in sorted(ids):
        profile = store.lastStageAttempt(sid).resourceProfileId()
        rp = manager.resourceProfileFromId(profile)
        gpu = rp.taskResources().get("gpu")
        cpus = rp.getTaskCpus()
        out[str(sid)] = {"profile": profile, "gpu": gpu.get().amount() if gpu.isDefined() else 0.0,
                         "cpus": cpus.get() if cpus.isDefined() else int(sc.getConf().get("spark.task.cpus", "1"))}
    return out


def dump_tables(spark, database: str, out: Path) -> list[str]:
    # SHOW TABLES, not spark.catalog.listTables: its encoder fails under the interpreted
    # (NO_CODEGEN) expression mode the test runs in
    names = sorted(r["tableName"] for r in spark.sql(f"SHOW TABLES IN {database}").collect())
    tables = {name: spark.table(f"{database}.{name}").toPandas() for name in names}
    with open(out / f"{database}.pkl", "wb") as f:
        pickle.dump(tables, f)
    return names


def run_one(run: dict, out: Path) -> dict:
    from etl.config import load_config
    from etl.runner import reason_line, run_stages, spark_alive
    from etl.session import build_spark

    cfg = load_config(PROJECT / "conf" / "local.yaml", run["sets"])
    t0 = time.perf_counter()
    spark = build_spark(cfg, progress=False)
    info: dict = {"name": run["name"], "database": cfg.catalog.database, "session_s": time.perf_counter() - t0}
    sc = spark.sparkContext
    info["settings"] = {k: sc.getConf().get(k, None) for k in SETTINGS}
    info["default_parallelism"] = sc.defaultParallelism
    t1 = time.perf_counter()

    def on_stage(name):
        print(f"[{time.perf_counter() - t1:7.1f}s] {run['name']}: {name}", file=sys.stderr, flush=True)

    try:
        run_stages(spark, cfg, on_stage=on_stage)
    except Exception as e:  # reported to the test with Spark's reason; the tables so far still dumped
        info["error"] = reason_line(e)
        info["traceback"] = traceback.format_exc()[-6000:]
    info["pipeline_s"] = time.perf_counter() - t1
    if spark_alive(spark):
        try:
            info["stage_profiles"] = stage_profiles(sc, Path(RECORDS["folder"]))
        except Exception:  # reported by the test that reads them
            info["stage_profiles_error"] = traceback.format_exc()[-3000:]
    executors = sc._jsc.sc().getExecutorMemoryStatus().size()  # the driver is one of them
    info["executors"] = executors - 1 if cfg.spark.master.startswith("local-cluster") else 0
    if spark_alive(spark):
        t2 = time.perf_counter()
        info["tables"] = dump_tables(spark, cfg.catalog.database, out)
        info["dump_s"] = time.perf_counter() - t2
    spark.stop()
    info["wall_s"] = time.perf_counter() - t0
    return info


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    record_tasks(spec["records"])
    print("RESULT " + json.dumps(run_one(spec, Path(spec["out"]))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
