"""`realsyn run | sql | status` — the command line over the runner and the Delta tables."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import ExitStack

from etl.config import ConfigError, load_config
from etl.lock import WarehouseBusy, warehouse_lock
from etl.session import SetupError


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--conf", default=None, help="profile YAML (default: conf/local.yaml)")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set retrieval.k=5 (repeatable)")
    p = argparse.ArgumentParser(prog="realsyn", description="RealSyn ETL on Spark + Delta Lake")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", parents=[common], help="run pipeline stages")
    run.add_argument("--stages", default=None, help="comma-separated stages (default: all, in order)")
    run.add_argument("--wait", action="store_true",
                     help="wait for a run that holds the warehouse instead of refusing at once")
    sql = sub.add_parser("sql", parents=[common], help="run a SQL statement against the tables")
    sql.add_argument("query")
    sql.add_argument("--limit", type=int, default=50, help="rows to print")
    sub.add_parser("status", parents=[common], help="tables, versions, row counts, last run per stage")
    return p


def cmd_run(spark, cfg, args, lock) -> None:
    from etl.runner import record_abandoned, run_stages

    if lock is not None and lock.abandoned is not None and lock.abandoned.command == "run":
        record_abandoned(spark, cfg, lock.abandoned)
    run_stages(spark, cfg, args.stage_list, batch_id=args.batch_id,
               on_stage=lock.set_stage if lock is not None else None)


def cmd_sql(spark, cfg, args, lock) -> None:
    df = spark.sql(args.query)
    df.show(args.limit, truncate=80)


def cmd_status(spark, cfg, args, lock) -> None:
    from etl import tables
    from etl.runner import STAGE_ORDER

    db = cfg.catalog.database
    print(f"database {db}")
    print(f"{'table':<22} {'version':>8} {'rows':>12}")
    for t in sorted(spark.catalog.listTables(db), key=lambda t: t.name):
        name = tables.qualified(db, t.name)
        rows = spark.table(name).count()
        print(f"{t.name:<22} {tables.version(spark, name):>8} {rows:>12}")
    runs = tables.qualified(db, "runs")
    if not tables.exists(spark, runs):
        print("no stage has run yet")
        return
    last = spark.sql(f"""
        SELECT stage, status, batch_id, started_at, round(wall_s, 1) AS wall_s, rows_in, rows_out, drops
        FROM (SELECT *, row_number() OVER (PARTITION BY stage ORDER BY started_at DESC) AS rn FROM {runs})
        WHERE rn = 1""").collect()
    by_stage = {r["stage"]: r for r in last}
    print(f"\n{'stage':<16} {'status':<7} {'last run (UTC)':<20} {'wall s':>7} {'in':>8} {'out':>8}  drops")
    for stage in STAGE_ORDER:
        r = by_stage.get(stage)
        if r is None:
            print(f"{stage:<16} {'-':<7}")
            continue
        drops = ", ".join(f"{k}={v}" for k, v in sorted((r["drops"] or {}).items()))
        print(f"{stage:<16} {r['status']:<7} {r['started_at']:%Y-%m-%d %H:%M:%S}  {r['wall_s']:>7} "
              f"{r['rows_in']:>8} {r['rows_out']:>8}  {drops}")


COMMANDS = {"run": cmd_run, "sql": cmd_sql, "status": cmd_status}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # py4j logs a traceback of its own for every call after the JVM is gone; we say it once.
    logging.getLogger("py4j").setLevel(logging.CRITICAL)
    try:
        cfg = load_config(args.conf, args.overrides)
        if args.command == "run":
            from etl.runner import new_batch_id, resolve_stages

            args.stage_list = resolve_stages(args.stages.split(",") if args.stages else None)
            args.batch_id = new_batch_id()
    except (ConfigError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        with ExitStack() as stack:
            lock, metastore = _hold_warehouse(cfg, args, stack)
            return _run_command(cfg, args, lock, metastore)
    except WarehouseBusy as e:
        print(f"realsyn: {e}", file=sys.stderr)
        return 4


def _hold_warehouse(cfg, args, stack: ExitStack):
    """(lock or None, whether the metastore may be opened). Only the local profile's embedded
    metastore needs the lock; a run refuses (or waits) while another process holds it, a reader
    then reads the table folders directly instead."""
    if cfg.spark.delta != "local-jars":
        return None, True
    run_id = getattr(args, "batch_id", None) or f"{args.command}-{os.getpid()}"
    wait = getattr(args, "wait", False)

    def waiting(holder) -> None:
        who = holder.describe() if holder else "another process"
        print(f"realsyn: waiting for {who} to release warehouse {cfg.spark.warehouse_dir}", file=sys.stderr)

    try:
        return stack.enter_context(warehouse_lock(cfg.spark.warehouse_dir, run_id, args.command, wait=wait,
                                                  on_wait=waiting)), True
    except WarehouseBusy as e:
        if args.command == "run":
            raise
        print(f"realsyn: {e.holder.describe() if e.holder else 'another process'} holds the metastore; "
              "reading the Delta table folders directly (tables only, no views)", file=sys.stderr)
        return None, False


def _run_command(cfg, args, lock, metastore: bool) -> int:
    from etl.session import build_spark

    try:
        # Progress bars help during a run; they only clutter `sql` and `status` output.
        spark = build_spark(cfg, progress=args.command == "run", metastore=metastore)
    except SetupError as e:
        print(f"setup error: {e}", file=sys.stderr)
        return 3
    try:
        COMMANDS[args.command](spark, cfg, args, lock)
    except Exception as e:
        if not _jvm_died(e):
            raise
        if lock is not None:
            lock.mark_died()
        print("realsyn: the Spark JVM died under this run (most often out of memory: raise "
              "spark.driver.memory in the profile; or it was killed). The next `realsyn run` records "
              "this run as abandoned in `runs`.", file=sys.stderr)
        return 5
    return 0


def _jvm_died(e: BaseException) -> bool:
    from py4j.protocol import Py4JNetworkError

    while e is not None:
        if isinstance(e, (Py4JNetworkError, ConnectionRefusedError, ConnectionResetError, BrokenPipeError)):
            return True
        e = e.__cause__ or e.__context__
    return False


if __name__ == "__main__":
    sys.exit(main())
