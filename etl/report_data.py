"""The Spark side of `realsyn report`: small pandas frames from the tables for etl/report.py.

Every query returns a bounded result (aggregates, a capped gallery, capped samples of scores and
lengths), so the report can be drawn on the driver whatever the size of the corpus.
"""
from __future__ import annotations

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from etl.config import Config
from etl.funnel import sentence_funnel
from etl.report import ReportData
from etl.tables import exists, qualified

SAMPLE_ROWS = 20_000  # per distribution (similarities, lengths)
GALLERY = 24


def _image_step(reason: str) -> str:
    if reason.startswith("fetch_"):
        return "fetch"
    return {"perceptual_duplicate": "image_dedup", "semantic_duplicate": "semantic_dedup"}.get(reason, "image_quality")


def collect(spark: SparkSession, cfg: Config) -> ReportData:
    import pandas as pd

    db = cfg.catalog.database
    has = lambda t: exists(spark, qualified(db, t))  # noqa: E731
    table = lambda t: spark.table(qualified(db, t))  # noqa: E731
    data = ReportData(length_unit="words")

    rows = []
    for kind, name, step_of in (("image", "images", _image_step),
                                ("sentence", "sentences", lambda r: "semantic_dedup" if r == "semantic_duplicate"
                                 else "sentences")):
        if has(name):
            for r in table(name).groupBy("drop_reason").count().collect():
                reason = r["drop_reason"]
                rows.append((step_of(reason) if reason else "semantic_dedup", kind, reason, r["count"]))
    data.funnel = pd.DataFrame(rows, columns=["step", "kind", "reason", "count"]) if rows else None
    if has("sentence_occurrences") and has("sentences"):
        data.sentence_funnel = sentence_funnel(spark, db)["removed_fraction"]

    subset = cfg.export.subset
    if has("subsets") and subset:
        names = [subset, f"{subset}-random"]
        sizes = (table("subsets").where(F.col("subset").isin(names)).groupBy("subset", "cluster_id")
                 .agg(F.count("*").alias("size")))
        if has("image_clusters") and has("pairs"):
            everything = (table("image_clusters").join(table("pairs").select("image_id"), "image_id", "left_semi")
                          .groupBy("cluster_id").agg(F.count("*").alias("size"))
                          .select(F.lit("all pairs").alias("subset"), "cluster_id", "size"))
            sizes = everything.unionByName(sizes)
        data.cluster_sizes = sizes.toPandas()

    if has("pairs"):
        pairs = table("pairs")
        scores = (pairs.select("image_id", F.posexplode("sentence_scores").alias("i", "similarity"))
                  .select(F.concat(F.lit("text"), (F.col("i") + 1).cast("string")).alias("text_type"), "similarity"))
        syn = pairs.where(F.col("similarity").isNotNull()).select(F.lit("syn_text").alias("text_type"), "similarity")
        data.similarities = _capped(scores.unionByName(syn)).toPandas()
        lengths = [pairs.where(F.col(c).isNotNull()).select(F.lit(c).alias("text_type"),
                                                            F.size(F.split(F.trim(c), r"\s+")).alias("tokens"))
                   for c in ("text1", "text2", "text3", "syn_text")]
        data.token_lengths = _capped(lengths[0].unionByName(lengths[1]).unionByName(lengths[2])
                                     .unionByName(lengths[3])).toPandas()
        gallery = pairs
        if has("subsets") and subset:
            gallery = gallery.join(table("subsets").where(F.col("subset") == subset), "image_id", "left_semi")
        data.gallery = (gallery.orderBy("image_id").limit(GALLERY)
                        .join(table("image_bytes").select("image_id", F.col("bytes").alias("image_bytes")), "image_id")
                        .select("image_id", "image_bytes", "text1", "text2", "text3", "syn_text").toPandas())
    clip = cfg.models[cfg.embed.model]
    if getattr(clip, "min_similarity", None) is not None and clip.max_similarity is not None:
        data.similarity_band = (clip.min_similarity, clip.max_similarity)

    if has("runs"):
        runs = table("runs")
        data.stage_times = runs.select("stage", "wall_s", "run_id", "started_at", "status", "rows_in",
                                       "rows_out").toPandas()
        latest = _latest_runs(runs).collect()
        warnings = [w for r in latest for w in (r["warnings"] or [])]
        models = {k: v for r in latest for k, v in (r["models"] or {}).items()}
    else:
        warnings, models = [], {}

    def n(t: str, where: str = "true") -> int:
        return table(t).where(where).count() if has(t) else 0

    data.summary = {
        "documents": n("documents"), "images_kept": n("images", "kept"), "sentences_kept": n("sentences", "kept"),
        "pairs": n("pairs"),
        "subsets": ({r["subset"]: r["n"] for r in table("subsets").groupBy("subset").agg(F.count("*").alias("n"))
                     .orderBy("subset").collect()} if has("subsets") else {}),
        "models": models, "warnings": sorted(set(warnings)),
    }
    return data


def _capped(df: DataFrame) -> DataFrame:
    return df.orderBy(F.xxhash64(*df.columns)).limit(SAMPLE_ROWS)


def _latest_runs(runs: DataFrame) -> DataFrame:
    from pyspark.sql import Window

    w = Window.partitionBy("stage").orderBy(F.desc("started_at"))
    return runs.where("status = 'ok'").withColumn("_n", F.row_number().over(w)).where("_n = 1")
