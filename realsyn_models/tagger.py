"""Object tags for an image (RealSyn §3.2: RAM++ tags feed the LLM that writes the synthetic text).

RAM++ weights cannot be had offline, but the CLIP image vectors the pipeline already stores can be
scored against a tag vocabulary at almost no cost: the vocabulary is embedded once per worker and
every image is one matrix product. `Tagger` is the contract a stage codes against, so a real RAM++
model can replace the zero-shot tagger without touching the stage.

The vocabulary is the RAM++ tag list (data/tag_vocab.txt, see data/TAG_VOCAB_LICENSE.md) extended
by noun phrases mined from the kept sentences, as the paper extends it. `vocab_version` hashes the
exact vocabulary and prompt, so tags from different vocabularies are never mixed unknowingly.
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable
from importlib import resources
from typing import Protocol, runtime_checkable

import numpy as np

from realsyn_models.clip import ClipEncoder, is_random_init

DEFAULT_PROMPT = "a photo of a {tag}"
TEXT_BATCH = 256  # prompts per text forward: memory bounded whatever the vocabulary size


@runtime_checkable
class Tagger(Protocol):
    model_id: str
    vocab_version: str

    def tag(self, image_vectors: np.ndarray) -> list[list[tuple[str, float]]]:
        """(n, dim) L2-normalised image vectors -> per image, (tag, score) pairs, best first."""


class RandomInitEncoder(ValueError):
    """The encoder's weights are a random init: its tags would be noise."""


def normalise_tag(tag: str) -> str:
    """The one spelling of a tag: lowercase, whitespace collapsed."""
    return " ".join(tag.lower().split())


def load_vocab(extra_tags: Iterable[str] = ()) -> list[str]:
    """The shipped base tag list plus `extra_tags`, normalised, deduplicated, sorted."""
    base = resources.files("realsyn_models").joinpath("data", "tag_vocab.txt").read_text(encoding="utf-8")
    tags = (normalise_tag(t) for t in (*base.splitlines(), *extra_tags))
    return sorted({t for t in tags if t})


def vocab_version(vocab: Iterable[str], prompt: str) -> str:
    """Short content hash of the sorted, deduplicated vocabulary and the prompt."""
    payload = json.dumps([prompt, sorted(set(vocab))], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]


def check_encoder(encoder_model_id: str, force: bool) -> None:
    if is_random_init(encoder_model_id) and not force:
        raise RandomInitEncoder(f"{encoder_model_id} is a random init: zero-shot tags from it are noise "
                                "(force only to exercise the code path)")


def prompts(vocab: Iterable[str], prompt: str = DEFAULT_PROMPT) -> list[str]:
    """The texts to embed for a vocabulary, in the tagger's (sorted) order."""
    return [prompt.format(tag=t) for t in sorted(set(vocab))]


# (encoder model_id, vocab_version, prompt) -> (len(vocab), dim) unit vectors, shared by every
# tagger of a worker: a Spark task builds a tagger per partition, the vocabulary is embedded once.
_tag_vectors: dict[tuple[str, str, str], np.ndarray] = {}
_tag_vectors_lock = threading.Lock()


class ClipZeroShotTagger:
    """Tags = vocabulary entries whose prompt embedding has cosine >= `threshold` with the image,
    at most `top_n`, best first. Holds the vocabulary and its vectors, not the encoder, so it
    pickles small: a stage embeds the vocabulary once (on its GPU tasks), builds the tagger from
    those vectors and ships it to the workers; `from_encoder` embeds it in this process."""

    def __init__(self, encoder_model_id: str, vocab: list[str], tag_vectors: np.ndarray, *, threshold: float,
                 top_n: int, prompt: str = DEFAULT_PROMPT, force: bool = False):
        check_encoder(encoder_model_id, force)
        if "{tag}" not in prompt:
            raise ValueError(f"tag prompt {prompt!r} has no {{tag}} placeholder")
        if top_n < 1:
            raise ValueError(f"top_n must be >= 1, got {top_n}")
        if not vocab:
            raise ValueError("empty tag vocabulary")
        if list(vocab) != sorted(set(vocab)) or len(tag_vectors) != len(vocab):
            raise ValueError("vocab must be sorted and distinct, one vector per tag (see prompts())")
        self.vocab = list(vocab)
        self.threshold = threshold
        self.top_n = top_n
        self.prompt = prompt
        self.vocab_version = vocab_version(self.vocab, prompt)
        self.model_id = f"clip-zero-shot:{encoder_model_id}"
        self.tag_vectors = np.asarray(tag_vectors, dtype=np.float32)

    @classmethod
    def from_encoder(cls, encoder: ClipEncoder, vocab: Iterable[str], *, threshold: float, top_n: int,
                     prompt: str = DEFAULT_PROMPT, force: bool = False) -> "ClipZeroShotTagger":
        check_encoder(encoder.model_id, force)
        vocab = sorted(set(vocab))
        if not vocab:
            raise ValueError("empty tag vocabulary")
        key = (encoder.model_id, vocab_version(vocab, prompt), prompt)
        with _tag_vectors_lock:
            if key not in _tag_vectors:
                texts = prompts(vocab, prompt)
                _tag_vectors[key] = np.concatenate(
                    [encoder.encode_texts(texts[i:i + TEXT_BATCH]) for i in range(0, len(texts), TEXT_BATCH)])
        return cls(encoder.model_id, vocab, _tag_vectors[key], threshold=threshold, top_n=top_n, prompt=prompt,
                   force=force)

    def tag(self, image_vectors: np.ndarray) -> list[list[tuple[str, float]]]:
        image_vectors = np.asarray(image_vectors, dtype=np.float32)
        if image_vectors.ndim != 2 or image_vectors.shape[1] != self.tag_vectors.shape[1]:
            raise ValueError(f"image vectors of shape {image_vectors.shape}; this tagger's encoder makes "
                             f"{self.tag_vectors.shape[1]}-d vectors")
        scores = image_vectors @ self.tag_vectors.T
        k = min(self.top_n, len(self.vocab))
        best = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # the k best per row, unordered
        out = []
        for row, candidates in zip(scores, best):
            picked = [(self.vocab[j], float(row[j])) for j in candidates if row[j] >= self.threshold]
            out.append(sorted(picked, key=lambda p: (-p[1], p[0])))
        return out
