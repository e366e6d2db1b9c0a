"""Perplexity of sentences under a causal LM, as a mapInPandas function (GPU when Spark gives one).

The model is loaded once per Python worker (realsyn_models.causal_lm via realsyn_models.cache) on
the task's GPU, or on CPU where there is none; batches stream through it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import pandas as pd

PERPLEXITY_SCHEMA = "sentence_id string, perplexity double"


def make_perplexity_fn(model: str, batch_size: int, max_tokens: int, precision: str,
                       device: str | None = None) -> Callable[[Iterable[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """(sentence_id, text) -> (sentence_id, perplexity); NaN perplexity for text with no tokens."""

    def score(batches: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from realsyn_models.causal_lm import load_scorer

        scorer = load_scorer(model, batch_size=batch_size, max_tokens=max_tokens, precision=precision, device=device)
        for pdf in batches:
            ppl = scorer.perplexity(pdf["text"].fillna("").tolist())
            yield pd.DataFrame({"sentence_id": pdf["sentence_id"], "perplexity": ppl})

    return score
