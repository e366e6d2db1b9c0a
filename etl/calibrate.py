"""`realsyn calibrate perplexity | dedup`: the sentence filters' knobs set for the configured models.

`dedup` sets the semantic sentence dedup threshold for the dedup encoder the same way the offline
perplexity route does, by a target share of clean reference text: distinct human-written
sentences should almost never be merged, so the threshold is the cosine above which only
`--share` (default 2%) of the reference texts have a nearest neighbour. On the bundled COCO
captions with MiniLM that share is captions of one photo that differ by a comma or a word.

`perplexity`: a perplexity band for the configured language model.

The paper keeps sentences with 30 <= PPL <= 200 under GPT-2 large, a band its annotators chose for
that model. Another model scores on another scale (SmolLM2-135M: median about 100, 90th percentile
about 380 on clean captions), so the band is set per model, by one of two routes:

- `reference`: where the reference model (GPT-2 large) can be loaded from the local cache, both
  models score the same clean reference texts; the band is the configured model's quantiles at the
  positions the paper's 30 and 200 take in the reference's scores (quantile matching);
- `shares` (offline, the default when the reference is not cached): the band keeps all but a target
  share of clean reference text at each end: `--low-share` (default 1%) below, `--high-share`
  (default 2%) above, so about 3% of clean text is dropped by perplexity.

The command says which route it took and why, prints the band and the share of the reference text
it keeps, writes it as a profile fragment, and records it in `runs` (stage `calibrate_perplexity`).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

PAPER_BAND = (30.0, 200.0)
REFERENCE_MODEL = "gpt2-large"
DEFAULT_REFERENCE_TEXTS = Path(__file__).resolve().parent.parent / "tests" / "data" / "captions" / "captions.jsonl"
LOW_SHARE, HIGH_SHARE = 0.01, 0.02
DEDUP_SHARE = 0.02


@dataclass(frozen=True)
class Band:
    low: float
    high: float
    route: str  # "reference" or "shares"
    why: str  # why this route
    kept_share: float  # share of the reference texts inside the band
    n_texts: int

    def source(self, model: str, texts: str) -> str:
        return (f"calibrated ({self.route}: {self.why}) on {self.n_texts} texts of {texts}; keeps "
                f"{self.kept_share:.1%} of them; `realsyn calibrate perplexity` for {model}")


def reference_texts(path: str | Path) -> list[str]:
    """Clean reference text: jsonl with a `captions` list or a `text` field per line, or plain text
    with one sentence per line."""
    texts: list[str] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            texts.append(line.strip())
            continue
        if isinstance(obj, dict):
            texts += [t for t in obj.get("captions", []) if isinstance(t, str)]
            if isinstance(obj.get("text"), str):
                texts.append(obj["text"])
    return texts


def band_by_shares(scores: np.ndarray, low_share: float, high_share: float) -> tuple[float, float]:
    finite = scores[np.isfinite(scores)]
    low, high = np.quantile(finite, [low_share, 1.0 - high_share])
    return float(low), float(high)


def band_by_reference(scores: np.ndarray, reference: np.ndarray,
                      paper_band: tuple[float, float] = PAPER_BAND) -> tuple[float, float]:
    """The configured model's quantiles where the paper's band sits in the reference's scores."""
    ok = np.isfinite(scores) & np.isfinite(reference)
    q_low = float(np.mean(reference[ok] < paper_band[0]))
    q_high = float(np.mean(reference[ok] <= paper_band[1]))
    low, high = np.quantile(scores[ok], [q_low, q_high])
    return float(low), float(high)


def reference_available(model: str) -> str | None:
    """None when `model` can be loaded without the network; else why not."""
    if Path(model).exists():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return "huggingface_hub is not installed"
    cached = try_to_load_from_cache(model, "config.json")
    return None if isinstance(cached, str) else f"{model} is not in the local model cache (offline)"


def calibrate(texts: list[str], score: Callable[[str, list[str]], np.ndarray], model: str, *,
              reference: str | None = REFERENCE_MODEL, low_share: float = LOW_SHARE,
              high_share: float = HIGH_SHARE) -> Band:
    """The band for `model` from `score(model, texts)` (perplexities), by the reference route when
    the reference model loads, else by target shares."""
    if not texts:
        raise ValueError("no reference texts to calibrate on")
    scores = np.asarray(score(model, texts), dtype=np.float64)
    missing = reference_available(reference) if reference else "no reference model given"
    if missing is None:
        low, high = band_by_reference(scores, np.asarray(score(reference, texts), dtype=np.float64))
        route, why = "reference", f"quantiles of {reference}'s {PAPER_BAND[0]:g}-{PAPER_BAND[1]:g}"
    else:
        low, high = band_by_shares(scores, low_share, high_share)
        route, why = "shares", f"{missing}; {low_share:.0%} low and {high_share:.0%} high share of clean text"
    kept = float(np.mean((scores >= low) & (scores <= high)))
    return Band(low=round(low, 2), high=round(high, 2), route=route, why=why, kept_share=kept, n_texts=len(texts))


def profile_fragment(model_key: str, band: Band, source: str) -> str:
    """The YAML to lay into a profile's `models:` section."""
    return yaml.safe_dump({"models": {model_key: {"min_perplexity": band.low, "max_perplexity": band.high,
                                                  "band_source": source}}}, sort_keys=False, width=200)


@dataclass(frozen=True)
class Threshold:
    value: float
    share: float  # share of the reference texts with a neighbour at or above it
    n_texts: int

    def source(self, model: str, texts: str) -> str:
        return (f"calibrated (shares: {self.share:.1%} of {self.n_texts} distinct texts of {texts} have a "
                f"neighbour at or above it); `realsyn calibrate dedup` for {model}")


def threshold_by_share(vectors: np.ndarray, share: float = DEDUP_SHARE) -> Threshold:
    """The cosine threshold at which `share` of the (distinct, L2-normalised) texts have a nearest
    neighbour at or above it."""
    if len(vectors) < 2:
        raise ValueError("need at least two distinct reference texts")
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    nearest = sims.max(axis=1)
    # Rounded down: the share at or above the printed threshold is never under the target.
    value = math.floor(float(np.quantile(nearest, 1.0 - share)) * 1000) / 1000
    return Threshold(value=value, share=float(np.mean(nearest >= value)), n_texts=len(vectors))


def dedup_fragment(threshold: Threshold, source: str) -> str:
    return yaml.safe_dump({"semantic_dedup": {"sentences": {"threshold": threshold.value}}},
                          sort_keys=False, width=200) + f"# {source}\n"
