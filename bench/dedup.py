"""Near-duplicate detection on synthetic data: pHash LSH bands vs all pairs, and bounded semantic dedup.

    .venv/bin/python bench/dedup.py            # 1M hashes, a few minutes on 2 cores
    .venv/bin/python bench/dedup.py --quick    # 125k, for a smoke run
    .venv/bin/python bench/dedup.py --semantic # 50k/100k/200k vectors, d=64: bench/results/semantic_dedup.json

--semantic runs the semantic_dedup stage's per-task work (udfs/kmeans.py, udfs/semantic_dedup.py)
for each N in a fresh process standing in for one Python worker: k-means on the bounded sample,
K = ceil(N / target cluster size), nearest-centroid assignment, then every (cluster, new-item
chunk, member chunk) group range-searched; then a second batch of near-copies of 1% of the old
items, judged against the old survivors of the clusters it falls into. It prints wall time, the
worker's peak RSS, pairs compared vs all pairs, and recall of the planted pairs.

Random hashes with planted near-duplicates: 1% of the hashes get a copy with 0..t bits flipped
(must all be found: recall 1.0) and another 1% a copy with t+1..t+3 flipped (must not be
reported). The LSH path (udfs/phash.py: band-subset keys, the method the Spark stage runs as a
join) is timed for m = t+1, t+2, t+3 bands as N doubles up to 1M; the all-pairs baseline on
subsets, where the two must return identical pairs. Prints a table and writes bench/results/dedup.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from udfs.phash import all_pairs_within, band_masks, hamming, near_duplicate_pairs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "dedup.json"


def flip(h: np.ndarray, n_bits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = h.view(np.uint64).copy()
    for i, k in enumerate(n_bits):
        for b in rng.choice(64, size=int(k), replace=False):
            out[i] ^= np.uint64(1) << np.uint64(int(b))
    return out.view(np.int64)


def synthetic(n: int, t: int, seed: int) -> tuple[np.ndarray, set[tuple[int, int]], set[tuple[int, int]]]:
    """n hashes; planted pairs within t (must find) and just beyond t (must not report)."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(-(2**63), 2**63 - 1, size=n, dtype=np.int64)
    n_pairs = max(1, n // 100)
    idx = rng.permutation(n)[: 4 * n_pairs].reshape(4, n_pairs)
    hashes[idx[1]] = flip(hashes[idx[0]], rng.integers(0, t + 1, size=n_pairs), rng)
    hashes[idx[3]] = flip(hashes[idx[2]], rng.integers(t + 1, t + 4, size=n_pairs), rng)
    near = {(min(a, b), max(a, b)) for a, b in zip(idx[0].tolist(), idx[1].tolist())}
    far = {(min(a, b), max(a, b)) for a, b in zip(idx[2].tolist(), idx[3].tolist())}
    return hashes, near, far


def candidates(hashes: np.ndarray, t: int, n_bands: int) -> int:
    """Pairs the key join compares (before the Hamming check), summed over keys."""
    total = 0
    for mask in band_masks(t, n_bands):
        _, counts = np.unique(hashes & np.int64(mask), return_counts=True)
        total += int((counts * (counts - 1) // 2).sum())
    return total


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def check(pairs: np.ndarray, hashes: np.ndarray, near: set, far: set, t: int) -> tuple[float, int]:
    found = set(map(tuple, pairs.tolist()))
    assert all(hamming(hashes[a], hashes[b]) <= t for a, b in found), "a reported pair is beyond t"
    assert not (found & far), "a planted pair beyond t was reported"
    return len(found & near) / len(near), len(found)


def _semantic_run(n: int, d: int, target: int, chunk: int, sample: int, threshold: float, seed: int) -> dict:
    """One worker's bounded semantic dedup of n vectors (planted: 1% near-copies), then of a
    second batch of near-copies of old items. Runs in its own process (peak RSS is its own)."""
    import resource

    from udfs.kmeans import nearest_centroids, normalise, train_kmeans
    from udfs.semantic_dedup import range_pairs

    rng = np.random.default_rng(seed)
    # Topic blobs (items of one topic stay below the threshold) with 1% planted near-copies.
    blobs = rng.normal(size=(max(1, n // 500), d)).astype(np.float32)
    x = blobs[rng.integers(0, len(blobs), n)] + 0.6 * rng.normal(size=(n, d)).astype(np.float32)
    n_pairs = n // 100
    src = rng.choice(n - n_pairs, n_pairs, replace=False)
    x[n - n_pairs:] = x[src] + 0.01 * rng.normal(size=(n_pairs, d)).astype(np.float32)
    x = normalise(x)
    planted = {(int(a), int(b)) for a, b in zip(src, range(n - n_pairs, n))}
    ids = np.array([f"{i:08d}" for i in range(n)], dtype=object)

    def search(xs: np.ndarray, ids: np.ndarray, new: np.ndarray, members: np.ndarray,
               labels: np.ndarray) -> tuple[set, int]:
        """Pairs found and pairs compared: each cluster's new-item chunks x member chunks."""
        found, compared = set(), 0
        is_new = np.zeros(len(labels), dtype=bool)
        is_new[new] = True
        for c in np.unique(labels[new]):
            q = new[labels[new] == c]
            m = members[labels[members] == c]
            for qs in range(0, len(q), chunk):
                for ms in range(0, len(m), chunk):
                    qq, mm = q[qs:qs + chunk], m[ms:ms + chunk]
                    compared += len(qq) * len(mm)
                    out = range_pairs(ids[qq], xs[qq], ids[mm], xs[mm], threshold, member_is_new=is_new[mm])
                    found |= {(int(a), int(b)) for a, b in zip(out["src"], out["dst"])}
        return found, compared

    t0 = time.perf_counter()
    pick = np.sort(rng.permutation(n)[:sample])
    centroids = train_kmeans(x[pick], max(1, -(-n // target)), niter=20, seed=0, gpu=False)
    labels = nearest_centroids(x, centroids, 1, gpu=False)[0][:, 0]
    everyone = np.arange(n)
    found, compared = search(x, ids, everyone, everyone, labels)
    first_s = time.perf_counter() - t0
    recall = len(found & planted) / len(planted)
    # Survivors: drop the larger id of every found pair (the full-run rule up to priority).
    losers = {b for _, b in found}
    survivors = np.array(sorted(set(range(n)) - losers))

    # Second batch: near-copies of 1% of the old items, appended.
    m2 = max(1, n // 100)
    of = rng.choice(n, m2, replace=False)
    x2 = normalise(x[of] + 0.01 * rng.normal(size=(m2, d)).astype(np.float32))
    xs = np.concatenate([x, x2])
    ids2 = np.array([f"{i:08d}" for i in range(n + m2)], dtype=object)
    t1 = time.perf_counter()
    labels2 = np.concatenate([labels, nearest_centroids(x2, centroids, 1, gpu=False)[0][:, 0]])
    new = np.arange(n, n + m2)
    found2, compared2 = search(xs, ids2, new, np.concatenate([survivors, new]), labels2)
    second_s = time.perf_counter() - t1
    caught = {n + i for i in range(m2) if any(a == n + i or b == n + i for a, b in found2)}
    return {"n": n, "d": d, "k": len(centroids), "target_cluster_size": target, "max_cluster_chunk": chunk,
            "largest_cluster": int(np.bincount(labels).max()), "seconds": first_s, "compared": compared,
            "all_pairs": n * (n - 1) // 2, "planted": len(planted), "recall": recall,
            "batch2_n": m2, "batch2_seconds": second_s, "batch2_compared": compared2,
            "batch2_caught": len(caught) / m2,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def semantic(args) -> None:
    import multiprocessing as mp

    sizes = [12_500, 25_000] if args.quick else [50_000, 100_000, 200_000]
    rows = []
    ctx = mp.get_context("spawn")
    for n in sizes:
        with ctx.Pool(1) as pool:  # a fresh process per N: its peak RSS is this N's alone
            rows.append(pool.apply(_semantic_run, (n, 64, args.target, args.chunk, args.sample, args.threshold,
                                                   args.seed)))
    prev = None
    for r in rows:
        r["x_when_n_doubles"] = r["seconds"] / prev["seconds"] if prev and r["n"] == 2 * prev["n"] else None
        prev = r
    print(f"bounded semantic dedup, d=64, threshold {args.threshold}, target cluster size {args.target}, "
          f"chunk {args.chunk}, k-means sample {args.sample}; planted: 1% near-copies; batch 2: near-copies of 1%")
    print(f"{'N':>8} {'K':>4} {'largest':>8} {'seconds':>8} {'x (2N)':>7} {'peak MiB':>9} {'compared':>14} "
          f"{'all pairs':>15} {'ratio':>7} {'recall':>7} | {'batch2':>6} {'s':>6} {'compared':>12} {'caught':>7}")
    for r in rows:
        x = f"{r['x_when_n_doubles']:.2f}" if r["x_when_n_doubles"] else "-"
        print(f"{r['n']:>8,} {r['k']:>4} {r['largest_cluster']:>8,} {r['seconds']:>8.1f} {x:>7} "
              f"{r['peak_rss_mib']:>9.0f} {r['compared']:>14,} {r['all_pairs']:>15,} "
              f"{r['compared'] / r['all_pairs']:>7.4f} {r['recall']:>7.3f} | {r['batch2_n']:>6,} "
              f"{r['batch2_seconds']:>6.1f} {r['batch2_compared']:>12,} {r['batch2_caught']:>7.3f}")
    out = RESULTS.parent / "semantic_dedup.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "threshold": args.threshold, "machine": {
        "python": platform.python_version(), "cpu": platform.processor() or platform.machine()}}, indent=2))
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--t", type=int, default=6, help="Hamming threshold (image_dedup.phash_max_hamming)")
    ap.add_argument("--max-n", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--semantic", action="store_true", help="bounded semantic dedup instead of pHash")
    ap.add_argument("--target", type=int, default=10_000, help="semantic_dedup.<kind>.target_cluster_size")
    ap.add_argument("--chunk", type=int, default=20_000, help="semantic_dedup.max_cluster_chunk")
    ap.add_argument("--sample", type=int, default=50_000, help="semantic_dedup.kmeans_sample")
    ap.add_argument("--threshold", type=float, default=0.95)
    args = ap.parse_args()
    if args.semantic:
        semantic(args)
        return
    t, max_n = args.t, 125_000 if args.quick else args.max_n

    rows = []
    lsh_sizes = [max_n // 8, max_n // 4, max_n // 2, max_n]
    brute_sizes = [5_000, 10_000, 20_000]
    variants = {f"lsh-{m}b": m for m in (t + 1, t + 2, t + 3)}  # t+1: one-band pigeonhole
    for n in brute_sizes:
        hashes, near, far = synthetic(n, t, args.seed)
        brute, brute_s = timed(all_pairs_within, hashes, t)
        recall, found = check(brute, hashes, near, far, t)
        rows.append({"method": "all-pairs", "n": n, "seconds": brute_s, "keys_per_hash": 0,
                     "compared": n * (n - 1) // 2, "pairs": found, "recall": recall})
    for n in sorted(set(brute_sizes + lsh_sizes)):
        hashes, near, far = synthetic(n, t, args.seed)
        reference = all_pairs_within(hashes, t) if n in brute_sizes else None
        for method, m in variants.items():
            if method == f"lsh-{t + 1}b" and n > max_n // 2:
                continue  # quadratic in practice: measured up to N/2, see the scaling column
            pairs, secs = timed(near_duplicate_pairs, hashes, t, m)
            if reference is not None:
                assert np.array_equal(pairs, reference), f"{method} and all-pairs disagree"
            recall, found = check(pairs, hashes, near, far, t)
            rows.append({"method": method, "n": n, "seconds": secs, "keys_per_hash": len(band_masks(t, m)),
                         "compared": candidates(hashes, t, m), "pairs": found, "recall": recall})

    # Scaling: time ratio when N doubles, per method.
    for method in ["all-pairs", *variants]:
        prev = None
        for r in sorted((r for r in rows if r["method"] == method), key=lambda r: r["n"]):
            r["x_when_n_doubles"] = (r["seconds"] / prev["seconds"]) if prev and r["n"] == 2 * prev["n"] else None
            prev = r
    biggest_brute = max((r for r in rows if r["method"] == "all-pairs"), key=lambda r: r["n"])
    extrapolated = biggest_brute["seconds"] * (max_n / biggest_brute["n"]) ** 2
    best = min((r for r in rows if r["n"] == max_n), key=lambda r: r["seconds"])

    print(f"pHash near-duplicates, t={t}; lsh-<m>b: m bands, keys on every (m-t)-subset; "
          "planted pairs: 1% within t, 1% at t+1..t+3")
    print(f"{'method':>9} {'N':>9} {'keys':>5} {'seconds':>9} {'x (2N)':>7} {'compared':>15} "
          f"{'pairs':>7} {'recall':>7}")
    for r in sorted(rows, key=lambda r: (r["method"], r["n"])):
        x = f"{r['x_when_n_doubles']:.2f}" if r["x_when_n_doubles"] else "-"
        print(f"{r['method']:>9} {r['n']:>9,} {r['keys_per_hash']:>5} {r['seconds']:>9.2f} {x:>7} "
              f"{r['compared']:>15,} {r['pairs']:>7,} {r['recall']:>7.3f}")
    print(f"all-pairs at N={max_n:,} extrapolated (quadratic): {extrapolated:,.0f} s vs "
          f"{best['method']} measured {best['seconds']:.1f} s ({extrapolated / best['seconds']:,.0f}x)")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "t": t, "variants": variants, "rows": rows, "fastest_at_max_n": best["method"],
        "all_pairs_extrapolated_s_at_max_n": extrapolated, "max_n": max_n,
        "recall_all_within_t": all(r["recall"] == 1.0 for r in rows),
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
    }, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
