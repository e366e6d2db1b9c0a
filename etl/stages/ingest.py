"""ingest: raw documents -> bronze `documents`, `doc_texts`, `doc_images` (+ `quarantine`,
`ingested_files`).

Read every input path as one JSON string per record, parse and validate all formats with the same
udf, then write on content-derived keys: ingesting the same input twice changes nothing.

Re-crawls (documented rule): a page is its `doc_id` (its URL, or its content when it has none). A
document seen again with other content replaces its old version whole: the `documents` row is
updated and its `doc_texts` / `doc_images` rows are made exactly the new version's (changed slots
rewritten, new ones inserted, slots the new version lacks deleted), so two versions are never
spliced. Within one run the record read last wins (highest source path, then record number); the
others are dropped as `superseded_in_run`.

Processed files: local input files are recorded in `ingested_files` (path, size, modification
time, SHA-256) after every write of the run; a later run skips a file whose path, size and
modification time match, or whose content hash matches (touched, not changed), without parsing it.
A killed run has not recorded its files, so running it again redoes them (the writes are keyed).
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from etl import tables
from etl.context import StageContext, StageResult
from etl.stage import stage
from udfs.ingest import (FILES_SCHEMA, PARSED_SCHEMA, RAW_SCHEMA, UNREADABLE_FILE, Limits, LocalFiles,
                         error_detail, make_parse_fn, make_read_fn, storable)

QUARANTINE_SCHEMA = (
    "quarantine_id string, source string, source_format string, record_no bigint, reason string, "
    "detail string, raw string, batch_id string, quarantined_at timestamp"
)
FILES_TABLE_SCHEMA = "source string, size bigint, mtime_ns bigint, sha256 string, batch_id string"
SUPERSEDED = "superseded_in_run"  # a record of a page that a later record of the same run replaces


def _numbered(df: DataFrame, source, base_dir) -> DataFrame:
    """RAW_SCHEMA rows from Spark's reader (`raw` plus its hidden `_metadata`); `source` and
    `base_dir` map the file's URI column to theirs. record_no is the row's number in its own
    file, whatever else was read with it. Splits of one file are numbered in
    offset order (Spark reads a split's rows in file order; monotonically_increasing_id keeps that
    order within a split), so the numbers are the same on every run and for every folder size."""
    order = Window.partitionBy("_file").orderBy("_block", "_seq")
    return (df.select("raw", F.col("_metadata.file_path").alias("_file"),
                      F.col("_metadata.file_block_start").alias("_block"),
                      F.monotonically_increasing_id().alias("_seq"))
            .select(source(F.col("_file")).alias("source"), (F.row_number().over(order) - 1).cast("bigint").alias("record_no"),
                    "raw", base_dir(F.col("_file")).alias("base_dir"), F.lit(None).cast("bigint").alias("cut_length")))


def _expand(path: str) -> list[str]:
    """Local folders are listed so each file is its own source; remote paths go to Spark as is."""
    if _remote(path):
        return [path]
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"input path does not exist: {path}")
    if p.is_dir():
        files = sorted(str(f) for f in p.iterdir() if f.is_file() and not f.name.startswith((".", "_")))
        return files
    return [str(p)]


def unreadable_inputs(paths: list[str]) -> list[str]:
    """The local input paths that do not exist or cannot be read, each with why: checked by the
    CLI before the JVM starts, so a typo costs a second, not a Spark start."""
    problems = []
    for path in paths:
        if _remote(path):
            continue
        if not os.path.exists(path):
            problems.append(f"{path} does not exist")
        elif not os.access(path, os.R_OK | (os.X_OK if os.path.isdir(path) else 0)):
            problems.append(f"{path} is not readable by this user")
    return problems


def _remote(path: str) -> bool:
    return "://" in path or path.startswith("/Volumes/")


def _sha256(path: str) -> str | None:
    """The file's content hash; None for anything but a readable regular file (O_NONBLOCK: a FIFO
    given as input must not hang the driver; the reader quarantines it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        h = hashlib.sha256()
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def new_local_files(ctx: StageContext, files: list[str]) -> tuple[set[str], list[tuple]]:
    """(files to read, records to write once the run's writes are done). A file whose path, size
    and mtime match a record is skipped without being hashed; one whose hash matches is skipped
    and its record given the new mtime. A file that cannot be hashed is read (and quarantined by
    the reader), never recorded."""
    seen_stat, seen_hash = set(), set()
    if files and ctx.exists("ingested_files"):
        for r in ctx.read("ingested_files").where(F.col("source").isin(files)).collect():
            seen_stat.add((r["source"], r["size"], r["mtime_ns"]))
            seen_hash.add((r["source"], r["sha256"]))
    todo, records = set(), []
    for source in files:
        try:
            st = os.stat(source)
        except OSError:
            todo.add(source)
            continue
        if (source, st.st_size, st.st_mtime_ns) in seen_stat:
            continue
        digest = _sha256(source)
        if digest is None or (source, digest) not in seen_hash:
            todo.add(source)
        if digest is not None:
            records.append((source, st.st_size, st.st_mtime_ns, digest))
    return todo, records


def read_raw(ctx: StageContext) -> tuple[DataFrame, list[tuple[str, str]], list[tuple]]:
    """One JSON string per record (RAW_SCHEMA) from every input file not ingested yet; files that
    cannot be read are returned apart (source, error) so they land in quarantine instead of
    failing the run; and the `ingested_files` records to write when the run's writes are done.

    Local jsonl files are read by udfs/ingest.py's capped line reader (one task per file, no line
    held whole past ingest.max_record_bytes); remote ones by Spark's text reader, whose Hadoop
    line cap (set by etl/session.py) skips over-long lines; parquet by Spark, one row per record.
    A remote folder is read whole, each file its own source (redacted by the parse step,
    udfs/ingest.py); remote files are not recorded in `ingested_files` (re-read every run).
    A local file whose name is not valid UTF-8 (no table could hold it) is unreadable, its name
    stored escaped.
    """
    spark, cfg, lim = ctx.spark, ctx.cfg.ingest, limits(ctx)
    paths = [f for path in cfg.paths for f in _expand(path)]
    todo, records = new_local_files(ctx, [os.path.abspath(f) for f in paths if not _remote(f)])
    parts, unreadable, local = [], [], []
    for file in paths:
        remote = _remote(file)
        source = file if remote else os.path.abspath(file)
        if not remote and source not in todo:
            continue
        if not _utf8(source):  # a name of non-UTF-8 bytes, as Python lists it (surrogate escapes)
            unreadable.append((storable(source, 2000, lim.secret_params), "file name is not valid UTF-8"))
            continue
        if cfg.format != "obelics" and not remote:
            local.append((source, os.path.dirname(source)))
            continue
        try:
            if cfg.format == "obelics":
                df = spark.read.parquet(file)
                df = df.select(F.to_json(F.struct(*df.columns)).alias("raw"), "_metadata")
            else:
                df = spark.read.text(file).select(F.col("value").alias("raw"), "_metadata")
            if remote:
                parts.append(_numbered(df, lambda f: f, lambda f: F.regexp_extract(f, r"^(.*)/[^/]*$", 1)))
            else:
                parts.append(_numbered(df, lambda f: F.lit(source), lambda f: F.lit(os.path.dirname(source))))
        except Exception as e:  # corrupt parquet footer, unreadable file, ...
            unreadable.append((lim.url(source), storable(error_detail(e), 500, lim.secret_params)))
    if local:
        files = spark.createDataFrame(local, FILES_SCHEMA).repartition(len(local))
        parts.append(files.mapInPandas(make_read_fn(cfg.max_record_bytes, cfg.quarantine_raw_chars),
                                       RAW_SCHEMA))
    raw = spark.createDataFrame([], RAW_SCHEMA)
    for part in parts:
        raw = raw.unionByName(part)
    failed = {s for s, _ in unreadable}
    return raw, unreadable, [r for r in records if r[0] not in failed and _utf8(r[0])]


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def limits(ctx: StageContext) -> Limits:
    cfg = ctx.cfg.ingest
    files = LocalFiles(root=cfg.local_root, allow_roots=tuple(cfg.allow_absolute_roots),
                       max_bytes=ctx.cfg.fetch.max_bytes)
    return Limits(max_record_bytes=cfg.max_record_bytes, max_text_chars=cfg.max_text_chars, files=files,
                  secret_params=tuple(ctx.cfg.redaction.secret_params))


def latest_versions(parsed: DataFrame) -> DataFrame:
    """The parsed documents, one per doc_id: the record read last wins (source, then record_no)."""
    last = Window.partitionBy("doc_id").orderBy(F.col("source").desc(), F.col("record_no").desc())
    return (parsed.where("kind = 'doc'").withColumn("_rank", F.row_number().over(last))
            .where("_rank = 1").drop("_rank"))


def tables_from(parsed: DataFrame, unreadable: list[tuple[str, str]], ctx: StageContext) -> dict[str, DataFrame]:
    """The parsed records as the four bronze tables' rows (one version per document)."""
    fmt, batch = ctx.cfg.ingest.format, F.lit(ctx.batch_id)
    docs = latest_versions(parsed)
    documents = docs.select(
        "doc_id", "url", "title", "source_format", "source", "metadata",
        F.size("texts").alias("n_texts"), F.size("images").alias("n_images"),
        batch.alias("batch_id"), F.current_timestamp().alias("ingested_at"),
    )
    doc_texts = docs.select("doc_id", F.explode("texts").alias("t")).select(
        "doc_id", "t.position", "t.text_id", "t.text", batch.alias("batch_id"))
    doc_images = docs.select("doc_id", F.explode("images").alias("i")).select(
        "doc_id", "i.position", "i.image_id", "i.url", "i.path", "i.alt_text", "i.metadata",
        "i.bytes", batch.alias("batch_id"))
    bad = parsed.where("kind = 'bad'").select("source", "source_format", "record_no", "reason", "detail", "raw")
    if unreadable:
        files = ctx.spark.createDataFrame(
            [(s, fmt, None, UNREADABLE_FILE, e, "") for s, e in unreadable],
            "source string, source_format string, record_no bigint, reason string, detail string, raw string")
        bad = bad.unionByName(files)
    quarantine = bad.select(
        F.sha2(F.concat_ws("\u0001", "source", F.coalesce(F.col("record_no").cast("string"), F.lit("")),
                           "reason", "detail"), 256).substr(1, 32).alias("quarantine_id"),
        "source", "source_format", "record_no", "reason", "detail", "raw",
        batch.alias("batch_id"), F.current_timestamp().alias("quarantined_at"))
    return {"documents": documents, "doc_texts": doc_texts, "doc_images": doc_images, "quarantine": quarantine}


# What makes a row a different version (batch_id and timestamps say when, not what).
CONTENT = {"documents": ["url", "title", "source_format", "source", "metadata", "n_texts", "n_images"],
           "doc_texts": ["text_id", "text"],
           "doc_images": ["image_id", "url", "path", "alt_text", "metadata", "bytes"]}
SLOT = ["doc_id", "position"]


def replace_versions(ctx: StageContext, df: DataFrame, name: str) -> tuple[int, int]:
    """One MERGE that makes `name` hold this run's version of every document in `df`: rows whose
    content differs are rewritten, new ones inserted and, for child tables, slots of those
    documents that the new version lacks deleted. Unchanged rows are not touched, so a re-run
    (after a crash, say) writes nothing. Returns (rows inserted, rows updated + deleted)."""
    table = ctx.table(name)
    tables.crash_point(f"merge:{name}")
    ctx.create_if_missing(name, df.schema)
    keys = SLOT if name != "documents" else ["doc_id"]
    source = df.withColumn("_stale", F.lit(False))
    if name != "documents":
        # Old slots of re-sent documents that the new version has not: delete markers.
        current = ctx.read(name).join(df.select("doc_id").distinct(), "doc_id", "left_semi")
        stale = current.join(df.select(*keys), keys, "left_anti").select(*df.columns)
        source = source.unionByName(stale.withColumn("_stale", F.lit(True)))
    differs = " OR ".join(f"NOT (t.`{c}` <=> s.`{c}`)" for c in CONTENT[name])
    columns = ", ".join(f"`{c}`" for c in df.columns)
    metrics = tables.merge_into(source, table, keys, f"""
        WHEN MATCHED AND s._stale THEN DELETE
        WHEN MATCHED AND NOT s._stale AND ({differs}) THEN UPDATE SET {", ".join(f"`{c}` = s.`{c}`" for c in df.columns)}
        WHEN NOT MATCHED AND NOT s._stale THEN INSERT ({columns}) VALUES ({", ".join(f"s.`{c}`" for c in df.columns)})""")
    return (int(metrics["num_inserted_rows"] or 0),
            int(metrics["num_updated_rows"] or 0) + int(metrics["num_deleted_rows"] or 0))


@stage(reads=(), writes=("documents", "doc_texts", "doc_images", "quarantine", "ingested_files"),
       config=("ingest", "redaction", "fetch.max_bytes"))
def ingest(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.ingest
    # read
    raw, unreadable, files = read_raw(ctx)

    # transform
    parse = make_parse_fn(cfg.format, limits(ctx), cfg.quarantine_raw_chars)
    parsed = raw.mapInPandas(parse, PARSED_SCHEMA).persist()
    rows = tables_from(parsed, unreadable, ctx)

    # write: documents first, then their slots; the files record last, so a run killed anywhere
    # before it reads its files again and completes what it left.
    ctx.create_if_missing("quarantine", QUARANTINE_SCHEMA)
    ctx.create_if_missing("ingested_files", FILES_TABLE_SCHEMA)
    written = {name: replace_versions(ctx, rows[name], name) for name in ("documents", "doc_texts", "doc_images")}
    written["quarantine"] = (ctx.merge_new(rows["quarantine"], "quarantine", ["quarantine_id"]), 0)
    if files:
        ctx.upsert(ctx.spark.createDataFrame([(*f, ctx.batch_id) for f in files], FILES_TABLE_SCHEMA),
                   "ingested_files", ["source", "sha256"])

    # record: counted from the cached parse, not by reading the inputs again. Every record read is
    # a document kept, a document superseded by a later record of the same page, or a bad record
    # (a record that only lost a slot is a document, and its slot a quarantine row).
    records = parsed.groupBy("source", "record_no").agg(F.max(F.col("kind") == "doc").alias("doc"))
    counts = records.agg(F.count("*").alias("n"), F.sum(F.col("doc").cast("int")).alias("docs")).first()
    n_docs = counts["docs"] or 0
    result = StageResult(rows_in=counts["n"] + len(unreadable), rows_out=rows["documents"].count())
    quarantined = rows["quarantine"].groupBy("reason").agg(F.count("*").alias("n")).collect()
    result.add_drops({r["reason"]: r["n"] for r in quarantined})
    if n_docs > result.rows_out:
        result.add_drops({SUPERSEDED: n_docs - result.rows_out})
    result.metrics = {f"inserted_{name}": float(n) for name, (n, _) in written.items()}
    result.metrics |= {f"replaced_{name}": float(n) for name, (_, n) in written.items() if name != "quarantine"}
    result.metrics["records_quarantined"] = float(result.rows_in - n_docs)
    result.metrics["files_recorded"] = float(len(files))
    result.notes["format"] = cfg.format
    parsed.unpersist()
    return result
