"""Polite, SSRF-safe HTTP fetching of image URLs, as a mapInPandas batch function.

Every hop of a request (the first URL and each redirect) is resolved here and refused when any
address it resolves to is not public (private, loopback, link-local, reserved, multicast, CGNAT...)
unless the host or address is allow-listed; the connection then goes to the address that was
checked, so a DNS answer cannot change between the check and the connect. Redirects are followed
by hand, one checked hop at a time. An IPv6 address that embeds IPv4 (6to4, NAT64, Teredo,
IPv4-mapped/-compatible/-translated) is refused when any IPv4 it carries is not public either:
`2002:7f00:1::` reaches 127.0.0.1 through a 6to4 relay.

Credentials never leave through the outputs: the `url` column is stored redacted and every error
text goes through udfs/redact.py. A stored URL is requested without the parameters whose values
were redacted (`request_url`): the secret is gone, so it cannot be sent.

One status per URL, from the fixed vocabulary below; only RETRYABLE ones are retried (with
exponential backoff inside a run, and again by later runs up to a total attempt budget).
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator
from urllib.parse import urljoin, urlsplit

import pandas as pd

from udfs.redact import DEFAULT_SECRET_PARAMS, redact_text, redact_url, request_url

FETCH_SCHEMA = (
    "image_id string, url string, batch_id string, bytes binary, fetch_status string, "
    "http_status int, fetch_error string, fetch_attempts int"
)

OK = "ok"
INLINE = "inline"  # came with bytes at ingest; never fetched
# Transient by nature: worth another try now (backoff) and in a later run.
RETRYABLE = frozenset({"server_error", "timeout"})
# Everything else is final: bad_url, blocked_address, dns_error, connection_error, http_error,
# opted_out, bad_content_type, too_large, not_image, too_many_redirects.

REDIRECTS = frozenset({301, 302, 303, 307, 308})
_GENERIC_TYPES = ("application/octet-stream", "binary/octet-stream")
_CHUNK = 64 << 10


def sniff_image_format(data: bytes) -> str | None:
    """Raster format from the magic bytes (Pillow's format names), None when not an image."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1"):
        return "AVIF" if data[8:11] == b"avi" else "HEIF"
    return None


@dataclass(frozen=True)
class FetchPolicy:
    concurrency: int = 16
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    total_timeout_s: float = 30.0
    retries: int = 2
    backoff_s: float = 0.5
    max_bytes: int = 20 << 20
    max_redirects: int = 5
    user_agent: str = "realsyn-etl"
    respect_opt_out: bool = True
    opt_out_tokens: tuple[str, ...] = ("noai", "noimageai")
    allow_hosts: tuple[str, ...] = ()
    # Attempts a URL may use over all runs; a URL that used some before gets only the rest.
    max_attempts_total: int | None = None
    secret_params: tuple[str, ...] = DEFAULT_SECRET_PARAMS  # redacted in stored URLs and errors


@dataclass
class FetchResult:
    status: str
    http_status: int | None = None
    error: str | None = None
    body: bytes | None = None
    attempts: int = 1


class _Refused(Exception):
    def __init__(self, status: str, detail: str):
        super().__init__(detail)
        self.status = status


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_MAPPED = ipaddress.ip_network("::ffff:0:0/96")  # ::ffff:a.b.c.d, IPv4 on the wire
_COMPATIBLE = ipaddress.ip_network("::/96")  # ::a.b.c.d, deprecated (RFC 4291)
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # ::ffff:0:a.b.c.d, SIIT (RFC 2765)
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")  # 2002:AABB:CCDD::/48 (RFC 3056)
_TEREDO = ipaddress.ip_network("2001::/32")  # server and obfuscated client (RFC 4380)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known prefix (RFC 6052)
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # local-use prefix (RFC 8215)
# Packets to these go to the embedded IPv4 (the kernel, a 6to4 relay, a NAT64 translator), so the
# IPv4 decides. Python's own verdict on them varies (::/8 is "reserved"; 2002::/16 "private" since
# the CVE-2024-4032 fix, 3.11.10) and would refuse what DNS64 answers for every IPv4-only host.
_CARRIERS = (_MAPPED, _SIX_TO_FOUR, _NAT64)


def embedded_ipv4(addr: IPAddress) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address an IPv6 address embeds, in any form that reaches it; [] when none."""
    if addr.version == 4:
        return []
    value = int(addr)
    low32 = ipaddress.IPv4Address(value & 0xFFFFFFFF)
    if addr in _MAPPED or addr in _TRANSLATED or addr in _NAT64:
        return [low32]
    if addr in _COMPATIBLE:
        # :: and ::1 are the IPv6 unspecified and loopback addresses, not IPv4 in disguise.
        return [low32] if value > 1 else []
    if addr in _SIX_TO_FOUR:
        return [addr.sixtofour]
    if addr in _TEREDO:
        return list(addr.teredo)
    if addr in _NAT64_LOCAL:
        # The local prefix may be any RFC 6052 length from /48 to /96, which moves the IPv4 (and
        # skips bits 64-71): every placement counts, so none can hide a private address.
        candidates = [
            (value >> 64 & 0xFFFF) << 16 | value >> 40 & 0xFFFF,  # /48
            (value >> 64 & 0xFF) << 24 | value >> 32 & 0xFFFFFF,  # /56
            value >> 24 & 0xFFFFFFFF,  # /64
            value & 0xFFFFFFFF,  # /96
        ]
        return [ipaddress.IPv4Address(v) for v in dict.fromkeys(candidates)]
    return []


def _public_as_is(addr: IPAddress) -> bool:
    # is_global alone still admits multicast (224.0.0.0/4) on some Python versions.
    return addr.is_global and not (addr.is_multicast or addr.is_reserved or addr.is_unspecified
                                   or addr.is_loopback or addr.is_link_local or addr.is_private)


def is_public(addr: IPAddress) -> bool:
    """Whether connecting to `addr` can only reach the public internet, IPv4 it embeds included."""
    embedded = embedded_ipv4(addr)
    if not all(_public_as_is(v4) for v4 in embedded):
        return False
    if embedded and any(addr in net for net in _CARRIERS):
        return True
    return _public_as_is(addr)


class _AllowList:
    """Allow-list entries are host names (exact, case-insensitive) or addresses / CIDR networks.

    An IPv6 address that embeds IPv4 is allowed by an entry covering the IPv6 address itself, or
    by entries covering the embedded IPv4 (every non-public one of them, when there are several).
    """

    def __init__(self, entries: tuple[str, ...]):
        self.names: set[str] = set()
        self.nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in entries:
            try:
                self.nets.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.names.add(entry.lower().rstrip("."))

    def permits(self, host: str, addr: IPAddress) -> bool:
        if is_public(addr) or host in self.names or self._listed(addr):
            return True
        embedded = embedded_ipv4(addr)
        return (any(self._listed(v4) for v4 in embedded)
                and all(self._listed(v4) or _public_as_is(v4) for v4 in embedded))

    def _listed(self, addr: IPAddress) -> bool:
        return any(addr in net for net in self.nets)


def resolve_public(host: str, port: int, allow: _AllowList) -> str:
    """The address to connect to; refuses if ANY resolved address is non-public and not allowed."""
    host = host.lower().rstrip(".")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise _Refused("dns_error", f"{host}: {e}") from None
    addrs = []
    for info in infos:
        addr = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        # ::ffff:10.0.0.1 is 10.0.0.1 on the wire.
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        if not allow.permits(host, addr):
            carried = ", ".join(map(str, embedded_ipv4(addr)))
            raise _Refused("blocked_address", f"{host} resolves to non-public address {addr}"
                           + (f" (embeds {carried})" if carried else ""))
        addrs.append(addr)
    return str(addrs[0])


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a checked address while SNI and certificate checks use the URL's host name."""

    def __init__(self, addr: str, port: int, server_hostname: str, timeout: float):
        super().__init__(addr, port, timeout=timeout, context=ssl.create_default_context())
        self._server_hostname = server_hostname

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self._server_hostname)


def _opted_out(resp: http.client.HTTPResponse, tokens: tuple[str, ...]) -> bool:
    # "X-Robots-Tag: noai, noimageai" or "X-Robots-Tag: somebot: noai". A bot-scoped directive
    # is honoured for us too: erring towards the publisher's wish.
    for value in resp.headers.get_all("X-Robots-Tag") or []:
        for directive in value.lower().split(","):
            if directive.rsplit(":", 1)[-1].strip() in tokens:
                return True
    return False


def _read_capped(resp: http.client.HTTPResponse, max_bytes: int, deadline: float) -> bytes | None:
    """Body, or None when it exceeds max_bytes. The deadline bounds trickling servers."""
    chunks, size = [], 0
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError("total timeout while reading body")
        chunk = resp.read(_CHUNK)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            return None
        chunks.append(chunk)


def _fetch_once(url: str, policy: FetchPolicy, allow: _AllowList) -> FetchResult:
    deadline = time.monotonic() + policy.total_timeout_s
    for _hop in range(policy.max_redirects + 1):
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as e:
            return FetchResult("bad_url", error=f"{e}: {redact_url(url, policy.secret_params)[:200]}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return FetchResult("bad_url", error=f"not an http(s) URL: {redact_url(url, policy.secret_params)[:200]}")
        try:
            addr = resolve_public(parts.hostname, port, allow)
        except _Refused as e:
            return FetchResult(e.status, error=str(e))
        if parts.scheme == "https":
            conn = _PinnedHTTPSConnection(addr, port, parts.hostname, policy.connect_timeout_s)
        else:
            conn = http.client.HTTPConnection(addr, port, timeout=policy.connect_timeout_s)
        try:
            conn.connect()
            conn.sock.settimeout(policy.read_timeout_s)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", target, headers={
                "Host": parts.netloc.rsplit("@", 1)[-1],
                "User-Agent": policy.user_agent,
                "Accept": "image/*",
                "Accept-Encoding": "identity",
            })
            resp = conn.getresponse()
            code = resp.status
            if policy.respect_opt_out and _opted_out(resp, policy.opt_out_tokens):
                return FetchResult("opted_out", code, "X-Robots-Tag opt-out")
            if code in REDIRECTS:
                location = resp.getheader("Location")
                if not location:
                    return FetchResult("http_error", code, "redirect without Location")
                url = urljoin(url, location)
                continue
            if code >= 500:
                return FetchResult("server_error", code, resp.reason)
            if code != 200:
                return FetchResult("http_error", code, resp.reason)
            ctype = (resp.getheader("Content-Type") or "").split(";", 1)[0].strip().lower()
            if ctype and not ctype.startswith("image/") and ctype not in _GENERIC_TYPES:
                return FetchResult("bad_content_type", code, ctype)
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                return FetchResult("too_large", code, f"Content-Length {length} > {policy.max_bytes}")
            body = _read_capped(resp, policy.max_bytes, deadline)
            if body is None:
                return FetchResult("too_large", code, f"body > {policy.max_bytes} bytes")
            if sniff_image_format(body) is None:
                return FetchResult("not_image", code, f"magic bytes {body[:8].hex()}")
            return FetchResult(OK, code, body=body)
        except (TimeoutError, socket.timeout) as e:
            return FetchResult("timeout", error=str(e) or "timed out")
        except (OSError, http.client.HTTPException) as e:
            return FetchResult("connection_error", error=f"{type(e).__name__}: {e}")
        finally:
            conn.close()
    return FetchResult("too_many_redirects", error=f"more than {policy.max_redirects} redirects")


def fetch_one(url: str, policy: FetchPolicy, attempts_before: int = 0) -> FetchResult:
    """Fetch one URL, retrying RETRYABLE outcomes with exponential backoff.

    The error text is redacted: it may quote the URL, a redirect's or a server's message.
    """
    allow = _AllowList(policy.allow_hosts)
    budget = policy.retries + 1
    if policy.max_attempts_total is not None:
        budget = max(1, min(budget, policy.max_attempts_total - attempts_before))
    for attempt in range(budget):
        result = _fetch_once(url, policy, allow)
        if result.status not in RETRYABLE or attempt == budget - 1:
            break
        time.sleep(policy.backoff_s * (2 ** attempt))
    result.attempts = attempt + 1
    if result.error:
        # Redacted before it is cut: a cut could split a credential from what marks it as one.
        result.error = redact_text(result.error, policy.secret_params)[:500]
    return result


def make_fetch_fn(**policy: object) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """mapInPandas fn: (image_id, url, batch_id, fetch_attempts) -> FETCH_SCHEMA rows.

    `fetch_attempts` in is what earlier runs spent; out is that plus this run's attempts. The thread
    pool bounds concurrency per Spark task, so a cluster's total is tasks x concurrency.
    """
    pol = FetchPolicy(**{k: tuple(v) if isinstance(v, list) else v for k, v in policy.items()})

    def fetch_batches(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        with ThreadPoolExecutor(max_workers=pol.concurrency) as pool:
            for pdf in batches:
                before = pdf["fetch_attempts"].fillna(0).astype("int64").to_numpy()
                results = list(pool.map(lambda u, n: fetch_one(request_url(u), pol, int(n)), pdf["url"], before))
                yield pd.DataFrame({
                    "image_id": pdf["image_id"],
                    "url": [redact_url(u, pol.secret_params) for u in pdf["url"]],
                    "batch_id": pdf["batch_id"],
                    "bytes": [r.body for r in results],
                    "fetch_status": [r.status for r in results],
                    "http_status": pd.array([r.http_status for r in results], dtype="Int32"),
                    "fetch_error": [r.error for r in results],
                    "fetch_attempts": (before + [r.attempts for r in results]).astype("int32"),
                })

    return fetch_batches
