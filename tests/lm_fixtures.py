"""A tiny real causal LM (2-layer GPT-2, word-level tokenizer), random-initialised and saved as a
local transformers folder. Import the fixture into a test module (`from lm_fixtures import tiny_lm`);
nothing is downloaded, and it scores a batch in milliseconds on CPU.
"""
from __future__ import annotations

import pytest

VOCAB_TEXT = [
    "Cut onions into half-rings and let them sweat in the same pot.",
    "Add some butter if your bacon was not fatty enough.",
    "Serve with apple sauce.",
    "Peel potatoes and cut them into small cubes.",
    "When the onions have become sufficiently cooked, add potatoes.",
]


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> str:
    """Path of the saved model folder (a `sentences.perplexity_model` value)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-gpt2")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(VOCAB_TEXT, trainers.WordLevelTrainer(special_tokens=["<|endoftext|>", "[UNK]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="[UNK]")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(path)
    return str(path)
