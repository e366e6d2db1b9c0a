"""The runner on a real local Spark + Delta: the registry drives it, inputs are checked before any
work, `runs` is a typed record, MERGE counts are the run's own, a closing summary repeats warnings."""
from __future__ import annotations

import logging

import pytest
from pyspark.sql import functions as F

from etl.context import StageContext, StageResult
from etl.runner import run_stages
from etl.stage import MissingInputs, Registry, Stage, stage

pytestmark = pytest.mark.spark


@stage(reads=(), writes=("numbers",), config=("retrieve.k",))
def numbers(ctx: StageContext) -> StageResult:
    rows = ctx.spark.range(ctx.cfg.retrieve.k).withColumnRenamed("id", "n")
    written = ctx.merge_new(rows, "numbers", ["n"])
    result = StageResult(rows_in=ctx.cfg.retrieve.k, rows_out=written, models={"counter": "builtin"})
    result.metrics["written"] = float(written)
    result.watermarks["numbers"] = "7"
    result.warn("numbers are made up")
    return result


@stage(reads=("numbers",), writes=("squares",), config=())
def squares(ctx: StageContext) -> StageResult:
    seen = ctx.last_watermark("numbers")
    rows = ctx.read("numbers").select("n", (F.col("n") * F.col("n")).alias("sq"))
    return StageResult(rows_out=ctx.merge_new(rows, "squares", ["n"]), notes={"previous_watermark": str(seen)})


def test_a_stage_added_to_the_registry_runs_without_touching_the_runner(stage_ctx, caplog):
    ctx = stage_ctx(retrieve={"k": 4})
    reg = Registry([numbers, squares])
    with caplog.at_level(logging.INFO, logger="realsyn"):
        results = run_stages(ctx.spark, ctx.cfg, registry=reg)
    assert list(results) == ["numbers", "squares"] and results["numbers"].rows_out == 4
    assert ctx.read("squares").count() == 4

    run = ctx.read("runs").where("stage = 'numbers'").first()
    assert run["metrics"] == {"written": 4.0} and run["watermarks"] == {"numbers": "7"}
    assert run["models"] == {"counter": "builtin"} and run["warnings"] == ["numbers are made up"]
    assert run["resources"] == "CPU tasks" and run["stage_config_hash"] == numbers.config_hash(
        ctx.cfg.model_dump(mode="json"))
    # The closing summary lists every stage and repeats the warning.
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("run summary")]
    assert summary and "numbers" in summary[0] and "WARNING [numbers] numbers are made up" in summary[0]

    # The next run of a stage reads its last watermark from runs (not a table property).
    again = run_stages(ctx.spark, ctx.cfg, registry=reg)
    assert again["squares"].notes["previous_watermark"] == "None"  # squares recorded none
    assert again["numbers"].rows_out == 0


def test_missing_inputs_are_refused_before_any_work(stage_ctx):
    ctx = stage_ctx()
    with pytest.raises(MissingInputs, match="squares reads numbers, which does not exist yet"):
        run_stages(ctx.spark, ctx.cfg, registry=Registry([numbers, squares]), stages=["squares"])
    assert not ctx.exists("runs")  # nothing ran, nothing was recorded
    with pytest.raises(MissingInputs, match=r"retrieve reads image_embeddings.*\(run embed first\)"):
        run_stages(ctx.spark, ctx.cfg, stages=["retrieve"])


def test_merge_counts_are_the_merges_own(stage_ctx):
    # The count comes back with the MERGE (its result frame), never from "the latest history
    # entry", which another writer's commit can be by the time it is read.
    ctx = stage_ctx()
    ctx.create_if_missing("t", "k long, v string")
    source = ctx.spark.range(10).withColumnRenamed("id", "k").withColumn("v", F.lit("a"))
    inserted = ctx.merge_new(source, "t", ["k"])
    ctx.spark.createDataFrame([(100, "x"), (101, "y"), (102, "z")], "k long, v string") \
        .write.format("delta").mode("append").saveAsTable(ctx.table("t"))
    assert inserted == 10
    history = ctx.spark.sql(f"DESCRIBE HISTORY {ctx.table('t')}").orderBy("version").collect()
    merge = [h for h in history if h["operation"] == "MERGE"][-1]
    assert int(merge["operationMetrics"]["numTargetRowsInserted"]) == inserted
    assert history[-1]["operation"] == "WRITE"  # the latest commit is the other writer's
    assert ctx.merge_new(source, "t", ["k"]) == 0  # and a no-op MERGE counts zero


def test_each_commit_carries_its_run_id(stage_ctx):
    ctx = stage_ctx(retrieve={"k": 2})
    run_stages(ctx.spark, ctx.cfg, registry=Registry([numbers]))
    run_id = ctx.read("runs").first()["run_id"]
    history = ctx.spark.sql(f"DESCRIBE HISTORY {ctx.table('numbers')}").collect()
    assert run_id in {h["userMetadata"] for h in history}
    assert ctx.spark.conf.get("spark.databricks.delta.commitInfo.userMetadata", None) in (None, "")


def test_a_failed_stage_is_recorded_and_stops_the_run(stage_ctx):
    @stage(reads=(), writes=("never",), config=())
    def broken(ctx: StageContext) -> StageResult:
        raise RuntimeError("boom")

    ctx = stage_ctx()
    with pytest.raises(Exception, match="stage broken failed"):
        run_stages(ctx.spark, ctx.cfg, registry=Registry([broken, numbers]))
    runs = {r["stage"]: r for r in ctx.read("runs").collect()}
    assert list(runs) == ["broken"] and runs["broken"]["status"] == "failed"
    assert "boom" in runs["broken"]["notes"]["error"]


def test_a_stage_declares_itself_once():
    assert isinstance(numbers, Stage) and numbers.name == "numbers" and numbers.steps == ()
    assert numbers.writes == ("numbers",) and numbers.config == ("retrieve.k",)


def test_stored_errors_are_one_short_line_without_paths_or_credentials():
    from etl.runner import ERROR_CHARS, stored_error

    e = FileNotFoundError("[PATH_NOT_FOUND] Path does not exist: file:/home/alice/project/docs.jsonl. "
                          "See https://bob:pw123@h.example/x?token=abc\n" + "Traceback line\n" * 200)
    text = stored_error(e, ["token"])
    assert text.startswith("FileNotFoundError: [PATH_NOT_FOUND] Path does not exist: .../docs.jsonl.")
    assert "alice" not in text and "pw123" not in text and "abc" not in text and "\n" not in text
    assert len(stored_error(RuntimeError("x" * 5000), [])) == ERROR_CHARS


def test_background_work_keeps_the_job_group_and_hands_back_its_result_or_error(spark):
    from etl.session import in_background, tag_jobs

    tag_jobs(spark, "run-bg", "realsyn bg")
    group = in_background(spark, lambda: (spark.sparkContext.getLocalProperty("spark.jobGroup.id"),
                                          spark.range(5).count()))
    assert group() == ("run-bg", 5)
    failed = in_background(spark, lambda: spark.sql("SELECT * FROM no_such_table_here").collect())
    with pytest.raises(Exception, match="no_such_table_here"):
        failed()


def test_an_error_in_a_python_worker_keeps_its_reason_line(spark):
    from etl.runner import stored_error

    def broken(batches):
        for _ in batches:
            raise ValueError("embedded null byte")
        yield from ()

    with pytest.raises(Exception) as caught:
        spark.range(1).mapInPandas(broken, "id long").collect()
    # Its first line alone is "PythonException:" (what `runs` used to keep): the worker's own line.
    assert stored_error(caught.value, []) == "PythonException from a Python worker: ValueError: embedded null byte"


STOPPED_JOB = """
import os, sys
os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
from pyspark.sql import SparkSession
from etl.config import load_config
from etl.context import StageResult
from etl.runner import SparkStopped, run_stages
from etl.stage import Registry, stage

@stage(reads=(), writes=(), config=())
def doomed(ctx):
    ctx.spark.sparkContext._jsc.sc().stop()  # the JVM side, as the DAG scheduler does when it gives up
    ctx.spark.range(3).count()
    return StageResult()

spark = SparkSession.builder.master("local[1]").config("spark.ui.enabled", "false").getOrCreate()
cfg = load_config(sys.argv[1], [])
try:
    run_stages(spark, cfg, registry=Registry([doomed]))
except SparkStopped as e:
    print("STOPPED", e.reason)
    print("MESSAGE", e)
"""


def test_a_stopped_spark_context_is_reported_with_sparks_reason(tmp_path):
    """Spark's own reason reaches the user and the lock (for the next run's `abandoned` row),
    never a secondary error from cleaning up on the dead session."""
    import os
    import subprocess
    import sys

    from data_paths import PROJECT

    from etl.lock import warehouse_lock

    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    done = subprocess.run([sys.executable, "-c", STOPPED_JOB, str(PROJECT / "conf" / "local.yaml")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith(("STOPPED", "MESSAGE")))
    assert "stopped SparkContext" in lines["STOPPED"], done.stderr[-2000:]
    assert "No active or default Spark session" not in done.stdout + done.stderr
    assert "records this run as abandoned" in lines["MESSAGE"]
    # What the CLI does with it: the lock keeps the holder and the reason for the next run.
    with warehouse_lock(tmp_path, "r1", "run") as held:
        held.mark_died(lines["STOPPED"])
    with warehouse_lock(tmp_path, "r2", "run") as held:
        assert held.abandoned.run_id == "r1" and held.abandoned.error == lines["STOPPED"]


def test_the_closing_summary_says_what_to_do_about_the_largest_drop_reasons():
    from etl.runner import closing_summary

    results = {"ingest": StageResult(rows_in=50, rows_out=8, drops={"path_outside_input": 40, "bad_json": 2}),
               "fetch": StageResult(rows_in=8, rows_out=8, drops={"fetch_timeout": 5, "fetch_http_error": 1})}
    said: list[str] = []
    listener = logging.Handler(logging.INFO)
    listener.emit = lambda record: said.append(record.getMessage())
    # On the logger itself (etl/logs.py stops its propagation), enabled at INFO: a library's
    # logging.config.dictConfig earlier in the session may have disabled every existing logger.
    logger = logging.getLogger("realsyn")
    level, disabled = logger.level, logger.disabled
    logger.setLevel(logging.INFO)
    logger.disabled = False
    logger.addHandler(listener)
    try:
        closing_summary(results, {"ingest": 1.0, "fetch": 2.0}, ["ingest", "fetch"])
    finally:
        logger.removeHandler(listener)
        logger.setLevel(level)
        logger.disabled = disabled
    lines = "\n".join(said).splitlines()
    hints = [line.strip() for line in lines if line.strip().startswith(("path_outside", "fetch_", "bad_json"))]
    # the three largest, largest first, each with the setting that changes it
    assert [h.split(":")[0] for h in hints] == ["path_outside_input (ingest, 40)", "fetch_timeout (fetch, 5)",
                                                "bad_json (ingest, 2)"]
    assert "ingest.allow_absolute_roots" in hints[0] and "fetch.read_timeout_s" in hints[1]


@stage(reads=(), writes=(), config=())
def unrecordable(ctx):
    # A real Delta refusal of the stage's own `runs` row: a CHECK constraint it violates.
    from etl import tables
    from etl.runner import RUNS_SCHEMA

    tables.create_if_missing(ctx.spark, ctx.table("runs"), RUNS_SCHEMA)
    ctx.spark.sql(f"ALTER TABLE {ctx.table('runs')} ADD CONSTRAINT no_record CHECK (stage <> 'unrecordable')")
    return StageResult(rows_out=1)


def test_a_run_whose_runs_row_cannot_be_written_is_recorded_abandoned_by_the_next(stage_ctx, tmp_path):
    from etl.lock import warehouse_lock
    from etl.runner import RunNotRecorded, record_abandoned

    ctx = stage_ctx()
    with warehouse_lock(tmp_path, "r1", "run") as held:
        held.set_stage("unrecordable")
        with pytest.raises(RunNotRecorded) as e:
            run_stages(ctx.spark, ctx.cfg, registry=Registry([unrecordable]))
        held.mark_died(e.value.reason)  # what the CLI does with it
    assert "ran (run " in str(e.value) and "but its `runs` row could not be written" in str(e.value)
    assert "no_record" in e.value.reason and ctx.read("runs").count() == 0

    ctx.spark.sql(f"ALTER TABLE {ctx.table('runs')} DROP CONSTRAINT no_record")
    with warehouse_lock(tmp_path, "r2", "run") as held:
        record_abandoned(ctx.spark, ctx.cfg, held.abandoned)  # what the next `realsyn run` does first
    row = ctx.read("runs").first()
    assert (row["run_id"], row["stage"], row["status"]) == ("r1", "unrecordable", "abandoned")
    assert row["notes"]["error"] == e.value.reason
