"""udfs/redact.py: credentials out of URLs and texts, every other byte kept."""
from __future__ import annotations

import json
import math
import time

import pytest

from udfs.redact import DEFAULT_SECRET_PARAMS, redact_text, redact_url, request_url

S3 = ("https://bucket.s3.amazonaws.com/photos/a%20b.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256"
      "&X-Amz-Credential=AKIAEXAMPLE%2F20240101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20240101T000000Z"
      "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token=FwoGZX%2Bsts"
      "&X-Amz-Signature=0123abcd")
S3_REDACTED = ("https://bucket.s3.amazonaws.com/photos/a%20b.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256"
               "&X-Amz-Credential=REDACTED&X-Amz-Date=20240101T000000Z"
               "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token=REDACTED"
               "&X-Amz-Signature=REDACTED")

URL_CASES = [
    # (id, url, stored)
    ("user-and-password", "https://alice:hunter2@example.com/a.jpg", "https://example.com/a.jpg"),
    ("user-only", "https://alice@example.com/a.jpg", "https://example.com/a.jpg"),
    ("encoded-at-in-password", "https://alice:p%40ss@example.com/a.jpg?w=1", "https://example.com/a.jpg?w=1"),
    ("raw-at-in-password", "https://alice:p@ss@example.com:8443/a.jpg", "https://example.com:8443/a.jpg"),
    ("ipv6-host", "http://alice:hunter2@[2001:db8::1]:8080/a.jpg", "http://[2001:db8::1]:8080/a.jpg"),
    ("scheme-relative", "//alice:hunter2@example.com/a.jpg", "//example.com/a.jpg"),
    ("s3-presigned", S3, S3_REDACTED),
    ("azure-sas", "https://acct.blob.core.windows.net/c/a.jpg?sv=2022-11-02&ss=b&srt=o&sp=r"
                  "&se=2024-01-01T00:00:00Z&spr=https&sig=AbC%2Bd%2Fe%3D",
     "https://acct.blob.core.windows.net/c/a.jpg?sv=2022-11-02&ss=b&srt=o&sp=r"
     "&se=2024-01-01T00:00:00Z&spr=https&sig=REDACTED"),
    ("gcs-signed", "https://storage.googleapis.com/b/a.jpg?X-Goog-Algorithm=GOOG4-RSA-SHA256"
                   "&X-Goog-Credential=sa%40p.iam.gserviceaccount.com%2F20240101%2Fauto%2Fstorage"
                   "%2Fgoog4_request"
                   "&X-Goog-Date=20240101T000000Z&X-Goog-Expires=900&X-Goog-SignedHeaders=host"
                   "&X-Goog-Signature=9f8e7d",
     "https://storage.googleapis.com/b/a.jpg?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=REDACTED"
     "&X-Goog-Date=20240101T000000Z&X-Goog-Expires=900&X-Goog-SignedHeaders=host&X-Goog-Signature=REDACTED"),
    ("cloudfront",
     "https://d1.cloudfront.net/a.jpg?Expires=1700000000&Signature=Zm9v~YmFy__&Key-Pair-Id=K2JCJMDEHXQW5F",
     "https://d1.cloudfront.net/a.jpg?Expires=1700000000&Signature=REDACTED&Key-Pair-Id=REDACTED"),
    ("cdn-key-case-insensitive", "https://img.cdn.example/a.jpg?w=640&KEY=abc123&fmt=webp",
     "https://img.cdn.example/a.jpg?w=640&KEY=REDACTED&fmt=webp"),
    ("encoded-name", "https://x.example/a.jpg?X%2DAmz%2DSignature=abc",
     "https://x.example/a.jpg?X%2DAmz%2DSignature=REDACTED"),
    ("name-merely-contains-key", "https://x.example/a.jpg?monkey=1&keyword=2&apikeys=3",
     "https://x.example/a.jpg?monkey=1&keyword=2&apikeys=3"),
    ("fragment-kept", "https://u:p@x.example/a.jpg?token=t0k#section-2",
     "https://x.example/a.jpg?token=REDACTED#section-2"),
    ("token-in-fragment", "https://x.example/cb#access_token=t0k&token_type=bearer",
     "https://x.example/cb#access_token=REDACTED&token_type=bearer"),
    ("no-query", "https://x.example/a.jpg", "https://x.example/a.jpg"),
    ("empty-value-kept", "https://x.example/a.jpg?sig=&w=1", "https://x.example/a.jpg?sig=&w=1"),
    ("other-params-not-reencoded", "https://x.example/a b.jpg?q=%7e+x&b=%2F&a=1&token=t#f",
     "https://x.example/a b.jpg?q=%7e+x&b=%2F&a=1&token=REDACTED#f"),
    ("at-in-path-is-not-userinfo", "https://x.example/@user/a.jpg", "https://x.example/@user/a.jpg"),
    ("signed-url-inside-proxy-url",
     "https://site.example/_next/image?url=https%3A%2F%2Fu%3Apw%40b.s3.amazonaws.com%2Fa.jpg"
     "%3FX-Amz-Signature%3Dabc%26w%3D1&w=640",
     "https://site.example/_next/image?url=https%3A%2F%2Fb.s3.amazonaws.com%2Fa.jpg"
     "%3FX-Amz-Signature%3DREDACTED%26w%3D1&w=640"),
    ("malformed-ipv6", "http://[::1", "http://[::1"),
    ("malformed-ipv6-with-userinfo", "http://alice:hunter2@[::1", "http://[::1"),
    ("malformed-port", "http://alice:hunter2@example.com:notaport/a.jpg",
     "http://example.com:notaport/a.jpg"),
    ("not-a-url", "not a url", "not a url"),
    ("empty", "", ""),
]


@pytest.mark.parametrize("url, stored", [c[1:] for c in URL_CASES], ids=[c[0] for c in URL_CASES])
def test_redact_url(url, stored):
    assert redact_url(url) == stored
    assert redact_url(stored) == stored  # idempotent


def test_custom_param_list_and_none():
    mine = redact_url("https://x.example/a.jpg?sig=1&mine=2", ["MINE"])
    assert mine == "https://x.example/a.jpg?sig=1&mine=REDACTED"
    assert redact_url("https://x.example/a.jpg?mine=2", "mine") == "https://x.example/a.jpg?mine=REDACTED"
    assert redact_url(None) is None and redact_text(None) is None
    assert math.isnan(redact_text(float("nan")))  # a pandas missing value comes back, no raise


def test_default_list_has_the_cdn_key_and_azure_sig():
    names = {n.lower() for n in DEFAULT_SECRET_PARAMS}
    assert {"key", "sig", "x-amz-signature", "x-goog-signature", "signature", "token"} <= names


def test_an_object_store_uri_loses_its_keys():
    """An export root as pyarrow opens it (etl/stages/export.py stores it in runs and the card)."""
    uri = "s3://AK:SK@bucket/realsyn?endpoint_override=h:9000&access_key=AK&secret_key=SK&session_token=T"
    shown = redact_url(uri)
    assert "AK" not in shown and "SK" not in shown and "=T" not in shown
    assert shown.startswith("s3://bucket/realsyn?endpoint_override=h:9000")


@pytest.mark.parametrize("stored, requested", [
    (S3_REDACTED, "https://bucket.s3.amazonaws.com/photos/a%20b.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                  "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"),
    ("https://x.example/a.jpg?key=REDACTED", "https://x.example/a.jpg"),
    ("https://x.example/a.jpg?key=REDACTED#f", "https://x.example/a.jpg#f"),
    ("https://x.example/a.jpg?w=1&key=REDACTED&h=2#f", "https://x.example/a.jpg?w=1&h=2#f"),
    ("https://x.example/a.jpg?note=REDACTEDX&w=%7e", "https://x.example/a.jpg?note=REDACTEDX&w=%7e"),
    ("https://x.example/a.jpg?", "https://x.example/a.jpg?"),
    ("https://x.example/a.jpg", "https://x.example/a.jpg"),
    (None, None),
])
def test_request_url(stored, requested):
    assert request_url(stored) == requested


def _secrets_gone(text: str) -> None:
    for secret in ("hunter2", "0123abcd", "FwoGZX", "t0k", "AKIAEXAMPLE", "bob@"):
        assert secret not in text, secret


def test_redact_text_json_record():
    record = {"image_id": "i1", "url": S3.replace("https://", "https://alice:hunter2@"),
              "pages": ["https://x.example/p?id=1&token=t0k&lang=en", "https://bob@y.example/q"],
              "contact": "admin@example.org", "note": "keys: monkey=1"}
    text = json.dumps(record)
    out = redact_text(text)
    _secrets_gone(out)
    back = json.loads(out)  # still a JSON record
    assert back["url"] == S3_REDACTED
    assert back["pages"] == ["https://x.example/p?id=1&token=REDACTED&lang=en", "https://y.example/q"]
    assert back["contact"] == "admin@example.org" and back["note"] == "keys: monkey=1"
    assert redact_text(out) == out


def test_redact_text_json_escaped_urls():
    # Escaped slashes (PHP, Go), an escaped quote in the password, `&` as \u0026 (Go).
    text = r'{"u":"https:\/\/alice:p\"w@cdn.example\/a.jpg?w=1\u0026token=t0k","v":"a@b"}'
    out = redact_text(text)
    assert out == r'{"u":"https:\/\/cdn.example\/a.jpg?w=1\u0026token=REDACTED","v":"a@b"}'
    assert json.loads(out)["u"] == "https://cdn.example/a.jpg?w=1&token=REDACTED"


@pytest.mark.parametrize("text, expected", [
    ("HTTPError 403 for https://alice:hunter2@cdn.example/a.jpg?Signature=0123abcd&Key-Pair-Id=K1 (expired)",
     "HTTPError 403 for https://cdn.example/a.jpg?Signature=REDACTED&Key-Pair-Id=REDACTED (expired)"),
    ("redirect to 'http://alice:hunter2@10.0.0.1/x?token=t0k' refused",
     "redirect to 'http://10.0.0.1/x?token=REDACTED' refused"),
    ("InvalidURL: '/a.jpg?w=1&amp;sig=AbC%2Bd' (found at least ' ')",
     "InvalidURL: '/a.jpg?w=1&amp;sig=REDACTED' (found at least ' ')"),
    ("mail alice@example.org about https://example.org/@alice/a.jpg",
     "mail alice@example.org about https://example.org/@alice/a.jpg"),
    ("no URL here: key=value, monkey=1", "no URL here: key=value, monkey=1"),
    ("", ""),
])
def test_redact_text_messages(text, expected):
    out = redact_text(text)
    assert out == expected
    assert redact_text(out) == out


@pytest.mark.parametrize("text", [
    "http://" + "a" * 200_000,
    "://" * 70_000,
    "?key=" * 40_000,
    "x:" + "\\/" * 100_000,
    "http://" + "a\\\"" * 60_000,
    "%3A%2F%2F" + "%41" * 60_000,
    "http://" + "@" * 200_000 + " ",
    "\\" * 100_000 + '"',  # a backslash run before a quote: the JSON-key pattern tries it once
    '\\"k\\":' * 30_000,
    " //" * 70_000,
    "&" + "a-" * 100_000,
])
def test_pathological_input_is_linear(text):
    t0 = time.perf_counter()
    redact_text(text)
    redact_url(text)
    assert time.perf_counter() - t0 < 2.0  # ~0.05 s each; catastrophic backtracking would be minutes


# --- names in any spelling, fragments, metadata ----------------------------------------------------

@pytest.mark.parametrize("name", ["api_key", "api-key", "apikey", "API_KEY", "Api.Key", "x-api-key", "auth_token",
                                  "access-token", "ACCESS_TOKEN", "private_token", "jwt", "hmac", "code",
                                  "X_AMZ_SIGNATURE", "x-amz-credential", "client-secret", "Pass_Word"])
def test_secret_names_match_in_any_case_and_separator(name):
    assert redact_url(f"https://x.example/a.jpg?w=1&{name}=s3cr3t") == f"https://x.example/a.jpg?w=1&{name}=REDACTED"
    assert redact_url(f"https://x.example/cb#{name}=s3cr3t&state=1") == f"https://x.example/cb#{name}=REDACTED&state=1"
    assert "s3cr3t" not in redact_text(f"see https://x.example/cb#{name}=s3cr3t and more")
    assert "s3cr3t" not in redact_text(json.dumps({name: "s3cr3t"}))


def test_default_list_covers_the_common_names():
    from udfs.redact import name_key

    names = {name_key(n) for n in DEFAULT_SECRET_PARAMS}
    assert {name_key(n) for n in ("api_key", "api-key", "apikey", "token", "access_token", "auth_token",
                                  "private_token", "signature", "X-Amz-Signature", "sig", "password", "secret",
                                  "key", "jwt", "hmac", "code", "client_secret")} <= names


def test_free_text_fragments_scheme_relative_userinfo_and_json_keys():
    text = ('OAuth https://app.example/#access_token=t0k&token_type=bearer, '
            'img "//alice:hunter2@cdn.example/a.jpg" {"password": "hunter2", "note": "keep"}')
    out = redact_text(text)
    _secrets_gone(out)
    assert '"note": "keep"' in out and "token_type=bearer" in out
    # JSON inside JSON (OBELICS metadata column)
    inner = json.dumps(json.dumps([{"src": "https://u:hunter2@x/a.jpg", "api-key": "t0k"}]))
    _secrets_gone(redact_text(inner))
    assert redact_text(inner).count("REDACTED") == 1


def test_redact_value_and_json():
    from udfs.redact import redact_json, redact_value

    assert redact_value("//alice:hunter2@cdn.example/a.jpg") == "//cdn.example/a.jpg"
    assert redact_value("https://x.example/cb#access_token=t0k") == "https://x.example/cb#access_token=REDACTED"
    assert redact_value(7) == 7
    meta = {"src": "https://alice:hunter2@x.example/a.jpg?X-Amz-Signature=0123abcd", "Api-Key": "t0k",
            "https://bob@y.example/": [1, {"token": "t0k", "w": 3}], "alt_text": "a pot", "empty_key": ""}
    out = redact_json(meta)
    _secrets_gone(json.dumps(out))
    assert out["src"] == "https://x.example/a.jpg?X-Amz-Signature=REDACTED" and out["Api-Key"] == "REDACTED"
    assert out["https://y.example/"] == [1, {"token": "REDACTED", "w": 3}] and out["alt_text"] == "a pot"
    assert meta["Api-Key"] == "t0k"  # the input is not changed
    deep = current = []
    for _ in range(10_000):  # no recursion limit
        current.append([])
        current = current[0]
    assert redact_json(deep) is not deep
