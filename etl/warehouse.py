"""A local warehouse is what its folder holds: relocation of a copied or moved warehouse, and the
one-line reports of a damaged one.

The local profile's embedded Derby metastore (`<warehouse>/metastore_db`) records every database's
and table's *absolute* location. A warehouse copied (`cp -r warehouse backup`) or moved keeps those
records, so without a repair a command on the copy would read and write the original's tables.
`relocate`, called by `etl/session.py: build_spark` before anything reads the catalog, rewrites
every location that follows the warehouse's layout (`<old>/tables/<db>.db/<table>`) to the same
place under this folder, the way Hive's `metatool -updateLocation` does (the database, the table
and the `path` storage property Spark keeps for data source tables); a table registered anywhere
else makes the command refuse, naming it. The Delta logs themselves hold only relative paths, but
Delta dates its history by the commit files' modification times, which a plain copy resets:
`restore_commit_times` gives them back from the commits.

`delta_fault` turns a Delta-level failure (a corrupt or truncated `_delta_log` file, a missing
table folder, a table written by a newer Delta protocol) into one line naming the table and the
repair; `check_versions` refuses a run when a table's latest Delta version is older than the one
`runs` last recorded for it (a deleted commit would otherwise silently lose its rows).
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from typing import NamedTuple
from pathlib import Path

from pyspark.sql import SparkSession

log = logging.getLogger("realsyn")


class WarehouseError(RuntimeError):
    """The warehouse needs a repair before a command may read or write it (one line: the table and
    what to do). The CLI exits with WAREHOUSE_DAMAGED."""


WAREHOUSE_DAMAGED = 7  # the CLI's exit code for a WarehouseError
BACKUP = "README: 'Backing up and moving a warehouse'"


# --- relocation --------------------------------------------------------------------------------------

def _path_of(location: str | None) -> str | None:
    """The local absolute path of a metastore location (`file:/x`, `file:///x`, `/x`); None for any
    other scheme (s3a://, hdfs://) or none."""
    if not location:
        return None
    if location.startswith("file:"):
        location = location[len("file:"):]
        if location.startswith("//"):
            location = location[2:]
    return os.path.normpath(location) if location.startswith("/") else None


def _inside(path: str | None, root: str) -> bool:
    return path is not None and (path == root or path.startswith(root + "/"))


def _query(conn, sql: str) -> list[tuple]:
    rs = conn.createStatement().executeQuery(sql)
    n = rs.getMetaData().getColumnCount()
    rows = []
    while rs.next():
        rows.append(tuple(rs.getString(i) for i in range(1, n + 1)))
    rs.close()
    return rows


def plan_relocation(warehouse: Path, dbs: list[tuple], tables: list[tuple],
                    serde_paths: dict[str, str]) -> tuple[dict[str, str], int]:
    """The moves that bring the metastore's entries home: old path -> its place under
    `warehouse/tables` (databases, then tables), and how many of them are databases.

    dbs: (id, name, location); tables: (database, name, type, location, serde id); serde_paths:
    serde id -> the `path` property (where Spark keeps a data source table's real location). An
    entry outside the folder moves when it follows the warehouse layout (`.../<db>.db/<table>`,
    the `default` database at the root) or when its folder is inside this one (copied in by hand);
    any other raises WarehouseError."""
    root = os.path.normpath(Path(warehouse) / "tables")
    moves: dict[str, str] = {}
    problems: list[str] = []
    n_dbs = 0
    for _, name, location in dbs:
        here = root if name == "default" else os.path.join(root, f"{name}.db")
        old = _path_of(location)
        if _inside(old, root):
            continue
        if old is not None and (name == "default" or old.endswith(f"/{name}.db") or os.path.isdir(here)):
            moves[old], n_dbs = here, n_dbs + 1
        else:
            problems.append(f"database {name} is registered at {location}, outside warehouse {warehouse}: "
                            f"copy that folder to {here}")
    for db, name, kind, location, serde in tables:
        if kind == "VIRTUAL_VIEW":
            continue
        here = os.path.join(root if db == "default" else os.path.join(root, f"{db}.db"), name)
        where = serde_paths.get(serde) or location
        old = _path_of(where)
        if _inside(old, root):
            continue
        if old is not None and (old.endswith(f"/{db}.db/{name}") or os.path.isdir(here)):
            moves[old] = here
        else:
            problems.append(f"table {db}.{name} is registered at {where}, outside warehouse {warehouse}: "
                            f"copy its folder to {here}")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise WarehouseError(f"{problems[0]}{more}, then run again. Nothing was read or written: a warehouse "
                             f"must hold every table it lists, or a copy of its folder is no backup ({BACKUP})")
    return moves, n_dbs


def moved(location: str | None, moves: dict[str, str]) -> str | None:
    """`location` rewritten by the longest old path it lies under; None when none applies."""
    old = _path_of(location)
    best = max((o for o in moves if _inside(old, o)), key=len, default=None)
    return None if best is None else "file:" + moves[best] + old[len(best):]


def _shut_down(jvm, url: str) -> None:
    """Shut the Derby database down in this engine (Derby answers a clean shutdown with SQLState
    08006)."""
    from py4j.protocol import Py4JJavaError

    try:
        jvm.java.sql.DriverManager.getConnection(url + ";shutdown=true")
    except Py4JJavaError as e:
        if str(e.java_exception.getSQLState()) != "08006":
            raise


def relocate(spark: SparkSession, warehouse: Path) -> dict[str, str]:
    """Re-register at their place under `warehouse/tables` the databases and tables that the
    metastore records elsewhere (a copied or moved warehouse), in one Derby transaction, the way
    Hive's `metatool -updateLocation` does. Returns the moves (old path -> new path).

    Raises WarehouseError, changing nothing, when an entry can not be placed (`plan_relocation`).
    Called by build_spark when it starts the session, before any catalog access: nothing is ever
    read through the old entries, and the Hive client has not booted the database yet."""
    warehouse = Path(warehouse).resolve()
    metastore = warehouse / "metastore_db"
    if not (metastore / "service.properties").is_file():
        return {}  # a fresh warehouse: Spark creates its metastore on first use
    restored = restore_commit_times(warehouse / "tables")
    if restored:
        log.warning("warehouse %s: the dates of %d Delta commits, lost by a copy, restored from the commits "
                    "themselves (Delta's history and `realsyn rollback` go by them)", warehouse, restored)
    jvm = spark.sparkContext._jvm
    # Derby as this JVM's class path loads it; Spark's Hive client loads its own copy (an isolated
    # class loader), so the database must be shut down here before the Hive client boots it: two
    # engines on one database corrupt it.
    url = f"jdbc:derby:;databaseName={metastore}"
    conn = jvm.java.sql.DriverManager.getConnection(url)
    try:
        dbs = _query(conn, "SELECT DB_ID, NAME, DB_LOCATION_URI FROM DBS")
        tbls = _query(conn, "SELECT d.NAME, t.TBL_NAME, t.TBL_TYPE, s.LOCATION, s.SERDE_ID FROM TBLS t "
                            "JOIN DBS d ON t.DB_ID = d.DB_ID LEFT JOIN SDS s ON t.SD_ID = s.SD_ID")
        serde_paths = dict(_query(conn, "SELECT SERDE_ID, PARAM_VALUE FROM SERDE_PARAMS WHERE PARAM_KEY = 'path'"))
        moves, n_dbs = plan_relocation(warehouse, dbs, tbls, serde_paths)
        if not moves:
            return moves
        conn.setAutoCommit(False)  # every rewrite or none
        changed = 0
        for table, key, column, rows in (
                ("DBS", "DB_ID", "DB_LOCATION_URI", [(r[0], r[2]) for r in dbs]),
                ("SDS", "SD_ID", "LOCATION", _query(conn, "SELECT SD_ID, LOCATION FROM SDS")),
                ("SERDE_PARAMS", "SERDE_ID", "PARAM_VALUE", list(serde_paths.items()))):
            extra = " AND PARAM_KEY = 'path'" if table == "SERDE_PARAMS" else ""
            update = conn.prepareStatement(f"UPDATE {table} SET {column} = ? WHERE {key} = ?{extra}")
            for row_id, location in rows:
                new = moved(location, moves)
                if new is not None and new != location:
                    update.setString(1, new)
                    update.setLong(2, int(row_id))
                    changed += update.executeUpdate()
            update.close()
        conn.commit()
    except BaseException:
        if not conn.getAutoCommit():
            conn.rollback()
        raise
    finally:
        conn.close()
        _shut_down(jvm, url)
    root = os.path.normpath(warehouse / "tables")
    origin = next((os.path.dirname(o) for o, new in moves.items() if new == root), os.path.commonpath(list(moves)))
    log.warning("warehouse %s is a copy or a move of %s: its metastore now registers its %d databases and %d "
                "tables in this folder (%d entries rewritten); nothing of the original is read or written",
                warehouse, origin, n_dbs, len(moves) - n_dbs, changed)
    return moves


COPIED_AFTER_S = 5


def restore_commit_times(root: Path) -> int:
    """Give the Delta commit files under `root` (`<db>.db/<table>/_delta_log/<version>.json`) of a
    copied table the time they were committed, from their own `commitInfo`; returns how many files
    were changed.

    Delta's history dates a commit by its file's modification time, and `realsyn rollback` finds a
    run's versions by those dates; a plain `cp -r` (a backup, or its restore) sets every file to
    the time of the copy, which makes every commit look newer than every run. A table counts as
    copied when its oldest commit file is dated more than COPIED_AFTER_S away from its commit (Delta
    writes the file within milliseconds of the time it records; a copy made seconds after the last
    write must count too); one file per table is read when nothing was copied."""
    changed = 0
    for log_dir in [*root.glob("*.db/*/_delta_log"), *root.glob("*/_delta_log")]:
        commits = sorted(p for p in log_dir.glob("[0-9]*.json") if p.name[:20].isdigit())
        oldest = _commit_time(commits[0]) if commits else None
        if oldest is None or abs(commits[0].stat().st_mtime - oldest) <= COPIED_AFTER_S:
            continue
        for path in commits:
            committed, stat = _commit_time(path), path.stat()
            if committed is not None and abs(stat.st_mtime - committed) > 1:
                os.utime(path, (stat.st_atime, committed))
                changed += 1
    return changed


def _commit_time(path: Path) -> float | None:
    """A commit's time in seconds: its in-commit timestamp, else its commitInfo's (the first
    action Delta writes). None when the file does not say."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            info = json.loads(f.readline()).get("commitInfo") or {}
        stamp = info.get("inCommitTimestamp", info.get("timestamp"))
        return None if stamp is None else float(stamp) / 1000
    except (OSError, ValueError, AttributeError):
        return None


# --- Delta-level faults --------------------------------------------------------------------------------

# db.table in Delta's messages: `db`.`t`, "db.t", spark_catalog.db.t; and in paths: <db>.db/<t>
_NAMED = re.compile(r"table [\"`]?(?:spark_catalog[\"`]?\.[\"`]?)?(\w+)[\"`]?\.[\"`]?(\w+)[\"`]?")
_IN_PATH = re.compile(r"((?:file:)?/[^\s'\"`]*?)?/(\w+)\.db/(\w+)(?:/_delta_log/(\d{20}\.[\w.]+?|_last_checkpoint)"
                      r"(?=[\s'\"`:,;)]|\.?$|\.\s))?")
_DAMAGED = re.compile(r"ChecksumException|Checksum error|MALFORMED_RECORD|Malformed record|JsonParseException|"
                      r"JsonEOFException|JsonMappingException|FAILED_READ_FILE|EOFException|corrupt", re.I)
_LOST = ("DELTA_TRUNCATED_TRANSACTION_LOG", "DELTA_VERSIONS_NOT_CONTIGUOUS", "DELTA_LOG_FILE_NOT_FOUND",
         "DELTA_STATE_RECOVER_ERROR", "DELTA_MISSING_PART_FILES", "DELTA_EMPTY_DIRECTORY")
_MISSING = ("DELTA_TABLE_NOT_FOUND", "DELTA_PATH_DOES_NOT_EXIST", "DELTA_MISSING_DELTA_TABLE",
            "DELTA_TABLE_NOT_FOUND_STREAMING", "DELTA_MISSING_TRANSACTION_LOG")
_NEWER = ("DELTA_UNSUPPORTED_FEATURES_FOR_READ", "DELTA_UNSUPPORTED_FEATURES_FOR_WRITE",
          "DELTA_INVALID_PROTOCOL_VERSION", "InvalidProtocolVersionException", "DELTA_UNSUPPORTED_READER_FEATURES")


def _chain(e: BaseException | None, limit: int = 24) -> list[str]:
    """The messages of an exception and of everything it wraps, Python and JVM, first lines first
    (a dead JVM answers nothing: what Python holds is kept)."""
    out: list[str] = []
    seen: set[int] = set()
    while e is not None and id(e) not in seen and len(out) < limit:
        seen.add(id(e))
        java = getattr(e, "java_exception", None) or getattr(e, "_origin", None)
        out.append(str(getattr(e, "_desc", None) or (e.args[0] if e.args and isinstance(e.args[0], str) else e)))
        try:
            while java is not None and len(out) < limit:
                out.append(str(java.toString()))
                java = java.getCause()
        except Exception:  # noqa: BLE001 - a dead JVM
            pass
        e = e.__cause__ or e.__context__
    return out


def _table_folder(warehouse: Path | None, db: str, name: str) -> Path | None:
    if warehouse is None:
        return None
    return Path(warehouse).resolve() / "tables" / ("" if db == "default" else f"{db}.db") / name


def delta_fault(e: BaseException, warehouse: str | Path | None = None) -> str | None:
    """One line for a Delta-level fault anywhere in `e`'s chain: which table, what is wrong with it,
    what to do. None when `e` is not one. `warehouse` (local profile) adds what only the folder
    can tell: whether a damaged commit is the table's last (then it can be dropped) or a folder is
    really missing."""
    text = "\n".join(_chain(e))
    paths = _IN_PATH.findall(text)
    named = _NAMED.search(text)
    db, name = (paths[0][1], paths[0][2]) if paths else (named.groups() if named else (None, None))
    table = f"table {db}.{name}" if db else "a Delta table"
    folder = _table_folder(warehouse, db, name) if db else None
    if any(c in text for c in _NEWER):
        features = re.search(r'unsupported by Delta Lake "([^"]+)": ([^\n]+?)\.?(?:\n|$)', text)
        versions = re.search(r"requires reader version (\d+), writer version (\d+)", text)
        side = "writer" if "FOR_WRITE" in text else "reader"
        needs = (f"{side} feature(s) {features.group(2)}" if features
                 else f"reader version {versions.group(1)} / writer version {versions.group(2)}" if versions
                 else "a newer Delta protocol")
        ours = features.group(1) if features else _delta_version()
        return (f"{table} was written by a newer Delta Lake: it needs {needs}, which "
                f"{f'Delta Lake {ours}' if ours else 'the Delta Lake'} here does not support. Use a delta-spark release that does (setup.cfg, tools/delta-jars/pom.xml, "
                f"then `make setup`), or restore the table from a backup ({BACKUP})")
    logged = [p for p in paths if p[3]]
    if logged and _DAMAGED.search(text):
        file = logged[0][3]
        why = ("checksum error" if "hecksum" in text else "truncated or invalid JSON" if re.search(
            r"JsonParse|JsonEOF|Malformed|MALFORMED", text) else "unreadable")
        line = (f"table {logged[0][1]}.{logged[0][2]} is damaged: its Delta log file _delta_log/{file} cannot be "
                f"read ({why}). Restore the warehouse from a backup ({BACKUP})")
        folder = _table_folder(warehouse, logged[0][1], logged[0][2])
        if (folder is not None and file.endswith(".json") and file[:20] == _last_commit(folder)
                and not any((folder / "_delta_log").glob(f"{file[:20]}.checkpoint*"))):
            log_dir = folder / "_delta_log"
            line += (f"; or drop that last commit: move {log_dir}/{file[:20]}.* and {log_dir}/.{file[:20]}.* out "
                     "of the folder, then `realsyn run` names the run to roll back to")
        return line
    if any(c in text for c in _LOST):
        where = f" ({folder})" if folder else ""
        return (f"{table} has lost commits from its Delta log (files of _delta_log deleted or truncated): "
                f"restore its folder{where} from a backup of the warehouse ({BACKUP})")
    if any(c in text for c in _MISSING) and db:
        if folder is not None and (folder / "_delta_log").is_dir():
            return None  # the folder is there: some other cause
        where = f"{folder}" if folder else "its folder"
        return (f"{table} is registered in the metastore but {where} is missing or holds no _delta_log: "
                f"restore it from a backup of the warehouse ({BACKUP})")
    return None


def _last_commit(folder: Path) -> str | None:
    versions = sorted(p.name[:20] for p in (folder / "_delta_log").glob("[0-9]*.json") if p.name[:20].isdigit())
    return versions[-1] if versions else None


def _delta_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("delta-spark")
    except Exception:  # noqa: BLE001 - not installed: the jars' version is unknown here
        return None


# --- versions behind `runs` ----------------------------------------------------------------------------

def check_versions(spark: SparkSession, cfg, names: Iterable[str]) -> None:
    """Refuse (WarehouseError) before any stage reads them when one of these tables is older than
    `runs` says it is: its latest Delta version below the output version the latest run that wrote it
    recorded. Commits removed from a `_delta_log` would otherwise silently drop their rows (a verdict
    written, then lost, is never written again: the stage thinks it has it). A Delta-level fault of
    one of the tables is reported here too, naming it, before any stage starts."""
    from pyspark.sql import functions as F

    from etl import tables
    from etl.session import in_background

    db = cfg.catalog.database
    runs = tables.qualified(db, "runs")
    warehouse = Path(cfg.spark.warehouse_dir) if cfg.spark.delta == "local-jars" else None
    names = sorted(set(names) - {"runs"})
    if not names or not tables.exists(spark, runs) or "output_versions" not in spark.table(runs).columns:
        return
    recorded = spark.table(runs).select(
        F.unix_millis("started_at").alias("t"), (F.unix_millis("started_at") + F.coalesce("wall_s", F.lit(0)) * 1000)
        .alias("end"), F.explode("output_versions").alias("table", "version"), "run_id", "stage")
    writes = [Write(*r) for r in recorded.where(F.col("table").isin(names) & F.col("t").isNotNull()).collect()]
    latest = {w.table: w for w in sorted(writes)}  # table -> the latest run's record of it
    pending = {t: in_background(spark, lambda t=t: tables.version(spark, tables.qualified(db, t))) for t in names}
    current: dict[str, int | None] = {}
    for t, wait in pending.items():
        try:
            current[t] = wait()
        except Exception as e:
            fault = delta_fault(e, warehouse)
            if fault is None:
                raise
            raise WarehouseError(fault) from e
    behind = [latest[t] for t, v in current.items() if v is not None and t in latest and v < latest[t].version
              and not _created_after(spark, tables.qualified(db, t), latest[t].end)]
    if not behind:
        return
    if warehouse is not None:
        for b in behind:
            _drop_orphan_checksums(_table_folder(warehouse, db, b.table), current[b.table])
    first = behind[0]
    # The latest ok run before the first one that wrote a version these tables no longer have.
    bound = min(w.t for w in writes if w.table in {b.table for b in behind} and w.version > current[w.table])
    target = (spark.table(runs).where("status = 'ok'").select("run_id", F.unix_millis("started_at").alias("t"))
              .where(F.col("t") < bound).orderBy(F.col("t").desc()).first())
    more = f" (and {len(behind) - 1} more tables)" if len(behind) > 1 else ""
    repair = (f"roll every table back to a run they all still hold, `realsyn rollback --to-run {target['run_id']}`, "
              f"or restore the warehouse from a backup ({BACKUP})" if target else
              f"restore the warehouse from a backup ({BACKUP})")
    raise WarehouseError(
        f"table {db}.{first.table} is at Delta version {current[first.table]}, older than the version "
        f"{first.version} that run {first.run_id} ({first.stage}) recorded{more}: commits were removed from its "
        f"_delta_log, and running on would silently lose their rows. Nothing ran: {repair}")


class Write(NamedTuple):
    """A table version a `runs` row recorded (times in epoch milliseconds)."""
    t: int
    end: float
    table: str
    version: int
    run_id: str
    stage: str


def _created_after(spark: SparkSession, name: str, ms: float) -> bool:
    """Whether the table's first commit is later than `ms`: dropped and created again since (its
    versions start over), not cut short."""
    from pyspark.sql import functions as F

    first = spark.sql(f"DESCRIBE HISTORY {name}").where("version = 0").select(F.unix_millis("timestamp")).first()
    return first is not None and first[0] > ms


def _drop_orphan_checksums(folder: Path, version: int) -> None:
    """The local file system's hidden checksum files (`.<version>.json.crc`) of commits removed by
    hand from `_delta_log`: left behind, they fail the next commit of that version (a rollback's)."""
    for crc in (folder / "_delta_log").glob(".[0-9]*.crc"):
        m = re.fullmatch(r"\.(\d{20})\.(json|crc)\.crc", crc.name)
        if m and int(m.group(1)) > version and not (crc.parent / f"{m.group(1)}.{m.group(2)}").exists():
            crc.unlink()
            log.warning("removed %s: the checksum of a commit no longer in the log", crc)
