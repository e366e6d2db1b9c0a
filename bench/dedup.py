"""Near-duplicate detection on synthetic 64-bit perceptual hashes: LSH bands vs all pairs.

    .venv/bin/python bench/dedup.py            # 1M hashes, a few minutes on 2 cores
    .venv/bin/python bench/dedup.py --quick    # 125k, for a smoke run

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--t", type=int, default=6, help="Hamming threshold (image_dedup.phash_max_hamming)")
    ap.add_argument("--max-n", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
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
