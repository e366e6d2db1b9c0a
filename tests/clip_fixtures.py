"""A tiny real open_clip architecture, random-initialised and saved as a local checkpoint.

Import the fixtures into a test module (`from clip_fixtures import tiny_clip`); nothing is
downloaded, and the model encodes a batch in milliseconds on CPU.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

TINY_ARCH = "realsyn-tiny"
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@dataclass(frozen=True)
class TinyClip:
    config_dir: str  # holds realsyn-tiny.json (for open_clip.add_model_config)
    checkpoint: str  # torch.save(state_dict) of a seeded random init
    local_dir: str  # the same weights as an open_clip `local-dir:` folder
    model: object  # the in-memory model the checkpoint was saved from

    def spec(self, **overrides):
        from realsyn_models.clip import ClipSpec

        fields = dict(model=TINY_ARCH, pretrained=self.checkpoint, model_config_dir=self.config_dir, offline=True)
        return ClipSpec(**{**fields, **overrides})


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> TinyClip:
    import open_clip
    import torch

    root = tmp_path_factory.mktemp("tiny_clip")
    (root / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(root)
    torch.manual_seed(1234)
    model = open_clip.create_model(TINY_ARCH).eval()
    checkpoint = root / "tiny.pt"
    torch.save(model.state_dict(), checkpoint)
    local_dir = Path(tmp_path_factory.mktemp("tiny_local_dir"))
    (local_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": {}}))
    torch.save(model.state_dict(), local_dir / "open_clip_pytorch_model.bin")
    return TinyClip(str(root), str(checkpoint), str(local_dir), model)


@pytest.fixture
def fresh_model_cache():
    """The per-worker model cache emptied before and after the test."""
    from realsyn_models import cache

    cache.clear()
    yield
    cache.clear()
