"""Property-based fuzzing of udfs/redact.py (hypothesis): URLs built from random parts with a
credential planted where one hides (userinfo, a secret parameter in any case and separator, the
fragment, a JSON key, percent-encoded in a proxy's `?url=`), alone, inside random text and inside
JSON. Properties: the credential is gone from `redact_url`, `redact_text`, `redact_value` and
`redact_json`; a URL without one comes back byte for byte; nothing raises on any text (lone
surrogates and controls included). Budget: tests/conftest.py's profile (REALSYN_FUZZ_EXAMPLES)."""
from __future__ import annotations

import json
from urllib.parse import quote


from hypothesis import given
from hypothesis import strategies as st

from udfs.redact import (DEFAULT_SECRET_PARAMS, name_key, redact_json, redact_text, redact_url,  # noqa: E402
                         redact_value)

SECRET_KEYS = {name_key(n) for n in DEFAULT_SECRET_PARAMS}
# Parameter names that are not secret: random, and never one of the list in another spelling.
plain_name = st.from_regex(r"[a-z][a-z0-9_-]{0,7}", fullmatch=True).filter(lambda n: name_key(n) not in SECRET_KEYS)
plain_value = st.from_regex(r"[A-Za-z0-9%._~+-]{0,10}", fullmatch=True)
path = st.from_regex(r"(/[A-Za-z0-9%._~@-]{0,8}){0,3}", fullmatch=True)
host = st.sampled_from(["cdn.example", "CDN.Example:8443", "127.0.0.1", "[2001:db8::1]", "b.s3.amazonaws.com"])
secret = st.from_regex(r"[A-Za-z0-9]{6,12}", fullmatch=True).map(lambda s: f"Kx{s}7W")


@st.composite
def secret_name(draw) -> str:
    """A listed secret name in a random spelling: case flipped per letter, separators changed."""
    name = draw(st.sampled_from(DEFAULT_SECRET_PARAMS))
    sep = draw(st.sampled_from(["-", "_", ".", ""]))
    name = name.replace("-", sep).replace("_", sep)
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return "".join(c.swapcase() if f else c for c, f in zip(name, flips))


@st.composite
def plain_url(draw) -> str:
    pairs = draw(st.lists(st.tuples(plain_name, plain_value), max_size=4))
    query = "&".join(f"{n}={v}" for n, v in pairs)
    frag = draw(st.sampled_from(["", "#top", "#a=1&b=2"]))
    return f"https://{draw(host)}{draw(path)}" + (f"?{query}" if query else "") + frag


@st.composite
def url_with_secret(draw) -> tuple[str, str]:
    value = draw(secret)
    base = draw(plain_url())
    where = draw(st.sampled_from(["userinfo", "query", "fragment", "relative", "proxied"]))
    if where == "userinfo":
        user = draw(st.sampled_from(["", "u", "Alice.B"]))
        return base.replace("://", f"://{user}:{value}@", 1), value
    if where == "relative":
        return f"//u:{value}@" + base.split("://", 1)[1], value
    pair = f"{draw(secret_name())}={value}"
    if where == "query":
        rest, hash_, frag = base.partition("#")
        glue = "&" if "?" in rest else "?"
        return f"{rest}{glue}{pair}{hash_}{frag}", value
    if where == "fragment":
        return f"{base.partition('#')[0]}#{pair}&state=x", value
    return "https://proxy.example/_next/image?url=" + quote(f"https://u:{value}@{draw(host)}/a.jpg?{pair}", safe="") \
        + "&w=640", value


any_text = st.text(st.one_of(st.characters(exclude_categories=()), st.sampled_from("\x00\ud800\\\"'@:/?#&=% \n")),
                   max_size=40)
filler = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)


@given(url_with_secret(), filler, filler)
def test_a_planted_credential_never_survives(case, before, after):
    url, value = case
    assert value in url
    assert value not in redact_url(url)
    assert value not in redact_value(url)
    assert value not in redact_text(f"{before} {url} {after}")
    assert value not in redact_text(json.dumps({"u": url, "note": before}))
    assert value not in redact_text(json.dumps(json.dumps([{"src": url}])))  # JSON inside JSON (OBELICS)
    assert value not in json.dumps(redact_json({"page": {"src": url, "list": [url, before]}}))


@given(secret_name(), secret, any_text)
def test_a_secret_named_json_key_loses_its_value(name, value, other):
    assert value not in json.dumps(redact_json({name: value, "other": other}))
    assert value not in redact_text(json.dumps({name: value, "other": other}))
    assert value not in redact_text(json.dumps(json.dumps({name: value})))


@given(plain_url())
def test_a_url_without_credentials_comes_back_byte_for_byte(url):
    assert redact_url(url) == url and redact_text(url) == url and redact_value(url) == url


@given(any_text)
def test_nothing_raises_on_any_text(text):
    for out in (redact_url(text), redact_text(text), redact_value(text), redact_json({text: [text, {"key": text}]})):
        assert out is not None
