"""Export throughput: the Spark export stage vs a plain single-process webdataset.TarWriter loop.

    .venv/bin/python bench/export.py                    # 2000 samples, ~4 min on 2 cores
    .venv/bin/python bench/export.py --samples 8000     # more rows (or --scale 4)
    .venv/bin/python bench/export.py --samples-per-shard 250 --cores 1 2

Rows: --samples pairs (image ids fresh, `stable_id`), images from the bundled sample
(sample/recipes.obelics.parquet `image_bytes`, or the photos in tests/data/recipes/static/pix)
cycled, texts from its sentences. A scratch warehouse (a temporary folder) gets the two tables the
stage reads, `pairs` (PAIRS_SCHEMA: raw_image_url, text1..3, syn_text and some lineage filled) and
`image_bytes`; `export.subset=null`, so every pair is exported, in --samples-per-shard shards.
Paths, each writing the same rows in the same shards:
- `plain`: one process, no Spark: per shard a `webdataset.TarWriter` (jpg via
  udfs.export.prepare_jpeg, the stage's own per-image work, + txt + json) and a zstd parquet of
  the release columns, from rows already in memory;
- `spark`: per core count a fresh process (`--worker`, spark.master=local[K]) runs the export
  stage through `run_stages`: once cold (discarded: JVM, Python workers, Delta state), once warm
  into a fresh folder (the timed row), once more into that folder (the idempotent re-export:
  every file compared, none rewritten); the last core count also exports 2x the rows (the second
  point of the cost-vs-data line).
Times are wall seconds of `run_stages(spark, cfg, ["export"])` (the `runs` record included;
the stage's own wall, from `runs`, is reported beside it). Prints a table and writes
bench/results/export.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import optional_path, print_table  # noqa: E402
from udfs.export import RELEASE_COLUMNS, prepare_jpeg, sample_key  # noqa: E402
from udfs.ids import stable_id  # noqa: E402

SAMPLE = ROOT / "sample" / "recipes.obelics.parquet"
PIX = ROOT / "tests" / "data" / "recipes" / "static" / "pix"  # bundled real photos
PHOTO_SUFFIXES = {".webp", ".jpg", ".jpeg", ".png"}
RESULTS = ROOT / "bench" / "results"
DB = "bench_export"
MARK = "BENCH-EXPORT-RESULT "


# --- rows --------------------------------------------------------------------------------------

def source(sample: Path | None, photos: Path) -> tuple[list[bytes], list[str]]:
    """Distinct image blobs and sentences of the bundled sample (or a folder of photos)."""
    if sample is not None and sample.exists():
        table = pq.read_table(sample, columns=["texts", "image_bytes"]).to_pydict()
        blobs = list(dict.fromkeys(b for row in table["image_bytes"] for b in row if b))
        found = [s.strip() + "." for row in table["texts"] for t in row if t for s in t.split(". ")
                 if 6 <= len(s.split()) <= 30]
        return blobs, list(dict.fromkeys(found))
    files = sorted(f for f in photos.iterdir() if f.suffix.lower() in PHOTO_SUFFIXES) if photos.is_dir() else []
    if not files:
        sys.exit(f"no sample parquet ({sample}) and no photos in {photos}")
    return ([f.read_bytes() for f in files],
            [f"A photo of {f.stem.replace('-', ' ').replace('_', ' ')}." for f in files])


def frames(lo: int, hi: int, blobs: list[bytes], texts: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows lo..hi-1 of `pairs` (PAIRS_SCHEMA order) and of `image_bytes`."""
    from etl.stages.pairs import COLUMNS

    ids = [stable_id("bench-export", str(i)) for i in range(lo, hi)]
    data = [blobs[i % len(blobs)] for i in range(lo, hi)]
    n_t = len(texts)
    pairs = pd.DataFrame({c: [None] * (hi - lo) for c in COLUMNS})
    pairs["image_id"] = ids
    pairs["raw_image_url"] = [f"https://recipes.example.org/img/{i}.webp" for i in range(lo, hi)]
    for k, col in enumerate(("text1", "text2", "text3", "syn_text")):
        pairs[col] = [texts[(i * 7 + k * 13) % n_t] for i in range(lo, hi)]
    pairs["doc_id"] = [stable_id("bench-doc", str(i // 4)) for i in range(lo, hi)]
    pairs["doc_url"] = [f"https://recipes.example.org/r/{i // 4}" for i in range(lo, hi)]
    pairs["sentence_ids"] = [[stable_id("bench-s", str(i * 3 + j)) for j in range(3)] for i in range(lo, hi)]
    pairs["sentence_scores"] = [[0.31, 0.29, 0.27]] * (hi - lo)
    pairs["centroid_version"] = 1
    pairs["embedding_model"] = "ViT-B-32"
    pairs["sha256"] = [hashlib.sha256(b).hexdigest() for b in data]
    pairs["batch_id"] = "bench"
    images = pd.DataFrame({"image_id": ids, "bytes": data, "n_bytes": [len(b) for b in data],
                           "sha256": pairs["sha256"], "batch_id": "bench"})
    return pairs, images


def _nulls(v):
    return None if v is None or (isinstance(v, float) and v != v) else v


# --- plain: one process, webdataset.TarWriter + pyarrow ---------------------------------------

def plain(pairs: pd.DataFrame, images: pd.DataFrame, out: Path, per_shard: int, resize_to: int | None) -> float:
    """Seconds to write `pairs` as WebDataset tars + release parquet, one process, rows in memory."""
    import webdataset as wds

    started = time.perf_counter()
    blobs = dict(zip(images["image_id"], images["bytes"]))
    rows = pairs.sort_values("image_id", kind="stable").to_dict("records")
    lineage = [c for c in pairs.columns if c not in ("image_id", *RELEASE_COLUMNS, "batch_id", "width", "height")]
    (out / "webdataset").mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(parents=True, exist_ok=True)
    for shard, lo in enumerate(range(0, len(rows), per_shard)):
        part = rows[lo:lo + per_shard]
        with wds.TarWriter(str(out / "webdataset" / f"{shard:05d}.tar")) as sink:
            for index, r in enumerate(part):
                key = sample_key(shard, index)
                jpeg, w, h = prepare_jpeg(blobs[r["image_id"]], resize_to)
                meta = {"key": key, "image_id": r["image_id"], **{c: _nulls(r[c]) for c in RELEASE_COLUMNS},
                        "status": "success", "width": w, "height": h,
                        **{c: _nulls(r[c]) if not hasattr(r[c], "tolist") else r[c].tolist() for c in lineage}}
                sink.write({"__key__": key, "jpg": jpeg, "txt": r["text1"] or "", "json": meta})
        release = pa.table({c: pa.array([_nulls(r[c]) for r in part], type=pa.string()) for c in RELEASE_COLUMNS})
        pq.write_table(release, out / "data" / f"part-{shard:05d}.parquet", compression="zstd")
    return time.perf_counter() - started


# --- spark: the export stage in a fresh process per core count --------------------------------

def worker(args) -> None:
    """--worker: build the session for local[K], fill the scratch warehouse if empty, time runs."""
    from pyspark.sql import functions as F

    from etl.config import load_config
    from etl.runner import run_stages
    from etl.session import build_spark
    from etl.stages.fetch import IMAGE_BYTES_SCHEMA
    from etl.stages.pairs import PAIRS_SCHEMA

    scratch, cores = Path(args.scratch), args.cores[0]
    cfg = load_config(args.config, [f"spark.master=local[{cores}]", f"spark.warehouse_dir={scratch / 'wh'}",
                                    f"catalog.database={DB}", "export.subset=null",
                                    f"export.samples_per_shard={args.samples_per_shard}", *args.set])
    t0 = time.perf_counter()
    spark = build_spark(cfg)
    session_s = time.perf_counter() - t0
    blobs, texts = source(args.sample, args.photos)

    def append(lo: int, hi: int) -> None:
        pairs, images = frames(lo, hi, blobs, texts)
        spark.createDataFrame(pairs, PAIRS_SCHEMA).write.format("delta").mode("append").saveAsTable(f"{DB}.pairs")
        spark.createDataFrame(images, IMAGE_BYTES_SCHEMA).write.format("delta").mode("append") \
            .saveAsTable(f"{DB}.image_bytes")

    if not spark.catalog.tableExists(f"{DB}.pairs"):
        append(0, args.samples)
    tracker = spark.sparkContext.statusTracker()

    def run(out: Path) -> dict:
        cfg.export.out_dir = str(out)
        started = time.perf_counter()
        result = run_stages(spark, cfg, ["export"])["export"]
        seconds = time.perf_counter() - started
        last = spark.table(f"{DB}.runs").where("stage = 'export'").orderBy(F.desc("started_at")).first()
        stages = [tracker.getStageInfo(s) for j in tracker.getJobIdsForGroup(last["run_id"])
                  for s in (tracker.getJobInfo(j).stageIds if tracker.getJobInfo(j) else [])]
        tasks = max((s.numTasks for s in stages if s is not None and "toPandas" in s.name), default=None)
        m = result.metrics
        return {"seconds": round(seconds, 2), "stage_wall_s": round(last["wall_s"], 2),
                "samples": int(m["samples"]), "shards": int(m["shards"]),
                "files_written": int(m["files_written"]), "files_unchanged": int(m["files_unchanged"]),
                "write_tasks": tasks, "spark_jobs": len(tracker.getJobIdsForGroup(last["run_id"]))}

    out = {"cores": cores, "session_s": round(session_s, 2)}
    out["cold"] = run(scratch / f"spark-{cores}-cold")
    out["warm"] = run(scratch / f"spark-{cores}-warm")
    out["rerun"] = run(scratch / f"spark-{cores}-warm")
    if args.double:
        append(args.samples, 2 * args.samples)
        out["double"] = run(scratch / f"spark-{cores}-double")
    spark.stop()
    print(MARK + json.dumps(out), flush=True)


def spark_path(args, cores: int, scratch: Path, double: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--cores", str(cores), "--scratch", str(scratch),
           "--samples", str(args.samples), "--samples-per-shard", str(args.samples_per_shard),
           "--config", str(args.config), "--sample", str(args.sample), "--photos", str(args.photos),
           *(["--double"] if double else []), *(x for s in args.set for x in ("--set", s))]
    print(f"spark local[{cores}] ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout)
        sys.exit(f"worker local[{cores}] failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(MARK):])


def same_jpegs(a: Path, b: Path) -> bool:
    """Shard 0's .jpg members equal, key for key, in two exports: the paths did the same work."""
    def jpgs(path: Path) -> dict[str, bytes]:
        with tarfile.open(path) as tar:
            return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")}
    return jpgs(a / "webdataset" / "00000.tar") == jpgs(b / "webdataset" / "00000.tar")


# --- report ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=2000, help="pairs exported (before --scale)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply --samples")
    p.add_argument("--samples-per-shard", type=int, default=500, help="export.samples_per_shard")
    p.add_argument("--cores", type=int, nargs="+", default=[1, 2], help="spark.master=local[K] for each K")
    p.add_argument("--sample", type=optional_path, default=SAMPLE,
                   help="OBELICS parquet with image_bytes (default: the bundled sample); 'none': --photos")
    p.add_argument("--photos", type=Path, default=PIX, help="folder of photos when --sample is missing")
    p.add_argument("--config", default=str(ROOT / "conf" / "local.yaml"), help="profile")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (exports, warehouse)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    p.add_argument("--double", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    args.samples = max(1, int(args.samples * args.scale))
    n, per_shard = args.samples, args.samples_per_shard

    from etl.config import load_config
    resize_to = load_config(args.config, args.set).export.resize_to
    scratch = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        blobs, texts = source(args.sample, args.photos)
        pairs, images = frames(0, 2 * n, blobs, texts)
        print(f"{n} samples, {per_shard} per shard, images from {len(blobs)} distinct sample photos "
              f"(mean {sum(map(len, blobs)) / len(blobs) / 1024:.0f} KiB), resize_to {resize_to}; "
              f"{os.cpu_count()} cores", file=sys.stderr, flush=True)
        plain(pairs.iloc[:50], images.iloc[:50], scratch / "plain-warmup", per_shard, resize_to)  # imports, caches
        plain_s = plain(pairs.iloc[:n], images.iloc[:n], scratch / "plain", per_shard, resize_to)
        plain2_s = plain(pairs, images, scratch / "plain-double", per_shard, resize_to)
        del pairs, images
        spark = {k: spark_path(args, k, scratch, double=(k == args.cores[-1])) for k in args.cores}
        same = same_jpegs(scratch / "plain", scratch / f"spark-{args.cores[0]}-warm")
        load = os.getloadavg()[0]
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            print(f"kept {scratch}", file=sys.stderr)

    plain_rate = n / plain_s
    rows, table = [], []

    def add(path: str, cores: int, samples: int, seconds: float, note: str = "", **extra) -> None:
        rate = samples / seconds
        rows.append({"path": path, "cores": cores, "samples": samples, "seconds": round(seconds, 2),
                     "samples_per_s": round(rate, 1), "ratio_to_plain": round(rate / plain_rate, 3),
                     "note": note, **extra})
        table.append([path, cores, samples, f"{seconds:.2f}", f"{rate:.1f}", f"{rate / plain_rate:.2f}x", note])

    add("plain TarWriter + parquet", 1, n, plain_s, "one process, rows in memory")
    for k, r in spark.items():
        w = r["warm"]
        add("spark export (warm)", k, n, w["seconds"],
            f"stage {w['stage_wall_s']}s; {w['shards']} shards in {w['write_tasks']} write tasks",
            stage_wall_s=w["stage_wall_s"], write_tasks=w["write_tasks"], spark_jobs=w["spark_jobs"])
    for k, r in spark.items():
        c = r["cold"]
        add("spark export (cold)", k, n, c["seconds"], f"first run in a new session ({r['session_s']}s to start it)",
            stage_wall_s=c["stage_wall_s"])
    for k, r in spark.items():
        x = r["rerun"]
        add("spark re-export (same dir)", k, n, x["seconds"],
            f"{x['files_written']} files written, {x['files_unchanged']} unchanged", stage_wall_s=x["stage_wall_s"],
            files_written=x["files_written"], files_unchanged=x["files_unchanged"])
    add("plain TarWriter + parquet", 1, 2 * n, plain2_s, "2x the rows")
    last = args.cores[-1]
    d = spark[last]["double"]
    add("spark export (warm)", last, 2 * n, d["seconds"],
        f"2x the rows; {d['shards']} shards in {d['write_tasks']} write tasks", stage_wall_s=d["stage_wall_s"],
        write_tasks=d["write_tasks"])

    print(f"\nexport bench: {n} samples, {per_shard} per shard, {os.cpu_count()} cores "
          f"(load average {load:.1f} at the end)")
    print_table(["path", "cores", "samples", "s", "samples/s", "vs plain", "note"], table)
    summary = {}
    if 1 in spark and len(spark) > 1:
        top = max(spark)
        summary["speedup_1_to_%d_cores" % top] = round(spark[1]["warm"]["seconds"] / spark[top]["warm"]["seconds"], 2)
        summary["stage_speedup_1_to_%d_cores" % top] = round(spark[1]["warm"]["stage_wall_s"]
                                                             / spark[top]["warm"]["stage_wall_s"], 2)
        print(f"\n1 -> {top} cores: {summary['speedup_1_to_%d_cores' % top]:.2f}x (warm run_stages wall), "
              f"{summary['stage_speedup_1_to_%d_cores' % top]:.2f}x (the stage's own wall)")
    w1, w2 = spark[last]["warm"]["seconds"], d["seconds"]
    per_sample = (w2 - w1) / n
    fixed = w1 - per_sample * n
    summary.update({"spark_fixed_s": round(fixed, 2), "spark_ms_per_sample": round(1000 * per_sample, 3),
                    "plain_ms_per_sample": round(1000 * (plain2_s - plain_s) / n, 3),
                    "double_over_single": {"spark": round(w2 / w1, 2), "plain": round(plain2_s / plain_s, 2)}})
    print(f"data x2: spark local[{last}] {w1:.1f}s -> {w2:.1f}s ({w2 / w1:.2f}x), plain {plain_s:.1f}s -> "
          f"{plain2_s:.1f}s ({plain2_s / plain_s:.2f}x); spark ~= {fixed:.1f}s fixed + "
          f"{1000 * per_sample:.2f} ms/sample (plain {1000 * (plain2_s - plain_s) / n:.2f} ms/sample)")
    print(f"shard 0 jpg members byte-equal between plain and spark: {same}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "export.json"
    out.write_text(json.dumps({"samples": n, "samples_per_shard": per_shard, "resize_to": resize_to,
                               "cores_available": os.cpu_count(), "machine": platform.machine(),
                               "load_average_end": round(load, 2), "same_jpeg_bytes": same,
                               "rows": rows, "summary": summary, "spark_raw": spark}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
