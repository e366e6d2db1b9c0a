"""udfs/fetch.py against a real HTTP server on 127.0.0.1 (no Spark, no other network)."""
from __future__ import annotations

import ssl
import subprocess
import time

import pandas as pd
import pytest

from image_fixtures import DATAJUICER, LoopbackServer, photo, server  # noqa: F401  (server is a fixture)
from udfs.fetch import FetchPolicy, fetch_one, make_fetch_fn, sniff_image_format

LOOPBACK = FetchPolicy(connect_timeout_s=1.0, read_timeout_s=0.5, total_timeout_s=5.0, retries=2,
                       backoff_s=0.01, max_bytes=1 << 20, allow_hosts=("127.0.0.1",))


@pytest.mark.parametrize("path, status, http, attempts", [
    ("/good.jpg", "ok", 200, 1),
    ("/octet", "ok", 200, 1),  # generic type, image magic: accepted
    ("/redirect-good", "ok", 200, 1),
    ("/redirect-relative", "ok", 200, 1),
    ("/missing.jpg", "http_error", 404, 1),  # 4xx: final, not retried
    ("/gone.jpg", "http_error", 410, 1),
    ("/slow.jpg", "timeout", None, 3),  # retried with backoff, then given up
    ("/always-500.jpg", "server_error", 500, 3),
    ("/redirect-private", "blocked_address", None, 1),
    ("/redirect-metadata", "blocked_address", None, 1),
    ("/redirect-loop", "too_many_redirects", None, 1),
    ("/big.png", "too_large", 200, 1),  # Content-Length over the cap: body never read
    ("/big-chunked.png", "too_large", 200, 1),  # no length: the cap holds while streaming
    ("/noai.jpg", "opted_out", 200, 1),
    ("/noimageai.jpg", "opted_out", 200, 1),
    ("/page.html", "bad_content_type", 200, 1),
    ("/fake.jpg", "not_image", 200, 1),
])
def test_outcomes(server, path, status, http, attempts):  # noqa: F811
    r = fetch_one(server.url(path), LOOPBACK)
    assert (r.status, r.http_status, r.attempts) == (status, http, attempts), r.error
    assert (r.body is not None) == (status == "ok")
    if status == "ok":
        assert sniff_image_format(r.body) == "JPEG"


def test_good_body_is_the_served_bytes(server):  # noqa: F811
    assert fetch_one(server.url("/good.jpg"), LOOPBACK).body == photo()


def test_5xx_then_success_is_retried(server):  # noqa: F811
    r = fetch_one(server.url("/flaky.jpg"), LOOPBACK)
    assert (r.status, r.http_status, r.attempts) == ("ok", 200, 3)
    assert server.hits["/flaky.jpg"] == 3


def test_loopback_refused_unless_allow_listed(server):  # noqa: F811
    strict = FetchPolicy(connect_timeout_s=1.0, read_timeout_s=1.0)
    r = fetch_one(server.url("/good.jpg"), strict)
    assert r.status == "blocked_address" and "127.0.0.1" in r.error
    hits = server.hits.get("/good.jpg", 0)
    fetch_one(server.url("/good.jpg"), strict)
    assert server.hits.get("/good.jpg", 0) == hits  # refused before any connection
    # A CIDR entry works too; a name entry allows whatever that name resolves to.
    assert fetch_one(server.url("/good.jpg"), FetchPolicy(allow_hosts=("127.0.0.0/8",))).status == "ok"
    named = server.url("/good.jpg").replace("127.0.0.1", "localhost")
    assert fetch_one(named, FetchPolicy(allow_hosts=("localhost",))).status == "ok"


@pytest.mark.parametrize("url", ["ftp://example.org/x.jpg", "not a url", "http:///nohost", "http://[::1"])
def test_bad_urls(url):
    assert fetch_one(url, LOOPBACK).status == "bad_url"


@pytest.mark.parametrize("host", ["10.0.0.1", "192.168.1.1", "172.16.0.5", "169.254.169.254", "[::1]",
                                  "0.0.0.0", "100.64.0.1", "[::ffff:10.0.0.1]", "224.0.0.1"])
def test_private_and_special_addresses_refused(host):
    r = fetch_one(f"http://{host}/x.jpg", FetchPolicy(connect_timeout_s=0.2))
    assert r.status == "blocked_address", r


def test_opt_out_can_be_switched_off(server):  # noqa: F811
    lax = FetchPolicy(allow_hosts=("127.0.0.1",), respect_opt_out=False)
    assert fetch_one(server.url("/noai.jpg"), lax).status == "ok"


def test_batch_fn_bounds_concurrency_and_adds_attempts(server):  # noqa: F811
    slow_policy = dict(concurrency=4, connect_timeout_s=1.0, read_timeout_s=3.0, retries=0,
                       allow_hosts=["127.0.0.1"])
    urls = [server.url("/slow.jpg")] * 4
    pdf = pd.DataFrame({"image_id": [f"i{i}" for i in range(4)], "url": urls, "batch_id": "b",
                        "fetch_attempts": [0, 1, 2, 3]})
    t0 = time.perf_counter()
    out = pd.concat(make_fetch_fn(**slow_policy)(iter([pdf])))
    elapsed = time.perf_counter() - t0
    assert list(out["fetch_status"]) == ["ok"] * 4
    assert elapsed < 4 * 1.5  # four 1.5 s responses in parallel, not one after another
    assert list(out["fetch_attempts"]) == [1, 2, 3, 4]
    assert list(out["image_id"]) == ["i0", "i1", "i2", "i3"]

    one = dict(slow_policy, concurrency=1)
    t0 = time.perf_counter()
    pd.concat(make_fetch_fn(**one)(iter([pdf.head(2)])))
    assert time.perf_counter() - t0 >= 2 * 1.5  # concurrency 1: one at a time


def test_user_agent_is_sent(server):  # noqa: F811
    seen = {}

    def record(h, n):
        seen["ua"] = h.headers.get("User-Agent")
        h._send(200, photo(DATAJUICER / "img2.jpg"))

    server.httpd.RequestHandlerClass.routes["/ua.jpg"] = record
    fetch_one(server.url("/ua.jpg"), FetchPolicy(allow_hosts=("127.0.0.1",), user_agent="polite-bot/1.0"))
    assert seen["ua"] == "polite-bot/1.0"


def test_attempt_budget_spans_runs(server):  # noqa: F811
    budget = FetchPolicy(allow_hosts=("127.0.0.1",), retries=2, backoff_s=0.01, max_attempts_total=3)
    assert fetch_one(server.url("/always-500.jpg"), budget, attempts_before=2).attempts == 1
    assert fetch_one(server.url("/always-500.jpg"), budget, attempts_before=0).attempts == 3


@pytest.fixture(scope="module")
def https_server(tmp_path_factory):
    """The same routes over TLS, with a throwaway self-signed certificate for `localhost`."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    s = LoopbackServer()
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    s.httpd.socket = tls.wrap_socket(s.httpd.socket, server_side=True)
    yield s, str(cert)
    s.close()


def test_https_pins_the_checked_address_and_verifies_the_name(https_server, monkeypatch):
    s, cert = https_server
    url = s.url("/good.jpg").replace("http://127.0.0.1", "https://localhost")
    policy = FetchPolicy(allow_hosts=("localhost",), connect_timeout_s=2.0, read_timeout_s=2.0, retries=0)
    untrusted = fetch_one(url, policy)
    assert untrusted.status == "connection_error" and "CERTIFICATE_VERIFY_FAILED" in untrusted.error
    monkeypatch.setenv("SSL_CERT_FILE", cert)  # trust the test certificate
    trusted = fetch_one(url, policy)
    assert (trusted.status, trusted.body) == ("ok", photo())
    # The certificate names localhost, not the address: connecting by address must fail.
    by_address = fetch_one(url.replace("localhost", "127.0.0.1"), FetchPolicy(allow_hosts=("127.0.0.1",), retries=0))
    assert by_address.status == "connection_error" and "127.0.0.1" in by_address.error
