"""Perceptual hashes as signed 64-bit ints, and the LSH keys that find near-duplicates.

Near-duplicates are pairs within Hamming distance t. Cut the 64 bits into m > t contiguous bands:
t differing bits touch at most t bands, so a pair within t agrees exactly on at least m - t bands,
hence on every bit of at least one (m - t)-subset of bands. Each subset is a bit mask; joining on
(subset, hash & mask) finds every pair within t, and no pair is ever missed (recall 1 by
construction). m = t + 1 is the classic one-band pigeonhole; m = t + 2 keys on 2 bands at once
(28 keys per hash for t = 6), which cuts the pairs compared by ~2^8 for 4x more keys: at a
million hashes that is the difference between minutes and seconds (bench/dedup.py).
Spark does the join in etl/stages/image_dedup.py with `band_masks`; `near_duplicate_pairs` is the
same method in numpy (benchmark, tests).
"""
from __future__ import annotations

import itertools

import imagehash
import numpy as np
from PIL import Image

HASH_BITS = 64


def phash_int64(img: Image.Image) -> int:
    """imagehash's 8x8 DCT pHash packed MSB-first into 64 bits, as a signed int64 (Spark bigint)."""
    bits = imagehash.phash(img, hash_size=8).hash.flatten()
    value = int.from_bytes(np.packbits(bits).tobytes(), "big")
    return value - (1 << 64) if value >= 1 << 63 else value


def band_layout(n_bands: int) -> list[tuple[int, int]]:
    """(shift, width) of each band: the 64 bits split into n_bands contiguous, near-equal runs."""
    if not 1 <= n_bands <= HASH_BITS:
        raise ValueError(f"n_bands must be in 1..{HASH_BITS}, got {n_bands}")
    base, extra = divmod(HASH_BITS, n_bands)
    layout, shift = [], 0
    for b in range(n_bands):
        width = base + (1 if b < extra else 0)
        layout.append((shift, width))
        shift += width
    return layout


def band_masks(max_hamming: int, n_bands: int) -> list[int]:
    """One signed-int64 bit mask per (n_bands - max_hamming)-subset of the bands."""
    if n_bands <= max_hamming:
        raise ValueError(f"need more bands ({n_bands}) than the Hamming threshold ({max_hamming})")
    band_bits = [((1 << w) - 1) << s for s, w in band_layout(n_bands)]
    masks = []
    for subset in itertools.combinations(band_bits, n_bands - max_hamming):
        m = sum(subset)
        masks.append(m - (1 << 64) if m >= 1 << 63 else m)
    return masks


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, np.int64), np.asarray(b, np.int64)).view(np.uint64))


def near_duplicate_pairs(hashes: np.ndarray, max_hamming: int, n_bands: int | None = None) -> np.ndarray:
    """All index pairs (i < j) within max_hamming, via band-subset keys. Shape (m, 2)."""
    hashes = np.asarray(hashes, dtype=np.int64)
    found = []
    for mask in band_masks(max_hamming, n_bands or max_hamming + 2):
        keys = hashes & np.int64(mask)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        sizes = np.diff(np.r_[starts, len(keys)])
        # Buckets of the same size share one triangle of offsets: one vectorised step per size.
        for size in np.unique(sizes[sizes > 1]):
            bucket_starts = starts[sizes == size]
            ii, jj = np.triu_indices(size, k=1)
            left = order[bucket_starts[:, None] + ii[None, :]].ravel()
            right = order[bucket_starts[:, None] + jj[None, :]].ravel()
            close = hamming(hashes[left], hashes[right]) <= max_hamming
            found.append(np.stack([np.minimum(left, right)[close], np.maximum(left, right)[close]], axis=1))
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(found).astype(np.int64), axis=0)


def all_pairs_within(hashes: np.ndarray, max_hamming: int, block: int = 2048) -> np.ndarray:
    """Baseline: compare every pair (quadratic). Shape (m, 2), i < j."""
    hashes = np.asarray(hashes, dtype=np.int64)
    found = []
    for start in range(0, len(hashes), block):
        rows = hashes[start:start + block]
        dist = hamming(rows[:, None], hashes[None, :])
        i, j = np.nonzero(dist <= max_hamming)
        i = i + start
        keep = i < j
        found.append(np.stack([i[keep], j[keep]], axis=1))
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(found).astype(np.int64), axis=0)
