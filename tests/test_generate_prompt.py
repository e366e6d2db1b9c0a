"""The fusion prompt: exact messages for a filled and a caption-less template, a hash that follows the
wording, slot validation, and the plain-text rendering for tokenizers without a chat template."""
from __future__ import annotations

import dataclasses

import pytest

from realsyn_models.llm import DEFAULT_TEMPLATE, PromptTemplate, render_text

SENTENCE = "The Eiffel Tower opened in 1889 for the World Fair in Paris."
SYSTEM = "You write short, factual descriptions of images for an image-text dataset."
RULES = (
    "Rules:\n"
    "- Keep the real-world details of the sentence: names, places, dates, numbers and events.\n"
    "- Use the caption and the tags to describe what is visible and to enrich the sentence.\n"
    "- Blend everything into fluent text; do not simply join the pieces one after another.\n"
    "- Do not add any fact that is not given above.\n"
    "- Reply with one or two sentences in English and nothing else."
)
HEAD = "Write one synthetic description of an image from the three pieces of information below.\n\n"


def test_filled_template_golden():
    messages = DEFAULT_TEMPLATE.messages(f"  {SENTENCE} ", "a tall iron tower under a blue sky",
                                         [" tower", "sky", "", "tower", "people "])
    assert messages == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": HEAD
         + f"Sentence (real-world text found with the image): {SENTENCE}\n"
         + "Caption (what the image shows): a tall iron tower under a blue sky\n"
         + "Tags (objects seen in the image): tower, sky, people\n\n"
         + RULES},
    ]


@pytest.mark.parametrize("caption, tags", [(None, []), ("", None), ("   ", ())])
def test_captionless_template_golden(caption, tags):
    messages = DEFAULT_TEMPLATE.messages(SENTENCE, caption, tags)
    assert messages[1]["content"] == (
        HEAD
        + f"Sentence (real-world text found with the image): {SENTENCE}\n"
        + "Caption (what the image shows): (no caption)\n"
        + "Tags (objects seen in the image): (no tags)\n\n"
        + RULES)


def test_hash_follows_the_wording():
    # Pinned: change the wording -> bump `version` and update this hash in the same change.
    assert DEFAULT_TEMPLATE.version == "v1" and DEFAULT_TEMPLATE.hash == "beaab6250da5"
    variants = [
        dataclasses.replace(DEFAULT_TEMPLATE, version="v2"),
        dataclasses.replace(DEFAULT_TEMPLATE, system=DEFAULT_TEMPLATE.system + " "),
        dataclasses.replace(DEFAULT_TEMPLATE, user=DEFAULT_TEMPLATE.user.replace("one or two", "one")),
    ]
    hashes = {DEFAULT_TEMPLATE.hash, *(v.hash for v in variants)}
    assert len(hashes) == 4 and all(len(h) == 12 and int(h, 16) >= 0 for h in hashes)
    assert PromptTemplate("v1", DEFAULT_TEMPLATE.system, DEFAULT_TEMPLATE.user).hash == DEFAULT_TEMPLATE.hash


def test_slots_are_checked_and_values_are_not_formatted():
    with pytest.raises(ValueError, match="exactly the slots"):
        PromptTemplate("x", "", "{sentence} {caption}")
    with pytest.raises(ValueError, match="exactly the slots"):
        PromptTemplate("x", "", "{sentence} {caption} {tags} {image}")
    with pytest.raises(ValueError, match="system text takes no slots"):
        PromptTemplate("x", "{sentence}", "{sentence} {caption} {tags}")
    bare = PromptTemplate("x", "", "{sentence}|{caption}|{tags}")
    # No system message when there is no system text; braces inside values stay as they are.
    assert bare.messages("a {caption} b", "c", ["d"]) == [{"role": "user", "content": "a {caption} b|c|d"}]


def test_render_text_for_tokenizers_without_chat_template():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Fuse this."}]
    assert render_text(messages) == "System: Be brief.\n\nUser: Fuse this.\n\nAssistant:"
