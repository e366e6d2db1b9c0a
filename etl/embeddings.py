"""The pipeline's CLIP and its tables: which model, which vectors, which centroids.

Shared by the stages that run or consume the CLIP (embed, cluster, retrieve, tag,
similarity_band), so they agree on the model and on what a usable vector is.
"""
from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl.config import Config, OpenClipModel
from etl.context import StageContext
from realsyn_models.clip import ClipSpec, resolve
from etl.centroids import CentroidIndex, load


def clip_spec(model: OpenClipModel) -> ClipSpec:
    return ClipSpec(model=model.name, pretrained=model.pretrained, precision=model.precision,
                    seed=model.random_init_seed, model_config_dir=model.model_config_dir,
                    cache_dir=model.cache_dir, offline=model.offline)


def clip_model(cfg: Config) -> OpenClipModel:
    return cfg.models[cfg.embed.model]


def resolved_clip(cfg: Config) -> tuple[ClipSpec, str]:
    """The CLIP spec the embed stage loads (its weights located, or a loud random-init fallback
    where the profile allows one) and the note saying where its weights came from."""
    model = clip_model(cfg)
    return resolve(clip_spec(model), model.allow_random_init)


def latest_model(df: DataFrame) -> str | None:
    """The model of the most recent embedding batch (ties: the larger model id)."""
    latest = df.agg(F.max(F.struct("batch_id", "model_id")).alias("m")).collect()[0]["m"]
    return latest["model_id"] if latest else None


def usable_vectors(ctx: StageContext, table: str, id_col: str, owner: str, model_id: str) -> DataFrame:
    """(id_col, vector) rows of one model that have a vector and whose item is still kept."""
    df = (ctx.read(table).where(F.col("vector").isNotNull() & F.col("error").isNull()
                                & (F.col("model_id") == model_id))
          .select(id_col, "vector").dropDuplicates([id_col]))
    if ctx.exists(owner):
        kept = ctx.read(owner).where(F.col("kept")).select(id_col)
        df = df.join(kept, id_col, "left_semi")
    return df


def latest_index(ctx: StageContext, model_id: str | None = None, *,
                 version: int | None = None) -> tuple[int, str, CentroidIndex] | None:
    """(version, model_id, centroid index) of the newest text centroid version (of `model_id` if
    given, or exactly `version`). The fine centroids stay a DataFrame; only the routing cells
    (about sqrt(K)) are collected."""
    if not ctx.exists("text_centroids"):
        return None
    tc = ctx.read("text_centroids")
    if model_id is not None:
        tc = tc.where(F.col("model_id") == model_id)
    top = version if version is not None else tc.agg(F.max("centroid_version").alias("v")).first()["v"]
    if top is None:
        return None
    first = tc.where(F.col("centroid_version") == top).select("model_id").first()
    if first is None:
        return None
    return int(top), str(first["model_id"]), load(ctx, "text_centroids", "text_centroid_cells", int(top))
