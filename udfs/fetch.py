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

Politeness: the threads of one batch function share a gate per host (at most
`per_host_concurrency` requests in flight, at most `per_host_rate` started per second) and a pool
of kept-alive connections per (scheme, host, port, pinned address), so a DNS answer that changes
gets a new connection to a newly checked address, never a reused one. The stage sends each host's
URLs to few tasks (etl/stages/fetch.py), which makes the per-task gate a per-host bound.

The magic bytes decide what is an image, as in img2dataset: a JPEG served as `text/plain` is kept,
and the mislabel is noted in its `fetch_error`.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator
from urllib.parse import urljoin, urlsplit

import pandas as pd

from udfs.redact import DEFAULT_SECRET_PARAMS, redact_url, request_url, short_error

FETCH_SCHEMA = (
    "image_id string, url string, batch_id string, bytes binary, fetch_status string, "
    "http_status int, fetch_error string, fetch_attempts int"
)

OK = "ok"
INLINE = "inline"  # came with bytes at ingest; never fetched
# Transient by nature: worth another try now (backoff) and in a later run.
RETRYABLE = frozenset({"server_error", "timeout", "rate_limited"})
# Failures that `--retry-failed` tries again (within the attempt budget): the transient ones and
# those a network or DNS outage on our side also produces. The rest say something about the URL or
# its content that another try cannot change: bad_url, blocked_address, http_error, opted_out,
# bad_content_type, too_large, not_image, too_many_redirects.
RETRY_FAILED = RETRYABLE | {"connection_error", "dns_error"}
# img2dataset's default list: each of these in X-Robots-Tag keeps the image out.
OPT_OUT_TOKENS = ("noai", "noimageai", "noindex", "noimageindex")

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
    opt_out_tokens: tuple[str, ...] = OPT_OUT_TOKENS
    per_host_concurrency: int = 8
    per_host_rate: float = 0.0  # requests started per second and host; 0: no limit
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



Key = tuple[str, str, int, str]  # scheme, host name, port, the checked address connected to


class _HostGate:
    """At most `concurrency` requests in flight to one host, started at most `rate` a second."""

    def __init__(self, concurrency: int, rate: float):
        self._slots = threading.BoundedSemaphore(concurrency)
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._lock = threading.Lock()
        self._next = 0.0

    def __enter__(self) -> "_HostGate":
        self._slots.acquire()
        if self._interval:
            with self._lock:
                now = time.monotonic()
                start = max(now, self._next)
                self._next = start + self._interval
            time.sleep(start - now)
        return self

    def __exit__(self, *exc: object) -> None:
        self._slots.release()


@dataclass
class Session:
    """What the threads of one batch function share: the policy, per-host gates, idle connections.

    A connection is kept only after its response was read to the end on a connection the server
    keeps open, and handed out again only for the same Key: same pinned address, so reuse never
    skips the address check of a fresh DNS answer.
    """
    policy: FetchPolicy
    allow: _AllowList = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _gates: dict[str, _HostGate] = field(default_factory=dict, init=False)
    _idle: dict[Key, list[http.client.HTTPConnection]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.allow = _AllowList(self.policy.allow_hosts)

    def gate(self, host: str) -> _HostGate:
        with self._lock:
            if host not in self._gates:
                self._gates[host] = _HostGate(self.policy.per_host_concurrency, self.policy.per_host_rate)
            return self._gates[host]

    def take(self, key: Key) -> http.client.HTTPConnection | None:
        with self._lock:
            idle = self._idle.get(key)
            return idle.pop() if idle else None

    def connect(self, key: Key) -> http.client.HTTPConnection:
        scheme, host, port, addr = key
        if scheme == "https":
            conn = _PinnedHTTPSConnection(addr, port, host, self.policy.connect_timeout_s)
        else:
            conn = http.client.HTTPConnection(addr, port, timeout=self.policy.connect_timeout_s)
        try:
            conn.connect()
            conn.sock.settimeout(self.policy.read_timeout_s)
        except BaseException:
            conn.close()
            raise
        return conn

    def give_back(self, key: Key, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self.policy.per_host_concurrency:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            for idle in self._idle.values():
                for conn in idle:
                    conn.close()
            self._idle.clear()


def _opted_out(resp: http.client.HTTPResponse, tokens: tuple[str, ...]) -> bool:
    # "X-Robots-Tag: noai, noimageai" or "X-Robots-Tag: somebot: noai". A bot-scoped directive
    # is honoured for us too: erring towards the publisher's wish.
    for value in resp.headers.get_all("X-Robots-Tag") or []:
        for directive in value.lower().split(","):
            if directive.rsplit(":", 1)[-1].strip() in tokens:
                return True
    return False


def _read_capped(resp: http.client.HTTPResponse, max_bytes: int, deadline: float, head: bytes = b"") -> bytes | None:
    """Body (after `head`, already read), or None when it exceeds max_bytes. The deadline bounds
    trickling servers."""
    chunks, size = [head], len(head)
    while size <= max_bytes:
        if time.monotonic() > deadline:
            raise TimeoutError("total timeout while reading body")
        chunk = resp.read(_CHUNK)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        chunks.append(chunk)
    return None


def _drain(resp: http.client.HTTPResponse) -> None:
    """Read a small error or redirect body so that its connection can serve the next request."""
    length = resp.getheader("Content-Length")
    if length and length.isdigit() and int(length) <= _CHUNK:
        resp.read()


def _send(session: Session, key: Key, target: str, headers: dict[str, str]):
    """(connection, response) for GET target: on an idle kept-alive connection for key when there
    is one, else (or when the server closed that one meanwhile) on a new connection."""
    conn = session.take(key)
    if conn is not None:
        try:
            conn.request("GET", target, headers=headers)
            return conn, conn.getresponse()
        except (ConnectionError, http.client.BadStatusLine):
            conn.close()
    conn = session.connect(key)
    try:
        conn.request("GET", target, headers=headers)
        return conn, conn.getresponse()
    except BaseException:
        conn.close()
        raise


def _judge(resp: http.client.HTTPResponse, policy: FetchPolicy, deadline: float) -> tuple[FetchResult, str | None]:
    """(outcome, redirect Location or None) of one response."""
    code = resp.status
    if policy.respect_opt_out and _opted_out(resp, policy.opt_out_tokens):
        return FetchResult("opted_out", code, "X-Robots-Tag opt-out"), None
    if code in REDIRECTS:
        location = resp.getheader("Location")
        _drain(resp)
        return FetchResult("http_error", code, "redirect without Location"), location
    if code != 200:
        _drain(resp)
        status = "rate_limited" if code == 429 else "server_error" if code >= 500 else "http_error"
        return FetchResult(status, code, resp.reason), None
    ctype = (resp.getheader("Content-Type") or "").split(";", 1)[0].strip().lower()
    length = resp.getheader("Content-Length")
    if length and length.isdigit() and int(length) > policy.max_bytes:
        return FetchResult("too_large", code, f"Content-Length {length} > {policy.max_bytes}"), None
    labelled = not ctype or ctype.startswith("image/") or ctype in _GENERIC_TYPES
    # The first chunk decides for a body labelled as something else: an HTML page is not read on.
    head = resp.read(_CHUNK)
    fmt = sniff_image_format(head)
    if fmt is None and not labelled:
        return FetchResult("bad_content_type", code, ctype), None
    body = _read_capped(resp, policy.max_bytes, deadline, head)
    if body is None:
        return FetchResult("too_large", code, f"body > {policy.max_bytes} bytes"), None
    if fmt is None:
        return FetchResult("not_image", code, f"magic bytes {body[:8].hex()}"), None
    return FetchResult(OK, code, None if labelled else f"served as {ctype}, bytes are {fmt}", body), None


def _fetch_hop(session: Session, key: Key, target: str, host_header: str,
               deadline: float) -> tuple[FetchResult, str | None]:
    policy = session.policy
    try:
        conn, resp = _send(session, key, target, {
            "Host": host_header,
            "User-Agent": policy.user_agent,
            "Accept": "image/*",
            "Accept-Encoding": "identity",
        })
    except (TimeoutError, socket.timeout) as e:
        return FetchResult("timeout", error=str(e) or "timed out"), None
    except (OSError, http.client.HTTPException) as e:
        return FetchResult("connection_error", error=f"{type(e).__name__}: {e}"), None
    try:
        return _judge(resp, policy, deadline)
    except (TimeoutError, socket.timeout) as e:
        return FetchResult("timeout", resp.status, str(e) or "timed out"), None
    except (OSError, http.client.HTTPException) as e:
        return FetchResult("connection_error", resp.status, f"{type(e).__name__}: {e}"), None
    finally:
        # Kept only when the whole response was read and the server keeps the connection open.
        if resp.isclosed() and conn.sock is not None:
            session.give_back(key, conn)
        else:
            resp.close()
            conn.close()


def _fetch_once(url: str, session: Session) -> FetchResult:
    policy = session.policy
    deadline = None
    for _hop in range(policy.max_redirects + 1):
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as e:
            return FetchResult("bad_url", error=f"{e}: {redact_url(url, policy.secret_params)[:200]}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return FetchResult("bad_url", error=f"not an http(s) URL: {redact_url(url, policy.secret_params)[:200]}")
        try:
            addr = resolve_public(parts.hostname, port, session.allow)
        except _Refused as e:
            return FetchResult(e.status, error=str(e))
        host = parts.hostname.lower().rstrip(".")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        with session.gate(host):
            # The clock starts once the host lets us in: waiting our turn is not the server's delay.
            deadline = deadline or time.monotonic() + policy.total_timeout_s
            result, location = _fetch_hop(session, (parts.scheme, host, port, addr), target,
                                          parts.netloc.rsplit("@", 1)[-1], deadline)
        if location is None:
            return result
        url = urljoin(url, location)
    return FetchResult("too_many_redirects", error=f"more than {policy.max_redirects} redirects")


def fetch_one(url: str, policy: FetchPolicy, attempts_before: int = 0, session: Session | None = None) -> FetchResult:
    """Fetch one URL, retrying RETRYABLE outcomes with exponential backoff.

    The error text is short and redacted: it may quote the URL, a redirect's or a server's message.
    `session` shares connections and host gates with other calls (a new one when None).
    """
    own = session is None
    session = Session(policy) if own else session
    budget = policy.retries + 1
    if policy.max_attempts_total is not None:
        budget = max(1, min(budget, policy.max_attempts_total - attempts_before))
    try:
        for attempt in range(budget):
            result = _fetch_once(url, session)
            if result.status not in RETRYABLE or attempt == budget - 1:
                break
            time.sleep(policy.backoff_s * (2 ** attempt))
    finally:
        if own:
            session.close()
    result.attempts = attempt + 1
    result.error = short_error(result.error, policy.secret_params)
    return result


def make_fetch_fn(**policy: object) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """mapInPandas fn: (image_id, url, batch_id, fetch_attempts) -> FETCH_SCHEMA rows.

    `fetch_attempts` in is what earlier runs spent; out is that plus this run's attempts. The thread
    pool bounds concurrency per Spark task, so a cluster's total is tasks x concurrency; the host
    gates bound each host within the task.
    """
    pol = FetchPolicy(**{k: tuple(v) if isinstance(v, list) else v for k, v in policy.items()})

    def fetch_batches(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        session = Session(pol)
        with ThreadPoolExecutor(max_workers=pol.concurrency) as pool:
            try:
                for pdf in batches:
                    before = pdf["fetch_attempts"].fillna(0).astype("int64").to_numpy()
                    results = list(pool.map(lambda u, n: fetch_one(request_url(u), pol, int(n), session),
                                            pdf["url"], before))
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
            finally:
                session.close()

    return fetch_batches
