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
from udfs.ingest import PARSED_SCHEMA, UNREADABLE_FILE, make_parse_fn

NAME = "ingest"
READS: tuple[str, ...] = ()
WRITES = ("documents", "doc_texts", "doc_images", "quarantine")
GPU = False

QUARANTINE_SCHEMA = (
    "quarantine_id string, source string, source_format string, record_no bigint, reason string, "
    "detail string, raw string, batch_id string, quarantined_at timestamp"
)


def _numbered(df: DataFrame, source: str, base_dir: str) -> DataFrame:
    """(source, record_no, raw, base_dir): record_no is the line / row number within the file."""
    rdd = df.rdd.zipWithIndex().map(lambda pair: (source, pair[1], pair[0][0], base_dir))
    return rdd.toDF("source string, record_no bigint, raw string, base_dir string")


def _expand(path: str) -> list[str]:
    """Local folders are listed so each file is its own source; remote paths go to Spark as is."""
    if "://" in path or path.startswith("/Volumes/"):
        return [path]
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"input path does not exist: {path}")
    if p.is_dir():
        files = sorted(str(f) for f in p.iterdir() if f.is_file() and not f.name.startswith((".", "_")))
        return files
    return [str(p)]


def read_raw(ctx: StageContext) -> tuple[DataFrame, list[tuple[str, str]]]:
    """One JSON string per record from every input file; files Spark cannot read are returned
    apart (source, error) so they land in quarantine instead of failing the run."""
    spark, fmt = ctx.spark, ctx.cfg.input.format
    parts, unreadable = [], []
    for path in ctx.cfg.input.paths:
        for file in _expand(path):
            source = file if "://" in file else os.path.abspath(file)
            base_dir = os.path.dirname(source)
            try:
                if fmt == "obelics":
                    df = spark.read.parquet(source)
                    df = df.select(F.to_json(F.struct(*df.columns)).alias("raw"))
                else:
                    df = spark.read.text(source)
                parts.append(_numbered(df, source, base_dir))
            except Exception as e:  # corrupt parquet footer, unreadable file, ...
                unreadable.append((source, str(e).splitlines()[0][:500]))
    if not parts:
        empty = "source string, record_no bigint, raw string, base_dir string"
        return spark.createDataFrame([], empty), unreadable
    raw = parts[0]
    for part in parts[1:]:
        raw = raw.unionByName(part)
    return raw, unreadable


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.input
    # read
    raw, unreadable = read_raw(ctx)

    # transform
    parse = make_parse_fn(cfg.format, cfg.max_record_bytes, cfg.quarantine_raw_chars)
    parsed = raw.mapInPandas(parse, PARSED_SCHEMA).persist()
    batch = F.lit(ctx.batch_id)
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
            [(s, cfg.format, None, UNREADABLE_FILE, e, "") for s, e in unreadable],
            "source string, source_format string, record_no bigint, reason string, detail string, raw string")
        bad = bad.unionByName(files)
    quarantine = bad.select(
        F.sha2(F.concat_ws("\u0001", "source", F.coalesce(F.col("record_no").cast("string"), F.lit("")),
                           "reason", "detail"), 256).substr(1, 32).alias("quarantine_id"),
        "source", "source_format", "record_no", "reason", "detail", "raw",
        batch.alias("batch_id"), F.current_timestamp().alias("quarantined_at"))

    # write
    ctx.create_if_missing("quarantine", QUARANTINE_SCHEMA)
    inserted = {
        "documents": ctx.merge_new(documents, "documents", ["doc_id"]),
        "doc_texts": ctx.merge_new(doc_texts, "doc_texts", ["doc_id", "position"]),
        "doc_images": ctx.merge_new(doc_images, "doc_images", ["doc_id", "position"]),
        "quarantine": ctx.merge_new(quarantine, "quarantine", ["quarantine_id"]),
    }

    # record
    # Counted from the cached parse, not by reading the inputs again; a record that lost a slot
    # has a doc row and a bad row under one (source, record_no).
    result = StageResult(rows_in=parsed.select("source", "record_no").distinct().count(),
                         rows_out=docs.count())
    result.add_drops({r["reason"]: r["n"] for r in bad.groupBy("reason").agg(F.count("*").alias("n")).collect()})
    result.notes = {f"inserted_{k}": str(v) for k, v in inserted.items()}
    result.notes["format"] = cfg.format
    parsed.unpersist()
    return result
