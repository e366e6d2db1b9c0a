"""Decode + quality rules, pHash and LSH bands, semantic pairs: pure functions, no Spark."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_paths import SHARED_DATA, TEST_DATA, requires_shared
from image_fixtures import DISTINCT_PHOTOS, PACKAGES, RECIPE_PIX, bad_images, variants
from udfs.image_quality import QualityRules, check_image, make_quality_fn
from udfs.phash import all_pairs_within, band_layout, band_masks, hamming, near_duplicate_pairs
from udfs.semantic_dedup import GROUP_KEYS, MEMBER, QUERY, make_grouped_edges_fn, range_pairs, similar_pairs

RULES = QualityRules()
T = 6  # the default image_dedup.phash_max_hamming


@pytest.mark.parametrize("reason, data", bad_images().items())
def test_every_bad_kind_lands_with_its_reason(reason, data):
    assert check_image(data, RULES).drop_reason == reason


def test_missing_bytes():
    assert check_image(None, RULES).drop_reason == "no_bytes"


def _assert_real_photos_pass(photos):
    assert photos
    for path in photos:
        v = check_image(path.read_bytes(), RULES)
        assert v.drop_reason is None, (path, v)
        assert v.width >= 100 and v.height >= 100 and v.format in RULES.formats and v.phash is not None


def test_real_photos_pass_with_dimensions_and_a_hash():
    _assert_real_photos_pass(sorted(RECIPE_PIX.glob("*.webp")) + DISTINCT_PHOTOS)


@requires_shared
def test_real_photos_pass_at_full_size():
    """The larger set: 40 recipe photos at their original sizes (up to 4624 px)."""
    _assert_real_photos_pass(sorted((SHARED_DATA / "recipes" / "static" / "pix").glob("*.webp"))[:40])


def test_thresholds_come_from_the_rules():
    cat_small = bad_images()["too_small"]  # 80 x 60
    assert check_image(cat_small, QualityRules(min_side=50)).drop_reason is None
    wide = bad_images()["aspect_ratio"]  # 4:1
    assert check_image(wide, QualityRules(max_aspect=5.0)).drop_reason is None
    assert check_image(wide, QualityRules(max_pixels=1000)).drop_reason == "decompression_bomb"
    gif = bad_images()["animated"]
    assert check_image(gif, QualityRules(drop_animated=False)).drop_reason is None


def test_rules_run_in_order_first_failure_wins():
    # A 60000x60000 canvas is also "too big" before it is anything else; an ICO that is tiny is
    # a format problem first.
    assert check_image(bad_images()["decompression_bomb"], QualityRules(min_side=10**6)).drop_reason \
        == "decompression_bomb"


def test_quality_fn_batches():
    pdf = pd.DataFrame({"image_id": ["a", "b"], "bytes": [DISTINCT_PHOTOS[0].read_bytes(), b"junk"]})
    out = pd.concat(make_quality_fn(min_side=100, formats=["WEBP"])(iter([pdf])))
    assert list(out["drop_reason"]) == [None, "undecodable"]
    with Image.open(DISTINCT_PHOTOS[0]) as photo:
        assert out["width"].iloc[0] == photo.width and pd.isna(out["width"].iloc[1])


# --- pHash ------------------------------------------------------------------------------------

def _hash(data: bytes) -> int:
    return check_image(data, RULES).phash


@pytest.mark.parametrize("path", DISTINCT_PHOTOS[::3])
def test_resized_and_reencoded_copies_are_within_t(path):
    base = _hash(path.read_bytes())
    for name, data in variants(path).items():
        assert hamming(base, _hash(data)) <= T, name


def _assert_far_apart(paths):
    hashes = [_hash(p.read_bytes()) for p in paths]
    for (pa, a), (pb, b) in itertools.combinations(zip(paths, hashes), 2):
        assert hamming(a, b) > T, (pa.name, pb.name)


def test_different_photos_are_far_apart():
    _assert_far_apart(sorted(set(DISTINCT_PHOTOS) | set(PACKAGES.glob("*.jpg"))))


@requires_shared
def test_different_photos_are_far_apart_full_size():
    """The larger set: the same kinds of photos at their original sizes, and more of them."""
    shared = [SHARED_DATA / p.relative_to(TEST_DATA) for p in DISTINCT_PHOTOS]  # same layout, originals
    _assert_far_apart(sorted(set(shared) | set((SHARED_DATA / "images" / "packages").glob("*.jpg"))))


def test_hash_is_a_signed_int64():
    hashes = [_hash(p.read_bytes()) for p in DISTINCT_PHOTOS]
    assert all(-(1 << 63) <= h < (1 << 63) for h in hashes)
    assert any(h < 0 for h in hashes)  # the top bit is used


def test_band_layout_covers_64_bits():
    for n in (1, 3, 7, 64):
        layout = band_layout(n)
        assert sum(w for _, w in layout) == 64 and layout[0][0] == 0
        assert all(s2 == s1 + w1 for (s1, w1), (s2, _) in zip(layout, layout[1:]))


@pytest.mark.parametrize("n_bands", [T + 1, T + 2, T + 3])
def test_pigeonhole_pairs_within_t_share_a_key(n_bands):
    rng = np.random.default_rng(n_bands)
    base = rng.integers(-(2**63), 2**63 - 1, size=2000, dtype=np.int64)
    masks = [np.uint64(sum(1 << int(b) for b in rng.choice(64, size=rng.integers(0, T + 1), replace=False)))
             for _ in base]
    near = (base.view(np.uint64) ^ np.array(masks, dtype=np.uint64)).view(np.int64)
    assert (hamming(base, near) <= T).all()
    shared = np.zeros(len(base), dtype=bool)
    for m in band_masks(T, n_bands):
        shared |= (base & np.int64(m)) == (near & np.int64(m))
    assert shared.all()
    assert len(band_masks(T, n_bands)) == math.comb(n_bands, n_bands - T)


@pytest.mark.parametrize("n_bands", [T + 1, T + 2, T + 3])
def test_lsh_pairs_equal_all_pairs(n_bands):
    rng = np.random.default_rng(1)
    hashes = rng.integers(-(2**63), 2**63 - 1, size=3000, dtype=np.int64)
    # Planted near-duplicates at distances 0..8 (some beyond t on purpose).
    for i in range(0, 600, 2):
        bits = rng.choice(64, size=(i // 2) % 9, replace=False)
        mask = np.uint64(sum(1 << int(b) for b in bits))
        hashes[i + 1] = (hashes[i].view(np.uint64) ^ mask).view(np.int64)
    assert np.array_equal(near_duplicate_pairs(hashes, T, n_bands), all_pairs_within(hashes, T))


def test_too_few_bands_is_refused():
    with pytest.raises(ValueError):
        band_masks(T, T)


# --- semantic pairs ---------------------------------------------------------------------------

def test_similar_pairs_threshold_and_order():
    v = np.array([[1, 0, 0], [0.99, 0.1, 0], [0, 1, 0], [0, 0.999, 0.04], [0, 0, 1]], dtype=np.float32)
    ids = np.array(["e", "d", "c", "b", "a"], dtype=object)
    pairs = similar_pairs(ids, v, 0.98)
    assert sorted(zip(pairs["src"], pairs["dst"])) == [("b", "c"), ("d", "e")]
    assert (pairs["cosine"] >= 0.98).all()
    assert similar_pairs(ids, v, 0.9999).empty
    assert list(similar_pairs(ids, v, 0.9999).columns) == ["src", "dst", "cosine"]


def test_range_pairs_equal_all_pairs_however_chunked():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(300, 16)).astype(np.float32)
    v = np.concatenate([base, base[:60] + 0.02 * rng.normal(size=(60, 16)).astype(np.float32)])
    ids = np.array([f"i{i:04d}" for i in range(len(v))], dtype=object)
    ref = {(s, d) for s, d in zip(*similar_pairs(ids, v, 0.98)[["src", "dst"]].to_numpy().T)}
    # brute-force reference: every pair at or above the threshold
    x = v / np.linalg.norm(v, axis=1, keepdims=True)
    i, j = np.nonzero(np.triu(x @ x.T >= 0.98, k=1))
    assert ref == set(zip(ids[i], ids[j])) and len(ref) >= 60
    # old survivors (the first 200) are never paired with each other; the new ones meet everyone
    new = np.arange(len(v)) >= 200
    fn = make_grouped_edges_fn(0.98)
    rows = []
    for q in range(2):  # two query chunks x three member chunks
        qsel = np.flatnonzero(new)[q::2]
        for c in range(3):
            msel = np.arange(len(v))[c::3]
            rows += [(0, q, c, QUERY, ids[k], v[k], True) for k in qsel]
            rows += [(0, q, c, MEMBER, ids[k], v[k], bool(new[k])) for k in msel]
    pdf = pd.DataFrame(rows, columns=[*GROUP_KEYS, "side", "id", "vector", "is_new"])
    out = pd.concat(list(fn(iter([pdf.iloc[:500], pdf.iloc[500:]]))))
    got = list(zip(out["src"], out["dst"]))
    assert len(got) == len(set(got))  # each pair once
    old = set(ids[~new])
    assert set(got) == {(s, d) for s, d in ref if not (s in old and d in old)}
    assert range_pairs(ids[:0], v[:0], ids, v, 0.5).empty
