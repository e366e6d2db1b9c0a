"""The sentence funnel next to the paper's: what fraction each filter removes.

    .venv/bin/python bench/sentence_funnel.py                      # bundled sample (conf/local.yaml input)
    .venv/bin/python bench/sentence_funnel.py --name mmc4-excerpt \\
        --input-format mmc4 --input tests/data/mmc4_docs/docs.jsonl  # the bundled 20 MMC4 pages
    .venv/bin/python bench/sentence_funnel.py --name mmc4 \\
        --input-format mmc4 --input ../shared/data/mmc4_docs/docs.jsonl  # the larger set, if present

Runs ingest + sentences into a fresh database of a scratch warehouse (nothing of the demo's is
touched), then counts, as the paper does, over sentence occurrences in funnel order:
2.13B split -> 1.82B after quality (-14.6%) -> 1.16B after semantics (-36.3%) -> 0.84B after
redundancy removal (-27.6%). Redundancy here is the exact-text part only (the semantic part is
the semantic_dedup stage's and is counted too when its reason is present). Any `--set` override
applies, e.g. `--set models.perplexity_lm.source=...`. Prints a table and writes
bench/results/sentence_funnel-<name>.json.
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
from udfs.sentences import QUALITY_REASONS, SEMANTIC_REASONS  # noqa: E402

PAPER = {"quality": 0.146, "semantics": 0.363, "redundancy": 0.276}
SEMANTIC_DUPLICATE = "semantic_duplicate"


def funnel(spark, database: str) -> dict:
    """Occurrence-level funnel plus per-reason counts of distinct sentences."""
    rows = spark.sql(f"""
        SELECT s.drop_reason AS reason, count(*) AS occurrences, count(DISTINCT s.sentence_id) AS sentences
        FROM {database}.sentence_occurrences o JOIN {database}.sentences s USING (sentence_id)
        GROUP BY s.drop_reason""").collect()
    occ = {r["reason"]: r["occurrences"] for r in rows}
    uniq = {r["reason"]: r["sentences"] for r in rows}
    split = sum(occ.values())
    quality = sum(occ.get(r, 0) for r in QUALITY_REASONS)
    semantics = sum(occ.get(r, 0) for r in SEMANTIC_REASONS)
    after_semantics = split - quality - semantics
    # Survivors of both filters: every occurrence beyond the first of a sentence is redundant,
    # and so is every occurrence of a semantic duplicate.
    final = uniq.get(None, 0)
    steps = {
        "split": split,
        "after_quality": split - quality,
        "after_semantics": after_semantics,
        "after_redundancy": final,
    }
    return {
        "steps": steps,
        "removed_fraction": {
            "quality": quality / split if split else 0.0,
            "semantics": semantics / (split - quality) if split - quality else 0.0,
            "redundancy": (after_semantics - final) / after_semantics if after_semantics else 0.0,
        },
        "occurrences_by_reason": {str(k): v for k, v in occ.items()},
        "sentences_by_reason": {str(k): v for k, v in uniq.items()},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conf", default=None, help="profile YAML (default conf/local.yaml)")
    ap.add_argument("--input", dest="inputs", nargs="+", type=Path, default=None, metavar="PATH",
                    help="input files or folders (default: the profile's ingest.paths, the bundled sample)")
    ap.add_argument("--input-format", default=None, metavar="FORMAT",
                    help="format of --input: obelics, mmc4 or interleaved_jsonl (default: the profile's ingest.format)")
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
    if args.input_format:
        data.append(f"ingest.format={args.input_format}")

    from etl.runner import run_stages
    from etl.session import build_spark

    warehouse = args.warehouse or tempfile.mkdtemp(prefix="realsyn-funnel-")
    database = args.database or f"funnel_{args.name}".replace("-", "_")
    cfg = load_config(args.conf, [*data, *args.overrides, f"spark.warehouse_dir={warehouse}", f"catalog.database={database}"])
    spark = build_spark(cfg)
    start = time.perf_counter()
    run = None if args.no_run else run_stages(spark, cfg, ["ingest", "sentences"])["sentences"]
    notes = {} if run is None else {**run.notes, **run.metrics}
    wall = time.perf_counter() - start
    out = funnel(spark, database)
    out.update({
        "name": args.name, "inputs": cfg.ingest.paths, "input_format": cfg.ingest.format,
        "perplexity_model": cfg.models[cfg.sentences.perplexity_model].source, "paper_removed_fraction": PAPER,
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
    print("\nby reason (occurrences / distinct sentences):")
    for reason, n in sorted(out["occurrences_by_reason"].items(), key=lambda kv: -kv[1]):
        print(f"  {reason:<24} {n:>8} / {out['sentences_by_reason'][reason]}")
    dest = ROOT / "bench" / "results" / f"sentence_funnel-{args.name}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2, sort_keys=True))
    print(f"\nwrote {dest}")
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
