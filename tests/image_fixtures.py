"""Image test material: real photos bundled in tests/data (see tests/data/README.md), crafted bad
files (made here, not committed), and a real HTTP server on 127.0.0.1 that misbehaves in the ways
the web does. Importing this module reads no file."""
from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from data_paths import TEST_DATA

RECIPE_PIX = TEST_DATA / "recipes" / "static" / "pix"
DATAJUICER = TEST_DATA / "images" / "datajuicer"
PACKAGES = TEST_DATA / "images" / "packages"

# Ten photos no two of which are near-duplicates (Data-Juicer's img_pair_1/2, two renderings of one
# scene at pHash distance 4, are a near-duplicate pair by design and so not bundled here).
DISTINCT_PHOTOS = [
    RECIPE_PIX / "apple-pie.webp", RECIPE_PIX / "aelplermagronen.webp", RECIPE_PIX / "apple-strudel-1.webp",
    DATAJUICER / "cat.jpg", DATAJUICER / "img2.jpg", DATAJUICER / "img3.jpg", DATAJUICER / "img9.jpg",
    PACKAGES / "scikit_learn__china.jpg", PACKAGES / "scikit_image__astronaut.png",
    PACKAGES / "scikit_image__coffee.png",
]


def photo(path: Path = DATAJUICER / "cat.jpg") -> bytes:
    return path.read_bytes()


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def variants(path: Path) -> dict[str, bytes]:
    """Resized and re-encoded copies of one photo: what near-duplicate detection must group."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    return {
        "half_jpeg_q60": encode(img.resize((w // 2, h // 2)), "JPEG", quality=60),
        "png_lossless": encode(img, "PNG"),
        "webp_q40_0.7": encode(img.resize((int(w * 0.7), int(h * 0.7))), "WEBP", quality=40),
        "upscaled_jpeg": encode(img.resize((int(w * 1.25), int(h * 1.25))), "JPEG", quality=85),
    }


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares a huge canvas: a decompression bomb costs no memory to make."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def bad_images() -> dict[str, bytes]:
    """drop_reason -> crafted bytes that must land with exactly that reason."""
    cat = photo()
    frames = [Image.new("RGB", (200, 200), c) for c in ("red", "blue", "green")]
    return {
        "undecodable": b"<html>this is not an image</html>" * 20,
        "truncated": cat[: len(cat) // 2],
        "decompression_bomb": png_header_only(60_000, 60_000),
        "animated": encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100),
        "too_small": encode(Image.open(DATAJUICER / "cat.jpg").convert("RGB").resize((80, 60)), "JPEG"),
        "aspect_ratio": encode(Image.open(DATAJUICER / "cat.jpg").convert("RGB").resize((640, 160)), "PNG"),
        "format_not_allowed": encode(Image.new("RGB", (128, 128), "white"), "ICO"),
    }


# --- a loopback HTTP server ------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    routes: dict = {}
    hits: dict[str, int] = {}
    lock = threading.Lock()

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        with self.lock:
            n = self.hits[self.path] = self.hits.get(self.path, 0) + 1
        route = self.routes.get(self.path)
        if route is None:
            return self._send(404, b"not found", "text/plain")
        route(self, n)

    def _send(self, code: int, body: bytes, ctype: str = "image/jpeg", headers: dict | None = None,
              length: int | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(body)
        except ConnectionError:  # the client gave up first (timeouts, size caps): expected
            pass


def _routes(base: str) -> dict:
    cat, jpeg = photo(), photo(DATAJUICER / "img2.jpg")
    big = encode(Image.effect_noise((1500, 1500), 64).convert("RGB"), "PNG")

    def image(body, ctype="image/jpeg", headers=None):
        return lambda h, n: h._send(200, body, ctype, headers)

    def slow(h, n):
        time.sleep(1.5)
        h._send(200, cat)

    def flaky(h, n):  # 503 twice, then the image
        h._send(503, b"busy", "text/plain") if n <= 2 else h._send(200, cat)

    def redirect(location):
        return lambda h, n: h._send(302, b"", "text/plain", {"Location": location})

    def oversize_chunked(h, n):  # no Content-Length: the cap must hold while reading
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        try:
            h.wfile.write(big)
        except ConnectionError:
            pass

    return {
        "/good.jpg": image(cat),
        "/other.jpg": image(jpeg),
        "/octet": image(jpeg, "application/octet-stream"),
        "/slow.jpg": slow,
        "/flaky.jpg": flaky,
        "/always-500.jpg": lambda h, n: h._send(500, b"boom", "text/plain"),
        "/gone.jpg": lambda h, n: h._send(410, b"gone", "text/plain"),
        "/redirect-good": redirect(f"{base}/good.jpg"),
        "/redirect-relative": redirect("/other.jpg"),
        "/redirect-private": redirect("http://10.1.2.3/secret.jpg"),
        "/redirect-metadata": redirect("http://169.254.169.254/latest/meta-data/"),
        "/redirect-loop": redirect("/redirect-loop"),
        "/big.png": image(big, "image/png"),
        "/big-chunked.png": oversize_chunked,
        "/noai.jpg": image(cat, headers={"X-Robots-Tag": "noai"}),
        "/noimageai.jpg": image(cat, headers={"X-Robots-Tag": "otherbot: noindex, noimageai"}),
        "/page.html": image(b"<html></html>", "text/html"),
        "/fake.jpg": image(b"GIF? no, plain text pretending to be a JPEG"),
        "/tiny.png": image(encode(Image.new("RGB", (20, 20)), "PNG"), "image/png"),
    }


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # Clients that hang up early (timeouts, size caps) are part of the tests.
        pass


class LoopbackServer:
    def __init__(self) -> None:
        self.httpd = _QuietServer(("127.0.0.1", 0), type("H", (_Handler,), {"hits": {}}))
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.httpd.RequestHandlerClass.routes = _routes(self.base)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return self.base + path

    @property
    def hits(self) -> dict[str, int]:
        return self.httpd.RequestHandlerClass.hits

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    s = LoopbackServer()
    yield s
    s.close()
