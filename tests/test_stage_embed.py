"""embed stage on real local Spark + Delta with the tiny open_clip model: writes both tables,
re-runs embed nothing, prefers the kept rows of `images`/`sentences`, records the weights."""
from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from etl.config import GpuConfig
from etl.gpu import gpu_profile
from etl.runner import StageFailed, run_stages
from etl.stages import embed as stage
from realsyn_models.clip import RANDOM_INIT_NOTE

pytestmark = pytest.mark.spark

DOC_IMAGES = ("doc_id string, position int, image_id string, url string, path string, alt_text string, "
              "metadata string, bytes binary, batch_id string")
DOC_TEXTS = "doc_id string, position int, text_id string, text string, batch_id string"


def _png(seed: int, size=(40, 30)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _embed_cfg(tiny_clip, **extra) -> dict:
    """Config sections for the tiny model: the models: entry and the embed section."""
    clip = {"name": "realsyn-tiny", "pretrained": tiny_clip.checkpoint, "model_config_dir": tiny_clip.config_dir,
            "offline": True, "precision": "fp32", "batch_size": 2, **extra}
    return {"models": {"clip": clip}, "embed": {"decode_threads": 2}, "model_output": {"rows_per_task": 2}}


def _add_doc_images(ctx, rows: list[tuple[str, int, str, bytes | None]]) -> None:
    data = [(doc, pos, image_id, f"http://x/{image_id}.png", None, None, None, blob, ctx.batch_id)
            for doc, pos, image_id, blob in rows]
    ctx.spark.createDataFrame(data, DOC_IMAGES).write.format("delta").mode("append").saveAsTable(
        ctx.table("doc_images"))


def _add_doc_texts(ctx, rows: list[tuple[str, int, str, str]]) -> None:
    ctx.spark.createDataFrame([(*r, ctx.batch_id) for r in rows], DOC_TEXTS).write.format("delta") \
        .mode("append").saveAsTable(ctx.table("doc_texts"))


def _rows(ctx, table: str) -> pd.DataFrame:
    return ctx.read(table).toPandas().set_index(table.split("_")[0] + "_id")


def test_embeds_new_rows_once_and_reruns_add_nothing(stage_ctx, tiny_clip):
    ctx = stage_ctx(**_embed_cfg(tiny_clip))
    _add_doc_images(ctx, [("d1", 1, "i1", _png(1)), ("d1", 3, "i2", _png(2)), ("d2", 0, "i1", _png(1)),
                          ("d2", 2, "bad", b"not an image"), ("d3", 0, "nobytes", None)])
    _add_doc_texts(ctx, [("d1", 0, "t1", "Whisk the eggs."), ("d1", 2, "t2", "Bake for an hour."),
                         ("d2", 1, "t1", "Whisk the eggs.")])

    first = stage.embed(ctx)
    assert (first.rows_in, first.rows_out) == (5, 5)  # i1, i2, bad + t1, t2
    assert first.drops == {"image_undecodable": 1}
    assert first.notes["weights"].startswith("pretrained:")
    assert first.models == {"clip": tiny_clip.spec().model_id} and not first.warnings
    # Which device computed the rows (no GPU here: the CPU).
    assert (first.notes["image_devices"], first.notes["sentence_devices"]) == ("cpu: 3 rows", "cpu: 2 rows")

    images, texts = _rows(ctx, "image_embeddings"), _rows(ctx, "sentence_embeddings")
    assert sorted(images.index) == ["bad", "i1", "i2"] and sorted(texts.index) == ["t1", "t2"]
    assert images.loc["bad", "error"] == "undecodable" and images.loc["bad", "vector"] is None
    for df in (images.drop(index="bad"), texts):
        assert (df["dim"] == 16).all() and df["error"].isna().all() and (df["batch_id"] == ctx.batch_id).all()
        vectors = np.stack(df["vector"].tolist())
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    again = stage.embed(ctx)
    assert (again.rows_in, again.rows_out) == (0, 0)

    _add_doc_images(ctx, [("d4", 0, "i3", _png(3))])  # a new batch costs only its new rows
    third = stage.embed(ctx)
    assert (third.rows_in, third.rows_out) == (1, 1)
    assert ctx.read("image_embeddings").count() == 4


def test_prefers_kept_images_and_sentences(stage_ctx):
    ctx = stage_ctx()
    _add_doc_images(ctx, [("d1", 0, "ignored", _png(9))])
    _add_doc_texts(ctx, [("d1", 1, "ignored", "Chop the onions.")])
    spark = ctx.spark
    spark.createDataFrame([("k1", True), ("k2", True), ("dropped", False)],
                          "image_id string, kept boolean").write.format("delta").saveAsTable(ctx.table("images"))
    spark.createDataFrame([("k1", _png(1)), ("k2", _png(2)), ("dropped", _png(3))],
                          "image_id string, bytes binary").write.format("delta").saveAsTable(ctx.table("image_bytes"))
    spark.createDataFrame([("s1", "Stir in the flour.", True), ("s2", "Buy it.", False)],
                          "sentence_id string, text string, kept boolean").write.format("delta").saveAsTable(
        ctx.table("sentences"))
    assert sorted(r["image_id"] for r in stage.image_inputs(ctx).collect()) == ["k1", "k2"]
    assert [r["sentence_id"] for r in stage.sentence_inputs(ctx).collect()] == ["s1"]


def test_random_init_fallback_is_recorded_in_runs(stage_ctx, tiny_clip):
    ctx = stage_ctx(**_embed_cfg(tiny_clip, pretrained=None, allow_random_init=True))
    _add_doc_texts(ctx, [("d1", 0, "t1", "Whisk the eggs.")])
    run_stages(ctx.spark, ctx.cfg, ["embed"], batch_id=ctx.batch_id)
    run = ctx.read("runs").where("stage = 'embed'").first()
    assert run["notes"]["weights"].startswith(RANDOM_INIT_NOTE)
    assert run["models"] == {"clip": "realsyn-tiny@random-init-seed0"}
    assert any("RANDOM INIT" in w for w in run["warnings"])
    assert _rows(ctx, "sentence_embeddings")["model_id"].tolist() == ["realsyn-tiny@random-init-seed0"]

    strict = stage_ctx(**_embed_cfg(tiny_clip, pretrained=None, allow_random_init=False))
    _add_doc_texts(strict, [("d1", 0, "t1", "Whisk the eggs.")])
    with pytest.raises(StageFailed, match="allow_random_init"):
        run_stages(strict.spark, strict.cfg, ["embed"], batch_id=strict.batch_id)
    assert strict.read("runs").first()["status"] == "failed"


def test_model_loads_once_per_python_worker(spark, tiny_clip):
    spec = tiny_clip.spec()

    def probe(batches):
        from dataclasses import replace

        from realsyn_models import cache
        from realsyn_models.clip import get_encoder

        for df in batches:
            encoder = get_encoder(spec)
            key = ("clip", replace(encoder.spec, device=None))
            yield pd.DataFrame({"pid": [os.getpid()] * len(df), "loads": [cache.load_count(key)] * len(df)})

    df = spark.range(0, 64, numPartitions=8)
    # Two jobs, 8 tasks each, over the same reused workers: the second loads nothing. (A worker
    # may have loaded this model before, for an earlier test, and freed it for another model.)
    first, second = ({r["pid"]: r["max(loads)"] for r in
                      df.mapInPandas(probe, "pid long, loads int").groupBy("pid").agg({"loads": "max"}).collect()}
                     for _ in range(2))
    assert first and all(second[pid] == first[pid] for pid in second if pid in first)


def test_gpu_profile_asks_for_one_gpu_per_task_and_is_built_once_per_request(spark):
    profile = gpu_profile(spark, GpuConfig(enabled=True, task_amount=1.0, task_cpus=4))
    assert profile.taskResources["gpu"].amount == 1.0
    assert profile.taskResources["cpus"].amount == 4
    # Spark compares profiles by id: a second step of the session must get the same object.
    assert gpu_profile(spark, GpuConfig(enabled=True, task_amount=1.0, task_cpus=4)) is profile
    assert gpu_profile(spark, GpuConfig(enabled=True, task_amount=0.5, task_cpus=4)) is not profile
