"""Headless Chromium for tests: find (or install) it, load a local page, take a full-page
screenshot, and collect what the page logged and requested.

The browser is driven through the DevTools protocol over a pipe (`--remote-debugging-pipe`:
JSON messages separated by NUL bytes on file descriptors 3 and 4), so nothing beyond the
standard library and the browser binary is needed: no websocket client, no Playwright or
Puppeteer download.

    python tests/chromium.py PAGE.html SHOT.png    # load a page, save a screenshot, print findings
    python tests/chromium.py --install             # apt-get install -y chromium (root, Debian)
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome",
              "chrome-headless-shell", "headless_shell")
APT_PACKAGE = "chromium"

# Evaluated in the page after load (by the test, not by the page: the report has no script).
_IMAGES_JS = """JSON.stringify(Array.from(document.images).map(i => ({
  src: i.getAttribute('src') ? i.getAttribute('src').slice(0, 32) : null,
  complete: i.complete, width: i.naturalWidth, height: i.naturalHeight})))"""


def find_chromium() -> str | None:
    """Path of a Chromium / Chrome binary: $CHROMIUM, then PATH, else None."""
    env = os.environ.get("CHROMIUM")
    if env and shutil.which(env):
        return shutil.which(env)
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def install_chromium() -> str | None:
    """Debian / Ubuntu as root: `apt-get install -y chromium`; returns the binary or None."""
    if find_chromium():
        return find_chromium()
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", APT_PACKAGE], check=False, env=env)
    return find_chromium()


@dataclass
class PageResult:
    screenshot: bytes
    images: list[dict]                                    # src prefix, complete, naturalWidth/Height
    console: list[dict] = field(default_factory=list)     # console API calls: type, text
    exceptions: list[str] = field(default_factory=list)   # uncaught exceptions
    log: list[dict] = field(default_factory=list)         # browser log entries: level, source, text
    requests: list[str] = field(default_factory=list)     # every URL the page asked for
    failed: list[str] = field(default_factory=list)       # requests that failed
    title: str = ""
    stderr: str = ""

    @property
    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error-level log entries (CSP violations too)."""
        out = [f"console.{c['type']}: {c['text']}" for c in self.console if c["type"] in ("error", "assert")]
        out += [f"exception: {e}" for e in self.exceptions]
        out += [f"log {e['level']} [{e['source']}]: {e['text']}" for e in self.log if e["level"] == "error"]
        return out


class _Pipe:
    def __init__(self, proc: subprocess.Popen, to_chrome: int, from_chrome: int, deadline: float):
        self.proc, self.w, self.r, self.deadline = proc, to_chrome, from_chrome, deadline
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        while True:
            m = self._read()
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str) -> dict:
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events[i]
        while True:
            m = self._read()
            self.events.append(m)
            if m.get("method") == method:
                return m

    def _read(self) -> dict:
        while b"\0" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self.r], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.r, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the pipe (exit code {self.proc.poll()})")
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)


def load_page(page: Path, *, binary: str | None = None, width: int = 1200, height: int = 900,
              timeout: float = 30.0, settle_s: float = 0.3) -> PageResult:
    """Open `page` (a local file) in headless Chromium and return what it showed and logged."""
    binary = binary or find_chromium()
    if not binary:
        raise FileNotFoundError("no Chromium binary on PATH (apt-get install -y chromium)")
    url = Path(page).resolve().as_uri()
    profile = tempfile.mkdtemp(prefix="realsyn-chromium-")
    to_r, to_w = os.pipe()      # we write, Chromium reads on fd 3
    from_r, from_w = os.pipe()  # Chromium writes on fd 4, we read

    def child_fds():
        # Move both ends above 4 first (either may already be 3 or 4), then onto 3 and 4, and
        # clear close-on-exec: os.dup2(fd, fd) would keep Python's non-inheritable flag.
        r, w = fcntl.fcntl(to_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_w, fcntl.F_DUPFD, 10)
        os.dup2(r, 3)
        os.dup2(w, 4)
        os.set_inheritable(3, True)
        os.set_inheritable(4, True)

    args = [binary, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
            "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--disable-background-networking", "--disable-sync",
            "--disable-component-update", "--mute-audio", "--hide-scrollbars",
            "--force-device-scale-factor=1", f"--window-size={width},{height}",
            f"--user-data-dir={profile}", "about:blank"]
    stderr = tempfile.TemporaryFile()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                            close_fds=False, preexec_fn=child_fds)
    os.close(to_r)
    os.close(from_w)
    cdp = _Pipe(proc, to_w, from_r, time.monotonic() + timeout)
    err = ""
    try:
        target = cdp.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            cdp.send(f"{domain}.enable", session=sid)
        cdp.send("Emulation.setDeviceMetricsOverride",
                 {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=sid)
        cdp.events.clear()
        cdp.send("Page.navigate", {"url": url}, session=sid)
        cdp.wait_event("Page.loadEventFired")
        time.sleep(settle_s)  # late console / log events
        cdp.send("Runtime.evaluate", {"expression": "1"}, session=sid)  # drain what arrived
        images = json.loads(cdp.send("Runtime.evaluate", {"expression": _IMAGES_JS, "returnByValue": True},
                                     session=sid)["result"]["value"])
        title = cdp.send("Runtime.evaluate", {"expression": "document.title", "returnByValue": True},
                         session=sid)["result"].get("value", "")
        size = cdp.send("Page.getLayoutMetrics", session=sid)["cssContentSize"]
        shot = cdp.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": max(width, size["width"]), "height": size["height"], "scale": 1},
        }, session=sid)["data"]
        result = PageResult(screenshot=base64.b64decode(shot), images=images, title=title)
        for e in cdp.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled":
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
                result.console.append({"type": p.get("type"), "text": text})
            elif m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                result.exceptions.append(d.get("exception", {}).get("description") or d.get("text", ""))
            elif m == "Log.entryAdded":
                entry = p.get("entry", {})
                result.log.append({"level": entry.get("level"), "source": entry.get("source"),
                                   "text": entry.get("text", "")})
            elif m == "Network.requestWillBeSent":
                result.requests.append(p.get("request", {}).get("url", ""))
            elif m == "Network.loadingFailed":
                result.failed.append(f"{p.get('errorText')} ({p.get('requestId')})")
        try:
            cdp.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        return result
    except (OSError, RuntimeError, TimeoutError) as e:
        proc.kill()
        proc.wait()
        stderr.seek(0)
        err = stderr.read().decode(errors="replace")
        raise RuntimeError(f"Chromium failed: {e}; its stderr ends:\n{err[-2000:]}") from e
    finally:
        os.close(to_w)
        os.close(from_r)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        stderr.seek(0)
        err = err or stderr.read().decode(errors="replace")
        stderr.close()
        shutil.rmtree(profile, ignore_errors=True)
        if "result" in locals():
            result.stderr = err


def _main(argv: list[str]) -> int:
    if argv[:1] == ["--install"]:
        path = install_chromium()
        print(path or "could not install Chromium (needs root and apt-get)")
        return 0 if path else 1
    if len(argv) != 2:
        print(__doc__)
        return 2
    res = load_page(Path(argv[0]))
    Path(argv[1]).write_bytes(res.screenshot)
    print(f"title: {res.title}\nimages: {len(res.images)} "
          f"({sum(1 for i in res.images if i['complete'] and i['width'] > 0)} decoded)")
    print(f"requests: {len(res.requests)} {[u[:40] for u in res.requests]}\nerrors: {res.errors or 'none'}")
    return 1 if res.errors else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
