"""Stage-level GPU scheduling on a real Spark standalone cluster (`local-cluster`), on CPU: a fake
discovery script gives the one worker two GPU addresses, the GPU profile is on, and a model
step (etl/gpu.py: map_in_pandas for a GPU stage) runs beside a CPU job.

The job runs in its own process (tests/gpu_scheduling_job.py): a process has one SparkContext,
and the suite's shared session is a local[2] one."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from data_paths import PROJECT

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    script = tmp_path_factory.mktemp("gpus") / "getGpusResources.sh"
    script.write_text("#!/bin/sh\necho '{\"name\": \"gpu\", \"addresses\": [\"0\", \"1\"]}'\n")
    script.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT), str(PROJECT / "tests")])}
    done = subprocess.run([sys.executable, str(PROJECT / "tests" / "gpu_scheduling_job.py"), str(script)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def tasks(job):
    return job["tasks"]


def overlaps(a, b) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_each_model_task_holds_one_gpu_of_its_own_and_its_udf_sees_it(tasks):
    model = [t for t in tasks if t["kind"] == "model"]
    assert len(model) == 4
    for t in model:
        # The task profile asked for one whole GPU: exactly one address, mapped to its CUDA index.
        assert len(t["addresses"]) == 1 and t["addresses"][0] in ("0", "1")
        assert t["cuda_index"] == int(t["addresses"][0])
        # What the stage's `runs.notes` records as the device its rows were computed on (the GPUs
        # are fake: torch sees no CUDA and computes on the CPU).
        assert t["task_device"] == f"cpu (Spark GPU {t['addresses'][0]})"
    # Both GPUs were used, and no two model tasks running at once shared one.
    assert {t["addresses"][0] for t in model} == {"0", "1"}
    for i, a in enumerate(model):
        for b in model[i + 1:]:
            if overlaps(a, b):
                assert a["addresses"] != b["addresses"]
    assert any(overlaps(a, b) for i, a in enumerate(model) for b in model[i + 1:]), "GPU tasks never ran in parallel"


def test_a_cpu_step_of_the_gpu_stage_holds_no_gpu_and_runs_beside_the_model_tasks(tasks):
    model = [t for t in tasks if t["kind"] == "model"]
    cpu = [t for t in tasks if t["kind"] == "cpu"]
    assert len(cpu) == 4
    # The default profile holds no GPU: CPU tasks neither wait for nor see one.
    assert all(t["addresses"] == [] and t["cuda_index"] is None and t["task_device"] == "cpu" for t in cpu)
    assert any(overlaps(c, m) for c in cpu for m in model), tasks


def test_two_model_maps_meet_in_one_spark_stage(job):
    # Both sides of the union ran (as GPU tasks: each held one fake GPU); before the profile was
    # built once per session, Spark refused this stage and shut the SparkContext down.
    assert job["union"] == sorted([side, i, 1] for side in ("a", "b") for i in range(8))


def test_the_multi_cell_centroid_index_and_two_level_kmeans_run_in_a_gpu_stage(job):
    # Every query found a centroid through the spilled 8-cell index; with 2 of 8 cells probed most
    # are the exact nearest (numpy's argmax in the job is the oracle).
    assert len(job["nearest"]) == len(job["exact"]) == 400
    agree = sum(job["nearest"][q] == job["exact"][q] for q in job["exact"])
    assert agree >= 0.9 * 400, agree
    assert job["trained_mode"] == "coarse-then-fine" and job["trained_k"] == 16
