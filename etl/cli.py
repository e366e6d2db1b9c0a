"""`realsyn run | sql | status` — the command line over the runner and the Delta tables."""
from __future__ import annotations

import argparse
import sys

from etl.config import ConfigError, load_config
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
    sql = sub.add_parser("sql", parents=[common], help="run a SQL statement against the tables")
    sql.add_argument("query")
    sql.add_argument("--limit", type=int, default=50, help="rows to print")
    sub.add_parser("status", parents=[common], help="tables, versions, row counts, last run per stage")
    return p


def cmd_run(spark, cfg, args) -> None:
    from etl.runner import resolve_stages, run_stages

    stages = resolve_stages(args.stages.split(",") if args.stages else None)
    run_stages(spark, cfg, stages)


def cmd_sql(spark, cfg, args) -> None:
    df = spark.sql(args.query)
    df.show(args.limit, truncate=80)


def cmd_status(spark, cfg, args) -> None:
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
    try:
        cfg = load_config(args.conf, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from etl.session import build_spark

    try:
        # Progress bars help during a run; they only clutter `sql` and `status` output.
        spark = build_spark(cfg, progress=args.command == "run")
    except SetupError as e:
        print(f"setup error: {e}", file=sys.stderr)
        return 3
    COMMANDS[args.command](spark, cfg, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
