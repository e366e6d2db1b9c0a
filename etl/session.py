"""The one place a SparkSession is built from config.

Local mode loads the Delta jars that `make setup` resolved from Maven Central into an ignored
cache (no network at run time) and keeps a persistent Derby metastore plus warehouse under
`spark.warehouse_dir`, so tables survive between processes and `realsyn sql` sees them; a copied
or moved warehouse has its metastore's locations rewritten to its own folder before anything reads
it (etl/warehouse.py: `relocate`). On Databricks/EMR (`spark.delta: cluster`) the platform's own
Delta and catalog are used.
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Callable, TypeVar

from pyspark import InheritableThread, SparkContext
from pyspark.sql import SparkSession

from etl import logs
from etl.config import CONF_DIR, Config

T = TypeVar("T")
DELTA_EXTENSIONS = "io.delta.sql.DeltaSparkSessionExtension"
LOG4J_CONF = CONF_DIR / "log4j2.properties"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"


class SetupError(RuntimeError):
    """The machine is missing something that `make setup` provides."""


def delta_jars(jars_dir: str) -> list[str]:
    jars = sorted(str(p) for p in Path(jars_dir).glob("*.jar"))
    if not any("delta-spark" in Path(j).name for j in jars):
        raise SetupError(
            f"Delta Lake jars not found in {jars_dir}. Run `make setup` once (it resolves them from "
            "Maven Central); runs and tests then need no network."
        )
    return jars


def build_spark(cfg: Config, progress: bool = True, metastore: bool = True, verbose: bool = False) -> SparkSession:
    """The session for `cfg`. metastore=False (local profile only): no Derby metastore; every
    Delta table folder of the warehouse is registered in an in-memory catalog instead, so a
    reader can query while a run holds the metastore (read-only in spirit: writes to such a
    session's tables would not reach the metastore)."""
    sc = cfg.spark
    if sc.remote:
        # Spark Connect: the server's session has its settings (and Delta, and the workers'
        # Python); this side only sends plans.
        spark = SparkSession.builder.remote(sc.remote).getOrCreate()
        spark.sql(f"CREATE DATABASE IF NOT EXISTS {cfg.catalog.database}")
        return spark
    # Python workers must run the interpreter that has our packages (the project venv).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    local = bool(sc.master and sc.master.startswith("local"))
    if local:
        # One machine talks to itself: no "hostname resolves to a loopback address" detour.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    # Workers started by this driver inherit its environment (local); executors get it here.
    quiet = logs.quiet_env(verbose)
    os.environ.update({k: v for k, v in quiet.items() if k not in os.environ})
    builder = SparkSession.builder.appName(sc.app_name)
    if sc.master:
        builder = builder.master(sc.master)
    for key, value in session_settings(cfg, progress, metastore, verbose).items():
        builder = builder.config(key, value)
    started = SparkContext._active_spark_context is None
    spark = builder.getOrCreate()
    set_log_level(spark, sc.log_level)
    if local and not verbose:
        quiet_task_failures(spark)
    if sc.delta == "local-jars" and metastore and started:
        # Before any catalog access: a copied or moved warehouse must not reach the original's
        # tables. Only in a new session: one already running has its metastore open.
        from etl.warehouse import relocate

        relocate(spark, Path(sc.warehouse_dir))
    if sc.delta == "local-jars" and not metastore:
        register_table_folders(spark, Path(sc.warehouse_dir).resolve() / "tables")
    else:
        spark.sql(f"CREATE DATABASE IF NOT EXISTS {cfg.catalog.database}")
    return spark


def session_settings(cfg: Config, progress: bool = True, metastore: bool = True,
                     verbose: bool = False) -> dict[str, str]:
    """Every Spark setting of `build_spark`'s session: also the `--conf` flags of a local
    `realsyn submit`, where spark-submit starts the JVM before our code runs."""
    sc = cfg.spark
    quiet = logs.quiet_env(verbose)
    settings: dict[str, str] = {
        # On a terminal only: redrawn bars are noise in a log file.
        "spark.ui.showConsoleProgress": str(progress and sys.stderr.isatty()).lower(),
        # Spark's text reader (remote jsonl inputs) would otherwise hold a line of any length.
        "spark.hadoop.mapreduce.input.linerecordreader.line.maxlength": str(cfg.ingest.max_record_bytes),
        **{f"spark.executorEnv.{k}": v for k, v in quiet.items()},
    }
    # Not in a wheel install (conf/ ships beside it, not in it): then log4j's own defaults.
    java_options = [] if verbose or not LOG4J_CONF.is_file() else [
        f"-Dlog4j2.configurationFile={LOG4J_CONF.as_uri()}"]
    if sc.delta == "local-jars":
        warehouse = Path(sc.warehouse_dir).resolve()
        warehouse.mkdir(parents=True, exist_ok=True)
        settings.update({
            "spark.jars": ",".join(delta_jars(sc.jars_dir)),
            "spark.sql.extensions": DELTA_EXTENSIONS,
            "spark.sql.catalog.spark_catalog": DELTA_CATALOG,
            "spark.sql.warehouse.dir": str(warehouse / "tables"),
            "spark.ui.enabled": "false",
        })
        if metastore:
            settings.update({
                "spark.sql.catalogImplementation": "hive",
                # Embedded Derby metastore inside the warehouse folder: tables persist across runs.
                "spark.hadoop.javax.jdo.option.ConnectionURL":
                    f"jdbc:derby:;databaseName={warehouse / 'metastore_db'};create=true",
            })
            java_options.append(f"-Dderby.system.home={warehouse}")
        else:
            settings["spark.sql.catalogImplementation"] = "in-memory"
    if java_options:
        settings["spark.driver.extraJavaOptions"] = " ".join(java_options)
    settings.update(cluster_settings(cfg))
    return settings


def cluster_settings(cfg: Config) -> dict[str, str]:
    """The Spark settings a profile fixes for the whole application: what `build_spark` sets on
    its session and what `realsyn submit` passes as `--conf` (a cluster reads GPU, plugin and
    Arrow settings at start-up, not from a running session)."""
    sc = cfg.spark
    settings = {
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(sc.arrow_batch_rows),
        "spark.sql.shuffle.partitions": str(sc.shuffle_partitions),
    }
    if sc.gpu.enabled:
        # Only executors declare GPUs here; GPU stages ask for them per task through a
        # stage-level ResourceProfile (etl/gpu.py), so CPU stages keep every core busy.
        settings["spark.executor.resource.gpu.amount"] = str(sc.gpu.executor_amount)
        if sc.gpu.discovery_script:
            settings["spark.executor.resource.gpu.discoveryScript"] = sc.gpu.discovery_script
    # The profile has the last word; YAML booleans become Spark's "true"/"false".
    settings.update({k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in sc.conf.items()})
    return settings


def is_connect(spark: SparkSession) -> bool:
    """A Spark Connect client session: no SparkContext, no RDDs on this side."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def default_parallelism(spark: SparkSession) -> int:
    """Tasks that keep every core busy. Over Spark Connect the client cannot see the cluster's
    cores: the server's `spark.default.parallelism` if set, else its shuffle partitions."""
    if not is_connect(spark):
        return spark.sparkContext.defaultParallelism
    value = spark.conf.get("spark.default.parallelism", None) or spark.conf.get("spark.sql.shuffle.partitions")
    return int(value)


def tag_jobs(spark: SparkSession, run_id: str, description: str) -> None:
    """Mark the jobs that follow as one stage run's (the UI's job group; a tag over Connect)."""
    if is_connect(spark):
        spark.clearTags()
        spark.addTag(run_id)
    else:
        spark.sparkContext.setJobGroup(run_id, description)


def in_background(spark: SparkSession, fn: Callable[[], T]) -> Callable[[], T]:
    """Start `fn` (Spark work) in a thread whose jobs keep this thread's job group or tags; returns
    a function that waits for it and gives its result or raises its error.

    For the small queries of a stage (counts for its record, version reads): each costs mostly
    planning and Delta log work on the driver, which overlaps with the next query's."""
    tags = spark.getTags() if is_connect(spark) else set()
    box: dict[str, object] = {}

    def target() -> None:
        try:
            for tag in tags:  # a Connect client's tags are per thread
                spark.addTag(tag)
            box["value"] = fn()
        except BaseException as e:  # handed to the waiting thread
            box["error"] = e

    # InheritableThread copies the JVM thread's local properties (the job group) to the new one.
    thread = (threading.Thread if is_connect(spark) else InheritableThread)(target=target, daemon=True)
    thread.start()

    def result() -> T:
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"]

    return result


def set_log_level(spark: SparkSession, level: str) -> None:
    # A Connect server's log level is its own (its log4j2 configuration).
    if not is_connect(spark):
        spark.sparkContext.setLogLevel(level)


def quiet_task_failures(spark: SparkSession) -> None:
    """Local mode: no Java stack trace on the console for a failed task. Its cause reaches the user
    as one line (the CLI, `runs.notes.error`); `--verbose` keeps these loggers and the traceback."""
    jvm = spark.sparkContext._jvm
    for name in ("org.apache.spark.executor.Executor", "org.apache.spark.scheduler.TaskSetManager"):
        jvm.org.apache.logging.log4j.core.config.Configurator.setLevel(name, jvm.org.apache.logging.log4j.Level.OFF)


def rapids_active(spark: SparkSession) -> bool:
    """Whether the RAPIDS Accelerator runs this session's SQL: the plugin loaded and SQL on."""
    plugins = spark.conf.get("spark.plugins", None) or ""
    return ("com.nvidia.spark.SQLPlugin" in plugins
            and (spark.conf.get("spark.rapids.sql.enabled", None) or "true").lower() == "true")


def register_table_folders(spark: SparkSession, tables_dir: Path) -> None:
    """`<db>.db/<table>/_delta_log` folders -> tables `db.table` of the session's catalog."""
    for db_dir in sorted(tables_dir.glob("*.db")):
        db = db_dir.name[:-3]
        spark.sql(f"CREATE DATABASE IF NOT EXISTS `{db}`")
        for table_dir in sorted(p for p in db_dir.iterdir() if (p / "_delta_log").is_dir()):
            spark.sql(f"CREATE TABLE IF NOT EXISTS `{db}`.`{table_dir.name}` USING DELTA "
                      f"LOCATION '{table_dir.as_posix()}'")
