"""The one GPU path: device from the task's GPU address mapped through CUDA_VISIBLE_DEVICES (a
fake task resource), FAISS on the same index, the grouped top-k as a mapInPandas that reads groups
across Arrow batches, the resource profile attached only to GPU stages with GPUs enabled, and one
model per worker."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from realsyn_models import cache, device
from udfs.grouping import by_group
from udfs.topk import CORPUS, QUERY, make_grouped_topk_fn, topk_ip


@pytest.fixture
def fake_task(monkeypatch):
    """fake_task("3") -> inside a Spark task that was given GPU address 3."""
    def give(*addresses: str, cpus: int = 1):
        gpu = SimpleNamespace(addresses=list(addresses))
        task = SimpleNamespace(resources=lambda: {"gpu": gpu} if addresses else {}, cpus=lambda: cpus)
        monkeypatch.setattr(device, "_task_context", lambda: task)
    return give


@pytest.mark.parametrize("address, visible, index", [
    ("3", None, 3),         # every GPU visible: the physical index
    ("3", "2,3", 1),        # CUDA_VISIBLE_DEVICES narrows and renumbers from 0
    ("0", "0", 0),
    ("5", "4, 5, 6", 1),
])
def test_task_gpu_address_is_mapped_through_cuda_visible_devices(fake_task, monkeypatch, address, visible, index):
    fake_task(address)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert device.task_cuda_index() == index
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device.pick_device() == f"cuda:{index}"  # never cuda:0 by default


def test_no_task_gpu_means_cpu_with_the_task_cores(fake_task, monkeypatch):
    fake_task(cpus=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    threads = torch.get_num_threads()
    try:
        assert device.task_cuda_index() is None and device.pick_device() == "cpu"
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_by_group_reads_groups_that_span_batches():
    rows = pd.DataFrame({"k": [1, 1, 1, 2, 3, 3, 3, 3], "v": range(8)})
    batches = [rows.iloc[0:2], rows.iloc[2:2], rows.iloc[2:5], rows.iloc[5:7], rows.iloc[7:]]
    groups = [(key, g["v"].tolist()) for key, g in by_group(iter(batches), ["k"])]
    assert groups == [((1,), [0, 1, 2]), ((2,), [3]), ((3,), [4, 5, 6, 7])]
    assert list(by_group(iter([]), ["k"])) == []


def test_grouped_topk_fn_matches_the_kernel_per_group():
    rng = np.random.default_rng(0)
    rows = []
    expected = {}
    for cluster in (4, 9):
        q, c = rng.standard_normal((5, 8)), rng.standard_normal((30, 8))
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        c /= np.linalg.norm(c, axis=1, keepdims=True)
        ids = np.array([f"c{cluster}-{i:02d}" for i in range(30)])
        found, _ = topk_ip(q, c, 3, ids)
        expected.update({f"q{cluster}-{i}": set(ids[found[i]]) for i in range(5)})
        rows += [(cluster, 0, 0, QUERY, f"q{cluster}-{i}", list(q[i])) for i in range(5)]
        rows += [(cluster, 0, 0, CORPUS, ids[i], list(c[i])) for i in range(30)]
    pdf = pd.DataFrame(rows, columns=["cluster_id", "cchunk", "qchunk", "side", "id", "vector"])
    batches = [pdf.iloc[i:i + 7] for i in range(0, len(pdf), 7)]  # groups cut across batches
    out = pd.concat(make_grouped_topk_fn(3, device="cpu")(iter(batches)))
    got = out.groupby("query_id")["corpus_id"].apply(set).to_dict()
    assert got == expected
    assert set(out["cluster_id"]) == {4, 9}


def test_a_worker_holds_one_model_and_reloads_on_another_device(fake_task):
    cache.clear()
    loads = []
    a = cache.get_or_load("a", lambda: loads.append("a") or object(), device="cpu")
    assert cache.get_or_load("a", lambda: pytest.fail("reloaded"), device="cpu") is a
    cache.get_or_load("a", lambda: loads.append("a@cuda:1") or object(), device="cuda:1")
    assert cache.load_count("a") == 2 and len(cache._models) == 1  # moved, never two copies
    fake_task("0")  # inside a Spark task: another stage's model frees the previous one first
    cache.get_or_load("b", lambda: loads.append("b") or object(), device="cpu")
    assert set(cache._models) == {"b"} and loads == ["a", "a@cuda:1", "b"]
    cache.clear()


@pytest.mark.spark
def test_profile_only_for_declared_gpu_steps_with_gpus_enabled(spark, stage_ctx):
    from etl.gpu import map_in_pandas
    from etl.stage import CPU, Stage, Step

    ctx = stage_ctx()
    df = spark.range(4)
    fn = lambda batches: batches  # noqa: E731
    declared = Stage(name="s", run=fn, reads=(), writes=(), config=(),
                     steps=(Step("model", "a model"), Step("plain", "declared, but CPU", CPU)))

    def rdd_profile(step, enabled):
        cfg = ctx.cfg.model_copy(update={"spark": ctx.cfg.spark.model_copy(
            update={"gpu": ctx.cfg.spark.gpu.model_copy(update={"enabled": enabled})})})
        c = type(ctx)(spark=spark, cfg=cfg, run_id="r", batch_id="b", stage=declared)
        return map_in_pandas(c, df, fn, "id long", step=step)._jdf.queryExecution().toRdd().getResourceProfile()

    # local[*] cannot schedule task resource profiles (hence the config refuses spark.gpu.enabled
    # there): that refusal at planning time is the proof that the profile was attached.
    with pytest.raises(Exception, match="TaskResourceProfiles are only supported"):
        rdd_profile("model", enabled=True)
    # GPUs off, a CPU step, a map that names no step: ordinary tasks.
    assert rdd_profile("model", enabled=False) is None
    assert rdd_profile("plain", enabled=True) is None and rdd_profile(None, enabled=True) is None
    with pytest.raises(KeyError, match="declares no step 'other'"):
        rdd_profile("other", enabled=True)
