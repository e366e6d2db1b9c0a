"""Shipping to a cluster: the wheel and conf archive, the GPU requirement set, the Databricks
bundle, the EMR step and bootstrap, the discovery script, `realsyn submit` per profile, and a
local spark-submit of the built wheel writing the same tables as an in-process run."""
from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from data_paths import PROJECT
from etl.config import load_config
from etl.runner import default_registry
from etl.session import cluster_settings
from etl.submit import artifact_names, build_artifacts, emr_step, project_version, spark_env, submit_command

DEPLOY = PROJECT / "deploy"
VERSION = project_version(PROJECT)
WHEEL, PY_FILES, CONF_ARCHIVE = artifact_names(VERSION)
RAPIDS = "rapids-4-spark_2.13-26.08.1-cuda12.jar"


def profile(name: str):
    return load_config(str(PROJECT / "conf" / f"{name}.yaml"))


def requirement_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def setup_requirements() -> tuple[list[str], dict[str, list[str]]]:
    cfg = configparser.ConfigParser()
    cfg.read(PROJECT / "setup.cfg")
    extras = {k: requirement_lines(v) for k, v in cfg["options.extras_require"].items()}
    return requirement_lines(cfg["options"]["install_requires"]), extras


def names(requirements: list[str]) -> set[str]:
    return {r.split("==")[0].lower() for r in requirements}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return build_artifacts(PROJECT, tmp_path_factory.mktemp("dist"))


def test_the_wheel_holds_the_packages_data_and_entry_point_without_spark_or_faiss(artifacts):
    assert artifacts.wheel.name == WHEEL and artifacts.wheel.is_file()
    with zipfile.ZipFile(artifacts.wheel) as z:
        files = set(z.namelist())
        meta = z.read(f"realsyn_etl-{VERSION}.dist-info/METADATA").decode()
        entry_points = z.read(f"realsyn_etl-{VERSION}.dist-info/entry_points.txt").decode()
    for module in ("etl/cli.py", "etl/submit.py", "etl/stages/embed.py", "udfs/embed.py", "realsyn_models/clip.py",
                   "realsyn_models/data/tag_vocab.txt"):
        assert module in files
    assert not any(f.startswith(("tests/", "conf/")) for f in files)
    assert "realsyn = etl.cli:main" in entry_points
    base = [line.split(": ", 1)[1] for line in meta.splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line]
    # A cluster's own Spark and Delta must not be shadowed; FAISS comes from an extra.
    assert not names(base) & {"pyspark", "delta-spark", "faiss-cpu", "faiss-gpu-cu12"}
    assert any(line.startswith("Requires-Dist: faiss-gpu-cu12") and 'extra == "gpu"' in line for line in meta.splitlines())


def test_the_py_files_zip_is_the_wheel(artifacts):
    # Spark's Python workers import only .zip/.egg/.jar --py-files.
    assert artifacts.py_files.name == PY_FILES and artifacts.py_files.read_bytes() == artifacts.wheel.read_bytes()


def test_the_conf_archive_unpacks_the_profiles_at_its_root(artifacts):
    assert artifacts.conf_archive.name == CONF_ARCHIVE
    with zipfile.ZipFile(artifacts.conf_archive) as z:
        assert {"local.yaml", "databricks-gpu.yaml", "emr-gpu.yaml", "log4j2.properties"} <= set(z.namelist())
    assert artifacts.entry.read_text() == (PROJECT / "etl" / "submit.py").read_text()


def test_the_gpu_cluster_gets_one_requirement_set_with_faiss_gpu_and_no_faiss_cpu():
    base, extras = setup_requirements()
    gpu_set = requirement_lines((DEPLOY / "requirements-gpu.txt").read_text())
    assert gpu_set == base + extras["gpu"]
    assert "faiss-gpu-cu12" in names(gpu_set)
    assert not names(gpu_set) & {"faiss-cpu", "pyspark", "delta-spark"}
    # One machine still gets Spark, Delta and FAISS on the CPU (make setup installs `local`).
    assert {"pyspark", "delta-spark", "faiss-cpu"} <= names(extras["local"])


def test_the_bundle_runs_every_stage_once_in_order_on_the_profiles_gpu_cluster():
    bundle = yaml.safe_load((DEPLOY / "databricks.yml").read_text())
    job = bundle["resources"]["jobs"]["realsyn"]
    cluster = job["job_clusters"][0]["new_cluster"]
    assert cluster["spark_version"] == "17.3.x-gpu-ml-scala2.13"
    assert cluster["spark_conf"] == cluster_settings(profile("databricks-gpu"))
    assert cluster["init_scripts"][0]["volumes"]["destination"].endswith("/databricks-init.sh")
    assert bundle["variables"]["wheel"]["default"] == WHEEL
    stages = []
    for task in job["tasks"]:
        assert task["job_cluster_key"] == "gpu"
        libs = task["libraries"]
        assert {"whl": "${var.artifacts}/${var.wheel}"} in libs
        assert {"requirements": "${var.artifacts}/requirements-gpu.txt"} in libs
        wheel_task = task["python_wheel_task"]
        assert (wheel_task["package_name"], wheel_task["entry_point"]) == ("realsyn_etl", "realsyn")
        params = wheel_task["parameters"]
        assert params[:3] == ["run", "--conf", "${var.artifacts}/conf/databricks-gpu.yaml"]
        stages += params[params.index("--stages") + 1].split(",")
    assert stages == default_registry().names
    init = (DEPLOY / "databricks-init.sh").read_text()
    assert RAPIDS in init.replace("${RAPIDS_VERSION}", "26.08.1") and "getGpusResources.sh" in init


def test_the_emr_step_is_the_submit_command_and_the_bootstrap_installs_what_it_names():
    cfg = profile("emr-gpu")
    command = submit_command(cfg, PROJECT / "conf" / "emr-gpu.yaml", "s3://YOUR-BUCKET/realsyn")
    assert json.loads((DEPLOY / "emr-step.json").read_text()) == emr_step(command)
    settings = cluster_settings(cfg)
    bootstrap = (DEPLOY / "emr-bootstrap.sh").read_text().replace("${RAPIDS_VERSION}", "26.08.1")
    assert settings["spark.executor.resource.gpu.discoveryScript"] == "/opt/realsyn/getGpusResources.sh"
    assert "getGpusResources.sh" in bootstrap and "cd /opt/realsyn" in bootstrap
    assert settings["spark.executor.extraClassPath"] == f"/opt/realsyn/jars/{RAPIDS}" and RAPIDS in bootstrap
    assert "realsyn_etl-${VERSION}-py3-none-any.whl" in bootstrap and "requirements-gpu.txt" in bootstrap
    assert settings["spark.pyspark.python"] == "/opt/realsyn/venv/bin/python" and "-m venv venv" in bootstrap
    configurations = json.loads((DEPLOY / "emr-configurations.json").read_text())
    assert {"delta-defaults", "yarn-site", "container-executor"} <= {c["Classification"] for c in configurations}


def test_submit_builds_each_profiles_command():
    emr = submit_command(profile("emr-gpu"), PROJECT / "conf" / "emr-gpu.yaml", "s3://b/realsyn", stages="embed")
    assert emr[:5] == ["spark-submit", "--master", "yarn", "--deploy-mode", "cluster"]
    flags = {emr[i + 1] for i, arg in enumerate(emr) if arg == "--conf" and i + 1 < emr.index("s3://b/realsyn/submit.py")}
    for needed in ("spark.executor.resource.gpu.amount=1", "spark.task.resource.gpu.amount=0.125",
                   "spark.plugins=com.nvidia.spark.SQLPlugin", "spark.dynamicAllocation.enabled=false"):
        assert needed in flags
    assert emr[emr.index("--py-files") + 1] == f"s3://b/realsyn/{PY_FILES}"
    assert emr[emr.index("--archives") + 1] == f"s3://b/realsyn/{CONF_ARCHIVE}#conf"
    assert emr[-6:] == ["s3://b/realsyn/submit.py", "run", "--conf", "conf/emr-gpu.yaml", "--stages", "embed"]

    dbx = profile("databricks-gpu")
    assert submit_command(dbx, Path("databricks-gpu.yaml"), "x") == [
        "databricks", "bundle", "run", "--target", "gpu", "realsyn"]
    assert submit_command(dbx, Path("databricks-gpu.yaml"), "x", stages="embed")[-3:] == [
        "realsyn_stages", "--params", "stages=embed"]

    local = submit_command(profile("local"), PROJECT / "conf" / "local.yaml", "/d", overrides=["retrieve.k=5"])
    assert local[0].endswith("/pyspark/bin/spark-submit") and local[1:3] == ["--master", "local[*]"]
    assert "--archives" not in local
    conf = dict(local[i + 1].split("=", 1) for i, arg in enumerate(local[:local.index("/d/submit.py")])
                if arg == "--conf")
    assert "delta-spark" in conf["spark.jars"] and conf["spark.pyspark.python"] == sys.executable
    assert local[-6:] == ["/d/submit.py", "run", "--conf", str(PROJECT / "conf" / "local.yaml"), "--set", "retrieve.k=5"]


def test_realsyn_submit_dry_run_prints_the_command_and_refuses_unknown_stages(capsys):
    from etl.cli import main

    assert main(["submit", "--profile", "emr-gpu", "--dry-run", "--stages", "embed"]) == 0
    assert capsys.readouterr().out.startswith("spark-submit --master yarn --deploy-mode cluster")
    assert main(["submit", "--profile", "emr-gpu", "--dry-run", "--stages", "embedd"]) == 2
    assert main(["submit", "--profile", "emr-gpu", "--emr-step"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["Jar"] == "command-runner.jar"


def test_the_discovery_script_lists_every_gpu_as_spark_expects(tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '0\\n1\\n'\n")
    fake.chmod(0o755)
    out = subprocess.run([str(DEPLOY / "getGpusResources.sh")], capture_output=True, text=True, check=True,
                         env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}).stdout
    assert json.loads(out) == {"name": "gpu", "addresses": ["0", "1"]}


LOCAL_STAGES = "ingest,fetch,image_quality,image_dedup"


def _rows(df):
    """A table's rows as comparable tuples, without what differs between two runs by design."""
    volatile = {f.name for f in df.schema.fields if f.name == "batch_id" or f.dataType.typeName() == "timestamp"}
    kept = sorted(c for c in df.columns if c not in volatile)
    return sorted(tuple(str(v) for v in r) for r in df.select(*kept).collect())


@pytest.mark.spark
def test_a_local_spark_submit_of_the_wheel_writes_the_same_tables_as_realsyn_run(
        artifacts, spark, stage_ctx, tmp_path):
    from etl.runner import run_stages

    import pyarrow.parquet as pq

    # The first documents of the bundled sample: every stage has work, the test stays short.
    sample = tmp_path / "sample.parquet"
    pq.write_table(pq.read_table(PROJECT / "sample" / "recipes.obelics.parquet").slice(0, 12), sample)
    ctx = stage_ctx({"ingest": {"paths": [str(sample)]}})
    results = run_stages(spark, ctx.cfg, LOCAL_STAGES.split(","))
    # The sample's images come inline: nothing fetched, every kept image measured and grouped.
    n = ctx.read("images").count()
    assert n == ctx.read("doc_images").select("image_id").distinct().count() > 0
    assert results["fetch"].drops == {}
    assert 0 < ctx.read("images").where("kept").count() <= n
    assert ctx.read("images").where("kept AND (phash IS NULL OR phash_group IS NULL OR width < 100)").count() == 0

    warehouse = tmp_path / "warehouse"
    dumped = ctx.cfg.model_dump(mode="json")
    dumped["spark"]["warehouse_dir"] = str(warehouse)
    dumped["spark"]["conf"]["spark.driver.memory"] = "2g"
    dumped["catalog"]["database"] = "realsyn"
    profile_file = tmp_path / "submitted.yaml"
    profile_file.write_text(yaml.safe_dump(dumped))
    command = submit_command(load_config(str(profile_file)), profile_file, str(artifacts.wheel.parent),
                             stages=LOCAL_STAGES)
    # Outside the checkout and without PYTHONPATH: the code comes from the wheel on --py-files.
    env = {k: v for k, v in spark_env().items() if k not in ("PYTHONPATH", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON")}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    stage_names = LOCAL_STAGES.split(",")
    written = sorted({t for s in default_registry().stages if s.name in stage_names for t in s.writes})
    for table in written:
        mine = spark.table(ctx.table(table))
        theirs = spark.read.format("delta").load(str(warehouse / "tables" / "realsyn.db" / table))
        assert _rows(theirs) == _rows(mine), table
