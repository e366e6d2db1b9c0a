"""Shared fixtures: one real local SparkSession with Delta for the whole test run.

Each stage test gets its own database (`stage_ctx`), so tests never see each other's tables
while paying the JVM start-up once. The whole pipeline on the bundled sample runs once per session
(`sample_run`, tests/sample_pipeline.py) for the tests that read a finished run.

The data paths (TEST_DATA: the bundled `tests/data`; SHARED_DATA and `requires_shared`: the
optional larger `../shared/data`) come from data_paths.py.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

import sample_pipeline
from clip_fixtures import tiny_clip  # noqa: F401  (fixture: sample_run's and its readers' models)
from data_paths import HAS_SHARED, PROJECT, SHARED_DATA, SHARED_REASON, TEST_DATA, requires_shared  # noqa: F401
from etl.config import load_config, validate
from lm_fixtures import tiny_lm  # noqa: F401  (fixture)

# Property-based fuzzing (tests/test_fuzz_*.py): no examples database (nothing written into the
# repo), no per-example deadline (a loaded machine is slow), REALSYN_FUZZ_EXAMPLES examples per
# property (the suite's budget by default; raise it for a long run).
FUZZ_EXAMPLES = int(os.environ.get("REALSYN_FUZZ_EXAMPLES", "100"))
hypothesis_settings.register_profile(
    "realsyn", database=None, deadline=None, max_examples=FUZZ_EXAMPLES, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
hypothesis_settings.load_profile("realsyn")

TEST_SETTINGS = {
    "spark": {
        "master": "local[2]",
        "shuffle_partitions": 2,
        "log_level": "ERROR",
        "conf": {
            "spark.databricks.delta.snapshotPartitions": "1",
            "spark.sql.sources.parallelPartitionDiscovery.parallelism": "2",
            "spark.ui.showConsoleProgress": "false",
            "spark.driver.memory": "4g",
        },
    },
}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture(scope="session")
def warehouse(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("warehouse")


@pytest.fixture(scope="session")
def make_cfg(warehouse):
    """make_cfg({"retrieve": {"k": 5}}) -> a validated Config on the test warehouse."""
    base = load_config(PROJECT / "conf" / "local.yaml").model_dump()
    base = _merge(base, TEST_SETTINGS)
    base["spark"]["warehouse_dir"] = str(warehouse)

    def make(overrides: dict | None = None, **sections):
        return validate(_merge(_merge(base, overrides or {}), sections), source="test config")

    return make


@pytest.fixture(scope="session")
def spark(make_cfg):
    from etl.session import build_spark

    session = build_spark(make_cfg(), progress=False)
    yield session
    session.stop()


def new_ctx(spark, make_cfg, overrides: dict | None = None, **sections):
    """A StageContext on a fresh database of its own."""
    from etl.context import StageContext
    from etl.runner import new_batch_id

    database = f"t_{uuid.uuid4().hex[:10]}"
    cfg = make_cfg(_merge(overrides or {}, {"catalog": {"database": database}}), **sections)
    spark.sql(f"CREATE DATABASE IF NOT EXISTS {database}")
    return StageContext(spark=spark, cfg=cfg, run_id=uuid.uuid4().hex[:12], batch_id=new_batch_id())


@pytest.fixture
def stage_ctx(spark, make_cfg):
    """stage_ctx(**config_sections) -> a StageContext on a fresh database of its own."""
    return lambda overrides=None, **sections: new_ctx(spark, make_cfg, overrides, **sections)


@pytest.fixture(scope="session")
def sample_batches(tmp_path_factory) -> list[Path]:
    return sample_pipeline.write_batches(tmp_path_factory.mktemp("sample-batches"))


@pytest.fixture(scope="session")
def sample_run(spark, make_cfg, sample_batches, tiny_clip, tiny_lm, tmp_path_factory):  # noqa: F811
    """The whole pipeline once over both sample batches: .ctx (its database), .results (per
    stage), .export_dir. Readers must not write to its tables."""
    from etl.runner import run_stages

    export_dir = tmp_path_factory.mktemp("sample-run") / "export"
    ctx = new_ctx(spark, make_cfg, **sample_pipeline.settings(tiny_clip, tiny_lm, sample_batches, export_dir))
    return SimpleNamespace(ctx=ctx, results=run_stages(spark, ctx.cfg), export_dir=export_dir)


@pytest.fixture
def s3_bucket(monkeypatch):
    """A real S3 API (moto's server) on 127.0.0.1 with one bucket, credentials in this process's
    environment as every AWS client reads them; yields an export root URI naming the endpoint."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "moto")
    host, port = server.get_host_and_port()
    query = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    pafs.FileSystem.from_uri(f"s3://release?{query}&allow_bucket_creation=true")[0].create_dir("release")
    try:
        yield f"s3://release/realsyn/15M?{query}"
    finally:
        server.stop()
