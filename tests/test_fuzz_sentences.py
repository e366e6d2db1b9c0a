"""Property-based fuzzing of the sentence path (udfs/sentences.py, hypothesis): random unicode text
(controls, C1, format characters, combining marks, emoji and ZWJ sequences, ligatures that NFKC
expands, line and paragraph separators, URL and list-marker fragments) through the splitter,
normaliser and quality rules, and through both batch functions. Properties: nothing raises; every
sentence is non-empty, stripped, and keyed by its own text; the output frames convert to Arrow as
Spark's worker does it. Lone surrogates are left out: ingest refuses them (tests/test_fuzz_ingest.py),
and a Spark string cannot hold one. Budget: tests/conftest.py's profile (REALSYN_FUZZ_EXAMPLES)."""
from __future__ import annotations

import pandas as pd

from hypothesis import given
from hypothesis import strategies as st

import hostile_corpus as H  # noqa: E402
from udfs import sentences as S  # noqa: E402

PIECES = ["\x00", "\x0b", "\x1b", "\x7f", "\x85", "\u00a0", "\u200b", "\u200d", "\u2028", "\u2029", "\u202e",
          "\ufeff", "\ufffd", "\u0301", "ﬁ", "Ⅻ", "İ", "ß", "\U0001f373", "\U0001f468\u200d\U0001f373",
          "\U0001f1eb\U0001f1f7", "1\ufe0f\u20e3", "©", "...", "!?", "Mr.", "e.g.", "3.14", " - ", "* ", "1) ",
          "# ", "www.x.org", "https://x.example/a?b=c", "a@b.co", "\n", "\r\n", "\t", "  ", ". ", "â€™", "Ã©"]
chars = st.one_of(st.characters(exclude_categories=("Cs",)), st.characters(max_codepoint=127))
paragraph = st.lists(st.one_of(st.text(chars, max_size=12), st.sampled_from(PIECES),
                               st.just("The cook stirs the soup slowly.")), max_size=14).map("".join)


@given(paragraph, st.integers(100, 400))
def test_split_normalise_and_rules_never_raise(text, max_chunk):
    for raw in S.split_sentences(text, max_chunk):
        assert raw and raw == raw.strip()
        clean = S.normalise_sentence(raw)
        assert clean == clean.strip() and "\x00" not in clean
        S.has_emoji(clean), S.has_url(clean), S.words(clean)
        S.strip_emoji_url(clean)
        assert S.word_count_reason(len(S.words(clean)), 3, 81) in (None, S.TOO_FEW_WORDS, S.TOO_MANY_WORDS)


@given(st.lists(paragraph, min_size=1, max_size=4), st.sampled_from(["drop", "strip"]))
def test_batch_functions_convert_to_arrow(texts, emoji_url):
    pdf = pd.DataFrame({"doc_id": [f"d{i}" for i in range(len(texts))], "position": range(len(texts)),
                        "text": texts, "batch_id": ["b"] * len(texts)})
    split = pd.concat(list(S.make_split_fn(emoji_url, 200)(iter([pdf]))), ignore_index=True)
    H.to_arrow(split, S.SPLIT_SCHEMA)
    assert all(S.sentence_id(t) == i for t, i in zip(split["text"], split["sentence_id"]))
    assert all(t for t in split["text"])
    sentences = split[["sentence_id", "text"]].drop_duplicates("sentence_id")
    frames = list(S.make_quality_fn(3, 81, False, 1, None)(iter([sentences])))
    for frame in frames:
        H.to_arrow(frame, S.QUALITY_SCHEMA)
    assert sum(len(f) for f in frames) == len(sentences)
