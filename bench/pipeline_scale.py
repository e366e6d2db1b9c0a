"""Simulated scale run: the whole pipeline on synthetic OBELICS documents at 1x, 10x and 100x the
bundled sample's size (410 documents: small synthetic images, generated text, the same models and
profile), reporting per stage how wall time and peak memory grow.

    python bench/pipeline_scale.py [--scales 1,10,100] [--stages ingest,...] [--conf conf/local.yaml]

Each scale is one `realsyn run` in a fresh warehouse (a subprocess, as a user runs it). Wall time per
stage comes from its own log line (`[stage run] done in Ns`); peak memory is the largest resident
set of the run's whole process tree (driver, JVM, Python workers) while that stage ran. The growth
column is the exponent b in wall ~ scale^b between the smallest and the largest scale (1 = linear).
Writes bench/results/pipeline_scale.json.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import print_table  # noqa: E402

SAMPLE_DOCS = 410
# The sample's shape: ~0.4 images and ~6 text paragraphs per document.
IMAGE_SHARE = 0.4
WORDS = {
    "adj": "golden crisp tender smoky fresh sweet creamy spicy warm rustic bright delicate".split(),
    "noun": "onion potato garlic butter cheese bread pasta sauce pepper tomato lemon herb".split(),
    "verb": "simmer roast whisk fold season bake stir grill toast chop blend glaze".split(),
    "place": "pan pot oven bowl skillet tray".split(),
}
STAGE_LINE = re.compile(r"\[(\w+) [0-9a-f]{12}\] (starting|done in ([0-9.]+)s: in=(\d+) out=(\d+))")


def sentence(rng: random.Random) -> str:
    w = {k: rng.choice(v) for k, v in WORDS.items()}
    return (f"{rng.choice(['First', 'Then', 'Next', 'Now'])} {w['verb']} the {w['adj']} {w['noun']} in the "
            f"{w['place']} for {rng.randint(2, 90)} minutes until the {rng.choice(WORDS['noun'])} is "
            f"{rng.choice(WORDS['adj'])}.")


def image(rng: random.Random) -> bytes:
    """A small photo-like JPEG (shapes on a gradient): passes the quality rules, unique per seed."""
    w, h = rng.randint(160, 320), rng.randint(160, 320)
    img = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = rng.randint(0, w), rng.randint(0, h)
        draw.ellipse((x, y, x + rng.randint(10, 80), y + rng.randint(10, 80)),
                     fill=tuple(rng.randint(0, 255) for _ in range(3)))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85)
    return out.getvalue()


def synthetic_corpus(n_docs: int, path: Path, seed: int = 0, first_id: int = 0) -> Path:
    """n_docs documents numbered from first_id (another batch: other ids, other seed)."""
    rng = random.Random(seed)
    rows = []
    for i in range(first_id, first_id + n_docs):
        texts = [" ".join(sentence(rng) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(3, 8))]
        has_image = rng.random() < IMAGE_SHARE
        images = [f"https://synthetic.invalid/pix/{i}.jpg" if has_image else None] + [None] * len(texts)
        rows.append({
            "images": images, "texts": [None, *texts],
            "image_bytes": [image(rng) if has_image else None] + [None] * len(texts),
            "metadata": json.dumps([{"src": images[0]} if has_image else None] + [None] * len(texts)),
            "general_metadata": json.dumps({"url": f"https://synthetic.invalid/doc/{i}", "title": f"doc {i}"}),
        })
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_scale(scale: float, conf: str, stages: str | None, work: Path) -> dict[str, dict[str, float]]:
    """{stage: {wall_s, peak_rss_gb}} of one `realsyn run` on `scale` x the sample."""
    corpus = synthetic_corpus(max(1, round(SAMPLE_DOCS * scale)), work / f"synthetic-{scale:g}x.parquet")
    return run_pipeline([corpus], work / f"wh-{scale:g}x", conf, stages, f"{scale:g}x")


def run_pipeline(corpora: list[Path], warehouse: Path, conf: str, stages: str | None, label: str,
                 overrides: list[str] = ()) -> dict[str, dict[str, float]]:
    """{stage: {wall_s, peak_rss_gb}} of one `realsyn run` over `corpora` into `warehouse`."""
    sets = [f"spark.warehouse_dir={warehouse}", f"ingest.paths=[{','.join(map(str, corpora))}]", *overrides]
    cmd = ([sys.executable, "-m", "etl.cli", "run", "--conf", conf, *(a for kv in sets for a in ("--set", kv))]
           + (["--stages", stages] if stages else []))
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    ps = psutil.Process(proc.pid)
    current: list[str | None] = [None]
    stats: dict[str, dict[str, float]] = {}
    tail: list[str] = []

    def sample() -> None:
        while proc.poll() is None:
            stage = current[0]
            if stage is not None:
                s = stats.setdefault(stage, {"wall_s": float("nan"), "peak_rss_gb": 0.0})
                s["peak_rss_gb"] = max(s["peak_rss_gb"], tree_rss(ps) / 2**30)
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for line in proc.stderr:
            tail = (tail + [line])[-20:]
            m = STAGE_LINE.search(line)
            if m and m.group(2) == "starting":
                current[0] = m.group(1)
            elif m:
                stats.setdefault(m.group(1), {"peak_rss_gb": 0.0}).update(
                    wall_s=float(m.group(3)), rows_in=int(m.group(4)), rows_out=int(m.group(5)))
                current[0] = None
        proc.wait()
    finally:
        # Interrupted: the run (and its JVM, which exits with it) must not outlive the bench.
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"realsyn run ({label}) failed:\n{''.join(tail)}")
    return stats


def growth(scales: list[float], walls: list[float]) -> float | None:
    lo, hi = walls[0], walls[-1]
    if len(scales) < 2 or not (lo > 0 and hi > 0):
        return None
    return math.log(hi / lo) / math.log(scales[-1] / scales[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", default="1,10,100", help="multiples of the sample's 410 documents")
    ap.add_argument("--stages", default=None, help="comma-separated stages (default: all)")
    ap.add_argument("--conf", default=str(ROOT / "conf" / "local.yaml"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "pipeline_scale.json"))
    args = ap.parse_args()
    scales = sorted(float(s) for s in args.scales.split(","))
    by_scale: dict[float, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="pipeline-scale-") as tmp:
        for scale in scales:
            started = time.perf_counter()
            by_scale[scale] = run_scale(scale, args.conf, args.stages, Path(tmp))
            print(f"{scale:g}x: {time.perf_counter() - started:.0f} s", file=sys.stderr)
            # Written after every scale: the largest one runs for hours, and may not finish.
            report(by_scale, args)


def report(by_scale: dict[float, dict[str, dict[str, float]]], args: argparse.Namespace) -> None:
    scales = sorted(by_scale)
    stages = list(dict.fromkeys(s for scale in scales for s in by_scale[scale]))
    rows, out = [], []
    for stage in stages:
        walls = [by_scale[s].get(stage, {}).get("wall_s", float("nan")) for s in scales]
        peaks = [by_scale[s].get(stage, {}).get("peak_rss_gb", float("nan")) for s in scales]
        # What the stage was given: a stage whose input stops growing (a per-run cap) stops growing too.
        inputs = [by_scale[s].get(stage, {}).get("rows_in", 0) for s in scales]
        b = growth(scales, walls)
        rows.append([stage, *(f"{w:.1f}" for w in walls), *map(str, inputs), *(f"{p:.2f}" for p in peaks),
                     "-" if b is None else f"{b:.2f}"])
        out.append({"stage": stage, "wall_s": dict(zip(map(str, scales), walls)),
                    "rows_in": dict(zip(map(str, scales), inputs)),
                    "peak_rss_gb": dict(zip(map(str, scales), peaks)), "wall_growth_exponent": b})
    print_table(["stage", *(f"wall s {s:g}x" for s in scales), *(f"rows in {s:g}x" for s in scales),
                 *(f"peak GB {s:g}x" for s in scales), "growth b"], rows)
    Path(args.out).write_text(json.dumps({
        "command": "python bench/pipeline_scale.py " + " ".join(sys.argv[1:]), "scales": scales,
        "sample_docs": SAMPLE_DOCS, "cpus": os.cpu_count(), "conf": args.conf, "stages": out,
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
