"""Stable, content-derived ids shared by every table."""
from __future__ import annotations

import hashlib
import unicodedata

ID_HEX_CHARS = 32  # 128 bits: collision-free at web scale, short enough to join on cheaply.


def stable_id(kind: str, *parts: str | bytes) -> str:
    """Hash of a namespace plus content parts; the same content always gives the same id."""
    h = hashlib.sha256(kind.encode())
    for part in parts:
        data = part if isinstance(part, bytes) else part.encode("utf-8", "surrogatepass")
        # Length prefix: ("ab", "c") and ("a", "bc") must not collide.
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:ID_HEX_CHARS]


def normalise_text(text: str) -> str:
    """NFKC and collapsed whitespace: the form that text keys are hashed on."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def normalise_url(url: str) -> str:
    """Trim, lower-case the scheme and host, drop the fragment (same resource, same id)."""
    url = url.strip()
    url = url.split("#", 1)[0]
    if "://" in url:
        scheme, rest = url.split("://", 1)
        host, sep, path = rest.partition("/")
        url = f"{scheme.lower()}://{host.lower()}{sep}{path}"
    return url
