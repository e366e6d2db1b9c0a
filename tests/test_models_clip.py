"""open_clip dual encoder: local checkpoints round-trip, unit vectors, loud offline fallback, one
load per worker, device choice."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from clip_fixtures import TINY_ARCH, TINY_CFG, fresh_model_cache  # noqa: F401  (fixture)
from realsyn_models import cache
from realsyn_models.clip import RANDOM_INIT_NOTE, ClipSpec, WeightsUnavailable, get_encoder, load, resolve
from realsyn_models.device import pick_device

TEXTS = ["a bowl of ramen with a soft egg", "apple strudel dusted with sugar", "x"]


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(40, 60), (90, 30), (32, 32)]]


@pytest.fixture(autouse=True)
def _fresh_cache(fresh_model_cache):
    """Every test here starts with no model loaded (load counts start at zero)."""


def _reference_vectors(model, encoder, images, texts):
    """What the saved model itself gives, computed without our wrapper."""
    with torch.inference_mode():
        img = model.encode_image(torch.stack([encoder.preprocess(im) for im in images]))
        txt = model.encode_text(encoder.tokenizer(texts))
    return (torch.nn.functional.normalize(img, dim=-1).numpy(), torch.nn.functional.normalize(txt, dim=-1).numpy())


@pytest.mark.parametrize("source", ["checkpoint_file", "local_dir"])
def test_local_checkpoint_round_trips_to_the_same_vectors(tiny_clip, source):
    spec = tiny_clip.spec() if source == "checkpoint_file" else ClipSpec(model=f"local-dir:{tiny_clip.local_dir}")
    spec, note = resolve(spec, allow_random_init=False)
    assert not spec.random_init and note.startswith("pretrained:")
    encoder = load(spec)
    assert encoder.pretrained
    images = _images()
    want_img, want_txt = _reference_vectors(tiny_clip.model, encoder, images, TEXTS)
    np.testing.assert_allclose(encoder.encode_pil(images), want_img, atol=1e-5)
    np.testing.assert_allclose(encoder.encode_texts(TEXTS), want_txt, atol=1e-5)


@pytest.mark.parametrize("tower", ["clip", "custom_text"])
def test_text_runs_only_as_wide_as_the_batch_needs_and_gives_the_full_width_vectors(tiny_clip, tower):
    import open_clip
    from realsyn_models.clip import ClipEncoder

    if tower == "clip":
        encoder = get_encoder(tiny_clip.spec())
        model, transformer = encoder.model, encoder.model.transformer
    else:  # EVA02-E-14-plus's kind: the text tower is its own TextTransformer module
        torch.manual_seed(0)
        model = open_clip.model.CustomTextCLIP(**TINY_CFG).eval()
        base = get_encoder(tiny_clip.spec())
        encoder = ClipEncoder(model, base.preprocess, base.tokenizer, "cpu", tiny_clip.spec())
        transformer = model.text.transformer
    owner = model if tower == "clip" else model.text
    context = TINY_CFG["text_cfg"]["context_length"]
    widths = []
    hook = transformer.register_forward_hook(lambda module, args, out: widths.append(args[0].shape[1]))
    try:
        short = encoder.encode_texts(["ramen", "x", ""])
        mixed_texts = ["ramen", "a bowl of ramen with a soft egg " * 4]  # the second overflows the context
        mixed = encoder.encode_texts(mixed_texts)
    finally:
        hook.remove()
    # "ramen": start, 1-2 word pieces, end; the overflowing text takes the whole context.
    assert widths[-2] <= 4 and widths[-1] == context
    with torch.inference_mode():
        want = [model.encode_text(encoder.tokenizer(t)) for t in (["ramen", "x", ""], mixed_texts)]
    for got, full in zip((short, mixed), want):
        np.testing.assert_allclose(got, torch.nn.functional.normalize(full, dim=-1).numpy(), atol=1e-5)
    # The model is left as loaded: full-width position table and mask.
    assert owner.positional_embedding.shape[0] == context and owner.attn_mask.shape == (context, context)


def test_vectors_are_unit_norm_float32_of_the_embedding_size(tiny_clip):
    encoder = get_encoder(tiny_clip.spec())
    assert encoder.dim == TINY_CFG["embed_dim"]
    for vectors in (encoder.encode_pil(_images()), encoder.encode_texts(TEXTS)):
        assert vectors.dtype == np.float32 and vectors.shape == (3, TINY_CFG["embed_dim"])
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_model_id_names_the_weights(tiny_clip):
    assert tiny_clip.spec().model_id.startswith(f"{TINY_ARCH}@tiny.pt#")
    assert ClipSpec("ViT-B-32", "laion2b_s34b_b79k").model_id == "ViT-B-32@laion2b_s34b_b79k"
    assert ClipSpec("ViT-B-32", "laion2b_s34b_b79k", random_init=True).model_id == "ViT-B-32@random-init-seed0"


def test_offline_pretrained_tag_fails_fast_without_random_init(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = ClipSpec("ViT-B-32", "laion2b_s34b_b79k", cache_dir=str(tmp_path))  # empty cache
    started = time.perf_counter()
    with pytest.raises(WeightsUnavailable, match="allow_random_init"):
        resolve(spec, allow_random_init=False)
    assert time.perf_counter() - started < 2, "must not wait on network retries"


def test_offline_fallback_is_loud_and_recorded(tiny_clip, caplog):
    spec, note = resolve(tiny_clip.spec(pretrained=None), allow_random_init=True)
    assert spec.random_init and note.startswith(RANDOM_INIT_NOTE)
    assert spec.model_id.endswith("@random-init-seed0")
    assert RANDOM_INIT_NOTE in caplog.text
    encoder = load(spec)
    assert not encoder.pretrained
    # Seeded: every Spark worker builds the same random weights, so their vectors agree.
    again = load(spec).encode_texts(TEXTS)
    np.testing.assert_array_equal(encoder.encode_texts(TEXTS), again)
    other_seed = load(ClipSpec(**{**spec.__dict__, "seed": 1})).encode_texts(TEXTS)
    assert not np.allclose(again, other_seed)


def test_offline_tag_falls_back_to_same_architecture(tmp_path, caplog):
    spec, note = resolve(ClipSpec("ViT-B-32", "laion2b_s34b_b79k", cache_dir=str(tmp_path), offline=True),
                         allow_random_init=True)
    assert spec.random_init and "ViT-B-32" in note and "offline" in note
    assert "!!!" in caplog.text


def test_unknown_tag_and_missing_file_are_errors_not_fallbacks(tiny_clip, tmp_path):
    with pytest.raises(ValueError, match="unknown pretrained tag"):
        resolve(ClipSpec("ViT-B-32", "no-such-tag", offline=True), allow_random_init=True)
    with pytest.raises(FileNotFoundError):
        resolve(tiny_clip.spec(pretrained=str(tmp_path / "missing.pt")), allow_random_init=True)


def test_worker_loads_a_model_once_per_config(tiny_clip):
    spec = tiny_clip.spec()
    first = get_encoder(spec)
    assert get_encoder(spec) is first
    assert cache.load_count(("clip", ClipSpec(**{**spec.__dict__, "device": None}))) == 1
    get_encoder(tiny_clip.spec(seed=7))  # a different config is a different model
    assert cache.load_count() == 2


def test_device_is_cpu_without_gpus(monkeypatch):
    # Pretend there is no CUDA so the CPU branch is checked on GPU machines too.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device() == "cpu"
    with pytest.raises(RuntimeError, match="CUDA"):
        pick_device("cuda")


def _hf_cache_entry(cache_dir, repo: str, files: dict[str, bytes]) -> None:
    """The Hugging Face cache layout (refs/main -> snapshots/<rev>/...) with the given files."""
    root = cache_dir / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text("0" * 40)
    snapshot = root / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)


def test_hf_hub_model_loads_from_the_local_cache_offline(tiny_clip, tmp_path):
    from pathlib import Path

    local = Path(tiny_clip.local_dir)
    _hf_cache_entry(tmp_path, "org/tiny-clip", {
        "open_clip_config.json": (local / "open_clip_config.json").read_bytes(),
        "open_clip_pytorch_model.bin": (local / "open_clip_pytorch_model.bin").read_bytes()})
    spec, note = resolve(ClipSpec("hf-hub:org/tiny-clip", cache_dir=str(tmp_path), offline=True), False)
    assert not spec.random_init and "snapshots" in note
    np.testing.assert_allclose(load(spec).encode_texts(TEXTS), get_encoder(tiny_clip.spec()).encode_texts(TEXTS),
                               atol=1e-5)
    # Not cached and offline: no architecture, so not even a random init.
    with pytest.raises(WeightsUnavailable, match="not even a random init"):
        resolve(ClipSpec("hf-hub:org/absent", cache_dir=str(tmp_path), offline=True), allow_random_init=True)


def test_pretrained_tag_found_in_the_hub_cache(tmp_path):
    _hf_cache_entry(tmp_path, "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", {"open_clip_model.safetensors": b"x"})
    spec, note = resolve(ClipSpec("ViT-B-32", "laion2b_s34b_b79k", cache_dir=str(tmp_path), offline=True), False)
    assert not spec.random_init and note.endswith("open_clip_model.safetensors)")


def test_spark_gpu_address_maps_to_the_visible_cuda_index():
    from realsyn_models.device import cuda_index

    assert cuda_index("3", None) == 3
    assert cuda_index("3", "2,3") == 1
    assert cuda_index("0", "") == 0
