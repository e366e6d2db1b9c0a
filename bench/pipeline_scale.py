"""Simulated scale run: the whole pipeline on synthetic OBELICS documents at 1x, 10x and 100x the
bundled sample's size (410 documents: small synthetic images, generated text, the same models and
profile), reporting per stage how wall time and peak memory grow.

    python bench/pipeline_scale.py [--scales 1,10,100] [--stages ingest,...] [--conf conf/local.yaml]
                                   [--work DIR [--start-no-stage-after HH:MM]]

Each scale is one `realsyn run` in a fresh warehouse (a subprocess, as a user runs it). Wall time per
stage comes from its own log line (`[stage run] done in Ns`); peak memory is the largest resident
set of the run's whole process tree (driver, JVM, Python workers) while that stage ran. The growth
columns are the exponent b in wall ~ scale^b between each two neighbouring scales (1 = linear).
Writes bench/results/pipeline_scale.json.

100x takes hours on two cores, longer than a working session, so a run can be split: with --work
the corpora, warehouses and every finished stage's figures are kept in DIR (state.json), and the
same command run again goes on with the stages not finished yet, in a new `realsyn run --stages
...` on the same warehouse (the stages are incremental, so a stage killed half-way is redone
whole, nothing twice).
--start-no-stage-after ends the run between two stages once that clock time has passed.
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
from datetime import datetime
from pathlib import Path
from typing import Callable

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import print_table  # noqa: E402
from etl.stages import PIPELINE  # noqa: E402

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


class Stopped(Exception):
    """The run was ended between two stages at the --start-no-stage-after time."""


class State:
    """Finished stages' figures per scale, in DIR/state.json (or in memory without --work)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.commit = git_commit()
        self.by_scale: dict[float, dict[str, dict]] = {}
        if path is not None and path.exists():
            saved = json.loads(path.read_text())
            self.by_scale = {float(k): v for k, v in saved["scales"].items()}

    def remaining(self, scale: float, stages: list[str]) -> list[str]:
        done = self.by_scale.get(scale, {})
        return [s for s in stages if s not in done]

    def record(self, scale: float, stage: str, stats: dict) -> None:
        self.by_scale.setdefault(scale, {})[stage] = {**stats, "commit": self.commit,
                                                      "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"scales": {f"{k:g}": v for k, v in self.by_scale.items()}}, indent=2))
            tmp.replace(self.path)


def run_scale(scale: float, conf: str, stages: list[str], work: Path, state: State,
              deadline: float | None) -> None:
    """The stages of `scale` x the sample that `state` has no figures for, in one `realsyn run`;
    each finished stage's {wall_s, peak_rss_gb, rows_in, rows_out} is saved as soon as it is known."""
    todo = state.remaining(scale, stages)
    if not todo:
        return
    corpus = work / f"synthetic-{scale:g}x.parquet"
    if not corpus.exists():
        # Written under another name first: a corpus cut short by a kill is not taken for whole.
        partial = synthetic_corpus(max(1, round(SAMPLE_DOCS * scale)), corpus.with_suffix(".partial"))
        partial.rename(corpus)
    run_pipeline([corpus], work / f"wh-{scale:g}x", conf, ",".join(todo), f"{scale:g}x",
                 on_stage=lambda stage, stats: state.record(scale, stage, stats), deadline=deadline)


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def run_pipeline(corpora: list[Path], warehouse: Path, conf: str, stages: str | None, label: str,
                 overrides: list[str] = (), on_stage: Callable[[str, dict], None] | None = None,
                 deadline: float | None = None) -> dict[str, dict[str, float]]:
    """{stage: {wall_s, peak_rss_gb}} of one `realsyn run` over `corpora` into `warehouse`.
    `on_stage` hears of each stage as it finishes; past `deadline` (epoch seconds) the run is ended
    after the stage that is finishing, and Stopped is raised."""
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
                done = stats.setdefault(m.group(1), {"peak_rss_gb": 0.0})
                done.update(wall_s=float(m.group(3)), rows_in=int(m.group(4)), rows_out=int(m.group(5)))
                current[0] = None
                if on_stage is not None:
                    on_stage(m.group(1), dict(done))
                if deadline is not None and time.time() > deadline:
                    raise Stopped(f"{label}: stopped after {m.group(1)}, past the time given")
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


def growth(scales: list[float], walls: list[float | None]) -> list[float | None]:
    """b in wall ~ scale^b from each scale to the next; None where either has no figure (a split
    run's largest scale may not have reached every stage yet) or the stage took no time."""
    points = list(zip(scales, walls))
    return [math.log(w1 / w0) / math.log(s1 / s0) if w0 and w1 else None
            for (s0, w0), (s1, w1) in zip(points, points[1:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", default="1,10,100", help="multiples of the sample's 410 documents")
    ap.add_argument("--stages", default=None, help="comma-separated stages (default: all)")
    ap.add_argument("--conf", default=str(ROOT / "conf" / "local.yaml"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "pipeline_scale.json"))
    ap.add_argument("--work", default=None,
                    help="keep corpora, warehouses and finished stages here; run again to go on (default: a temp dir)")
    ap.add_argument("--start-no-stage-after", default=None, metavar="HH:MM",
                    help="with --work: end the run between two stages once this local time has passed")
    args = ap.parse_args()
    scales = sorted(float(s) for s in args.scales.split(","))
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else list(PIPELINE)
    if args.start_no_stage_after and not args.work:
        ap.error("--start-no-stage-after needs --work, or the finished stages are lost")
    deadline = clock_deadline(args.start_no_stage_after) if args.start_no_stage_after else None
    with tempfile.TemporaryDirectory(prefix="pipeline-scale-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        state = State(work / "state.json" if args.work else None)
        for scale in scales:
            started = time.perf_counter()
            try:
                run_scale(scale, args.conf, stages, work, state, deadline)
            except Stopped as stop:
                report(state.by_scale, args, scales, stages)
                print(f"{stop}; run the same command again to go on", file=sys.stderr)
                return
            print(f"{scale:g}x: {time.perf_counter() - started:.0f} s", file=sys.stderr)
            # Written after every scale: the largest one runs for hours, and may not finish.
            report(state.by_scale, args, scales, stages)


def clock_deadline(hhmm: str) -> float:
    """Today's HH:MM (local time) as epoch seconds; tomorrow's if it has passed already."""
    now = datetime.now()
    at = now.replace(hour=int(hhmm.split(":")[0]), minute=int(hhmm.split(":")[1]), second=0, microsecond=0)
    return at.timestamp() + (86400 if at <= now else 0)


def cell(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(by_scale: dict[float, dict[str, dict]], args: argparse.Namespace, scales: list[float],
           stages: list[str]) -> None:
    scales = [s for s in scales if by_scale.get(s)]
    stages = [s for s in stages if any(s in by_scale[scale] for scale in scales)]
    steps = [f"{a:g}x-{b:g}x" for a, b in zip(scales, scales[1:])]
    rows, out = [], []
    for stage in stages:
        # A stage a split run has not reached at some scale has no figure there: "-" and JSON null.
        figures = [by_scale[s].get(stage, {}) for s in scales]
        walls = [f.get("wall_s") for f in figures]
        peaks = [f.get("peak_rss_gb") for f in figures]
        # What the stage was given: a stage whose input stops growing (a per-run cap) stops growing too.
        inputs = [f.get("rows_in") for f in figures]
        bs = growth(scales, walls)
        rows.append([stage, *(cell(w, ".1f") for w in walls), *(cell(n, "d") for n in inputs),
                     *(cell(p, ".2f") for p in peaks), *(cell(b, ".2f") for b in bs)])
        out.append({"stage": stage, "wall_s": dict(zip(map(str, scales), walls)),
                    "rows_in": dict(zip(map(str, scales), inputs)),
                    # A run split over sessions: which commit and when each figure was measured.
                    "commit": {str(s): f.get("commit") for s, f in zip(scales, figures)},
                    "at": {str(s): f.get("at") for s, f in zip(scales, figures)},
                    "peak_rss_gb": dict(zip(map(str, scales), peaks)),
                    "wall_growth_exponent": dict(zip(steps, bs))})
    print_table(["stage", *(f"wall s {s:g}x" for s in scales), *(f"rows in {s:g}x" for s in scales),
                 *(f"peak GB {s:g}x" for s in scales), *(f"b {step}" for step in steps)], rows)
    Path(args.out).write_text(json.dumps({
        "command": "python bench/pipeline_scale.py " + " ".join(sys.argv[1:]), "scales": scales,
        "sample_docs": SAMPLE_DOCS, "cpus": os.cpu_count(), "conf": args.conf, "stages": out,
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
