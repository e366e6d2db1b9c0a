"""The whole pipeline, ingest to export, through a Spark Connect client against a local Spark
Connect server started here (the session `realsyn run` would build: Delta jars, warehouse,
metastore), on the first pages of the bundled sample with the suite's tiny offline models.

The client runs in its own process: a Connect client switches pyspark into remote mode for the
whole process, which the suite's classic shared session must not see."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from data_paths import PROJECT

# The Connect client's grpcio, grpcio-status and googleapis-common-protos come with the test extra
# (`make setup`): without them this fails at import, like a broken set-up should, rather than skip.
import grpc  # noqa: E402,F401
pytestmark = pytest.mark.spark

# The first documents of the bundled sample: every stage has work, the test stays short.
SAMPLE_DOCS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def realsyn(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    return subprocess.run([sys.executable, "-m", "etl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=PROJECT)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from etl.config import load_config
    from etl.submit import connect_server_command, spark_env

    import pyarrow.parquet as pq

    warehouse = tmp_path_factory.mktemp("connect-warehouse")
    sample = warehouse / "sample.parquet"
    pq.write_table(pq.read_table(PROJECT / "sample" / "recipes.obelics.parquet").slice(0, SAMPLE_DOCS), sample)
    sets = [f"spark.warehouse_dir={warehouse}", "spark.master=local[2]", "spark.shuffle_partitions=2",
            "spark.conf.spark.driver.memory=3g", f"ingest.paths=[{sample}]"]
    overrides = [a for s in sets for a in ("--set", s)]

    port = free_port()
    cfg = load_config(str(PROJECT / "conf" / "local.yaml"), sets)
    command = connect_server_command(cfg, port)
    env = {**spark_env(), "PYTHONPATH": str(PROJECT), "PYSPARK_PYTHON": sys.executable}
    log = open(warehouse / "server.log", "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=warehouse,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, (warehouse / "server.log").read_text()[-3000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline, "the Connect server did not start"
                time.sleep(1)
        yield f"sc://127.0.0.1:{port}", overrides
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def tiny_models(clip, lm, out) -> list[str]:
    """The e2e test's small real models and settings (tests/test_e2e.py), as `--set` items."""
    sets = [f"models.clip.name={clip.spec().model}", f"models.clip.pretrained={clip.checkpoint}",
            f"models.clip.model_config_dir={clip.config_dir}", "models.clip.offline=true",
            "models.clip.batch_size=16",
            f"models.perplexity_lm.source={lm}", "models.perplexity_lm.min_perplexity=0",
            "models.perplexity_lm.max_perplexity=1e9",
            f"models.llm.source={lm}", "models.llm.max_new_tokens=4",
            "generate.max_images=4", "generate.max_attempts=1", "generate.prompt.version=connect",
            "generate.prompt.system=''", "generate.prompt.user='{sentence} {caption} {tags}'",
            "tag.mine_min_count=2", "tag.threshold=-1.0", "tag.top_n=3", "cluster.k=4", "retrieve.k=3",
            f"export.out_dir={out}", "export.subset=cap-8"]
    return [a for s in sets for a in ("--set", s)]


def test_the_whole_pipeline_runs_through_a_spark_connect_client(server, tiny_clip, tiny_lm, tmp_path):
    from etl.stages import PIPELINE

    remote, overrides = server
    out = tmp_path / "export"
    client = ["--conf", str(PROJECT / "conf" / "local.yaml"), *overrides, *tiny_models(tiny_clip, tiny_lm, out),
              "--set", f"spark.remote={remote}", "--set", "spark.delta=cluster",
              # A cluster's Delta settings ask for a staging folder every worker reaches: here, one machine's.
              "--set", f"model_output.staging_dir={tmp_path / 'staging'}"]
    done = realsyn("run", *client, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]

    runs = realsyn("sql", *client, "--limit", "100",
                   "SELECT stage, status, rows_out FROM realsyn.runs ORDER BY started_at")
    assert runs.returncode == 0, runs.stderr[-3000:]
    lines = [line.split("|")[1:-1] for line in runs.stdout.splitlines() if line.startswith("|")][1:]
    statuses = {cells[0].strip(): (cells[1].strip(), int(cells[2])) for cells in lines}
    assert {stage: statuses[stage][0] for stage in PIPELINE} == {stage: "ok" for stage in PIPELINE}, statuses
    for stage in ["ingest", "image_quality", "sentences", "embed", "retrieve", "generate", "pairs", "balance"]:
        assert statuses[stage][1] > 0, (stage, statuses)
    assert sorted(out.glob("webdataset/*.tar")) and (out / "manifest.json").is_file()
