"""Fetch throughput: the Spark fetch stage vs img2dataset, on one loopback server with seeded faults.

    flock /tmp/realsyn-pytest.lock .venv/bin/python bench/fetch.py               # 2000 URLs x 3 runs, ~3 min
    .venv/bin/python bench/fetch.py --urls 4000 --threads 16 --processes 2
    .venv/bin/python bench/fetch.py --img2dataset /tmp/i2d/bin/python          # its own venv

One `http.server` ThreadingHTTPServer (HTTP/1.1, keep-alive, TCP_NODELAY as nginx and CDNs set it:
without it, Python's server writes headers and body as two segments and a reused connection waits
out the client's delayed ACK, 40 ms a response) on 127.0.0.1 serves --urls distinct
paths, each with a fault drawn once from a seeded RNG: `ok` (a bundled photo, 10-25 KB webp), `404`,
`500-then-200` (the first request of each URL fails), `slow` (answers after --slow-s), `html` (an
HTML page served as text/html), `oversized` (a 2 MiB image, over the stage's 1 MiB cap) and
`mislabelled` (a photo served as text/plain). Each tool gets a fresh copy of that state.

- img2dataset (installed in its own venv, never the project's: `python3 -m venv /tmp/i2d &&
  /tmp/i2d/bin/pip install img2dataset`) in raw-bytes mode: `resize_mode=no`,
  `disable_all_reencoding`, `output_format=files`, no EXIF, no hash; --processes x --threads,
  shards of urls / processes so that every process has one; retries=1. Timed around its
  `download()` call in a subprocess.
- realsyn: `run_stages(spark, cfg, ["fetch"])` on a scratch warehouse (real Delta tables, Spark
  local[--processes]) whose `doc_images` holds the same URLs; fetch.concurrency=--threads,
  fetch.tasks_per_host=--processes (the server is one host), per_host_concurrency=--threads and no
  rate limit (img2dataset has none), retries=1. The session is warmed by one run on other URLs
  first; the timed run is the stage's whole wall, its writes and its `runs` record included.
- Both tools run --repeat times, alternating, each time on fresh URLs with the same faults; the
  table gives each tool's median and the ratio of the medians (this machine is noisy).

Throughput is URLs done per wall second (every URL reaches a verdict in both tools); kept images
per second is printed beside it (img2dataset keeps HTML pages and oversized images: it does not
check bytes). Prints a table and the per-fault outcomes; writes bench/results/fetch.json
(fetch-N.json for another --urls).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import print_table  # noqa: E402

PIX = ROOT / "tests" / "data" / "recipes" / "static" / "pix"
RESULTS = ROOT / "bench" / "results"
DB = "bench_fetch"
FAULTS = {"ok": 0.70, "404": 0.05, "500-then-200": 0.05, "slow": 0.05, "html": 0.05, "oversized": 0.05,
          "mislabelled": 0.05}
MAX_BYTES = 1 << 20
BIG = b"\x89PNG\r\n\x1a\n" + bytes(2 << 20)  # magic bytes of a PNG, 2 MiB: over MAX_BYTES
HTML = b"<!doctype html><html><body>" + b"<p>not an image</p>" * 200 + b"</body></html>"


# --- the server --------------------------------------------------------------------------------

def plan(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return rng.choices(list(FAULTS), weights=list(FAULTS.values()), k=n)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    faults: list[str] = []
    photos: list[bytes] = []
    slow_s = 0.3
    hits: Counter = Counter()
    lock = threading.Lock()

    def log_message(self, *args) -> None:
        pass

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except ConnectionError:  # a client that stopped reading (the size cap)
            pass

    def do_GET(self) -> None:
        try:
            i = int(self.path.split("/")[-1].split(".")[0])
            fault = self.faults[i]
        except (ValueError, IndexError):
            return self._send(404, b"not found", "text/plain")
        with self.lock:
            self.hits[i] += 1
            n = self.hits[i]
        photo = self.photos[i % len(self.photos)]
        if fault == "404":
            self._send(404, b"not found", "text/plain")
        elif fault == "500-then-200" and n == 1:
            self._send(500, b"try again", "text/plain")
        elif fault == "slow":
            time.sleep(self.slow_s)
            self._send(200, photo, "image/webp")
        elif fault == "html":
            self._send(200, HTML, "text/html")
        elif fault == "oversized":
            self._send(200, BIG, "image/png")
        elif fault == "mislabelled":
            self._send(200, photo, "text/plain")
        else:
            self._send(200, photo, "image/webp")


class Server:
    def __init__(self, faults: list[str], slow_s: float):
        handler = type("H", (_Handler,), {"faults": faults, "slow_s": slow_s, "hits": Counter(),
                                          "photos": [p.read_bytes() for p in sorted(PIX.glob("*.webp"))]})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.request_queue_size = 256
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def urls(self, n: int, tag: str) -> list[str]:
        return [f"{self.base}/{tag}/{i}.webp" for i in range(n)]

    def reset(self) -> None:
        self.httpd.RequestHandlerClass.hits.clear()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --- img2dataset -------------------------------------------------------------------------------

I2D_SCRIPT = """
import json, sys, time
from img2dataset import download
a = json.loads(sys.argv[1])
t0 = time.perf_counter()
download(url_list=a["list"], output_folder=a["out"], input_format="txt", output_format="files",
         resize_mode="no", disable_all_reencoding=True, extract_exif=False, compute_hash=None,
         processes_count=a["processes"], thread_count=a["threads"], number_sample_per_shard=a["per_shard"],
         timeout=10, retries=1, enable_wandb=False, distributor="multiprocessing")
print("I2D-RESULT " + json.dumps({"seconds": time.perf_counter() - t0}))
"""


def run_img2dataset(python: str, urls: list[str], scratch: Path, processes: int, threads: int) -> dict:
    import pyarrow.parquet as pq

    scratch.mkdir(parents=True, exist_ok=True)
    lst, out = scratch / "urls.txt", scratch / "i2d"
    lst.write_text("\n".join(urls) + "\n")
    args = {"list": str(lst), "out": str(out), "processes": processes, "threads": threads,
            "per_shard": -(-len(urls) // processes)}
    proc = subprocess.run([python, "-c", I2D_SCRIPT, json.dumps(args)], capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("I2D-RESULT ")]
    if proc.returncode or not line:
        raise SystemExit(f"img2dataset failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    seconds = json.loads(line[0].split(" ", 1)[1])["seconds"]
    outcomes = {}
    for f in out.glob("*.parquet"):
        for r in pq.read_table(f, columns=["url", "status", "error_message"]).to_pylist():
            err = (r["error_message"] or "").split(":")[0][:40]
            outcomes[r["url"]] = r["status"] + (f" ({err})" if err else "")
    return {"seconds": seconds, "outcomes": outcomes}


# --- the realsyn stage -------------------------------------------------------------------------

class StageBench:
    """One Spark session and scratch warehouse; `run(urls)` times one fetch stage run on new URLs."""

    def __init__(self, server: Server, scratch: Path, processes: int, threads: int, sets: list[str]):
        from etl.config import load_config
        from etl.session import build_spark

        self.cfg = load_config(ROOT / "conf" / "local.yaml", [
            f"spark.master=local[{processes}]", f"spark.warehouse_dir={scratch / 'wh'}", f"catalog.database={DB}",
            "fetch.allow_hosts=[\"127.0.0.1\"]", f"fetch.concurrency={threads}", f"fetch.tasks_per_host={processes}",
            f"fetch.per_host_concurrency={threads}", "fetch.per_host_rate=0", "fetch.retries=1",
            "fetch.backoff_s=0.05", f"fetch.max_bytes={MAX_BYTES}", "fetch.read_timeout_s=10", *sets])
        self.spark = build_spark(self.cfg, progress=False)
        self.spark.sql(f"CREATE DATABASE IF NOT EXISTS {DB}")
        self.run(server.urls(200, "warm"))  # JVM, Python workers, Delta state: not what is measured

    def _add(self, urls: list[str]) -> None:
        from udfs.ids import normalise_url, stable_id

        schema = ("doc_id string, position int, image_id string, url string, path string, alt_text string, "
                  "metadata string, bytes binary, batch_id string")
        rows = [("d", i, stable_id("image-url", normalise_url(u)), u, None, None, None, None, "b0")
                for i, u in enumerate(urls)]
        self.spark.createDataFrame(rows, schema).write.format("delta").mode("append").saveAsTable(f"{DB}.doc_images")

    def run(self, urls: list[str]) -> dict:
        from pyspark.sql import functions as F

        from etl.runner import run_stages

        self._add(urls)
        t0 = time.perf_counter()
        result = run_stages(self.spark, self.cfg, ["fetch"])["fetch"]
        seconds = time.perf_counter() - t0
        run = self.spark.table(f"{DB}.runs").where("stage = 'fetch'").orderBy(F.desc("started_at")).first()
        timed = set(urls)
        outcomes = {r["url"]: r["fetch_status"]
                    for r in self.spark.table(f"{DB}.images").select("url", "fetch_status").collect()
                    if r["url"] in timed}
        return {"seconds": seconds, "stage_wall_s": run["wall_s"], "outcomes": outcomes, "metrics": result.metrics}

    def close(self) -> None:
        self.spark.stop()


# --- main --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--urls", type=int, default=2000)
    p.add_argument("--processes", type=int, default=2, help="img2dataset processes = Spark cores / tasks")
    p.add_argument("--threads", type=int, default=16, help="threads per process / task")
    p.add_argument("--slow-s", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=15)
    p.add_argument("--repeat", type=int, default=3, help="runs of each tool, alternating; medians compared")
    p.add_argument("--img2dataset", default="/tmp/i2d/bin/python", help="a Python with img2dataset installed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for the stage")
    args = p.parse_args(argv)

    faults = plan(args.urls, args.seed)
    server = Server(faults, args.slow_s)
    i2d_runs, stage_runs = [], []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-fetch-") as tmp:
            scratch = Path(tmp)
            stage = StageBench(server, scratch, args.processes, args.threads, args.set)
            try:
                for r in range(args.repeat):
                    server.reset()
                    i2d_runs.append(run_img2dataset(args.img2dataset, server.urls(args.urls, f"i2d{r}"),
                                                    scratch / f"i2d{r}", args.processes, args.threads))
                    server.reset()
                    stage_runs.append(stage.run(server.urls(args.urls, f"stage{r}")))
            finally:
                stage.close()
    finally:
        server.close()

    n = args.urls

    def by_index(outcomes: dict[str, str]) -> list[str]:
        """Outcomes in URL index order (the fault plan's)."""
        short = {int(u.rsplit("/", 1)[-1].split(".")[0]): v for u, v in outcomes.items()}
        return [short.get(i, "missing") for i in range(n)]

    i2d_s = statistics.median(x["seconds"] for x in i2d_runs)
    stage_s = statistics.median(x["seconds"] for x in stage_runs)
    i2d_out, stage_out = by_index(i2d_runs[0]["outcomes"]), by_index(stage_runs[0]["outcomes"])
    i2d_kept = sum(o == "success" for o in i2d_out)
    stage_kept = sum(o == "ok" for o in stage_out)
    ratio = i2d_s / stage_s
    runs = lambda xs: " ".join(f"{x['seconds']:.1f}" for x in xs)  # noqa: E731
    rows = [
        ["img2dataset", f"{args.processes} proc x {args.threads} thr", runs(i2d_runs), f"{i2d_s:.1f}",
         f"{n / i2d_s:.0f}", f"{i2d_kept / i2d_s:.0f}", "1.00"],
        ["realsyn fetch stage", f"local[{args.processes}], {args.threads} thr/task", runs(stage_runs),
         f"{stage_s:.1f}", f"{n / stage_s:.0f}", f"{stage_kept / stage_s:.0f}", f"{ratio:.2f}"],
    ]
    print(f"\n{n} URLs, one loopback server, faults seeded ({args.seed}): "
          + ", ".join(f"{k} {v:.0%}" for k, v in FAULTS.items()))
    print_table(["tool", "concurrency", "runs (wall s)", "median s", "URLs/s", "kept img/s",
                 "vs img2dataset (URLs/s)"], rows)
    stage_wall = statistics.median(x["stage_wall_s"] for x in stage_runs)
    print(f"\nstage / img2dataset throughput: {ratio:.2f}x (target >= 0.7); stage's own wall (runs), median: "
          f"{stage_wall:.1f}s")

    table = {}
    for fault, a, b in zip(faults, i2d_out, stage_out):
        table.setdefault(fault, Counter())[(a, b)] += 1
    print("\nper-fault outcomes (count: img2dataset -> realsyn)")
    out_rows = [[f, str(c), a, b] for f in FAULTS for (a, b), c in sorted(table.get(f, {}).items())]
    print_table(["fault", "URLs", "img2dataset", "realsyn fetch"], out_rows)

    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = {
        "urls": n, "seed": args.seed, "faults": FAULTS, "slow_s": args.slow_s, "processes": args.processes,
        "threads": args.threads, "repeat": args.repeat,
        "img2dataset_runs_s": [round(x["seconds"], 2) for x in i2d_runs],
        "stage_runs_s": [round(x["seconds"], 2) for x in stage_runs],
        "img2dataset_s": round(i2d_s, 2), "stage_s": round(stage_s, 2), "stage_wall_s": round(stage_wall, 2),
        "ratio_urls_per_s": round(ratio, 3), "img2dataset_kept": i2d_kept, "stage_kept": stage_kept,
        "stage_metrics": stage_runs[0]["metrics"],
        "per_fault": {f: [{"img2dataset": a, "realsyn": b, "urls": c} for (a, b), c in sorted(t.items())]
                      for f, t in table.items()},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    out_name = "fetch.json" if n == 2000 else f"fetch-{n}.json"
    (RESULTS / out_name).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {RESULTS / out_name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
