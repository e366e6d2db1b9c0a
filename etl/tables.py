"""Delta table helpers: one place that knows how tables are named, created and merged into.

Every write in the pipeline goes through `merge_new`, `upsert`, `update_columns` or `sync` (a
derived table kept equal to its query), so re-running a
stage on the same input adds nothing and a crashed run can simply be run again. Counts come from
the MERGE's own result, and each commit carries the stage run's id as its user metadata (set by the
runner), so `DESCRIBE HISTORY` shows which run wrote what.
"""
from __future__ import annotations

import os
import signal
import threading
import uuid
from functools import reduce

from pyspark.sql import functions as F
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import StructType

from etl.session import is_connect


def crash_point(name: str) -> None:
    """Test hook (tests/test_kill_rerun.py): when REALSYN_CRASH_AT names this point the process is
    SIGKILLed here, or REALSYN_CRASH_AFTER_S seconds later from a timer thread, which cuts the step
    now starting (a MERGE's file writes, say) midway. Points: `merge:<table>` before every write."""
    if os.environ.get("REALSYN_CRASH_AT") != name:
        return
    delay = float(os.environ.get("REALSYN_CRASH_AFTER_S", "0"))
    if delay <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()


def qualified(database: str, name: str) -> str:
    return f"{database}.{name}"


def exists(spark: SparkSession, table: str) -> bool:
    return spark.catalog.tableExists(table)


def version(spark: SparkSession, table: str) -> int | None:
    """Latest Delta version of a table, None when it does not exist yet."""
    if not exists(spark, table):
        return None
    return int(spark.sql(f"DESCRIBE HISTORY {table} LIMIT 1").collect()[0]["version"])


def create_if_missing(spark: SparkSession, table: str, schema: str | StructType,
                      partition_by: list[str] | None = None) -> None:
    """Create an empty Delta table from a DDL schema string or a frame's schema.

    Metadata only (one log commit, no data files), so a run killed while creating it leaves at
    worst a folder that `_clear_killed_creation` resolves; a `df.limit(0)` write would run a job
    whose kill leaves data files without a log, and Delta then refuses the location for good."""
    if exists(spark, table):
        return
    if isinstance(schema, StructType):
        schema = ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in schema)
    if _clear_killed_creation(spark, table):
        return
    parts = f"PARTITIONED BY ({', '.join(partition_by)})" if partition_by else ""
    spark.sql(f"CREATE TABLE IF NOT EXISTS {table} ({schema}) USING DELTA {parts}")


def _clear_killed_creation(spark: SparkSession, table: str) -> bool:
    """A run killed while creating `table` can leave the managed folder without the catalog entry,
    where Delta refuses to create it again ("not empty and also not a Delta table"). A folder with
    a committed log is registered where it is (nothing lost); one without is uncommitted files no
    Delta reader would ever see, and is removed. Returns whether the table now exists.

    Not over Spark Connect: the managed locations are then the server's (Unity Catalog gives every
    table a fresh one, so there is nothing left behind to collide with)."""
    if is_connect(spark):
        return False
    database, name = table.rsplit(".", 1)
    info = spark.sql(f"DESCRIBE DATABASE {database}").where("info_name = 'Location'").first()
    location = f"{info['info_value'].rstrip('/')}/{name}"
    hadoop = spark.sparkContext._jvm.org.apache.hadoop.fs.Path
    folder = hadoop(location)
    fs = folder.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    if not fs.exists(folder):
        return False
    if fs.globStatus(hadoop(f"{location}/_delta_log/*.json")):
        spark.sql(f"CREATE TABLE IF NOT EXISTS {table} USING DELTA LOCATION '{location}'")
        return True
    fs.delete(folder, True)
    return False


def merge_into(df: DataFrame, table: str, keys: list[str], clauses: str):
    """`MERGE INTO table USING df ON keys <clauses>`; returns the MERGE's own metrics row.

    SQL rather than the DeltaTable API: it runs unchanged over Spark Connect and on any cluster's
    Delta without the delta-spark Python package."""
    spark = df.sparkSession
    view = f"realsyn_merge_source_{uuid.uuid4().hex}"
    df.createOrReplaceTempView(view)
    cond = " AND ".join(f"t.`{k}` <=> s.`{k}`" for k in keys)
    try:
        return spark.sql(f"MERGE INTO {table} AS t USING {view} AS s ON {cond} {clauses}").first()
    except Exception as e:
        e.realsyn_table = table  # a failed stage's `runs` note names the table (etl/runner.py: stored_error)
        raise
    finally:
        spark.catalog.dropTempView(view)


def _merge(df: DataFrame, table: str, keys: list[str], update: bool,
           columns: list[str] | None = None) -> int:
    """MERGE df into table on keys; returns the number of rows inserted (+ updated).

    columns: update only these columns of rows already present, and insert nothing."""
    crash_point(f"merge:{table.rsplit('.', 1)[-1]}")
    spark = df.sparkSession
    # Insert-only MERGE would insert every source duplicate of a new key; keep one.
    df = df.dropDuplicates(keys)
    create_if_missing(spark, table, df.schema)
    if columns:
        # Rows whose values already match are not rewritten (no new files for no change).
        differs = " OR ".join(f"NOT (t.`{c}` <=> s.`{c}`)" for c in columns)
        clauses = f"WHEN MATCHED AND ({differs}) THEN UPDATE SET " + ", ".join(f"`{c}` = s.`{c}`" for c in columns)
    else:
        clauses = ("WHEN MATCHED THEN UPDATE SET * " if update else "") + "WHEN NOT MATCHED THEN INSERT *"
    # The MERGE's own metrics: another writer's commit landing meanwhile cannot be miscounted.
    metrics = merge_into(df, table, keys, clauses)
    return int(metrics["num_inserted_rows"] or 0) + int(metrics["num_updated_rows"] or 0)


def sync(df: DataFrame, table: str, keys: list[str], compare: list[str]) -> int:
    """Make `table` hold exactly the rows of `df` (a derived table): keys whose `compare` columns
    differ are rewritten, new keys inserted, keys absent from `df` deleted; equal rows are not
    touched. Returns rows inserted + updated + deleted."""
    crash_point(f"merge:{table.rsplit('.', 1)[-1]}")
    spark = df.sparkSession
    df = df.dropDuplicates(keys)
    create_if_missing(spark, table, df.schema)
    # A MERGE with a not-matched-by-source clause commits even when it changes nothing: look first.
    current = spark.table(table).select(*keys, *compare).alias("t")
    incoming = df.select(*keys, *compare).alias("s")

    def same(columns: list[str]):
        return reduce(lambda a, b: a & b, [F.col(f"t.{c}").eqNullSafe(F.col(f"s.{c}")) for c in columns])

    if (incoming.join(current, same([*keys, *compare]), "left_anti").isEmpty()
            and current.join(incoming, same(keys), "left_anti").isEmpty()):
        return 0
    differs = " OR ".join(f"NOT (t.`{c}` <=> s.`{c}`)" for c in compare)
    metrics = merge_into(df, table, keys, f"WHEN MATCHED AND ({differs}) THEN UPDATE SET * "
                          "WHEN NOT MATCHED THEN INSERT * WHEN NOT MATCHED BY SOURCE THEN DELETE")
    return sum(int(metrics[m] or 0) for m in ("num_inserted_rows", "num_updated_rows", "num_deleted_rows"))


def merge_new(df: DataFrame, table: str, keys: list[str]) -> int:
    """Insert rows whose keys are not in the table yet (idempotent append). Returns rows inserted."""
    return _merge(df, table, keys, update=False)


def upsert(df: DataFrame, table: str, keys: list[str]) -> int:
    """Insert new keys and overwrite existing ones. Returns rows inserted + updated."""
    return _merge(df, table, keys, update=True)


def update_columns(df: DataFrame, table: str, keys: list[str], columns: list[str]) -> int:
    """Overwrite `columns` of existing rows only (verdict columns, say), leaving the wide ones
    (image bytes) untouched. Returns rows updated."""
    return _merge(df.select(*keys, *columns), table, keys, update=True, columns=columns)


def delete_keys(df: DataFrame, table: str, keys: list[str]) -> int:
    """Delete the rows of `table` whose keys appear in `df` (a keyed MERGE ... DELETE: a re-run
    deletes nothing more). Returns rows deleted."""
    if not exists(df.sparkSession, table) or df.isEmpty():
        return 0
    metrics = merge_into(df.select(*keys).distinct(), table, keys, "WHEN MATCHED THEN DELETE")
    return int(metrics["num_deleted_rows"] or 0)
