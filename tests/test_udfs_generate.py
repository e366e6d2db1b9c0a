"""Synthetic-text batch function and its judge: every bad-generation reason (and what must not fire),
the order in which they win, cleaning, and the mapInPandas function end to end on a real tiny LM
trained to answer three fusion prompts (one copy, one good fusion, one too long for the budget)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from realsyn_models.llm import DEFAULT_TEMPLATE, PromptTemplate, SamplingConfig, TransformersBackend
from test_generate_backends import train_chat_lm
from udfs.generate import BAD_REASONS, COLUMNS, SYNTHETIC_SCHEMA, clean, judge, make_generate_fn

T = DEFAULT_TEMPLATE
SENTENCE = "The Eiffel Tower opened in 1889 for the World Fair in Paris."
GOOD = "Tourists gather under the iron lattice of the Eiffel Tower, opened in 1889 for the World Fair in Paris."


def test_clean_strips_wrapping():
    bus = "A red bus waits in Leeds."
    assert clean('  Sure! Here is the synthetic text:\n\n  "A red bus waits in Leeds."  ') == bus
    assert clean("Here's a fused description of the image: “A red bus\nwaits in Leeds.”") == bus
    assert clean("Synthetic text: 'A red bus.'") == "A red bus."
    assert clean("Output: A red bus.") == "A red bus."
    assert clean(None) == "" and clean("  ") == ""
    # Inner quotes and words that merely look like a lead-in stay.
    assert clean('A sign reads "Welcome to Leeds" above the bus.') == 'A sign reads "Welcome to Leeds" above the bus.'
    assert clean("Here the bus waits: red and empty.") == "Here the bus waits: red and empty."


def test_good_generations_pass():
    assert judge(GOOD, "stop", SENTENCE, T) is None
    assert judge(f'Here is the synthetic text: "{GOOD}"', "stop", SENTENCE, T) is None
    # Terse but English, and a non-English source answered in kind, are not "not_english".
    assert judge("Red double-decker bus, Leeds street, sunny afternoon.", "stop", "A bus in Leeds.", T) is None
    assert judge("Der Eiffelturm mit vielen Touristen, eröffnet 1889.", "stop",
                 "Der Eiffelturm wurde 1889 eröffnet und ist ein Wahrzeichen.", T) is None
    # First person from the source sentence is not a refusal.
    assert judge("Fans lift the trophy in Leeds, shouting that they can't believe it: I can't believe we won.",
                 "stop", "I can't believe we won the cup in Leeds.", T) is None


@pytest.mark.parametrize("text, finish, reason", [
    ("", "error", "error"),
    (GOOD, "error", "error"),
    ('  ""  ', "stop", "empty"),
    ("Here is the synthetic text:", "stop", "empty"),
    ("I'm sorry, but I can't help with that request.", "stop", "refusal"),
    ("As an AI language model, I do not see images.", "stop", "refusal"),
    ("I cannot describe this image without more details.", "stop", "refusal"),
    ("Sentence: The Eiffel Tower opened in 1889.", "stop", "prompt_leak"),
    ("Caption (what the image shows): a tall iron tower.", "stop", "prompt_leak"),
    ("tags: tower, sky", "stop", "prompt_leak"),
    ("The tower stands tall; keep the real-world details of the sentence in mind.", "stop", "prompt_leak"),
    ("A tower under {caption}.", "stop", "prompt_leak"),
    (SENTENCE, "stop", "copy_of_sentence"),
    ("the eiffel tower opened in 1889, for the world fair in paris", "stop", "copy_of_sentence"),
    ("The Eiffel Tower opened in 1889 for the World Fair in Paris, France.", "stop", "copy_of_sentence"),
    ("Der Eiffelturm wurde 1889 für die Weltausstellung in Paris eröffnet und ist aus Eisen.", "stop", "not_english"),
    ("La tour Eiffel a été inaugurée en 1889 pour l'Exposition universelle de Paris.", "stop", "not_english"),
    ("埃菲尔铁塔于1889年为巴黎世界博览会而建。", "stop", "not_english"),
    ("Tourists gather under the iron lattice of the Eiffel Tower, opened in", "length", "truncated"),
    (GOOD + " " + "The lattice glows at dusk above the crowd. " * 15, "stop", "too_long"),
])
def test_each_bad_reason(text, finish, reason):
    assert reason in BAD_REASONS
    assert judge(text, finish, SENTENCE, T) == reason


def test_most_informative_reason_wins():
    assert judge("I'm sorry, I cannot", "length", SENTENCE, T) == "refusal"  # truncated too
    assert judge("Sentence: " + SENTENCE, "stop", SENTENCE, T) == "prompt_leak"  # a copy too
    assert judge(SENTENCE, "length", SENTENCE, T) == "copy_of_sentence"
    long_cut = GOOD + " The lattice glows at dusk above the crowd." * 15
    assert judge(long_cut, "length", SENTENCE, T) == "truncated"  # too long as well
    assert judge(long_cut, "stop", SENTENCE, T, max_chars=2000) is None
    assert list(BAD_REASONS) == ["error", "empty", "refusal", "prompt_leak", "copy_of_sentence", "not_english",
                                 "truncated", "too_long"]


# -- the mapInPandas function on a real tiny LM ---------------------------------------------------

TINY = PromptTemplate("t1", "", "{sentence} | {caption} | {tags}")
ROWS = [  # (image_id, sentence id, sentence, caption, tags, what the tiny LM is trained to answer)
    ("i1", "s1", "Serve with apple sauce.", "potatoes", ["butter"], "Serve with apple sauce ."),
    ("i2", "s2", "Peel potatoes.", "onions", np.array(["pot"], dtype=object),
     "Peel potatoes and add onions in the same pot ."),
    ("i3", "s3", "Cut onions.", None, None,
     "Cut onions into half - rings and let them sweat in the same pot , add some butter ."),
]


@pytest.fixture(scope="module")
def fusion_lm(tiny_lm, tmp_path_factory) -> str:
    texts = [TINY.messages(s, c, t)[-1]["content"] + " " + target for _, _, s, c, t, target in ROWS]
    return train_chat_lm(tiny_lm, tmp_path_factory.mktemp("fusion-gpt2"), texts, steps=150)


class FallsOverOnPoison:
    """The real backend, except that a batch with a "poison" prompt raises (an OOM, a lost server)."""

    def __init__(self, inner):
        self.inner, self.closed = inner, False
        self.model_id = inner.model_id

    def generate(self, batch):
        if any("poison" in m[-1]["content"] for m in batch):
            raise RuntimeError("backend fell over")
        return self.inner.generate(batch)

    def close(self):
        self.closed = True


def frame(rows) -> pd.DataFrame:
    columns = ["image_id", "source_sentence_id", "sentence", "caption", "tags"]
    return pd.DataFrame([r[:5] for r in rows], columns=columns)


def test_generate_fn_one_row_per_input(fusion_lm):
    made = []

    def factory():
        made.append(FallsOverOnPoison(TransformersBackend(
            fusion_lm, precision="fp32", batch_size=2, device="cpu", sampling=SamplingConfig(max_new_tokens=14))))
        return made[-1]

    fn = make_generate_fn(factory, TINY, batch_size=2, max_chars=600)
    assert made == []  # the backend is built on the worker, when batches arrive
    poisoned = frame([("i4", "s4", "poison pill", "x", [], ""), ("i5", "s5", "Serve with apple sauce.", None, [], "")])
    out = pd.concat(list(fn(iter([frame(ROWS), poisoned]))), ignore_index=True)

    assert len(made) == 1 and made[0].closed
    assert list(out.columns) == COLUMNS == [c.split()[0] for c in SYNTHETIC_SCHEMA.split(", ")]
    assert out.image_id.tolist() == ["i1", "i2", "i3", "i4", "i5"]
    assert out.source_sentence_id.tolist() == ["s1", "s2", "s3", "s4", "s5"]
    assert out.text.tolist()[:3] == ["Serve with apple sauce .", "Peel potatoes and add onions in the same pot .",
                                     "Cut onions into half - rings and let them sweat in the same pot"]
    assert out.drop_reason.tolist() == ["copy_of_sentence", None, "truncated", "error", "error"]
    assert out.finish_reason.tolist() == ["stop", "stop", "length", "error", "error"]
    assert out.tokens_out.tolist()[:3] == [6, 11, 14] and out.tokens_in.isna().tolist() == [False] * 3 + [True] * 2
    assert out.error.tolist() == [None] * 3 + ["RuntimeError: backend fell over"] * 2
    assert out.text.tolist()[3:] == [None, None]
    assert set(out.model_id) == {fusion_lm} and set(out.prompt_version) == {"t1"}
    assert set(out.prompt_hash) == {TINY.hash}
    # What Spark's Arrow conversion will be asked to do with the declared types.
    types = {c: pa.int32() if c.startswith("tokens_") else pa.string() for c in COLUMNS}
    table = pa.Table.from_pandas(out, schema=pa.schema(types.items()), preserve_index=False)
    assert table.column("tokens_in").null_count == 2


def test_generate_fn_empty_partition(fusion_lm):
    fn = make_generate_fn(lambda: TransformersBackend(fusion_lm, precision="fp32", device="cpu"), TINY, 4, 600)
    out = list(fn(iter([frame([])])))
    assert len(out) == 1 and out[0].empty and list(out[0].columns) == COLUMNS


def test_a_continuously_batching_backend_gets_the_whole_partition_in_one_call():
    from realsyn_models.llm import Generation

    class Continuous:  # as VllmBackend: it schedules its own batches
        whole_partition = True
        model_id = "fake"

        def __init__(self):
            self.calls = []

        def generate(self, prompts):
            self.calls.append(len(prompts))
            return [Generation(f"a longer answer number {i}", 3, 5, "stop") for i in range(len(prompts))]

        def close(self):
            pass

    backend = Continuous()
    # Two Arrow batches of one partition, a batch_size of 2: one call for all three prompts.
    fn = make_generate_fn(lambda: backend, TINY, 2, 600)
    out = pd.concat(list(fn(iter([frame(ROWS[:2]), frame(ROWS[2:])]))))
    assert backend.calls == [3] and out.image_id.tolist() == [r[0] for r in ROWS]
    assert list(fn(iter([]))) == [] and backend.calls == [3]
