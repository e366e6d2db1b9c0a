"""Credentials out of stored URLs and error texts.

Image URLs arrive with credentials in them: `user:password@` in the authority, signed-URL query
parameters (S3, GCS, CloudFront, Azure SAS) and CDN API keys. None of that may reach a table.
`redact_url` drops the userinfo and replaces the value of every secret parameter with `REDACTED`,
leaving every other byte alone (parameter order and encoding, path, fragment) so that a stored URL
still identifies its image. `redact_text` does the same for URLs inside free text (error messages,
JSON records). `request_url` turns a stored URL back into one that can be requested: the redacted
parameters are dropped, since a signature that is gone cannot be sent; a signed URL whose signature
was redacted is therefore not fetchable again, which is the price of not keeping the secret.

Parameter names match whole, ignoring case and the separators `-`, `_`, `.` (`api_key`, `API-Key`
and `apikey` are one name; `monkey=` is not `key=`), after `?`, `&`, `;` and `#` (OAuth implicit
grants put `access_token` in the fragment). One level of percent-encoding is seen through as well,
for signed URLs wrapped in a proxy's `?url=` parameter. `redact_value` is for a string standing on
its own (a metadata value): a URL is redacted as one, anything else as text; `redact_json` walks a
parsed JSON value, redacting every key and string and replacing the value of a secret-named key.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable
from urllib.parse import unquote_plus

REDACTED = "REDACTED"

DEFAULT_SECRET_PARAMS: tuple[str, ...] = (
    # Names compare without case and without `-`, `_`, `.`: `api_key` also stands for `api-key`,
    # `apikey`, `API.Key`; each is listed once.
    # S3 presigned URLs, SigV4 and SigV2 (the access key id names whose key signed it).
    "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "AWSAccessKeyId", "Signature",
    # GCS signed URLs, V4 and V2.
    "X-Goog-Signature", "X-Goog-Credential", "GoogleAccessId",
    # CloudFront signed URLs (Signature above); the policy and key pair id are only good with it.
    "Policy", "Key-Pair-Id",
    # Azure SAS: only the signature is secret; sv, se, sp and the rest are not.
    "sig",
    # Akamai EdgeAuth tokens (`hdnts=`, `__hdnea__=`).
    "hdnts", "hdnea",
    # API keys: image CDNs and map tiles take `key`, so it stays in despite being a common word.
    "key", "api_key", "x-api-key", "api_secret", "app_key", "app_secret", "private_key",
    "access_key", "secret_key", "auth_key", "client_secret", "consumer_secret",
    # Bearer tokens, JWTs, HMACs, OAuth (`code` is an authorization code: one exchange away from
    # a token), passwords.
    "token", "access_token", "auth_token", "id_token", "refresh_token", "private_token",
    "session_token", "security_token", "bearer", "jwt", "hmac", "code", "oauth_token",
    "oauth_signature", "oauth_verifier", "auth", "authorization", "credential", "credentials",
    "password", "passwd", "pass", "pwd", "passphrase", "secret",
    # Session ids in URLs are a logged-in session.
    "session", "sessionid", "sid", "jsessionid", "phpsessid",
)

# The authority of a URL: after `scheme://` (or a scheme-relative `//`) up to the path.
_AUTHORITY = re.compile(r"(?:[A-Za-z][A-Za-z0-9+.-]*:)?//([^/]*)")

# In free text a URL's end is a guess; these never occur raw inside one and end it.
# `//` may be JSON-escaped (`:\/\/`), so backslashes before a slash are part of the separator; a
# backslash before anything else (`\"` in a JSON-escaped password) is an escape inside the
# userinfo. '@' is in the class so that the greedy match ends at the authority's LAST '@'.
# A scheme-relative URL (`//user:pw@host`) counts where a value starts: at the start of the text
# or after a blank, quote, bracket, `=` or `,`.
_TEXT_USERINFO = re.compile(r"(?:(?<=[:\s\"'(\[<=,])|^)((?:\\*/){2})(?:[^\s/\\?#\"<>\[\]]|\\+[^\s/\\])*@")
# The same URL percent-encoded once, as the value of another URL's parameter.
_ENCODED_USERINFO = re.compile(
    r"(%3A%2F%2F)(?:[^\s/?#&%\"<>\\]|%(?!2F|3F|23)[0-9A-F]{2})*%40", re.IGNORECASE)


_SEPARATORS = re.compile(r"[-_.\s]+")


def name_key(name: str) -> str:
    """The form parameter names are compared in: percent-decoded, lower case, no separators."""
    return _SEPARATORS.sub("", unquote_plus(name).lower())


def _names(params: Iterable[str]) -> frozenset[str]:
    # A lone name is a str, itself an iterable of one-letter names.
    return _name_set((params,) if isinstance(params, str) else tuple(params))


@lru_cache(maxsize=32)
def _name_set(params: tuple[str, ...]) -> frozenset[str]:
    return frozenset(name_key(p) for p in params)


# `name=value` after `?`, `&`, `;` (`&amp;`), `#` or a JSON `\u0026`; which names are secret is
# decided per match (name_key), so a pattern is not rebuilt per parameter list.
_PLAIN_PAIR = re.compile(r"(?:(?<=[?&;#])|(?<=\\u0026))([\w.~+%-]+)=([^&#\s\"'<>\\]+)")
# The same once percent-encoded, inside another URL's parameter value (%3F ?, %26 &, %23 #).
_ENCODED_PAIR = re.compile(
    r"(?:(?<=%3F)|(?<=%26)|(?<=%23))((?:[\w.~+-]|%(?!26|3D|3F|23)[0-9A-F]{2})+)%3D"
    r"(?:[^&#%\s\"'<>\\]|%(?!26)[0-9A-F]{2})+", re.IGNORECASE)


def _redact_pairs(part: str, names: frozenset[str]) -> str:
    """A query (or fragment: OAuth puts tokens there) with the secret values replaced."""
    pairs = part.split("&")
    for i, pair in enumerate(pairs):
        name, eq, value = pair.partition("=")
        # Names are compared decoded (X%2DAmz%2DSignature is X-Amz-Signature to a server).
        if eq and value and name_key(name) in names:
            pairs[i] = f"{name}={REDACTED}"
    return "&".join(pairs)


# `"name": "value"` in JSON text, also once escaped inside another JSON string (`\\"name\\":\\"v\\"`,
# as OBELICS keeps its metadata): a secret-named key's string value up to its first quote or
# backslash is replaced. A backslash run is tried from its start only (linear time).
_JSON_PAIR = re.compile(r'(?<!\\)(\\{0,7})"([\w.~+%-]+)\1"(\s*:\s*\1")([^"\\]+)')


def _redact_inline(text: str, names: frozenset[str]) -> str:
    """Userinfo and secret pairs wherever they appear, plain, JSON-escaped or percent-encoded."""
    if '"' in text:
        text = _JSON_PAIR.sub(lambda m: f'{m.group(1)}"{m.group(2)}{m.group(1)}"{m.group(3)}{REDACTED}'
                              if name_key(m.group(2)) in names else m.group(0), text)
    text = _PLAIN_PAIR.sub(lambda m: f"{m.group(1)}={REDACTED}" if name_key(m.group(1)) in names
                           else m.group(0), _TEXT_USERINFO.sub(r"\1", text))
    return _ENCODED_PAIR.sub(lambda m: f"{m.group(1)}%3D{REDACTED}" if name_key(unquote_plus(m.group(1))) in names
                             else m.group(0), _ENCODED_USERINFO.sub(r"\1", text))


def redact_url(url: str | None, params: Iterable[str] = DEFAULT_SECRET_PARAMS) -> str | None:
    """`url` without userinfo and with the value of each secret parameter replaced by REDACTED.

    Everything else is kept byte for byte. Works on the string, not a parse, so it never raises:
    a malformed URL comes back with whatever of it could be recognised redacted. URLs nested in
    the query (a proxy's `?url=`) are redacted too.
    """
    if not isinstance(url, str):
        return url
    return _redact_url(url, _names(params))


def _redact_url(url: str, names: frozenset[str]) -> str:
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
    inside another URL, and the string value of a secret-named key in JSON text. Anything that is
    not a string (None, NaN) is returned as it is.
    """
    if not isinstance(text, str):
        return text
    return _redact_inline(text, _names(params))


# A string that is a URL by itself (leading blanks allowed): `scheme://...` or `//host/...`.
_URL_START = re.compile(r"\s*(?:[A-Za-z][A-Za-z0-9+.-]*:)?//")


def redact_value(value: object, params: Iterable[str] = DEFAULT_SECRET_PARAMS) -> object:
    """A string standing on its own (a metadata value): redacted as a URL when it is one
    (`redact_url`: its fragment and scheme-relative userinfo too), else as text."""
    if not isinstance(value, str):
        return value
    names = _names(params)
    return _redact_url(value, names) if _URL_START.match(value) else _redact_inline(value, names)


def redact_json(value: object, params: Iterable[str] = DEFAULT_SECRET_PARAMS) -> object:
    """A parsed JSON value with every key redacted as text, every string value by `redact_value`,
    and the string value of every secret-named key (`{"api_key": "..."}`) replaced by REDACTED.
    A new value is built; the input is not changed. Iterative: any nesting depth."""
    names = _names(params)

    def leaf(v: object, secret: bool) -> object:
        if not isinstance(v, str):
            return v
        if secret and v:
            return REDACTED
        return _redact_url(v, names) if _URL_START.match(v) else _redact_inline(v, names)

    root: list = [None]
    todo: list[tuple[object, object, object, bool]] = [(value, root, 0, False)]
    while todo:
        v, parent, slot, secret = todo.pop()
        if isinstance(v, dict):
            out: dict = {}
            for k, x in v.items():
                key = _redact_inline(k, names) if isinstance(k, str) else k
                out[key] = None
                todo.append((x, out, key, isinstance(k, str) and name_key(k) in names))
            parent[slot] = out
        elif isinstance(v, (list, tuple)):
            items = [None] * len(v)
            todo.extend((x, items, i, secret) for i, x in enumerate(v))
            parent[slot] = items
        else:
            parent[slot] = leaf(v, secret)
    return root[0]


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
