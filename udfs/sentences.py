"""Sentence path, the per-row steps: split paragraphs, normalise, and the paper's quality rules.

Each rule is a small function with one job; `first_quality_reason` applies them cheapest first and
names the first that fails (rows are never deleted: a sentence keeps its first drop reason).

Splitter: pysbd (rule-based, pure Python, "Golden Rules" tested on abbreviations, decimals,
initials, quotes). It installs from PyPI with no data download (NLTK's Punkt needs one) and no
native library (blingfire's wheel carries prebuilt binaries, unmaintained since 2021; spaCy's
parser-based splitter costs a neural parse of every paragraph), so it runs the same on a laptop,
an ARM EMR node and Databricks. Its cost grows faster than linearly with input length, so long lines
are first cut into windows at a sentence-final punctuation mark (`max_chunk_chars`).

The corpus-level steps (unigram counts, entropy, perplexity) live in the stage and in
udfs/perplexity.py; this module only turns text into rows and flags.
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence

import pandas as pd

from udfs.ids import normalise_text, stable_id

# --- drop reasons (the `drop_reason` column; first failing rule wins) -------------------------
EMOJI = "emoji"
URL = "url"
TOO_FEW_WORDS = "too_few_words"
TOO_MANY_WORDS = "too_many_words"
NO_ACTION = "no_relation_or_action"  # CAT rule: complexity >= C1 and an action
LOW_ENTROPY = "low_entropy"
LOW_PERPLEXITY = "low_perplexity"
HIGH_PERPLEXITY = "high_perplexity"
# Which paper filter each reason belongs to (the funnel: quality -> semantics -> redundancy).
QUALITY_REASONS = (EMOJI, URL, TOO_FEW_WORDS, TOO_MANY_WORDS, NO_ACTION)
SEMANTIC_REASONS = (LOW_ENTROPY, LOW_PERPLEXITY, HIGH_PERPLEXITY)

SPLIT_SCHEMA = "doc_id string, position int, sent_index int, sentence_id string, text string, batch_id string"
QUALITY_SCHEMA = (
    "sentence_id string, word_count int, has_emoji boolean, has_url boolean, n_relations int, "
    "has_action boolean, words array<string>, drop_reason string"
)


def sentence_id(text: str) -> str:
    """Key of a sentence: the hash of its normalised text, so exact duplicates are one row."""
    return stable_id("sentence", text)


# --- normalisation ----------------------------------------------------------------------------

def _is_invisible(ch: str) -> bool:
    # Format characters (zero-width space/joiner, soft hyphen, BOM, bidi marks) change the hash
    # without changing what a reader sees.
    return unicodedata.category(ch) == "Cf"


def normalise_sentence(text: str) -> str:
    """Mojibake repaired (ftfy), invisible characters removed, NFKC, whitespace collapsed."""
    import ftfy

    text = ftfy.fix_text(text, normalization="NFC")
    text = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text if not _is_invisible(ch))
    return normalise_text(text)


# --- splitting --------------------------------------------------------------------------------

# Markdown / web list and heading markers at the start of a line are layout, not words.
_LINE_MARKER = re.compile(r"^\s*(?:[-*+•·▪►‣◦]|\d{1,3}[.)]|#{1,6})\s+")
_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*\s")

_segmenter = None


def _segment(text: str) -> list[str]:
    global _segmenter
    if _segmenter is None:
        import pysbd

        _segmenter = pysbd.Segmenter(language="en", clean=False)
    return _segmenter.segment(text)


def _windows(line: str, max_chars: int) -> Iterator[str]:
    """Cut a long line at the last sentence end (else space) before max_chars: pysbd is
    superlinear in input length (a 100 kB paragraph takes tens of seconds in one piece)."""
    while len(line) > max_chars:
        head = line[:max_chars]
        ends = list(_SENTENCE_END.finditer(head))
        cut = ends[-1].end() if ends else head.rfind(" ") + 1 or max_chars
        yield line[:cut]
        line = line[cut:]
    yield line


def split_sentences(paragraph: str | None, max_chunk_chars: int = 2000) -> list[str]:
    """A paragraph -> its sentences, raw (not normalised). Lines are split first: in web text a
    line break ends a list item, a heading or a caption even without a full stop."""
    if not paragraph:
        return []
    out = []
    for line in paragraph.splitlines():
        line = _LINE_MARKER.sub("", line).strip()
        for window in _windows(line, max_chunk_chars) if line else ():
            out.extend(s.strip() for s in _segment(window) if s.strip())
    return out


# --- rules ------------------------------------------------------------------------------------

_URL_TAIL = r"\S*[^\s.,;:!?)\]\"'”’]"  # a URL does not end with the sentence's punctuation
_URL = re.compile(
    rf"(?:\b[a-z][a-z0-9+.-]*://{_URL_TAIL})"  # scheme://...
    rf"|(?:\bwww\d?\.{_URL_TAIL})"
    # bare host names with a common lower-case TLD ("BlackFriday.com", "example.org/path"); a
    # capital after the dot is a missing space between sentences ("the sides.In the end")
    r"|(?:\b[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*"
    r"\.(?-i:com|org|net|edu|gov|io|co|uk|de|fr|ru|info|biz|ca|au|tv|ly|cn|jp|nl|eu|app|dev|ml)"
    r"(?:/\S*)?\b)"
    r"|(?:\b[\w.+-]+@[\w-]+\.[\w.-]+\b)",  # e-mail addresses are links too
    re.IGNORECASE,
)


def _is_emoji_match(seq: str) -> bool:
    """Pictographs, flags, keycaps and ZWJ sequences count; text-style symbols that the emoji
    list also holds (©, ®, ‼, ↔: Emoji_Presentation=No, no U+FE0F) are ordinary typography."""
    if len(seq) > 1:
        return True
    cp = ord(seq)
    return not (cp < 0x2300 or seq in "©®")


def has_emoji(text: str) -> bool:
    import emoji

    return any(_is_emoji_match(m["emoji"]) for m in emoji.emoji_list(text))


def has_url(text: str) -> bool:
    return _URL.search(text) is not None


_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?])")


def strip_emoji_url(text: str) -> str:
    """The "strip instead of drop" option: remove emoji and URLs, keep the rest of the sentence."""
    import emoji

    text = _URL.sub(" ", text)
    text = emoji.replace_emoji(text, replace=lambda e, _data: " " if _is_emoji_match(e) else e)
    return _SPACE_BEFORE_PUNCT.sub(r"\1", normalise_text(text))


_WORD = re.compile(r"\d+(?:[.,:]\d+)+|[^\W_]+(?:['’-][^\W_]+)*")


def words(text: str) -> list[str]:
    """Lower-cased word tokens: the one definition of "word" for the word-count rule, the
    unigram table and the entropy (punctuation and symbols are not words)."""
    return [w.lower() for w in _WORD.findall(text)]


def word_count_reason(n_words: int, min_words: int, max_words: int) -> str | None:
    if n_words < min_words:
        return TOO_FEW_WORDS
    if n_words > max_words:
        return TOO_MANY_WORDS
    return None


# A noun-relation edge: a nominal attached to a verb / preposition as one of its arguments
# (subject, object, prepositional object, ...). spaCy (ClearNLP) and Universal Dependencies names.
RELATION_DEPS = frozenset({
    "nsubj", "nsubjpass", "nsubj:pass", "csubj", "dobj", "obj", "iobj", "dative", "pobj",
    "attr", "agent", "oprd", "obl",
})
NOMINAL_POS = frozenset({"NOUN", "PROPN", "PRON"})


def count_relations(tokens: Sequence[tuple[str, str]]) -> int:
    """Complexity in the CAT sense (Radenovic et al. 2023): the number of relation edges, here a
    nominal token (POS) attached by an argument dependency. `tokens` is [(pos, dep), ...]."""
    return sum(1 for pos, dep in tokens if pos in NOMINAL_POS and dep in RELATION_DEPS)


def has_action(tokens: Sequence[tuple[str, str]]) -> bool:
    """An action: a main verb (auxiliaries such as "is" or "has" describe, they do not act)."""
    return any(pos == "VERB" for pos, _dep in tokens)


def relation_action_reason(tokens: Sequence[tuple[str, str]], min_relations: int) -> str | None:
    if count_relations(tokens) < min_relations or not has_action(tokens):
        return NO_ACTION
    return None


# --- batch functions (mapInPandas) ------------------------------------------------------------

def make_split_fn(emoji_url: str, max_chunk_chars: int) -> Callable[[Iterable[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """doc_texts rows (doc_id, position, text, batch_id) -> one row per sentence occurrence.

    The key is computed here, after normalisation (and after stripping in "strip" mode), so one
    sentence seen on many pages gets one id. Sentences that normalise to nothing yield no row.
    """
    strip = emoji_url == "strip"

    def split(batches: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            rows = []
            for doc_id, position, text, batch_id in zip(pdf["doc_id"], pdf["position"], pdf["text"], pdf["batch_id"]):
                index = 0
                for raw in split_sentences(text, max_chunk_chars):
                    clean = normalise_sentence(raw)
                    if strip:
                        clean = strip_emoji_url(clean)
                    if clean:
                        rows.append((doc_id, int(position), index, sentence_id(clean), clean, batch_id))
                        index += 1
            yield pd.DataFrame(rows, columns=["doc_id", "position", "sent_index", "sentence_id", "text", "batch_id"])

    return split


def make_quality_fn(min_words: int, max_words: int, require_action: bool, min_relations: int,
                    parse: Callable[[list[str]], list[list[tuple[str, str]]]] | None
                    ) -> Callable[[Iterable[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """(sentence_id, text) -> flags, word list and the first failing quality rule.

    Cheap rules first; only sentences that pass them are parsed. `parse` maps texts to
    [(pos, dep), ...] per text (realsyn_models.pos); it is required when require_action is set.
    """
    if require_action and parse is None:
        raise ValueError("require_action needs a part-of-speech / dependency parser")

    def quality(batches: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            if pdf.empty:  # an empty `words` column would not convert to array<string> (fuzzing found it)
                continue
            texts = pdf["text"].tolist()
            toks = [words(t) for t in texts]
            emo = [has_emoji(t) for t in texts]
            url = [has_url(t) for t in texts]
            reasons = [
                EMOJI if e else URL if u else word_count_reason(len(w), min_words, max_words)
                for e, u, w in zip(emo, url, toks)
            ]
            n_rel: list[int | None] = [None] * len(texts)
            action: list[bool | None] = [None] * len(texts)
            todo = [i for i, r in enumerate(reasons) if r is None]
            if require_action and todo:
                for i, parsed in zip(todo, parse([texts[i] for i in todo])):
                    n_rel[i], action[i] = count_relations(parsed), has_action(parsed)
                    reasons[i] = relation_action_reason(parsed, min_relations)
            yield pd.DataFrame({
                "sentence_id": pdf["sentence_id"],
                "word_count": pd.array([len(w) for w in toks], dtype="Int32"),
                "has_emoji": emo, "has_url": url,
                "n_relations": pd.array(n_rel, dtype="Int32"),
                "has_action": pd.array(action, dtype="boolean"),
                "words": toks, "drop_reason": reasons,
            })

    return quality
