"""Embedding throughput: the udf on pandas batches vs the full Spark embed stage, or GPU end to end.

    .venv/bin/python bench/embed.py                     # CPU: direct udf vs Spark stage (~3 min, 2 cores)
    .venv/bin/python bench/embed.py --scale 4           # 4x the rows
    .venv/bin/python bench/embed.py --device cuda       # GPU machine, no Spark: ViT-B-32 + ViT-L-14 fp16

Rows come from the bundled sample (--sample, default sample/recipes.obelics.parquet), or from a
folder of photos (--photos, default the bundled tests/data/recipes/static/pix) when that file is
missing, cycled under fresh ids when more rows are asked for than it has, e.g.
`--sample none --photos ../shared/data/recipes/static/pix` for the full-size recipe photos.
CPU mode uses conf/local.yaml's embed model; both paths are timed warm (model already loaded in
the process / in the Spark Python workers) so the ratio is the cost of Spark itself: Arrow
transfer, the anti-join, the Delta MERGE. The cold first Spark run is reported too.
Results: a table on stdout and JSON in bench/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import optional_path, print_table  # noqa: E402

from realsyn_models import cache  # noqa: E402
from realsyn_models.clip import ClipSpec, get_encoder, resolve  # noqa: E402
from udfs.embed import decode_image, make_image_embed_fn, make_text_embed_fn  # noqa: E402
from udfs.ids import stable_id  # noqa: E402

SAMPLE = ROOT / "sample" / "recipes.obelics.parquet"
PIX = ROOT / "tests" / "data" / "recipes" / "static" / "pix"  # bundled real photos
PHOTO_SUFFIXES = {".webp", ".jpg", ".jpeg", ".png"}
RESULTS = ROOT / "bench" / "results"
BASE_IMAGES, BASE_TEXTS = 96, 192  # --scale 1 on CPU: a few minutes on 2 cores with ViT-B-32


def sample_rows(n_images: int, n_texts: int, sample: Path | None = SAMPLE,
                photos: Path = PIX) -> tuple[pd.DataFrame, pd.DataFrame]:
    if sample is not None and sample.exists():
        table = pq.read_table(sample, columns=["texts", "image_bytes"]).to_pydict()
        blobs = list(dict.fromkeys(b for row in table["image_bytes"] for b in row if b))
        texts = list(dict.fromkeys(t for row in table["texts"] for t in row if t))
    else:
        files = sorted(f for f in photos.iterdir() if f.suffix.lower() in PHOTO_SUFFIXES) if photos.is_dir() else []
        if not files:
            sys.exit(f"no sample parquet ({sample}) and no photos in {photos}")
        blobs = [f.read_bytes() for f in files]
        texts = [f"A photo of {f.stem.replace('-', ' ').replace('_', ' ')}." for f in files]
    images = pd.DataFrame({"image_id": [stable_id("bench-image", str(i)) for i in range(n_images)],
                           "bytes": [blobs[i % len(blobs)] for i in range(n_images)]})
    sentences = pd.DataFrame({"sentence_id": [stable_id("bench-text", str(i)) for i in range(n_texts)],
                              "text": [texts[i % len(texts)] for i in range(n_texts)]})
    return images, sentences


def _frames(df: pd.DataFrame, rows: int) -> list[pd.DataFrame]:
    return [df.iloc[i:i + rows] for i in range(0, len(df), rows)]


def timed_udf(fn, df: pd.DataFrame, batch_rows: int) -> float:
    """Seconds to push df through fn in Arrow-sized frames (model already loaded)."""
    started = time.perf_counter()
    n = sum(len(out) for out in fn(iter(_frames(df, batch_rows))))
    assert n == len(df)
    return time.perf_counter() - started


# --- CPU: direct udf vs Spark stage ---------------------------------------------------------------

def bench_cpu(args) -> dict:
    from etl.config import load_config
    from etl.embeddings import clip_model, clip_spec

    warehouse = tempfile.mkdtemp(prefix="bench-embed-")
    cfg = load_config(args.config, [f"spark.warehouse_dir={warehouse}", "catalog.database=bench_embed", *args.set])
    e, m = cfg.embed, clip_model(cfg)
    images, texts = sample_rows(int(BASE_IMAGES * args.scale), int(BASE_TEXTS * args.scale), args.sample, args.photos)
    spec, note = resolve(clip_spec(m), m.allow_random_init)
    img_fn = make_image_embed_fn(spec, m.batch_size, e.decode_threads, e.max_image_bytes, e.max_pixels)
    txt_fn = make_text_embed_fn(spec, m.batch_size)

    import torch
    print(f"model {spec.model_id}; {len(images)} images, {len(texts)} texts; torch threads "
          f"{torch.get_num_threads()}; {os.cpu_count()} cores", file=sys.stderr)
    get_encoder(spec)  # warm: the load is not what is measured
    direct = {"images_s": timed_udf(img_fn, images, cfg.spark.arrow_batch_rows),
              "texts_s": timed_udf(txt_fn, texts, cfg.spark.arrow_batch_rows)}
    cache.clear()

    spark_times = bench_spark_stage(cfg, images, texts)
    rows = {"images": len(images), "texts": len(texts)}
    result = {"mode": "cpu", "model_id": spec.model_id, "weights": note, "rows": rows, "scale": args.scale,
              "direct_s": direct, "spark_s": spark_times}
    for path, t in (("direct", direct), ("spark", spark_times)):
        result[f"{path}_images_per_s"] = rows["images"] / t["images_s"]
        result[f"{path}_texts_per_s"] = rows["texts"] / t["texts_s"]
    result["spark_over_direct"] = {k: spark_times[f"{k}_s"] / direct[f"{k}_s"] for k in rows}
    print_table(
        ["path", "images/s", "texts/s"],
        [["direct udf (pandas)", f"{result['direct_images_per_s']:.2f}", f"{result['direct_texts_per_s']:.2f}"],
         ["spark embed stage", f"{result['spark_images_per_s']:.2f}", f"{result['spark_texts_per_s']:.2f}"],
         ["spark time / direct time", f"{result['spark_over_direct']['images']:.2f}x",
          f"{result['spark_over_direct']['texts']:.2f}x"]])
    print(f"cold first Spark run (worker start + model load, 2 images + 2 texts): {spark_times['cold_s']:.1f}s; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return result


def bench_spark_stage(cfg, images: pd.DataFrame, texts: pd.DataFrame) -> dict:
    """Time the real stage: a warm-up batch (loads the model in every Python worker), then new
    images only, then new texts only, each an incremental run over the previous tables."""
    from etl.context import StageContext
    from etl.session import build_spark
    from etl.stages import embed as stage

    spark = build_spark(cfg)
    db = cfg.catalog.database
    spark.sql(f"DROP DATABASE IF EXISTS {db} CASCADE")
    spark.sql(f"CREATE DATABASE {db}")
    parallelism = spark.sparkContext.defaultParallelism

    def add(df: pd.DataFrame, table: str) -> None:
        out = df.rename(columns={"sentence_id": "text_id"})
        spark.createDataFrame(out).write.format("delta").mode("append").saveAsTable(f"{db}.{table}")

    def run_stage(batch: str):
        ctx = StageContext(spark=spark, cfg=cfg, run_id=batch, batch_id=batch)
        started = time.perf_counter()
        result = stage.embed(ctx)
        return time.perf_counter() - started, result

    warm = parallelism  # one row per task so every Python worker loads the model before timing
    add(images.iloc[:warm], "doc_images")
    add(texts.iloc[:warm], "doc_texts")
    cold_s, _ = run_stage("warmup")
    add(images.iloc[warm:], "doc_images")
    images_run_s, r1 = run_stage("images")
    add(texts.iloc[warm:], "doc_texts")
    texts_run_s, r2 = run_stage("texts")
    assert r1.rows_out == len(images) - warm and r2.rows_out == len(texts) - warm, (r1, r2)
    spark.stop()
    # Each kind's own part of the run (anti-join, model, MERGE), from the stage's metrics, scaled
    # to the full row count; the whole runs also include the other kind's no-op check.
    return {"cold_s": cold_s,
            "images_s": r1.metrics["image_wall_s"] * len(images) / (len(images) - warm),
            "texts_s": r2.metrics["sentence_wall_s"] * len(texts) / (len(texts) - warm),
            "images_whole_run_s": images_run_s, "texts_whole_run_s": texts_run_s, "parallelism": parallelism}


# --- GPU: end to end without Spark --------------------------------------------------------------

def bench_cuda(args) -> dict:
    import torch

    if not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible")
    return bench_device(args, "cuda:0", torch.cuda.get_device_name(0))


def bench_device(args, device: str, device_name: str) -> dict:
    """Decode + preprocess alone, forward alone, and the udf end to end, per model."""
    import torch

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    n_images = int(args.cuda_images * args.scale)
    images, texts = sample_rows(n_images, n_images, args.sample, args.photos)
    out = {"mode": device.split(":")[0], "gpu": device_name, "rows": n_images, "batch_size": args.batch_size,
           "decode_threads": args.threads, "precision": args.precision, "models": {}}
    rows = []
    for model in args.models:
        # Random init: throughput does not depend on the weights, and the GPU box is offline.
        spec = ClipSpec(model, None, args.precision, random_init=True, device=device)
        encoder = get_encoder(spec)
        size = encoder.model.visual.image_size
        size = max(size) if isinstance(size, (tuple, list)) else size

        def prepare(data):  # what the udf's decode pool does per image
            return encoder.preprocess(decode_image(data, 1 << 30, 1 << 31, draft_size=size)[0])

        with ThreadPoolExecutor(args.threads) as pool:  # CPU side alone
            started = time.perf_counter()
            pixels = list(pool.map(prepare, images["bytes"]))
            decode_rate = n_images / (time.perf_counter() - started)

        batch = torch.stack(pixels[: args.batch_size])
        encoder.encode_images(batch)  # warm-up: kernels, allocator
        sync()
        reps = max(1, n_images // len(batch))
        started = time.perf_counter()
        for _ in range(reps):
            encoder.encode_images(batch)
        sync()
        forward = reps * len(batch) / (time.perf_counter() - started)

        e2e = n_images / timed_udf(make_image_embed_fn(spec, args.batch_size, args.threads), images, args.arrow_rows)
        text_rate = n_images / timed_udf(make_text_embed_fn(spec, args.batch_size), texts, args.arrow_rows)
        bound = "decode+preprocess (CPU)" if decode_rate < forward else "forward (GPU)"
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
        out["models"][model] = {"end_to_end_images_per_s": e2e, "forward_only_images_per_s": forward,
                                "decode_preprocess_images_per_s": decode_rate, "texts_per_s": text_rate,
                                "bound_by": bound, "peak_gpu_mem_gib": peak}
        rows.append([model, f"{e2e:.0f}", f"{forward:.0f}", f"{decode_rate:.0f}", f"{text_rate:.0f}", bound])
        cache.clear()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    print(f"{device_name}, {args.precision}, batch {args.batch_size}, {args.threads} decode threads, "
          f"{n_images} sample images")
    print_table(["model", "e2e img/s", "forward img/s", "decode+prep img/s", "texts/s", "bound by"], rows)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the number of rows")
    p.add_argument("--sample", type=optional_path, default=SAMPLE,
                   help="OBELICS parquet with an image_bytes column (default: the bundled sample); "
                        "'none' to use --photos")
    p.add_argument("--photos", type=Path, default=PIX,
                   help="folder of .webp/.jpg/.png photos, used when --sample is missing "
                        "(default: the bundled tests/data/recipes/static/pix)")
    p.add_argument("--config", default=str(ROOT / "conf" / "local.yaml"), help="CPU mode: profile")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="CPU mode: config override")
    p.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"], help="cuda mode")
    p.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"], help="cuda mode")
    p.add_argument("--batch-size", type=int, default=256, help="cuda mode")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="cuda mode: decode threads")
    p.add_argument("--cuda-images", type=int, default=2048, help="cuda mode: images at --scale 1")
    p.add_argument("--arrow-rows", type=int, default=2048, help="cuda mode: rows per pandas batch")
    p.add_argument("--out", help="JSON path (default bench/results/embed-<device>.json)")
    args = p.parse_args(argv)
    if args.sample is not None and args.sample != SAMPLE and not args.sample.is_file():
        p.error(f"--sample {args.sample}: no such file")

    result = bench_cuda(args) if args.device == "cuda" else bench_cpu(args)
    data = args.sample if args.sample is not None and args.sample.is_file() else args.photos
    result.update({"data": str(data), "host": platform.node(), "cpus": os.cpu_count(), "loadavg_1m_at_end": os.getloadavg()[0], "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "command": " ".join(sys.argv)})
    out = Path(args.out) if args.out else RESULTS / f"embed-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
