"""udfs/fetch.py against a real HTTP server on 127.0.0.1 (no Spark, no other network)."""
from __future__ import annotations

import ipaddress
import ssl
import subprocess
import threading
import time

import pandas as pd
import pytest

from image_fixtures import DATAJUICER, LoopbackServer, photo, server  # noqa: F401  (server is a fixture)
from udfs.fetch import (FetchPolicy, Session, _AllowList, _Refused, embedded_ipv4, fetch_one, is_public,
                        make_fetch_fn, resolve_public, sniff_image_format)

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


def _embedding_forms(v4: str) -> dict[str, str]:
    """Every IPv6 form that carries the IPv4 address `v4`."""
    n = int(ipaddress.IPv4Address(v4))
    six = lambda value: str(ipaddress.IPv6Address(value))  # noqa: E731
    return {
        "6to4": six(0x2002 << 112 | n << 80),
        "nat64": six(0x64FF9B << 96 | n),
        "nat64-local/96": six(0x64FF9B0001 << 80 | n),
        "nat64-local/48": six(0x64FF9B0001 << 80 | (n >> 16) << 64 | (n & 0xFFFF) << 40),
        "teredo-server": six(0x20010000 << 96 | n << 64),
        "teredo-client": six(0x20010000 << 96 | int(ipaddress.IPv4Address("8.8.8.8")) << 64 | n ^ 0xFFFFFFFF),
        "ipv4-mapped": six(0xFFFF << 32 | n),
        "ipv4-compatible": six(n),
        "siit-translated": six(0xFFFF << 48 | n),
    }


EMBEDDED_NON_PUBLIC = ["127.0.0.1", "10.1.2.3", "169.254.169.254", "192.168.1.1"]

REFUSED = [
    ("ipv4-private-10", "10.0.0.1"), ("ipv4-private-172", "172.16.0.5"), ("ipv4-private-192", "192.168.1.1"),
    ("ipv4-loopback", "127.0.0.1"), ("ipv4-loopback-other", "127.1.2.3"),
    ("ipv4-link-local-metadata", "169.254.169.254"), ("ipv4-cgnat", "100.64.0.1"),
    ("ipv4-multicast", "224.0.0.1"), ("ipv4-reserved", "240.0.0.1"), ("ipv4-broadcast", "255.255.255.255"),
    ("ipv4-unspecified", "0.0.0.0"), ("ipv4-documentation", "192.0.2.1"), ("ipv4-benchmark", "198.18.0.1"),
    ("ipv6-loopback", "::1"), ("ipv6-unspecified", "::"), ("ipv6-ula", "fd00::1"),
    ("ipv6-link-local", "fe80::1"), ("ipv6-multicast", "ff02::1"), ("ipv6-documentation", "2001:db8::1"),
] + [(f"{form}-{v4}", v6) for v4 in EMBEDDED_NON_PUBLIC for form, v6 in _embedding_forms(v4).items()]


@pytest.mark.parametrize("host", [h for _, h in REFUSED], ids=[i for i, _ in REFUSED])
def test_non_public_addresses_refused(host):
    # IP literals: getaddrinfo hands them back without DNS, and nothing is connected to.
    with pytest.raises(_Refused) as refused:
        resolve_public(host, 80, _AllowList(()))
    assert refused.value.status == "blocked_address"
    assert not is_public(ipaddress.ip_address(host))


@pytest.mark.parametrize("v4", EMBEDDED_NON_PUBLIC + ["8.8.8.8"])
def test_every_form_yields_its_ipv4(v4):
    for form, v6 in _embedding_forms(v4).items():
        assert ipaddress.IPv4Address(v4) in embedded_ipv4(ipaddress.IPv6Address(v6)), form
    assert embedded_ipv4(ipaddress.IPv6Address("2001:0:808:808::f5fe:fdfc")) == [
        ipaddress.IPv4Address("8.8.8.8"), ipaddress.IPv4Address("10.1.2.3")]  # Teredo: server, client


@pytest.mark.parametrize("addr", ["::1", "::", "2606:4700::1111", "fd00::1", "8.8.8.8"])
def test_no_embedded_ipv4(addr):
    assert embedded_ipv4(ipaddress.ip_address(addr)) == []


@pytest.mark.parametrize("addr, public", [
    # Packets go to the embedded IPv4 (6to4 relay, NAT64 translator, kernel): it decides.
    ("2002:808:808::", True), ("2002:808:808:1::1", True), ("64:ff9b::808:808", True),
    ("::ffff:8.8.8.8", True),
    # Not globally reachable in themselves (deprecated, local-use or non-global by IANA).
    ("::8.8.8.8", False), ("::ffff:0:808:808", False), ("64:ff9b:1::808:808", False),
    ("2001:0:808:808::f7f7:f7f7", False),
    ("2606:4700::1111", True), ("8.8.8.8", True),
])
def test_public_embedded_forms(addr, public):
    # The pure check only: nothing here is connected to.
    assert is_public(ipaddress.ip_address(addr)) is public
    assert _AllowList(()).permits("example.org", ipaddress.ip_address(addr)) is public


@pytest.mark.parametrize("entries, addr, permitted", [
    (("10.0.0.0/8",), "2002:a01:203::", True),  # the embedded IPv4's network
    (("10.1.2.3",), "64:ff9b::a01:203", True),
    (("10.0.0.0/8",), "::ffff:10.1.2.3", True),
    (("2002::/16",), "2002:7f00:1::", True),  # the IPv6 form itself
    (("example.org",), "2002:7f00:1::", True),  # the host name
    (("10.0.0.0/8",), "2002:7f00:1::", False),  # some other private address
    (("10.0.0.0/8",), "2001:0:808:808::f5fe:fdfc", True),  # Teredo: public server, listed client
    (("10.0.0.0/8",), "2001:0:7f00:1::f5fe:fdfc", False),  # ... loopback server not listed
    (("2002:a01:203::/48",), "2002:7f00:1::", False),
])
def test_allow_list_names_the_ipv6_form_or_the_embedded_ipv4(entries, addr, permitted):
    assert _AllowList(entries).permits("example.org", ipaddress.ip_address(addr)) is permitted


def test_6to4_of_loopback_refused_by_fetch(server):  # noqa: F811
    port = server.httpd.server_address[1]
    hits = dict(server.hits)
    r = fetch_one(f"http://[2002:7f00:1::]:{port}/good.jpg", FetchPolicy(retries=0, connect_timeout_s=0.2))
    assert r.status == "blocked_address" and "127.0.0.1" in r.error, r
    assert server.hits == hits  # refused before any connection


def test_redirect_to_embedded_private_refused(server):  # noqa: F811
    server.httpd.RequestHandlerClass.routes["/redirect-6to4"] = lambda h, n: h._send(
        302, b"", "text/plain", {"Location": "http://[2002:a01:203::]/secret.jpg"})
    r = fetch_one(server.url("/redirect-6to4"), LOOPBACK)
    assert r.status == "blocked_address" and "10.1.2.3" in r.error, r


def test_no_credentials_in_stored_url_or_error(server):  # noqa: F811
    routes = server.httpd.RequestHandlerClass.routes
    port = server.httpd.server_address[1]
    # The request goes out as given (the route only matches with the signature)...
    routes["/signed.jpg?X-Amz-Signature=s3cr3t&w=1"] = lambda h, n: h._send(200, photo())
    routes["/to-ftp"] = lambda h, n: h._send(302, b"", "text/plain", {
        "Location": "ftp://bob:hunter2@example.org/x.jpg?sig=s3cr3t"})
    routes["/to-private"] = lambda h, n: h._send(302, b"", "text/plain", {
        "Location": "http://bob:hunter2@10.1.2.3/x.jpg?token=s3cr3t"})

    def chatty_404(h, n):
        h.send_response(404, "see https://bob:hunter2@cdn.example/x.jpg?key=s3cr3t")
        h.send_header("Content-Length", "0")
        h.end_headers()

    routes["/chatty-404"] = chatty_404
    base = f"http://alice:pa55w0rd@127.0.0.1:{port}"
    rows = {
        f"{base}/signed.jpg?X-Amz-Signature=s3cr3t&w=1": (
            "ok", f"http://127.0.0.1:{port}/signed.jpg?X-Amz-Signature=REDACTED&w=1"),
        f"{base}/to-ftp": ("bad_url", "not an http(s) URL: ftp://example.org/x.jpg?sig=REDACTED"),
        f"{base}/to-private": ("blocked_address", "10.1.2.3 resolves to non-public address 10.1.2.3"),
        f"{base}/chatty-404": ("http_error", "see https://cdn.example/x.jpg?key=REDACTED"),
        "ftp://alice:pa55w0rd@example.org/a.jpg?token=s3cr3t": (
            "bad_url", "not an http(s) URL: ftp://example.org/a.jpg?token=REDACTED"),
    }
    pdf = pd.DataFrame({"image_id": [f"i{i}" for i in range(len(rows))], "url": list(rows), "batch_id": "b",
                        "fetch_attempts": 0})
    policy = dict(allow_hosts=["127.0.0.1"], retries=0, connect_timeout_s=1.0, read_timeout_s=1.0)
    out = pd.concat(make_fetch_fn(**policy)(iter([pdf])))
    for (status, stored_or_error), row in zip(rows.values(), out.itertuples()):
        assert row.fetch_status == status, row
        assert stored_or_error in (row.url if status == "ok" else row.fetch_error), row
    for cell in list(out["url"]) + list(out["fetch_error"].dropna()):
        for secret in ("pa55w0rd", "alice", "hunter2", "bob", "s3cr3t"):
            assert secret not in cell, cell


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


# --- politeness, connection reuse, magic bytes, opt-out list, error texts --------------------------

def _in_flight_route(server, path: str, hold_s: float = 0.15):  # noqa: F811
    """A route that records the most requests it served at once, per Host header."""
    lock, now, peak = threading.Lock(), {}, {}

    def route(h, n):
        host = h.headers["Host"].split(":")[0]
        with lock:
            now[host] = now.get(host, 0) + 1
            peak[host] = max(peak.get(host, 0), now[host])
        time.sleep(hold_s)
        with lock:
            now[host] -= 1
        h._send(200, photo())

    server.httpd.RequestHandlerClass.routes[path] = route
    return peak


def test_per_host_concurrency_bounds_each_host_not_the_total(server):  # noqa: F811
    peak = _in_flight_route(server, "/held.jpg")
    urls = [server.url("/held.jpg")] * 8 + [server.url("/held.jpg").replace("127.0.0.1", "localhost")] * 8
    pdf = pd.DataFrame({"image_id": [f"i{i}" for i in range(16)], "url": urls, "batch_id": "b", "fetch_attempts": 0})
    fn = make_fetch_fn(concurrency=16, per_host_concurrency=3, retries=0, allow_hosts=["127.0.0.1", "localhost"])
    out = pd.concat(fn(iter([pdf])))
    assert set(out["fetch_status"]) == {"ok"}
    assert peak == {"127.0.0.1": 3, "localhost": 3}  # each host its own gate, both full


def test_per_host_rate_spaces_request_starts(server):  # noqa: F811
    starts = []
    server.httpd.RequestHandlerClass.routes["/paced.jpg"] = lambda h, n: (starts.append(time.monotonic()),
                                                                         h._send(200, photo()))
    pdf = pd.DataFrame({"image_id": [f"i{i}" for i in range(6)], "url": [server.url("/paced.jpg")] * 6,
                        "batch_id": "b", "fetch_attempts": 0})
    fn = make_fetch_fn(concurrency=6, per_host_rate=20.0, retries=0, allow_hosts=["127.0.0.1"])
    assert set(pd.concat(fn(iter([pdf])))["fetch_status"]) == {"ok"}
    gaps = [b - a for a, b in zip(sorted(starts), sorted(starts)[1:])]
    assert len(gaps) == 5 and min(gaps) > 0.04  # 20/s: 50 ms apart (less a little scheduling jitter)


def test_connections_are_kept_alive_per_pinned_address(server):  # noqa: F811
    ports = []
    server.httpd.RequestHandlerClass.routes["/port.jpg"] = lambda h, n: (ports.append(h.client_address[1]),
                                                                        h._send(200, photo()))
    policy = FetchPolicy(allow_hosts=("127.0.0.1",), retries=0)
    session = Session(policy)
    try:
        for _ in range(5):
            assert fetch_one(server.url("/port.jpg"), policy, session=session).status == "ok"
        # An error with a small body is read out, so its connection serves the next request too.
        assert fetch_one(server.url("/missing.jpg"), policy, session=session).status == "http_error"
        assert fetch_one(server.url("/port.jpg"), policy, session=session).status == "ok"
    finally:
        session.close()
    assert len(set(ports)) == 1, ports


def test_a_connection_the_server_closed_is_replaced(server):  # noqa: F811
    def then_close(h, n):
        h._send(200, photo(), headers={"Connection": "close"})
        h.close_connection = True

    server.httpd.RequestHandlerClass.routes["/closing.jpg"] = then_close
    policy = FetchPolicy(allow_hosts=("127.0.0.1",), retries=0)
    session = Session(policy)
    try:
        assert [fetch_one(server.url("/closing.jpg"), policy, session=session).status for _ in range(3)] == ["ok"] * 3
        # A kept connection that the server drops while idle: the request goes out on a new one.
        assert fetch_one(server.url("/good.jpg"), policy, session=session).status == "ok"
        for conns in session._idle.values():
            for conn in conns:
                conn.sock.shutdown(2)
        assert fetch_one(server.url("/good.jpg"), policy, session=session).status == "ok"
    finally:
        session.close()


@pytest.mark.parametrize("ctype, body, status, error", [
    ("text/plain", "cat", "ok", "served as text/plain, bytes are JPEG"),  # magic bytes decide
    ("text/html; charset=utf-8", "cat", "ok", "served as text/html, bytes are JPEG"),
    ("application/octet-stream", "cat", "ok", None),
    ("image/png", "cat", "ok", None),  # an image label that names another format is not a mismatch
    ("text/html", "html", "bad_content_type", "text/html"),
    ("image/jpeg", "html", "not_image", "magic bytes 3c68746d6c3e3c2f"),
])
def test_magic_bytes_decide_and_a_mislabel_is_noted(server, ctype, body, status, error):  # noqa: F811
    path = f"/labelled-{abs(hash((ctype, body)))}"
    data = photo() if body == "cat" else b"<html></html>"
    server.httpd.RequestHandlerClass.routes[path] = lambda h, n: h._send(200, data, ctype)
    r = fetch_one(server.url(path), LOOPBACK)
    assert (r.status, r.error) == (status, error)
    assert r.body == (data if status == "ok" else None)


@pytest.mark.parametrize("tag", ["noai", "noimageai", "noindex", "noimageindex", "somebot: NoIndex",
                                 "max-image-preview:large, noimageindex"])
def test_opt_out_list_is_img2datasets_by_default(server, tag):  # noqa: F811
    path = f"/tagged-{abs(hash(tag))}.jpg"
    server.httpd.RequestHandlerClass.routes[path] = lambda h, n: h._send(200, photo(), headers={"X-Robots-Tag": tag})
    assert fetch_one(server.url(path), FetchPolicy(allow_hosts=("127.0.0.1",))).status == "opted_out"


def test_429_is_retried_with_backoff(server):  # noqa: F811
    server.httpd.RequestHandlerClass.routes["/busy.jpg"] = (
        lambda h, n: h._send(429, b"slow down", "text/plain") if n == 1 else h._send(200, photo()))
    r = fetch_one(server.url("/busy.jpg"), LOOPBACK)
    assert (r.status, r.attempts) == ("ok", 2)
    always = fetch_one(server.url("/busy.jpg").replace("busy", "nope"), LOOPBACK)
    assert always.status == "http_error"


def test_error_texts_are_short_and_free_of_paths(server):  # noqa: F811
    def verbose(h, n):
        h.send_response(500, "failed reading /srv/www/private/images/x.jpg for https://u:pw@h.example/a"
                             "?X-Amz-Signature=abc " + "x" * 400)
        h.send_header("Content-Length", "0")
        h.end_headers()

    server.httpd.RequestHandlerClass.routes["/verbose-500"] = verbose
    r = fetch_one(server.url("/verbose-500"), FetchPolicy(allow_hosts=("127.0.0.1",), retries=0))
    assert r.status == "server_error" and len(r.error) <= 200
    assert "<path>" in r.error and "/srv/" not in r.error
    assert "pw@" not in r.error and "abc" not in r.error and "https://h.example/a" in r.error
