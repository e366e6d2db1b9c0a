"""Tag mining from the kept sentences: RealSyn §3.2 extends the RAM++ vocabulary with the concepts
the corpus itself talks about, so images get tags a fixed list has no word for.

A tag is a normalised noun chunk (spaCy's `doc.noun_chunks`): what the possessor, leading
determiners, pronouns, numbers and stop words leave ("my grandmother's apple pies" -> "apple pie",
"the same pot" -> "pot"), nouns lemmatised, lowercase, one to three alphabetic words ("half-ring"
is one). Chunks headed by a pronoun or a proper noun give none: names of people and places are not
object tags. `n` counts sentences, not mentions, so one sentence repeating a word cannot make it
frequent. Each task emits partial counts; Spark sums them and the stage keeps the frequent ones.

The parse uses realsyn_models.pos's loader with the lemmatizer kept (the sentence rule leaves it
out: it never reads lemmas), cached apart from the sentence rule's pipeline.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd

from realsyn_models import cache
from realsyn_models.pos import load_pipeline
from realsyn_models.tagger import Tagger, normalise_tag

MINED_SCHEMA = "tag string, n long"
MAX_WORDS = 3
FLUSH_AT = 100_000  # distinct tags a task holds before it emits a partial count
LEADING_DROP_POS = frozenset({"DET", "PRON", "NUM", "PUNCT", "SYM", "PART"})
WORD = re.compile(r"[^\W\d_]+(?:-[^\W\d_]+)*")  # letters, hyphen-joined parts allowed


def chunk_tag(chunk) -> str | None:
    """The tag a spaCy noun chunk gives, or None."""
    root = chunk.root
    if root.pos_ != "NOUN":
        return None
    tokens = list(chunk)
    possessives = [i for i, t in enumerate(tokens) if t.tag_ == "POS" and t.i < root.i]
    tokens = tokens[possessives[-1] + 1:] if possessives else tokens
    while tokens[0].i != root.i and (tokens[0].pos_ in LEADING_DROP_POS or tokens[0].is_stop):
        tokens.pop(0)
    text = "".join((t.lemma_ if t.pos_ == "NOUN" else t.text) + t.whitespace_ for t in tokens)
    tag = normalise_tag(text)
    words = tag.split()
    return tag if 0 < len(words) <= MAX_WORDS and all(WORD.fullmatch(w) for w in words) else None


def mine_noun_chunks(texts: list[str], nlp, batch_size: int = 256) -> Counter:
    """tag -> number of `texts` that mention it, parsed by `nlp` (tagger, parser and lemmatizer)."""
    counts: Counter = Counter()
    for doc in nlp.pipe((t if isinstance(t, str) else "" for t in texts), batch_size=batch_size):
        counts.update({tag for tag in map(chunk_tag, doc.noun_chunks) if tag})
    return counts


def load_mining_pipeline(names: tuple[str, ...]):
    """The worker's cached spaCy pipeline for mining: the first of `names` that is installed, with
    its lemmatizer (onions -> onion), which the sentence rules leave out."""
    return cache.get_or_load(("spacy+lemmatizer", names), lambda: load_pipeline(names, exclude=("ner",)))


def make_mine_fn(pos_model_candidates: Sequence[str], batch_size: int = 256, text_col: str = "text"):
    """(text) batches -> MINED_SCHEMA partial counts (a tag may appear in several; sum them)."""
    names = tuple(pos_model_candidates)

    def mine(batches: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        counts: Counter = Counter()
        for df in batches:
            if not len(df):
                continue
            counts.update(mine_noun_chunks(df[text_col].tolist(), load_mining_pipeline(names), batch_size))
            if len(counts) >= FLUSH_AT:
                yield _counts_frame(counts)
                counts = Counter()
        if counts:
            yield _counts_frame(counts)

    return mine


def _counts_frame(counts: Counter) -> pd.DataFrame:
    return pd.DataFrame({"tag": list(counts), "n": pd.array(list(counts.values()), dtype="int64")})


TAGS_SCHEMA = "image_id string, tags array<struct<tag:string,score:float>>, model_id string, vocab_version string"


def make_tag_fn(tagger: Tagger, id_col: str = "image_id", vector_col: str = "vector"):
    """(image_id, vector) batches -> TAGS_SCHEMA rows: the tagger's tags of each image, best first.
    The tagger travels with the function (it holds its vocabulary vectors, not a model)."""

    def tag_images(batches: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for df in batches:
            if not len(df):
                continue
            tags = tagger.tag(np.stack([np.asarray(v, dtype=np.float32) for v in df[vector_col]]))
            yield pd.DataFrame({
                id_col: df[id_col].to_numpy(),
                "tags": [[{"tag": t, "score": s} for t, s in row] for row in tags],
                "model_id": tagger.model_id,
                "vocab_version": tagger.vocab_version,
            })

    return tag_images
