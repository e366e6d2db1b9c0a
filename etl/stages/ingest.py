"""ingest: raw documents -> bronze `documents`, `doc_texts`, `doc_images` (+ `quarantine`).

Read every input path as one JSON string per record, parse and validate all formats with the same
udf, then MERGE on content-derived keys: ingesting the same input twice inserts nothing.
"""
from __future__ import annotations

import os
from pathlib import Path

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl.context import StageContext, StageResult
from etl.stage import stage
from udfs.ingest import (FILES_SCHEMA, PARSED_SCHEMA, RAW_SCHEMA, UNREADABLE_FILE, Limits, LocalFiles,
                         make_parse_fn, make_read_fn)

QUARANTINE_SCHEMA = (
    "quarantine_id string, source string, source_format string, record_no bigint, reason string, "
    "detail string, raw string, batch_id string, quarantined_at timestamp"
)


def _numbered(df: DataFrame, source: str, base_dir: str) -> DataFrame:
    """RAW_SCHEMA rows from a one-column (raw) DataFrame: record_no is the row number in the file."""
    rdd = df.rdd.zipWithIndex().map(lambda pair: (source, pair[1], pair[0][0], base_dir, None))
    return rdd.toDF(RAW_SCHEMA)


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


def _remote(path: str) -> bool:
    return "://" in path or path.startswith("/Volumes/")


def read_raw(ctx: StageContext) -> tuple[DataFrame, list[tuple[str, str]]]:
    """One JSON string per record (RAW_SCHEMA) from every input file; files that cannot be read
    are returned apart (source, error) so they land in quarantine instead of failing the run.

    Local jsonl files are read by udfs/ingest.py's capped line reader (one task per file, no line
    held whole past ingest.max_record_bytes); remote ones by Spark's text reader, whose Hadoop
    line cap (set by etl/session.py) skips over-long lines; parquet by Spark, one row per record.
    """
    spark, cfg, lim = ctx.spark, ctx.cfg.ingest, limits(ctx)
    parts, unreadable, local = [], [], []
    for path in cfg.paths:
        for file in _expand(path):
            # A remote path may carry credentials (s3a://key:secret@bucket/...): stored redacted.
            source = lim.url(file) if _remote(file) else os.path.abspath(file)
            base_dir = os.path.dirname(source)
            if cfg.format != "obelics" and not _remote(source):
                local.append((source, base_dir))
                continue
            try:
                if cfg.format == "obelics":
                    df = spark.read.parquet(file)
                    df = df.select(F.to_json(F.struct(*df.columns)).alias("raw"))
                else:
                    df = spark.read.text(file)
                parts.append(_numbered(df, source, base_dir))
            except Exception as e:  # corrupt parquet footer, unreadable file, ...
                unreadable.append((source, lim.text(str(e).splitlines()[0][:500])))
    if local:
        files = spark.createDataFrame(local, FILES_SCHEMA).repartition(len(local))
        parts.append(files.mapInPandas(make_read_fn(cfg.max_record_bytes, cfg.quarantine_raw_chars),
                                       RAW_SCHEMA))
    if not parts:
        return spark.createDataFrame([], RAW_SCHEMA), unreadable
    raw = parts[0]
    for part in parts[1:]:
        raw = raw.unionByName(part)
    return raw, unreadable


def limits(ctx: StageContext) -> Limits:
    cfg = ctx.cfg.ingest
    files = LocalFiles(root=cfg.local_root, allow_roots=tuple(cfg.allow_absolute_roots),
                       max_bytes=ctx.cfg.fetch.max_bytes)
    return Limits(max_record_bytes=cfg.max_record_bytes, max_text_chars=cfg.max_text_chars, files=files,
                  secret_params=tuple(ctx.cfg.redaction.secret_params))


def tables_from(parsed: DataFrame, unreadable: list[tuple[str, str]], ctx: StageContext) -> dict[str, DataFrame]:
    """The parsed records as the four bronze tables' rows."""
    fmt, batch = ctx.cfg.ingest.format, F.lit(ctx.batch_id)
    docs = parsed.where("kind = 'doc'")
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


KEYS = {"documents": ["doc_id"], "doc_texts": ["doc_id", "position"], "doc_images": ["doc_id", "position"],
        "quarantine": ["quarantine_id"]}


@stage(reads=(), writes=("documents", "doc_texts", "doc_images", "quarantine"),
       config=("ingest", "redaction", "fetch.max_bytes"))
def ingest(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.ingest
    # read
    raw, unreadable = read_raw(ctx)

    # transform
    parse = make_parse_fn(cfg.format, limits(ctx), cfg.quarantine_raw_chars)
    parsed = raw.mapInPandas(parse, PARSED_SCHEMA).persist()
    rows = tables_from(parsed, unreadable, ctx)

    # write
    ctx.create_if_missing("quarantine", QUARANTINE_SCHEMA)
    inserted = {name: ctx.merge_new(df, name, KEYS[name]) for name, df in rows.items()}

    # record: counted from the cached parse, not by reading the inputs again; a record that lost a
    # slot has a doc row and a bad row under one (source, record_no).
    result = StageResult(rows_in=parsed.select("source", "record_no").distinct().count(),
                         rows_out=parsed.where("kind = 'doc'").count())
    quarantined = rows["quarantine"].groupBy("reason").agg(F.count("*").alias("n")).collect()
    result.add_drops({r["reason"]: r["n"] for r in quarantined})
    result.metrics = {f"inserted_{name}": float(n) for name, n in inserted.items()}
    result.notes["format"] = cfg.format
    parsed.unpersist()
    return result
