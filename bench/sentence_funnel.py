"""The sentence funnel next to the paper's: what fraction each filter removes.

    .venv/bin/python bench/sentence_funnel.py                      # bundled sample (conf/local.yaml input)
    .venv/bin/python bench/sentence_funnel.py --name mmc4-excerpt \\
        --input-format mmc4 --input tests/data/mmc4_docs/docs.jsonl  # the bundled 20 MMC4 pages
    .venv/bin/python bench/sentence_funnel.py --name mmc4 \\
        --input-format mmc4 --input ../shared/data/mmc4_docs/docs.jsonl  # the larger set, if present
    .venv/bin/python bench/sentence_funnel.py --name captions \\
        --captions tests/data/captions/captions.jsonl                   # 400 human-written captions

Runs ingest -> sentences -> semantic_dedup (its sentence half) into a fresh database of a scratch
warehouse (nothing of the demo's is touched), then counts, as the paper does, over sentence
occurrences in funnel order: 2.13B split -> 1.82B after quality (-14.6%) -> 1.16B after semantics
(-36.3%) -> 0.84B after redundancy removal (-27.6%; exact and semantic duplicates). `--captions`
turns a captions jsonl into one interleaved page per photo first. Each reason is marked by what
decides it: the data alone (word counts, emoji and URLs, entropy over the corpus, exact repeats)
or a model (the spaCy parser for the action rule, the LM for perplexity, the text encoder for
semantic duplicates), which is where a gap to the paper can come from our smaller models rather
than from the corpus. Any `--set` override applies, e.g. `--set models.perplexity_lm.source=...`.
Prints a table and writes bench/results/sentence_funnel-<name>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from etl.config import load_config  # noqa: E402
from etl.funnel import EXACT_DUPLICATE, PAPER, SEMANTIC_DUPLICATE, sentence_funnel as funnel  # noqa: E402
from udfs.sentences import (EMOJI, HIGH_PERPLEXITY, LOW_ENTROPY, LOW_PERPLEXITY, NO_ACTION,  # noqa: E402
                            TOO_FEW_WORDS, TOO_MANY_WORDS, URL)
# What decides each reason: the corpus alone, or a model (a gap to the paper there may be ours).
DECIDED_BY = {EMOJI: "data", URL: "data", TOO_FEW_WORDS: "data", TOO_MANY_WORDS: "data",
              NO_ACTION: "model: spaCy parser", LOW_ENTROPY: "data (corpus unigrams)",
              LOW_PERPLEXITY: "model: LM + its band", HIGH_PERPLEXITY: "model: LM + its band",
              EXACT_DUPLICATE: "data", SEMANTIC_DUPLICATE: "model: dedup encoder + threshold"}


def captions_as_pages(captions: Path, folder: Path) -> Path:
    """A captions jsonl ({captions: [...]} per photo) as interleaved_jsonl pages, one per photo."""
    out = folder / "captions.pages.jsonl"
    with captions.open(encoding="utf-8") as src, out.open("w", encoding="utf-8") as dst:
        for line in src:
            if line.strip():
                photo = json.loads(line)
                blocks = [{"type": "text", "text": c} for c in photo.get("captions", [])]
                dst.write(json.dumps({"doc_id": str(photo.get("coco_image_id", "")), "blocks": blocks}) + "\n")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conf", default=None, help="profile YAML (default conf/local.yaml)")
    ap.add_argument("--input", dest="inputs", nargs="+", type=Path, default=None, metavar="PATH",
                    help="input files or folders (default: the profile's ingest.paths, the bundled sample)")
    ap.add_argument("--input-format", default=None, metavar="FORMAT",
                    help="format of --input: obelics, mmc4 or interleaved_jsonl (default: the profile's ingest.format)")
    ap.add_argument("--captions", type=Path, default=None, metavar="JSONL",
                    help="a captions jsonl (tests/data/captions/captions.jsonl) as input, one page per photo")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--name", default="sample", help="names the results file")
    ap.add_argument("--warehouse", default=None, help="scratch warehouse (default: a temp folder)")
    ap.add_argument("--database", default=None, help="database name (default: funnel_<name>)")
    ap.add_argument("--no-run", action="store_true",
                    help="count an existing warehouse/database (e.g. the demo's) without running stages")
    args = ap.parse_args()
    data = []
    if args.inputs:
        missing = [str(p) for p in args.inputs if not p.exists()]
        if missing:
            ap.error(f"--input: no such file or folder: {', '.join(missing)}")
        data.append("ingest.paths=" + json.dumps([str(p.resolve()) for p in args.inputs]))
    if args.captions:
        pages = captions_as_pages(args.captions, Path(tempfile.mkdtemp(prefix="realsyn-captions-")))
        data += ["ingest.paths=" + json.dumps([str(pages)]), "ingest.format=interleaved_jsonl"]
    if args.input_format:
        data.append(f"ingest.format={args.input_format}")

    from etl.runner import run_stages
    from etl.session import build_spark

    warehouse = args.warehouse or tempfile.mkdtemp(prefix="realsyn-funnel-")
    database = args.database or f"funnel_{args.name}".replace("-", "_")
    cfg = load_config(args.conf, [*data, *args.overrides, f"spark.warehouse_dir={warehouse}", f"catalog.database={database}"])
    spark = build_spark(cfg)
    start = time.perf_counter()
    runs = {} if args.no_run else run_stages(spark, cfg, ["ingest", "sentences", "semantic_dedup"])
    notes = {name: {**r.notes, **r.metrics} for name, r in runs.items() if name != "ingest"}
    wall = time.perf_counter() - start
    out = funnel(spark, database)
    out.update({
        "name": args.name, "inputs": cfg.ingest.paths, "input_format": cfg.ingest.format,
        "perplexity_model": cfg.models[cfg.sentences.perplexity_model].source, "paper_removed_fraction": PAPER,
        "dedup_encoder": (cfg.models[cfg.semantic_dedup.sentences.encoder].source
                          if cfg.semantic_dedup.sentences.encoder else f"{cfg.embed.model} (CLIP)"),
        "dedup_threshold": cfg.semantic_dedup.sentences.threshold,
        "stage_notes": notes, "wall_s": round(wall, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    })

    print(f"\nsentence funnel: {args.name} ({', '.join(cfg.ingest.paths)})")
    print(f"{'step':<18} {'occurrences':>12}")
    for step, n in out["steps"].items():
        print(f"{step:<18} {n:>12}")
    print(f"\n{'filter':<12} {'removed':>9} {'paper':>9}")
    for k, v in out["removed_fraction"].items():
        print(f"{k:<12} {v:>9.1%} {PAPER[k]:>9.1%}")
    split = out["steps"]["split"] or 1
    print("\nby reason (occurrences, share of split, distinct sentences, decided by):")
    for reason, n in sorted(out["occurrences_by_reason"].items(), key=lambda kv: -kv[1]):
        if reason == "None":
            continue
        print(f"  {reason:<24} {n:>8} {n / split:>7.1%} {out['sentences_by_reason'][reason]:>8}  "
              f"{DECIDED_BY.get(reason, '?')}")
    print(f"\nmodels: perplexity {out['perplexity_model']}; semantic dedup {out['dedup_encoder']} "
          f"at cosine >= {out['dedup_threshold']}")
    dest = ROOT / "bench" / "results" / f"sentence_funnel-{args.name}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2, sort_keys=True))
    print(f"\nwrote {dest}")
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
