"""The fetch stage on real Spark + Delta against a loopback server: secrets kept out of every table
and log, --retry-failed, bytes written exactly once after a killed run, hosts placed on tasks."""
from __future__ import annotations

import json
import logging
import socket

import pytest
from pyspark.sql import functions as F

from etl.runner import run_stages
from etl.stages.fetch import by_host
from etl.tables import version
from image_fixtures import LoopbackServer, photo
from udfs.ids import normalise_url, stable_id

pytestmark = pytest.mark.spark

DOC_IMAGES = ("doc_id string, position int, image_id string, url string, path string, alt_text string, "
              "metadata string, bytes binary, batch_id string")
FETCH = {"allow_hosts": ["127.0.0.1"], "retries": 0, "backoff_s": 0.01, "read_timeout_s": 2.0,
         "max_attempts_total": 2}
SECRETS = ("pa55w0rd", "alice", "s3cr3t", "hunter2", "/srv/private")


@pytest.fixture(scope="module")
def server():
    s = LoopbackServer()
    routes = s.httpd.RequestHandlerClass.routes
    routes["/signed.jpg?X-Amz-Signature=s3cr3t&w=1"] = lambda h, n: h._send(200, photo())
    routes["/plain.jpg"] = lambda h, n: h._send(200, photo(), "text/plain")

    def verbose_500(h, n):
        h.send_response(500, "cannot read /srv/private/a.jpg for https://bob:hunter2@cdn.example/x?token=s3cr3t")
        h.send_header("Content-Length", "0")
        h.end_headers()

    routes["/verbose-500"] = verbose_500
    yield s
    s.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _add(spark, ctx, urls: dict[str, str]) -> None:
    rows = [(f"d-{name}", 0, stable_id("image-url", normalise_url(url)), url, None, None, name, None, "b0")
            for name, url in urls.items()]
    spark.createDataFrame(rows, DOC_IMAGES).write.format("delta").mode("append").saveAsTable(ctx.table("doc_images"))


def _images(ctx) -> dict[str, dict]:
    names = ctx.read("doc_images").select("image_id", F.col("metadata").alias("name"))
    return {r["name"]: r.asDict() for r in ctx.read("images").join(names, "image_id").collect()}


def _last_run(ctx) -> dict:
    return ctx.read("runs").where("stage = 'fetch'").orderBy(F.desc("started_at")).first().asDict()


def test_no_secret_reaches_a_table_or_the_log(spark, stage_ctx, server, caplog):
    ctx = stage_ctx(fetch=FETCH)
    base = server.base.replace("http://", "http://alice:pa55w0rd@")
    _add(spark, ctx, {"signed": f"{base}/signed.jpg?X-Amz-Signature=s3cr3t&w=1", "chatty": f"{base}/verbose-500",
                      "mislabelled": f"{base}/plain.jpg"})
    with caplog.at_level(logging.DEBUG):
        run_stages(spark, ctx.cfg, ["fetch"])
    img = _images(ctx)
    assert img["signed"]["fetch_status"] == "ok"  # the signed request went out as given...
    assert img["signed"]["url"] == f"{server.base}/signed.jpg?X-Amz-Signature=REDACTED&w=1"  # ...stored without it
    assert img["chatty"]["fetch_error"] == "cannot read <path> for https://cdn.example/x?token=REDACTED"
    assert (img["mislabelled"]["fetch_status"], img["mislabelled"]["kept"]) == ("ok", True)
    run = _last_run(ctx)
    assert run["metrics"]["content_type_mismatch"] == 1
    assert json.loads(run["notes"]["failures_by_host"]) == {"127.0.0.1": {"server_error": 1}}
    for table in ("images", "runs"):
        for row in ctx.read(table).collect():
            for secret in SECRETS:
                assert secret not in str(row), (table, row)
    for record in caplog.records:
        for secret in SECRETS:
            assert secret not in record.getMessage(), record.getMessage()


def test_retry_failed_fetches_only_failures_within_their_budget(spark, stage_ctx, server):
    ctx = stage_ctx(fetch=FETCH)
    _add(spark, ctx, {"good": server.url("/good.jpg"), "missing": server.url("/missing.jpg"),
                      "busy": server.url("/always-500.jpg"), "refused": f"http://127.0.0.1:{_closed_port()}/x.jpg"})
    run_stages(spark, ctx.cfg, ["fetch"])
    first = _images(ctx)
    assert {k: v["fetch_status"] for k, v in first.items()} == {
        "good": "ok", "missing": "http_error", "busy": "server_error", "refused": "connection_error"}

    _add(spark, ctx, {"new": server.url("/other.jpg")})
    hits = dict(server.hits)
    retry = ctx.cfg.model_copy(update={"fetch": ctx.cfg.fetch.model_copy(update={"retry_failed": True})})
    run_stages(spark, retry, ["fetch"])
    again = _images(ctx)
    assert "new" not in again  # no new URLs in this mode
    assert server.hits.get("/other.jpg", 0) == hits.get("/other.jpg", 0)
    assert server.hits["/missing.jpg"] == hits["/missing.jpg"] and server.hits["/good.jpg"] == hits["/good.jpg"]
    assert server.hits["/always-500.jpg"] == hits["/always-500.jpg"] + 1
    assert {k: v["fetch_attempts"] for k, v in again.items()} == {"good": 1, "missing": 1, "busy": 2, "refused": 2}
    assert _last_run(ctx)["rows_in"] == 2

    # Budget (2 attempts) spent: nothing left to retry, no table written.
    v = version(spark, ctx.table("images"))
    run_stages(spark, retry, ["fetch"])
    assert version(spark, ctx.table("images")) == v and _last_run(ctx)["rows_in"] == 0
    # A plain run brings the new URL; connection errors are final there.
    run_stages(spark, ctx.cfg, ["fetch"])
    assert _images(ctx)["new"]["fetch_status"] == "ok"


def test_bytes_are_written_once_after_a_run_killed_between_its_writes(spark, stage_ctx, server):
    ctx = stage_ctx(fetch=FETCH)
    _add(spark, ctx, {"good": server.url("/good.jpg"), "other": server.url("/other.jpg")})
    run_stages(spark, ctx.cfg, ["fetch"])
    # What a run killed after its bytes append and before its images upsert leaves: bytes, no row.
    spark.sql(f"DELETE FROM {ctx.table('images')} WHERE url LIKE '%/good.jpg'")
    v = version(spark, ctx.table("image_bytes"))
    run_stages(spark, ctx.cfg, ["fetch"])
    assert _images(ctx)["good"]["fetch_status"] == "ok"
    counts = ctx.read("image_bytes").groupBy("image_id").count().collect()
    assert sorted(r["count"] for r in counts) == [1, 1]
    assert version(spark, ctx.table("image_bytes")) == v  # nothing new to store: no commit at all
    assert _last_run(ctx)["metrics"]["image_bytes_written"] == 0


@pytest.mark.parametrize("tasks_per_host", [1, 2])
def test_a_hosts_urls_go_to_tasks_per_host_tasks(spark, stage_ctx, tasks_per_host):
    ctx = stage_ctx()
    rows = [(f"i{h}{i}", f"http://user:pw@host{h}.example:8080/{i}.jpg", "b", 0) for h in range(3) for i in range(40)]
    rows.append(("bad", "not a url", "b", 0))
    df = spark.createDataFrame(rows, "image_id string, url string, batch_id string, fetch_attempts int")
    placed = (by_host(ctx, df, tasks_per_host).select(F.regexp_extract("url", r"@([^:/]+)", 1).alias("host"),
                                                       F.spark_partition_id().alias("p"))
              .groupBy("host").agg(F.countDistinct("p").alias("tasks")).collect())
    tasks = {r["host"]: r["tasks"] for r in placed if r["host"]}
    assert tasks == {f"host{h}.example": tasks_per_host for h in range(3)}
