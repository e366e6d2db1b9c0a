"""export: a subset of the pairs as the released dataset -> files under `export.out_dir` (paper §3.3).

- `data/part-NNNNN.parquet`: the release schema (`raw_image_url, text1, text2, text3, syn_text`),
  readable by `datasets` and pandas; `extras/part-NNNNN.parquet`: image id + our lineage, row for row;
- `webdataset/NNNNN.tar` (+ `.parquet`, `_stats.json`): shards laid out as img2dataset writes
  them, `.jpg` (the original JPEG when it needs no resize; shorter side to `export.resize_to` only
  when bigger), `.txt` = text1, `.json` with all four texts and ids (udfs/export.py);
- `manifest.json` (counts, sizes, SHA-256 per file) and `README.md`, a dataset card with the
  Hugging Face header, a warning for every model behind the rows that is not the paper's (a
  random-init CLIP: do not train on it), the funnel per path, the subset sizes, the sources and
  what the filters do and do not remove (etl/dataset_card.py).
Shards are written in parallel, one task per shard; a file appears only whole (write, then
rename, or the upload's completion on an object store) and a file whose content is unchanged is
not rewritten, so a re-export writes nothing.
Positions are exact and stable: rows in image-id order, shard = position // samples_per_shard.
"""
from __future__ import annotations

from pathlib import Path

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl.context import StageContext, StageResult
from etl.dataset_card import Lineage, render_card
from etl.stage import stage
from etl.stages.pairs import COLUMNS as PAIR_COLUMNS
from udfs.export import (ENTRY_SCHEMA, RELEASE_COLUMNS, RELEASE_DIR, make_shard_writer, object_store, publish,
                         remove_orphan_temps, write_manifest)
from udfs.redact import redact_text, redact_url

LINEAGE = [c for c in PAIR_COLUMNS if c not in ("image_id", *RELEASE_COLUMNS, "batch_id")]


def positioned(rows: DataFrame, samples_per_shard: int) -> DataFrame:
    """rows + `shard`, `sample_index`: exact positions in image-id order without one global task
    (a range-partitioned sort, then each partition's offset from the partitions' counts)."""
    ordered = (rows.orderBy("image_id").withColumn("_pid", F.spark_partition_id())
               .withColumn("_mid", F.monotonically_increasing_id()).localCheckpoint())
    counts = sorted((r["_pid"], r["n"]) for r in ordered.groupBy("_pid").agg(F.count("*").alias("n")).collect())
    offsets, total = [], 0
    for pid, n in counts:
        offsets.append((pid, total))
        total += n
    offset = F.create_map(*[F.lit(x) for pair in offsets for x in pair]) if offsets else F.create_map()
    position = offset[F.col("_pid")] + (F.col("_mid") - F.shiftleft(F.col("_pid").cast("long"), 33))
    return (ordered.withColumn("_pos", position)
            .withColumn("shard", (F.col("_pos") / samples_per_shard).cast("long"))
            .withColumn("sample_index", F.pmod(F.col("_pos"), F.lit(samples_per_shard)))
            .drop("_pid", "_mid", "_pos"))


def export_rows(ctx: StageContext) -> DataFrame:
    """The subset's pairs with their image bytes."""
    pairs = ctx.read("pairs")
    subset = ctx.cfg.export.subset
    if subset is not None:
        members = ctx.read("subsets").where(F.col("subset") == subset).select("image_id")
        pairs = pairs.join(members, "image_id", "left_semi")
    return pairs.drop("batch_id").join(ctx.read("image_bytes").select("image_id", "bytes"), "image_id", "left")


def funnel(ctx: StageContext) -> list[tuple[str, str, int]]:
    """(path, step, rows) for the card: each path counted in its own unit."""
    def n(table: str, where: str = "true") -> int:
        return ctx.read(table).where(where).count() if ctx.exists(table) else 0
    return [("documents", "ingested", n("documents")),
            ("images", "fetched or inline", n("images")), ("images", "kept", n("images", "kept")),
            ("images", "paired with texts", n("pairs")),
            ("sentences", "extracted", n("sentences")), ("sentences", "kept", n("sentences", "kept")),
            ("synthetic texts", "generated", n("synthetic_texts")),
            ("synthetic texts", "kept", n("synthetic_texts", "kept"))]


def lineage(ctx: StageContext, embedding_models: list[str], synthetic_models: list[str]) -> Lineage:
    """The models behind the exported rows (as the pairs name them), the captioner if captions
    exist, and the inputs they came from (redacted)."""
    captioner = None
    if ctx.cfg.caption.model is not None and ctx.exists("captions") and ctx.read("captions").limit(1).count():
        captioner = ctx.cfg.models[ctx.cfg.caption.model].source
    secrets = ctx.cfg.redaction.secret_params
    # A model id can name a URL or a path with a token in it: the card is published
    return Lineage(embedding_models=[redact_text(m, secrets) for m in embedding_models],
                   synthetic_models=[redact_text(m, secrets) for m in synthetic_models],
                   captioner=captioner and redact_text(captioner, secrets),
                   inputs=[redact_url(p, secrets) for p in ctx.cfg.ingest.paths])


@stage(reads=("pairs", "image_bytes"),
       optional_reads=("subsets", "documents", "images", "sentences", "synthetic_texts", "captions"),
       writes=(), config=("export", "redaction"))
def export(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.export
    # Resolved here: a relative folder means the driver's, and the tasks must write there too.
    out_dir = cfg.out_dir if object_store(cfg.out_dir) else str(Path(cfg.out_dir.removeprefix("file://")).resolve())
    # What is stored and printed: an object-store URI may carry keys (access_key=..., user:secret@).
    shown = redact_url(out_dir, ctx.cfg.redaction.secret_params)
    result = StageResult(notes={"out_dir": shown, "subset": str(cfg.subset)})
    if cfg.subset is not None and not (ctx.exists("subsets")
                                       and ctx.read("subsets").where(F.col("subset") == cfg.subset).limit(1).count()):
        result.warn(f"export.subset {cfg.subset!r} has no rows (run balance, or name one of its subsets)")
        return result
    # read
    rows = positioned(export_rows(ctx), cfg.samples_per_shard)
    # transform + write: one task per shard writes its files
    writer = make_shard_writer(out_dir, cfg.resize_to, LINEAGE)
    entries = rows.groupBy("shard").applyInPandas(writer, ENTRY_SCHEMA).toPandas()
    remove_orphan_temps(out_dir)
    # One pass over the rows for the counts and the models the card names.
    seen = rows.agg(F.count("*").alias("samples"), F.count("raw_image_url").alias("urls"),
                    F.array_sort(F.collect_set("embedding_model")).alias("clip"),
                    F.array_sort(F.collect_set("synthetic_model")).alias("llm")).first()
    samples = int(seen["samples"])
    tars = entries["path"].str.endswith(".tar")
    shards = int(tars.sum())
    subsets = ({r["subset"]: r["n"] for r in ctx.read("subsets").groupBy("subset").agg(F.count("*").alias("n")).collect()}
               if ctx.exists("subsets") else {})
    counts = {"samples": samples, "shards": shards, "subset": cfg.subset, "subsets": subsets}
    write_manifest(out_dir, entries.to_dict("records"), counts)
    release = entries["path"].str.startswith(f"{RELEASE_DIR}/")
    card = render_card(cfg.name, subsets, funnel(ctx), num_rows=samples, num_bytes=int(entries.loc[release, "bytes"].sum()),
                       webdataset_shards=shards, webdataset_samples=int(entries.loc[tars, "samples"].sum()),
                       urls=int(seen["urls"]), lineage=lineage(ctx, list(seen["clip"]), list(seen["llm"])),
                       license=cfg.license, input_licenses=cfg.input_licenses)
    publish(out_dir, "README.md", 0, lambda path: Path(path).write_text(card))
    # record
    status = entries["status"].value_counts().to_dict()
    result.rows_in = samples
    result.rows_out = int(status.get("written", 0))
    result.metrics.update({"samples": float(samples), "shards": float(shards),
                           "files_written": float(status.get("written", 0)),
                           "files_unchanged": float(status.get("unchanged", 0))})
    return result
