"""Credentials out of stored URLs and error texts.

Image URLs arrive with credentials in them: `user:password@` in the authority, signed-URL query
parameters (S3, GCS, CloudFront, Azure SAS) and CDN API keys. None of that may reach a table.
`redact_url` drops the userinfo and replaces the value of every secret parameter with `REDACTED`,
leaving every other byte alone (parameter order and encoding, path, fragment) so that a stored URL
still identifies its image. `redact_text` does the same for URLs inside free text (error messages,
JSON records). `request_url` turns a stored URL back into one that can be requested: the redacted
parameters are dropped, since a signature that is gone cannot be sent; a signed URL whose signature
was redacted is therefore not fetchable again, which is the price of not keeping the secret.

Parameter names match whole and case-insensitively (`monkey=` is not `key=`). One level of
percent-encoding is seen through as well, for signed URLs wrapped in a proxy's `?url=` parameter.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable
from urllib.parse import unquote_plus

REDACTED = "REDACTED"

DEFAULT_SECRET_PARAMS: tuple[str, ...] = (
    # S3 presigned URLs, SigV4 and SigV2 (the access key id names whose key signed it).
    "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "AWSAccessKeyId", "Signature",
    # GCS signed URLs, V4 and V2.
    "X-Goog-Signature", "X-Goog-Credential", "GoogleAccessId",
    # CloudFront signed URLs (Signature above); the policy and key pair id are only good with it.
    "Policy", "Key-Pair-Id",
    # Azure SAS: only the signature is secret; sv, se, sp and the rest are not.
    "sig",
    # API keys: image CDNs and map tiles take `key`, so it stays in despite being a common word.
    "key", "api_key", "apikey",
    # Bearer tokens and passwords.
    "token", "access_token", "id_token", "refresh_token", "auth", "password", "passwd", "pwd",
    "secret", "client_secret",
    # Session ids in URLs are a logged-in session.
    "session", "sessionid", "jsessionid", "phpsessid",
    # Object-store URIs as pyarrow opens them (an export root: s3://bucket/prefix?access_key=...).
    "access_key", "secret_key", "session_token",
)

# The authority of a URL: after `scheme://` (or a scheme-relative `//`) up to the path.
_AUTHORITY = re.compile(r"(?:[A-Za-z][A-Za-z0-9+.-]*:)?//([^/]*)")

# In free text a URL's end is a guess; these never occur raw inside one and end it.
# `//` may be JSON-escaped (`:\/\/`), so backslashes before a slash are part of the separator; a
# backslash before anything else (`\"` in a JSON-escaped password) is an escape inside the
# userinfo. '@' is in the class so that the greedy match ends at the authority's LAST '@'.
_TEXT_USERINFO = re.compile(r"(?<=:)((?:\\*/){2})(?:[^\s/\\?#\"<>\[\]]|\\+[^\s/\\])*@")
# The same URL percent-encoded once, as the value of another URL's parameter.
_ENCODED_USERINFO = re.compile(
    r"(%3A%2F%2F)(?:[^\s/?#&%\"<>\\]|%(?!2F|3F|23)[0-9A-F]{2})*%40", re.IGNORECASE)


def _names(params: Iterable[str]) -> frozenset[str]:
    # A lone name is a str, itself an iterable of one-letter names.
    return frozenset(p.lower() for p in ((params,) if isinstance(params, str) else params))


@lru_cache(maxsize=32)
def _pair_patterns(names: frozenset[str]) -> tuple[re.Pattern, re.Pattern]:
    """`name=value` after `?`, `&`, `;` (`&amp;`) or a JSON `\\u0026`, plain and percent-encoded."""
    alt = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    plain = re.compile(rf"(?:(?<=[?&;])|(?<=\\u0026))({alt})=[^&#\s\"'<>\\]+", re.IGNORECASE)
    encoded = re.compile(rf"(?:(?<=%3F)|(?<=%26))({alt})%3D(?:[^&#%\s\"'<>\\]|%(?!26)[0-9A-F]{{2}})+",
                         re.IGNORECASE)
    return plain, encoded


def _redact_pairs(part: str, names: frozenset[str]) -> str:
    """A query (or fragment: OAuth puts tokens there) with the secret values replaced."""
    pairs = part.split("&")
    for i, pair in enumerate(pairs):
        name, eq, value = pair.partition("=")
        # Names are compared decoded (X%2DAmz%2DSignature is X-Amz-Signature to a server).
        if eq and value and unquote_plus(name).lower() in names:
            pairs[i] = f"{name}={REDACTED}"
    return "&".join(pairs)


def _redact_inline(text: str, names: frozenset[str]) -> str:
    """Userinfo and secret pairs wherever they appear, plain, JSON-escaped or percent-encoded."""
    plain, encoded = _pair_patterns(names)
    text = plain.sub(rf"\1={REDACTED}", _TEXT_USERINFO.sub(r"\1", text))
    return encoded.sub(rf"\1%3D{REDACTED}", _ENCODED_USERINFO.sub(r"\1", text))


def redact_url(url: str | None, params: Iterable[str] = DEFAULT_SECRET_PARAMS) -> str | None:
    """`url` without userinfo and with the value of each secret parameter replaced by REDACTED.

    Everything else is kept byte for byte. Works on the string, not a parse, so it never raises:
    a malformed URL comes back with whatever of it could be recognised redacted. URLs nested in
    the query (a proxy's `?url=`) are redacted too.
    """
    if not isinstance(url, str):
        return url
    names = _names(params)
    rest, hash_, fragment = url.partition("#")
    rest, qmark, query = rest.partition("?")
    m = _AUTHORITY.match(rest)
    if m and "@" in m.group(1):
        rest = rest[:m.start(1)] + rest[m.start(1) + m.group(1).rindex("@") + 1:]
    if qmark:
        query = _redact_pairs(query, names)
    if hash_:
        fragment = _redact_pairs(fragment, names)
    return _redact_inline(rest + qmark + query + hash_ + fragment, names)


def redact_text(text: str | None, params: Iterable[str] = DEFAULT_SECRET_PARAMS) -> str | None:
    """`text` with the userinfo of every URL in it removed and secret query values REDACTED.

    Catches URLs written plainly, JSON-escaped (`https:\\/\\/user:pw@host`) and percent-encoded
    inside another URL. Anything that is not a string (None, NaN) is returned as it is.
    """
    if not isinstance(text, str):
        return text
    return _redact_inline(text, _names(params))


def request_url(stored_url: str | None) -> str | None:
    """The URL to request for a stored (redacted) one: parameters whose value is REDACTED dropped."""
    if not isinstance(stored_url, str):
        return stored_url
    rest, hash_, fragment = stored_url.partition("#")
    base, _, query = rest.partition("?")
    pairs = query.split("&")
    kept = [p for p in pairs if p.partition("=")[2] != REDACTED]
    if len(kept) == len(pairs):
        return stored_url
    return base + (f"?{'&'.join(kept)}" if kept else "") + hash_ + fragment


# An absolute file path (POSIX or Windows) standing on its own: not a URL's path, which follows
# its host. Library errors quote them (a CA bundle, a module, a socket file).
_FILE_PATH = re.compile(r"(?<![\w:/.~-])(?:/[\w.@+~-]+){2,}/?|\b[A-Za-z]:\\[^\s\"'<>]+")


def short_error(text: str | None, params: Iterable[str] = DEFAULT_SECRET_PARAMS, limit: int = 200) -> str | None:
    """An error text fit to store or log: redacted (`redact_text`), file paths replaced by
    `<path>`, whitespace collapsed, then cut to `limit` characters (after redaction: a cut could
    split a credential from what marks it as one)."""
    if not isinstance(text, str):
        return text
    text = " ".join(_FILE_PATH.sub("<path>", redact_text(text, params)).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"
