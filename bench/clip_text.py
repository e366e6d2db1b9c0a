"""The CLIP text tower at the tokenizer's full width (77 positions) against trimmed to each batch's
longest text (realsyn_models/clip.py: ClipEncoder.encode_texts), in arrival order and with each
Arrow batch sorted by length first as the embed stage does (udfs/embed.py: by_length), side by
side in one process.

    .venv/bin/python bench/clip_text.py                      # CPU, conf/local.yaml's model (~2 min on 2 cores)
    .venv/bin/python bench/clip_text.py --device cuda --model ViT-L-14

Sentences are the bundled sample's (sample/recipes.obelics.parquet, split at sentence ends), in
the embed model's batch size, sorted within conf/local.yaml's Arrow batch rows. The ways alternate
per round, so drift in a noisy machine's speed falls on all of them. Prints a table and writes
bench/results/clip_text-<device>.json, with the largest difference between full-width and trimmed
unit vectors of the same sentences (0 up to float rounding: trimming is exact).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import print_table  # noqa: E402
from realsyn_models.clip import load, resolve  # noqa: E402
from udfs.embed import by_length  # noqa: E402

SAMPLE = ROOT / "sample" / "recipes.obelics.parquet"


def sample_sentences(n: int) -> list[str]:
    paragraphs = [t for row in pq.read_table(SAMPLE, columns=["texts"]).column("texts").to_pylist() for t in row if t]
    sentences = [s.strip() for p in paragraphs for s in re.split(r"(?<=[.!?])\s+", p) if len(s.split()) >= 3]
    return [sentences[i % len(sentences)] for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", default=None,
                    help="open_clip architecture, random init (default: conf/local.yaml's model and weights)")
    ap.add_argument("--sentences", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=None, help="default: conf/local.yaml's clip batch_size")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from dataclasses import replace

    import torch
    from etl.config import load_config
    from etl.embeddings import clip_model, clip_spec

    cfg = load_config(ROOT / "conf" / "local.yaml")
    clip = clip_model(cfg)
    batch = args.batch_size or clip.batch_size
    spec = replace(clip_spec(clip), device=args.device, precision="fp16" if args.device == "cuda" else "fp32",
                   **({"model": args.model, "pretrained": None} if args.model else {}))
    spec, note = resolve(spec, allow_random_init=True)
    encoder = load(spec)
    texts = sample_sentences(args.sentences)
    arrow_rows = cfg.spark.arrow_batch_rows
    frames = [pd.DataFrame({"text": texts[i:i + arrow_rows]}) for i in range(0, len(texts), arrow_rows)]
    sorted_texts = [t for frame in by_length(frames, "text") for t in frame["text"]]
    orders = {"arrival": texts, "by length": sorted_texts}

    def full_width(chunk: list[str]) -> np.ndarray:
        return encoder._encode(encoder.model.encode_text, encoder.tokenizer(chunk))

    ways = {"full width": (full_width, "arrival"), "trimmed": (encoder.encode_texts, "arrival"),
            "trimmed, sorted by length (embed stage)": (encoder.encode_texts, "by length")}
    seconds = {name: 0.0 for name in ways}
    vectors: dict[str, np.ndarray] = {}
    encoder.encode_texts(texts[:batch])  # warm-up: allocator, kernels
    chunks = {order: [ts[i:i + batch] for i in range(0, len(ts), batch)] for order, ts in orders.items()}
    for _ in range(args.rounds):
        for name, (fn, order) in ways.items():
            if args.device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            vectors[name] = np.concatenate([fn(c) for c in chunks[order]])
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds[name] += time.perf_counter() - started
    rate = {name: args.rounds * len(texts) / s for name, s in seconds.items()}
    positions = {name: float(encoder.tokenizer(["x"]).shape[1]) if fn is full_width else
                 float(np.mean([int(encoder.tokenizer(c).argmax(dim=-1).max()) + 1 for c in chunks[order]]))
                 for name, (fn, order) in ways.items()}
    diff = float(np.abs(vectors["full width"] - vectors["trimmed"]).max())
    print_table(["text tower", "positions per batch (mean)", "sentences/s", "vs full width"],
                [[name, f"{positions[name]:.1f}", f"{rate[name]:.1f}", f"{rate[name] / rate['full width']:.2f}x"]
                 for name in ways])
    print(f"\nlargest vector difference, full width vs trimmed: {diff:.2e}; {spec.model_id} ({note}), batch "
          f"{batch}, Arrow batch {arrow_rows} rows, {args.rounds} rounds, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} cores")
    out = Path(args.out or ROOT / "bench" / "results" / f"clip_text-{args.device}.json")
    out.write_text(json.dumps({
        "command": "python bench/clip_text.py " + " ".join(sys.argv[1:]), "model_id": spec.model_id,
        "weights": note, "device": args.device, "sentences": len(texts), "batch_size": batch, "rounds": args.rounds,
        "arrow_batch_rows": arrow_rows, "sentences_per_s": rate, "mean_positions": positions,
        "speedup": {name: rate[name] / rate["full width"] for name in ways}, "max_abs_vector_difference": diff,
        "cpus": os.cpu_count(), "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
