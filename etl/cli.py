"""`realsyn run | sql | status | rollback | stages | config | calibrate | report | check` — the command line over the
runner and the tables."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import ExitStack
from pathlib import Path

from etl import logs
from etl.config import ConfigError, leaves, load_config, load_layers
from etl.lock import WarehouseBusy, warehouse_lock
from etl.session import SetupError

log = logging.getLogger(logs.LOGGER)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--conf", default=None, help="profile YAML (default: conf/local.yaml)")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set retrieve.k=5 (repeatable)")
    common.add_argument("--verbose", action="store_true",
                        help="debug logging and the model libraries' own progress bars")
    p = argparse.ArgumentParser(prog="realsyn", description="RealSyn ETL on Spark + Delta Lake")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", parents=[common], help="run pipeline stages")
    run.add_argument("--stages", default=None, help="comma-separated stages (default: all, in order)")
    run.add_argument("--wait", action="store_true",
                     help="wait for a run that holds the warehouse instead of refusing at once")
    run.add_argument("--retry-failed", action="store_true",
                     help="fetch: only retry URLs that failed (5xx, 429, timeouts, network), within their attempt budget")
    run.add_argument("--skip-check", action="store_true",
                     help="GPU / cluster profiles: do not run the `realsyn check` preflight first")
    sql = sub.add_parser("sql", parents=[common], help="run a SQL statement against the tables")
    sql.add_argument("query")
    sql.add_argument("--limit", type=int, default=50, help="rows to print")
    st = sub.add_parser("status", parents=[common], help="tables, versions, row counts, last run per stage")
    st.add_argument("--history", metavar="TABLE", default=None,
                    help="a table's versions instead: time, operation, rows, the run and stage of each commit")
    rb = sub.add_parser("rollback", parents=[common],
                        help="restore every table to its version after a run (Delta RESTORE), recorded as a run")
    rb.add_argument("--to-run", dest="to_run", required=True, metavar="RUN_ID", help="a run id from `runs`")
    sub.add_parser("stages", parents=[common], help="the pipeline: stages, reads -> writes, resources, config")
    sub.add_parser("config", parents=[common], help="the resolved config and where each value came from")
    rep = sub.add_parser("report", parents=[common], help="write the HTML report over the tables (etl/report.py)")
    rep.add_argument("--out", default=None, help="folder for report.html and its PNGs (default: <warehouse>/report)")
    cal = sub.add_parser("calibrate", parents=[common],
                         help="set the perplexity band or the sentence dedup threshold from reference text (etl/calibrate.py)")
    cal.add_argument("what", choices=["perplexity", "dedup"])
    cal.add_argument("--texts", default=None, help="clean reference text: captions jsonl, {text} jsonl or "
                     "one sentence a line (default: the bundled COCO captions)")
    cal.add_argument("--reference", default="gpt2-large",
                     help="reference model for quantile matching, used when it loads offline ('none': never)")
    cal.add_argument("--low-share", type=float, default=None, help="offline route: share of clean text under the band")
    cal.add_argument("--high-share", type=float, default=None, help="offline route: share of clean text over the band")
    cal.add_argument("--share", type=float, default=None,
                     help="dedup: share of clean reference texts allowed a neighbour above the threshold")
    cal.add_argument("--out", default=None, help="also write the result as a profile fragment (YAML) here")
    sbm = sub.add_parser("submit", parents=[common], help="print or run the spark-submit / bundle command for a "
                         "cluster profile (etl/submit.py)")
    sbm.add_argument("--profile", default="emr-gpu", help="conf/<profile>.yaml (or --conf a file)")
    sbm.add_argument("--stages", default=None, help="comma-separated stages (default: all)")
    sbm.add_argument("--artifacts", default=None, help="folder or URI holding the wheel, conf archive and "
                     "submit.py (default: s3://YOUR-BUCKET/realsyn for emr-gpu, else ./dist)")
    sbm.add_argument("--build", action="store_true", help="build the wheel and conf archive into dist/ first")
    sbm.add_argument("--dry-run", action="store_true", help="print the command only")
    sbm.add_argument("--emr-step", action="store_true", help="print it as `aws emr add-steps` JSON instead")
    chk = sub.add_parser("check", parents=[common], help="preflight: models, GPU environment, cluster settings, "
                         "inputs, outputs, versions; one line per check (etl/check.py)")
    chk.add_argument("--profile", default=None, help="conf/<profile>.yaml (--conf a file wins; default: local)")
    chk.add_argument("--stages", default=None, help="only the models of these stages (default: all)")
    chk.add_argument("--session", action="store_true", help="cluster profiles: start (or attach to) the Spark "
                     "session and check its live settings and remote inputs")
    return p


# --- commands without Spark ------------------------------------------------------------------------

def cmd_stages(cfg, args) -> None:
    from etl.gpu import model_task_request
    from etl.runner import default_registry

    dumped = cfg.model_dump(mode="json")
    rows = [("stage", "reads -> writes", "resources", "config", "models", "hash")]
    for s in default_registry().stages:
        reads = ", ".join(s.reads + tuple(f"({t})" for t in s.optional_reads)) or "(input files)"
        models = ", ".join(s.model_keys(dumped)) or "-"
        gpu = ", ".join(step.name for step in s.gpu_steps)
        rows.append((s.name, f"{reads} -> {', '.join(s.writes)}", f"GPU: {gpu}" if gpu else "CPU",
                     ", ".join(s.config), models, s.config_hash(dumped)))
    _table(rows)
    print("\n(table) = read when present. hash = stage_config_hash under this config.")
    gpu = cfg.spark.gpu
    cores = int(cfg.spark.conf.get("spark.executor.cores", 0)) or None
    held = (f"each task holds {model_task_request(gpu, cores)}" if gpu.enabled
            else "CPU tasks under this profile: spark.gpu.enabled is false")
    print(f"GPU steps ({held}); every other step of a stage, its joins and writes run as CPU tasks:")
    for s in default_registry().stages:
        for step in s.gpu_steps:
            print(f"  {s.name}.{step.name}: {step.what}")


def cmd_config(cfg, args) -> None:
    import yaml

    layers = load_layers(args.conf, args.overrides)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    print("\n# where each value came from (default / profile / environment / --set)")
    for path, _ in leaves(cfg.model_dump(mode="json")):
        key = ".".join(path)
        print(f"{key:<48} {layers.sources.get(key, 'default')}")


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


# --- commands over Spark -----------------------------------------------------------------------------

def cmd_run(spark, cfg, args, lock) -> None:
    from etl.runner import default_registry, record_abandoned, run_stages

    if getattr(args, "preflight", False) and cfg.spark.gpu.enabled:
        # The settings the cluster actually started with (spark-submit, Databricks' spark_conf).
        from etl.check import PreflightFailed, check_live_session

        problems = check_live_session(spark, cfg)
        if problems:
            raise PreflightFailed(f"GPU scheduling (live session): {problems[0]}")
    if lock is not None and lock.abandoned is not None and lock.abandoned.command == "run":
        record_abandoned(spark, cfg, lock.abandoned)
    # Before any stage reads: a damaged table, or one older than `runs` says, stops the run here.
    from etl.warehouse import check_versions

    selected = default_registry().resolve(args.stage_list)
    check_versions(spark, cfg, {t for s in selected for t in (*s.reads, *s.optional_reads, *s.writes)})
    run_stages(spark, cfg, args.stage_list, batch_id=args.batch_id,
               on_stage=lock.set_stage if lock is not None else None)


def cmd_sql(spark, cfg, args, lock) -> None:
    df = spark.sql(args.query)
    df.show(args.limit, truncate=80)


def cmd_history(spark, cfg, args) -> None:
    from etl.history import history

    rows = [("version", "time (UTC)", "operation", "rows", "run", "stage", "status")]
    for h in history(spark, cfg, args.history):
        rows.append((str(h["version"]), f"{h['time']:%Y-%m-%d %H:%M:%S}", h["operation"], str(h["rows"]),
                     h["run_id"], h["stage"], h["status"]))
    _table(rows)


def cmd_rollback(spark, cfg, args, lock) -> None:
    from etl.history import rollback
    from udfs.redact import redact_url

    for table, what in rollback(spark, cfg, args.to_run).items():
        print(f"{table:<28} {what}")
    # Files are not Delta tables: what an export wrote after that run stays until it is re-exported.
    print(f"The export folder ({redact_url(cfg.export.out_dir, cfg.redaction.secret_params)}) is not rolled back: "
          "`realsyn run --stages export` writes it again from the rolled-back tables.")


def cmd_status(spark, cfg, args, lock) -> None:
    from etl import tables
    from etl.runner import default_registry

    if args.history:
        return cmd_history(spark, cfg, args)

    db = cfg.catalog.database
    print(f"database {db}")
    listed = sorted(spark.catalog.listTables(db), key=lambda t: t.name)
    rows = [("table", "version", "rows")]
    for t in listed:
        name = tables.qualified(db, t.name)
        rows.append((t.name, str(tables.version(spark, name)), str(spark.table(name).count())))
    _table(rows)
    runs = tables.qualified(db, "runs")
    if not tables.exists(spark, runs):
        print("no stage has run yet")
        return
    columns = set(spark.table(runs).columns)
    models = "models" if "models" in columns else "map() AS models"
    warnings = "warnings" if "warnings" in columns else "array() AS warnings"
    last = spark.sql(f"""
        SELECT stage, status, started_at, round(wall_s, 1) AS wall_s, rows_in, rows_out, drops,
               {models}, {warnings}
        FROM (SELECT *, row_number() OVER (PARTITION BY stage ORDER BY started_at DESC) AS rn FROM {runs})
        WHERE rn = 1""").collect()
    by_stage = {r["stage"]: r for r in last}
    rows = [("stage", "status", "last run (UTC)", "wall s", "in", "out", "models", "drops")]
    warned = []
    for stage in default_registry().names:
        r = by_stage.get(stage)
        if r is None:
            rows.append((stage, "-", "", "", "", "", "", ""))
            continue
        drops = ", ".join(f"{k}={v}" for k, v in sorted((r["drops"] or {}).items()))
        used = ", ".join(sorted(set((r["models"] or {}).values())))
        rows.append((stage, r["status"], f"{r['started_at']:%Y-%m-%d %H:%M:%S}", str(r["wall_s"] or ""),
                     str(r["rows_in"] if r["rows_in"] is not None else ""),
                     str(r["rows_out"] if r["rows_out"] is not None else ""), used, drops))
        warned += [f"[{stage}] {w}" for w in r["warnings"] or []]
    print()
    _table(rows)
    for w in warned:
        print(f"WARNING {w}")
    outputs = [("export", Path(cfg.export.out_dir) / "manifest.json"),
               ("dataset card", Path(cfg.export.out_dir) / "README.md"),
               ("report", report_dir(cfg) / "report.html")]
    found = [(what, p.resolve()) for what, p in outputs if p.exists()]
    if found:
        print()
        for what, path in found:
            print(f"{what + ':':<14}{path.parent if what == 'export' else path}")


def cmd_calibrate(spark, cfg, args, lock) -> None:
    """Score the reference texts with the configured model (in this process), print and write the
    result, record it in `runs`."""
    from datetime import datetime, timezone

    from etl import calibrate as C
    from etl.runner import new_batch_id, record_run

    texts_path = args.texts or str(C.DEFAULT_REFERENCE_TEXTS)
    texts = C.reference_texts(texts_path)
    if args.what == "dedup":
        return calibrate_dedup(spark, cfg, args, texts, texts_path)
    from realsyn_models.causal_lm import load_scorer

    key = cfg.sentences.perplexity_model
    lm = cfg.models[key]

    def score(model: str, batch: list[str]):
        return load_scorer(model, batch_size=lm.batch_size, max_tokens=lm.max_tokens, precision=lm.precision
                           ).perplexity(batch)

    started = datetime.now(timezone.utc)
    band = C.calibrate(texts, score, lm.source, reference=None if args.reference == "none" else args.reference,
                       low_share=C.LOW_SHARE if args.low_share is None else args.low_share,
                       high_share=C.HIGH_SHARE if args.high_share is None else args.high_share)
    source = band.source(lm.source, Path(texts_path).name)
    fragment = C.profile_fragment(key, band, source)
    print(f"route: {band.route} ({band.why})")
    print(f"band for models.{key} ({lm.source}): {band.low} <= PPL <= {band.high}; keeps {band.kept_share:.1%} "
          f"of {band.n_texts} reference texts\n\n{fragment}")
    if args.out:
        Path(args.out).write_text(fragment)
        print(f"written to {args.out}; lay it into your profile's models: section")
    record_run(spark, cfg, stage="calibrate_perplexity", batch_id=new_batch_id(), started=started,
               metrics={"min_perplexity": band.low, "max_perplexity": band.high, "kept_share": band.kept_share,
                        "n_texts": float(band.n_texts)},
               models={key: lm.source}, notes={"route": band.route, "why": band.why, "texts": texts_path})


def calibrate_dedup(spark, cfg, args, texts: list[str], texts_path: str) -> None:
    from datetime import datetime, timezone

    from etl import calibrate as C
    from etl.runner import new_batch_id, record_run
    from realsyn_models.text_encoder import TextEncoderSpec, get_text_encoder

    key = cfg.semantic_dedup.sentences.encoder
    if key is None:
        raise SystemExit("semantic_dedup.sentences.encoder is not set: sentences are deduped on the retrieval "
                         "CLIP's vectors, whose threshold is the paper's; name a sentence_transformer model to calibrate")
    model = cfg.models[key]
    started = datetime.now(timezone.utc)
    encoder = get_text_encoder(TextEncoderSpec(model.source, model.precision))
    threshold = C.threshold_by_share(encoder.encode_texts(sorted(set(texts)), model.batch_size),
                                     C.DEDUP_SHARE if args.share is None else args.share)
    source = threshold.source(model.source, Path(texts_path).name)
    fragment = C.dedup_fragment(threshold, source)
    print(f"semantic_dedup.sentences.threshold for models.{key} ({model.source}): {threshold.value}; "
          f"{threshold.share:.1%} of {threshold.n_texts} distinct reference texts have a neighbour at or above it"
          f"\n\n{fragment}")
    if args.out:
        Path(args.out).write_text(fragment)
        print(f"written to {args.out}; lay it into your profile")
    record_run(spark, cfg, stage="calibrate_dedup", batch_id=new_batch_id(), started=started,
               metrics={"threshold": threshold.value, "share": threshold.share, "n_texts": float(threshold.n_texts)},
               models={key: encoder.model_id}, notes={"texts": texts_path})


def report_dir(cfg) -> Path:
    return Path(cfg.spark.warehouse_dir or ".") / "report"


def cmd_report(spark, cfg, args, lock) -> None:
    from etl.report import render_report
    from etl.report_data import collect

    path = render_report(collect(spark, cfg), Path(args.out) if args.out else report_dir(cfg))
    print(f"report: {path.resolve()}")


SPARK_COMMANDS = {"run": cmd_run, "sql": cmd_sql, "status": cmd_status, "calibrate": cmd_calibrate,
                  "report": cmd_report, "rollback": cmd_rollback}
PLAIN_COMMANDS = {"stages": cmd_stages, "config": cmd_config}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.setup(args.verbose)
    if args.command == "check":
        from etl.check import cmd_check

        return cmd_check(args)
    if getattr(args, "retry_failed", False):
        args.overrides.append("fetch.retry_failed=true")
    try:
        cfg = load_config(args.conf, args.overrides)
        if args.command == "run":
            from etl.runner import default_registry, new_batch_id

            args.stage_list = [s.name for s in default_registry().resolve(args.stages.split(",") if args.stages
                                                                          else None)]
            args.batch_id = new_batch_id()
            if "ingest" in args.stage_list:
                from etl.stages.ingest import unreadable_inputs

                if problems := unreadable_inputs(cfg.ingest.paths):
                    raise ValueError(f"ingest.paths: {'; '.join(problems)} (give the input with "
                                     "--set 'ingest.paths=[/path/to/file-or-folder]')")
    except (ConfigError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.command == "submit":
        from etl.submit import cmd_submit

        return cmd_submit(args)
    if args.command in PLAIN_COMMANDS:
        PLAIN_COMMANDS[args.command](cfg, args)
        return 0
    if args.command == "run":
        failed = _preflight(cfg, args)
        if failed is not None:
            return failed
    try:
        with ExitStack() as stack:
            lock, metastore = _hold_warehouse(cfg, args, stack)
            return _run_command(cfg, args, lock, metastore)
    except WarehouseBusy as e:
        print(f"realsyn: {e}", file=sys.stderr)
        return 4


def _preflight(cfg, args) -> int | None:
    """`realsyn check` before a run on a GPU or cluster profile (not on a local CPU profile, not with
    --skip-check): stops at the first failing line. None: go on."""
    from etl.check import PREFLIGHT_FAILED, WARN, needs_preflight, preflight

    args.preflight = needs_preflight(cfg) and not args.skip_check
    if not args.preflight:
        return None
    lines = preflight(cfg, args.stage_list)
    for line in lines:
        if line.failed:
            print(f"realsyn: preflight check failed: {line}\n(`realsyn check` with the same --conf / --set prints "
                  "every check; --skip-check runs anyway)", file=sys.stderr)
            return PREFLIGHT_FAILED
        if line.status == WARN:
            print(f"realsyn: preflight: {line}", file=sys.stderr)
    print(f"realsyn: preflight: {len(lines)} checks passed", file=sys.stderr)
    return None


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
        if args.command in ("run", "rollback"):  # writers never work around the lock
            raise
        print(f"realsyn: {e.holder.describe() if e.holder else 'another process'} holds the metastore; "
              "reading the Delta table folders directly (tables only, no views)", file=sys.stderr)
        return None, False


def _run_command(cfg, args, lock, metastore: bool) -> int:
    from etl.check import PREFLIGHT_FAILED, PreflightFailed
    from etl.history import UnknownRun
    from etl.runner import RunNotRecorded, StageFailed
    from etl.session import build_spark
    from etl.stage import MissingInputs
    from etl.warehouse import WAREHOUSE_DAMAGED, WarehouseError, delta_fault

    warehouse = cfg.spark.warehouse_dir if cfg.spark.delta == "local-jars" else None
    try:
        # Progress bars help during a run; they only clutter `sql` and `status` output.
        spark = build_spark(cfg, progress=args.command == "run", metastore=metastore, verbose=args.verbose)
        SPARK_COMMANDS[args.command](spark, cfg, args, lock)
    except SetupError as e:
        print(f"setup error: {e}", file=sys.stderr)
        return 3
    except WarehouseError as e:  # found before anything was read or written: one line, the repair
        print(f"realsyn: {e}", file=sys.stderr)
        return WAREHOUSE_DAMAGED
    except UnknownRun as e:
        print(f"realsyn: {e}", file=sys.stderr)
        return 2
    except MissingInputs as e:
        print(f"realsyn: nothing ran: {e}", file=sys.stderr)
        return 2
    except PreflightFailed as e:
        print(f"realsyn: preflight check failed: {e} (--skip-check runs anyway)", file=sys.stderr)
        return PREFLIGHT_FAILED
    except RunNotRecorded as e:  # Spark stopped, or the `runs` write failed
        if lock is not None:
            lock.mark_died(e.reason)  # kept holder: the next run records this one abandoned
        if args.verbose:
            raise
        print(f"realsyn: {e} (--verbose shows the traceback)", file=sys.stderr)
        return 1
    except StageFailed as e:
        if args.verbose:
            raise
        print(f"realsyn: {e} (the runs table has it; --verbose shows the traceback)", file=sys.stderr)
        return WAREHOUSE_DAMAGED if delta_fault(e) else 1
    except Exception as e:
        if _jvm_died(e):
            if lock is not None:
                lock.mark_died()
            print("realsyn: the Spark JVM died under this run (most often out of memory: raise "
                  "spark.driver.memory in the profile; or it was killed). The next `realsyn run` records "
                  "this run as abandoned in `runs`.", file=sys.stderr)
            return 5
        if args.verbose:
            raise
        fault = delta_fault(e, warehouse)
        if fault is not None:
            print(f"realsyn: {fault} (--verbose shows the traceback)", file=sys.stderr)
            return WAREHOUSE_DAMAGED
        print(f"realsyn: {args.command} failed: {_reason(e)} (--verbose shows the traceback)", file=sys.stderr)
        return 2 if _user_error(e) else 1
    return 0


def _reason(e: BaseException) -> str:
    from etl.runner import reason_line

    return reason_line(e).replace("pyspark.errors.exceptions.captured.", "")


def _user_error(e: BaseException) -> bool:
    """A statement that does not parse or names what is not there (`realsyn sql` with a typo)."""
    from pyspark.errors import AnalysisException, ParseException

    return isinstance(e, (AnalysisException, ParseException))


def _jvm_died(e: BaseException) -> bool:
    from py4j.protocol import Py4JNetworkError

    while e is not None:
        if isinstance(e, (Py4JNetworkError, ConnectionRefusedError, ConnectionResetError, BrokenPipeError)):
            return True
        e = e.__cause__ or e.__context__
    return False


if __name__ == "__main__":
    sys.exit(main())
