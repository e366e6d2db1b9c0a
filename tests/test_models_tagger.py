"""Zero-shot CLIP tagger and the tag vocabulary: scoring against the tiny open_clip fixture,
vocabulary embedded once per worker, refusal on random-init weights, vocabulary loading and
versioning."""
from __future__ import annotations

import pickle
import random

import numpy as np
import pytest

from clip_fixtures import fresh_model_cache  # noqa: F401  (fixture)
from realsyn_models.clip import get_encoder, is_random_init
from realsyn_models.tagger import (DEFAULT_PROMPT, ClipZeroShotTagger, RandomInitEncoder, Tagger, load_vocab,
                                   normalise_tag, vocab_version)

VOCAB = ["onion", "potato", "apple pie", "frying pan", "cat", "bicycle", "half-ring"]
SHIPPED_TAGS = 4585  # ram_tag_list.txt of recognize-anything (data/TAG_VOCAB_LICENSE.md)
SHIPPED_VERSION = "9935958006e8"  # vocab_version(load_vocab(), DEFAULT_PROMPT): the shipped list unchanged


@pytest.fixture
def encoder(tiny_clip, fresh_model_cache):
    return get_encoder(tiny_clip.spec())


def _count_text_calls(encoder, monkeypatch) -> list[int]:
    calls: list[int] = []
    real = encoder.encode_texts

    def counting(texts):
        calls.append(len(texts))
        return real(texts)

    monkeypatch.setattr(encoder, "encode_texts", counting)
    return calls


def test_tags_are_the_vocabulary_entries_nearest_the_image_best_first(encoder):
    tagger = ClipZeroShotTagger.from_encoder(encoder, VOCAB, threshold=-1.0, top_n=3)
    assert isinstance(tagger, Tagger)
    images = tagger.tag_vectors[[tagger.vocab.index("cat"), tagger.vocab.index("onion")]]
    tags = tagger.tag(images)
    assert [t[0][0] for t in tags] == ["cat", "onion"]  # its own prompt vector is an image's best match
    texts = encoder.encode_texts([DEFAULT_PROMPT.format(tag=t) for t in tagger.vocab])
    for row, image in zip(tags, images):
        assert len(row) == 3
        scores = [s for _, s in row]
        assert scores == sorted(scores, reverse=True)
        expected = dict(zip(tagger.vocab, (texts @ image).tolist()))  # cosine: both sides unit norm
        assert all(abs(s - expected[t]) < 1e-5 for t, s in row)
        assert scores[-1] >= sorted(expected.values())[-3] - 1e-6  # the top 3 of all, none missed


def test_threshold_drops_tags_and_top_n_caps_them(encoder):
    low = ClipZeroShotTagger.from_encoder(encoder, VOCAB, threshold=-1.0, top_n=100)
    image = low.tag_vectors[[low.vocab.index("potato")]]
    everything = low.tag(image)[0]
    assert len(everything) == len(VOCAB)
    cut = everything[2][1]
    assert ClipZeroShotTagger.from_encoder(encoder, VOCAB, threshold=cut, top_n=100).tag(image)[0] == everything[:3]
    assert ClipZeroShotTagger.from_encoder(encoder, VOCAB, threshold=-1.0, top_n=2).tag(image)[0] == everything[:2]
    assert ClipZeroShotTagger.from_encoder(encoder, VOCAB, threshold=1.01, top_n=5).tag(image) == [[]]
    assert low.tag(np.zeros((0, encoder.dim), dtype=np.float32)) == []
    with pytest.raises(ValueError, match="16-d"):
        low.tag(np.ones((1, encoder.dim + 1), dtype=np.float32))


def test_vocabulary_is_embedded_once_per_encoder_vocabulary_and_prompt(encoder, monkeypatch):
    calls = _count_text_calls(encoder, monkeypatch)
    vocab = [*VOCAB, "embedded-once test tag"]
    first = ClipZeroShotTagger.from_encoder(encoder, vocab, threshold=0.0, top_n=3)
    again = ClipZeroShotTagger.from_encoder(encoder, list(reversed(vocab)), threshold=0.5, top_n=1)
    assert calls == [len(vocab)] and again.tag_vectors is first.tag_vectors
    assert again.vocab_version == first.vocab_version and again.model_id == first.model_id
    other_prompt = ClipZeroShotTagger.from_encoder(encoder, vocab, prompt="a picture of {tag}", threshold=0.0, top_n=3)
    assert calls == [len(vocab), len(vocab)] and other_prompt.vocab_version != first.vocab_version


def test_full_shipped_vocabulary_is_embedded_in_batches(encoder, monkeypatch):
    calls = _count_text_calls(encoder, monkeypatch)
    vocab = [*load_vocab(), "full vocabulary test tag"]  # a version no other test embeds
    tagger = ClipZeroShotTagger.from_encoder(encoder, vocab, threshold=-1.0, top_n=5)
    assert sum(calls) == len(vocab) and max(calls) <= 256
    assert tagger.tag_vectors.shape == (len(vocab), encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(tagger.tag_vectors, axis=1), 1.0, atol=1e-5)


def test_tagger_pickles_without_its_encoder(encoder):
    tagger = ClipZeroShotTagger.from_encoder(encoder, VOCAB, threshold=-1.0, top_n=3)
    shipped = pickle.loads(pickle.dumps(tagger))
    assert not any(isinstance(v, type(encoder)) for v in vars(shipped).values())
    assert shipped.tag(tagger.tag_vectors) == tagger.tag(tagger.tag_vectors)


def test_random_init_encoder_is_refused_unless_forced(tiny_clip, fresh_model_cache):
    random_encoder = get_encoder(tiny_clip.spec(random_init=True))
    assert is_random_init(random_encoder.model_id)
    with pytest.raises(RandomInitEncoder, match="random init"):
        ClipZeroShotTagger.from_encoder(random_encoder, VOCAB, threshold=0.0, top_n=3)
    forced = ClipZeroShotTagger.from_encoder(random_encoder, VOCAB, threshold=-1.0, top_n=3, force=True)
    assert len(forced.tag(forced.tag_vectors[:2])) == 2


def test_bad_settings_are_refused(encoder):
    with pytest.raises(ValueError, match="placeholder"):
        ClipZeroShotTagger.from_encoder(encoder, VOCAB, prompt="a photo", threshold=0.0, top_n=3)
    with pytest.raises(ValueError, match="top_n"):
        ClipZeroShotTagger.from_encoder(encoder, VOCAB, threshold=0.0, top_n=0)
    with pytest.raises(ValueError, match="empty"):
        ClipZeroShotTagger.from_encoder(encoder, [], threshold=0.0, top_n=3)


# --- vocabulary -----------------------------------------------------------------------------------

def test_shipped_vocabulary_loads_normalised_and_sorted():
    vocab = load_vocab()
    assert len(vocab) == SHIPPED_TAGS and vocab == sorted(set(vocab))
    assert all(t == normalise_tag(t) and t for t in vocab)
    assert {"abacus", "apple pie", "3d glasses", "frying pan"} <= set(vocab)


def test_mined_tags_extend_the_vocabulary_normalised_and_deduplicated():
    vocab = load_vocab([" Half-Ring ", "half-ring", "ONION", "apple   pie", "", "  "])
    assert len(vocab) == SHIPPED_TAGS + 1  # only half-ring is new: onion and apple pie are shipped
    assert "half-ring" in vocab and vocab == sorted(set(vocab))


def test_vocab_version_is_stable_and_content_derived():
    vocab = load_vocab()
    shuffled = random.Random(0).sample(vocab, len(vocab))
    assert vocab_version(vocab, DEFAULT_PROMPT) == vocab_version(shuffled + vocab[:10], DEFAULT_PROMPT)
    assert vocab_version(vocab, DEFAULT_PROMPT) == SHIPPED_VERSION
    assert vocab_version([*vocab, "half-ring"], DEFAULT_PROMPT) != SHIPPED_VERSION
    assert vocab_version(vocab, "a picture of {tag}") != SHIPPED_VERSION
