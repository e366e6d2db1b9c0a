"""Synthetic texts (LLM fusion, RealSyn §3.2) as a mapInPandas function, and the judge of each output.

Every input row gives exactly one output row, kept or not: a bad generation is recorded with its
`drop_reason` instead of vanishing, so the table says how often the model refused, echoed the
prompt or copied the sentence, per prompt version (`prompt_hash`), and a later run with a better
prompt or model can be compared row for row. The backend (realsyn_models.llm) is built inside the
function, on the worker, so the model or HTTP client never travels through Spark's closure pickling.

The judge is cheap and conservative: string rules only, no model and no new dependency. Its checks
run in a fixed order and the first that fires is the reason (see `judge`).
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence

import pandas as pd

from realsyn_models.llm import SLOTS, Backend, Generation, PromptTemplate, failed

SYNTHETIC_SCHEMA = (
    "image_id string, source_sentence_id string, text string, model_id string, prompt_version string, "
    "prompt_hash string, tokens_in int, tokens_out int, finish_reason string, error string, drop_reason string"
)
COLUMNS = [c.split()[0] for c in SYNTHETIC_SCHEMA.split(", ")]

# In the order judge() tries them: the first that fires is the row's reason.
BAD_REASONS = (
    "error",             # the backend failed: there is no output to judge
    "empty",             # nothing left after cleaning
    "refusal",           # the model declined; more tokens or another sentence would not help
    "prompt_leak",       # the model echoed the instruction or its labels
    "copy_of_sentence",  # no fusion happened: the sentence came back (nearly) unchanged
    "not_english",       # an English sentence answered in another language
    "truncated",         # otherwise plausible text cut off at max_new_tokens
    "too_long",          # finished, but longer than max_chars
)

# Lead-ins chat models put before the answer; removed by clean(), never judged.
_LEAD_INS = re.compile(
    r"^(?:(?:sure|certainly|of course|okay|ok)\b[,.!]?\s*)?"
    r"(?:(?:here(?:'s|’s| is)|below is)\b[^:\n]{0,60}:|"
    r"(?:the\s+)?(?:synthetic|fused|rewritten|combined|final)\s+(?:text|description|sentence)s?\s*:|"
    r"(?:output|answer|result|response)\s*:)\s*",
    re.IGNORECASE)
_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’", "«": "»", "`": "`"}

_REFUSALS = re.compile(
    r"\bas an ai\b|\bas a language model\b|\bi apologi[sz]e\b|"
    r"\bi(?: am|'m|’m) (?:sorry|unable|not able)\b|\bi (?:cannot|can ?not|can't|can’t|won't|won’t)\b",
    re.IGNORECASE)
# Shared run of this many words between output and the template's own wording = a prompt leak.
LEAK_NGRAM = 6
_LABEL = re.compile(r"([A-Za-z][A-Za-z ]{0,30}?)\s*(?:\([^)]*\))?\s*:\s*\{(?:" + "|".join(SLOTS) + r")\}")
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")

_EN_STOP = frozenset(
    "a an the and or but of to in on at for with from by as is are was were be been being it its this that "
    "these those there their they he she his her we our you your i not no into over under after before "
    "while during near next beside behind has have had will can".split())
# Frequent function words of the languages an LLM most often drifts into; words also common in
# English ("a", "in", "is", "as", "die", "on") are left out.
_FOREIGN_STOP = frozenset(
    # German
    "der das und ein eine einer einem einen ist auf mit von zu den dem nicht sich auch im des wird "
    # French
    "le la les et un une des du est dans pour avec sur au aux ce qui que pas sont "
    # Spanish, Portuguese, Italian
    "el los las y del en con por para es una su al lo il gli di della che per sono um uma em não da "
    # Dutch
    "het een en van op met voor niet zijn".split())


def clean(text: str | None) -> str:
    """The answer without the wrapping chat models add: surrounding whitespace and quotes, a lead-in
    such as "Here is the synthetic text:"; inner whitespace (newlines) collapsed to single spaces."""
    out = " ".join((text or "").split())
    while True:
        before = out
        out = _LEAD_INS.sub("", out, count=1).strip()
        if len(out) >= 2 and _QUOTES.get(out[0]) == out[-1]:
            out = out[1:-1].strip()
        if out == before:
            return out


def judge(text: str | None, finish_reason: str, sentence: str, template: PromptTemplate,
          max_chars: int = 600) -> str | None:
    """Why this generation must not be used (one of BAD_REASONS), or None when it is good.

    Checks run in BAD_REASONS order, most informative first: an error or empty output has nothing
    else to judge; a refusal, an echoed prompt or a copied sentence says what went wrong even when
    the text was also cut off or too long; not_english needs an English source sentence; truncated
    and too_long only describe length, which is the least specific failure.
    """
    if finish_reason == "error":
        return "error"
    text = clean(text)
    if not text:
        return "empty"
    if _REFUSALS.search(text) and not _REFUSALS.search(sentence or ""):
        return "refusal"
    if _leaks_prompt(text, template):
        return "prompt_leak"
    if _copies(text, sentence or ""):
        return "copy_of_sentence"
    if _looks_english(sentence or "") and not _looks_english(text, lenient=True):
        return "not_english"
    if finish_reason == "length":
        return "truncated"
    if len(text) > max_chars:
        return "too_long"
    return None


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def _leaks_prompt(text: str, template: PromptTemplate) -> bool:
    labels = set(SLOTS) | {m.strip().lower() for m in _LABEL.findall(template.user)}
    head = text.lstrip("#*- ").lower()
    if any(head.startswith(label + ":") or head.startswith(label + " (") for label in labels):
        return True
    if any("{" + slot + "}" in text for slot in SLOTS):
        return True
    # The template's own words only: slots are cut out, so text from the sentence is never a leak.
    fixed = [_words(part) for part in re.split(r"\{\w+\}", template.system + "\n" + template.user)]
    grams = {tuple(ws[k:k + LEAK_NGRAM]) for ws in fixed for k in range(len(ws) - LEAK_NGRAM + 1)}
    words = _words(text)
    return any(tuple(words[k:k + LEAK_NGRAM]) in grams for k in range(len(words) - LEAK_NGRAM + 1))


def _copies(text: str, sentence: str) -> bool:
    a, b = _words(text), _words(sentence)
    if not a or not b:
        return False
    if a == b:
        return True
    sa, sb = set(a), set(b)
    if len(sa & sb) / len(sa | sb) >= 0.9:
        return True
    return difflib.SequenceMatcher(None, " ".join(a), " ".join(b), autojunk=False).ratio() >= 0.95


def _looks_english(text: str, lenient: bool = False) -> bool:
    """Mostly ASCII letters, and more English than foreign function words. Strict (a source
    sentence): at least one English function word is required; lenient (an output): a text with
    neither kind (a terse phrase) passes."""
    letters = [c for c in text if c.isalpha()]
    if not letters or sum(c.isascii() for c in letters) / len(letters) < 0.8:
        return False
    words = _words(text)
    english = sum(w in _EN_STOP for w in words)
    foreign = sum(w in _FOREIGN_STOP for w in words)
    return english >= foreign if lenient else english > foreign


def make_generate_fn(backend_factory: Callable[[], Backend], template: PromptTemplate, batch_size: int,
                     max_chars: int) -> Callable[[Iterable[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """(image_id, source_sentence_id, sentence, caption, tags) -> SYNTHETIC_SCHEMA rows, one per input
    row, in order. Prompts go to the backend `batch_size` at a time; an exception from the backend
    turns that batch into error rows carrying its text, and the next batch is tried. A backend that
    batches continuously itself (`whole_partition`: vLLM) gets every prompt of the partition in one
    call instead: its scheduler keeps the GPU full only when it sees them all."""

    def generate(batches: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        backend = backend_factory()
        try:
            if getattr(backend, "whole_partition", False):
                frames = list(batches)
                if frames:
                    pdf = pd.concat(frames, ignore_index=True)
                    yield _generate_frame(backend, pdf, template, max(1, len(pdf)), max_chars)
                return
            for pdf in batches:
                yield _generate_frame(backend, pdf, template, batch_size, max_chars)
        finally:
            backend.close()

    return generate


def _generate_frame(backend: Backend, pdf: pd.DataFrame, template: PromptTemplate, batch_size: int,
                    max_chars: int) -> pd.DataFrame:
    sentences = [s if isinstance(s, str) else "" for s in pdf["sentence"]]
    prompts = [template.messages(s, c if isinstance(c, str) else None, _tags(t))
               for s, c, t in zip(sentences, pdf["caption"], pdf["tags"])]
    gens: list[Generation] = []
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo: lo + batch_size]
        try:
            got = backend.generate(chunk)
            if len(got) != len(chunk):
                raise RuntimeError(f"backend returned {len(got)} generations for {len(chunk)} prompts")
        except Exception as exc:
            got = [failed(f"{type(exc).__name__}: {exc}") for _ in chunk]
        gens.extend(got)
    texts = [clean(g.text) if g.finish_reason != "error" else None for g in gens]  # null: nothing came back
    return pd.DataFrame({
        "image_id": pdf["image_id"].to_numpy(),
        "source_sentence_id": pdf["source_sentence_id"].to_numpy(),
        "text": texts,
        "model_id": backend.model_id,
        "prompt_version": template.version,
        "prompt_hash": template.hash,
        "tokens_in": pd.Series([g.tokens_in for g in gens], dtype="Int32"),
        "tokens_out": pd.Series([g.tokens_out for g in gens], dtype="Int32"),
        "finish_reason": [g.finish_reason for g in gens],
        "error": [g.error for g in gens],
        "drop_reason": [judge(t, g.finish_reason, s, template, max_chars) for t, g, s in zip(texts, gens, sentences)],
    }, columns=COLUMNS)


def _tags(value: object) -> Sequence[str] | None:
    """Spark hands array columns to pandas as numpy arrays (or None)."""
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return None
    return [str(t) for t in value]  # type: ignore[union-attr]
