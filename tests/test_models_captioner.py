"""Captioner and its mapInPandas function: two tiny real transformers captioners (a ViT-GPT2
VisionEncoderDecoder, whose folder has no processor class, and a BLIP, whose processor takes a
prompt), random-initialised and saved here; nothing is downloaded."""
from __future__ import annotations

import io

import pandas as pd
import pytest
from PIL import Image

from clip_fixtures import fresh_model_cache  # noqa: F401  (fixture)
from image_fixtures import DISTINCT_PHOTOS, bad_images, photo
from realsyn_models import cache
from realsyn_models.captioner import Captioner, CaptionSpec, UnprocessableImages, load_captioner, locate_weights
from realsyn_models.clip import WeightsUnavailable
from udfs.caption import make_caption_fn
from udfs.embed import EMPTY_BYTES, MISSING_BYTES, TOO_LARGE, TOO_MANY_PIXELS, UNDECODABLE

WORDS = "a an the of with on in and cat dog mat park bowl soup apple pie plate table man woman street photo".split()
SIDE = 32


@pytest.fixture(autouse=True)
def _fresh_cache(fresh_model_cache):
    """Every test here starts with no model loaded (load counts start at zero)."""


@pytest.fixture(scope="module")
def ved_captioner(tmp_path_factory) -> str:
    """A ViT encoder + GPT-2 decoder folder, image processor and tokenizer saved side by side."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (GPT2Config, PreTrainedTokenizerFast, VisionEncoderDecoderConfig,
                              VisionEncoderDecoderModel, ViTConfig, ViTImageProcessor)

    path = tmp_path_factory.mktemp("tiny-vit-gpt2")
    vocab = ["<|endoftext|>", "[UNK]", *WORDS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                            unk_token="[UNK]", pad_token="<|endoftext|>").save_pretrained(path)
    ViTImageProcessor(size={"height": SIDE, "width": SIDE}).save_pretrained(path)
    # A wide init so that different photos give different captions (order checks mean something).
    encoder = ViTConfig(image_size=SIDE, patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, initializer_range=0.5)
    decoder = GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=1, n_head=2, bos_token_id=0,
                         eos_token_id=0, add_cross_attention=True, is_decoder=True, initializer_range=0.5)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = config.pad_token_id = config.eos_token_id = 0
    torch.manual_seed(0)
    VisionEncoderDecoderModel(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def blip_captioner(tmp_path_factory) -> str:
    """A BLIP folder with its BlipProcessor (image processor + BERT tokenizer): takes a prompt."""
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    path = tmp_path_factory.mktemp("tiny-blip")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": SIDE, "width": SIDE}),
                  tokenizer=tokenizer).save_pretrained(path)
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = BlipConfig(
        vision_config=dict(**layers, image_size=SIDE, patch_size=16, initializer_range=0.5),
        text_config=dict(**layers, vocab_size=len(vocab), encoder_hidden_size=32, max_position_embeddings=64,
                         bos_token_id=5, pad_token_id=0, sep_token_id=3, eos_token_id=3, initializer_range=0.5),
        projection_dim=16)
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(path)
    return str(path)


def _photos(n: int = 5) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in DISTINCT_PHOTOS[:n]]


def test_captions_are_strings_in_batch_order(ved_captioner):
    captioner = load_captioner(CaptionSpec(ved_captioner, batch_size=2, max_new_tokens=6))
    images = _photos()
    captions = captioner.caption(images)
    assert len(captions) == len(images) and all(isinstance(c, str) for c in captions)
    assert captions == [captioner.caption([im])[0] for im in images]  # batching (2+2+1) keeps order
    assert len(set(captions)) > 1, "the fixture's photos should not all read the same"
    assert captioner.caption([]) == []


def test_model_loads_once_per_worker_and_names_its_weights(ved_captioner):
    spec = CaptionSpec(ved_captioner, max_new_tokens=4)
    first, second = load_captioner(spec), load_captioner(spec)
    assert first is second and cache.load_count(("captioner", spec)) == 1
    assert first.model_id == spec.model_id and spec.model_id.startswith(f"{ved_captioner}#")
    assert first.input_size == SIDE  # JPEG draft decoding stays at twice the model's input


def test_prompt_is_not_echoed_in_the_caption(blip_captioner):
    import torch

    prompt = "a photo of"
    captioner = load_captioner(CaptionSpec(blip_captioner, prompt=prompt, max_new_tokens=6))
    images = _photos(3)
    inputs = captioner.processor(images=images, text=[prompt] * 3, return_tensors="pt")
    with torch.inference_mode():
        raw = captioner.processor.batch_decode(
            captioner.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=6),
            skip_special_tokens=True)
    assert all(r.startswith(prompt) for r in raw)  # BLIP repeats its prompt ...
    assert captioner.caption(images) == [r[len(prompt):].strip() for r in raw]  # ... the caption does not


def test_chat_template_turns_the_prompt_into_a_user_turn(blip_captioner):
    spec = CaptionSpec(blip_captioner, prompt="a photo of", max_new_tokens=4)
    loaded = load_captioner(spec)
    processor = loaded.processor  # as a VLM's processor: one that carries a chat template
    processor.chat_template = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'text' %}"
                               "{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
                               "{% if add_generation_prompt %} and{% endif %}")
    captioner = Captioner(loaded.model, processor, loaded.device, loaded.dtype, spec)
    assert captioner._text == "a photo of and"
    captions = captioner.caption(_photos(2))
    assert all(isinstance(c, str) and not c.startswith("a photo of") for c in captions)


def test_a_prompt_needs_a_processor_that_takes_text(ved_captioner):
    with pytest.raises(ValueError, match="cannot use a prompt"):
        load_captioner(CaptionSpec(ved_captioner, prompt="a photo of"))


def test_a_processor_that_rejects_every_image_fails_at_load(ved_captioner):
    loaded = load_captioner(CaptionSpec(ved_captioner))

    def needs_a_task_prompt(**kwargs):  # as Florence-2's processor without "<CAPTION>"
        raise ValueError("text input is required")

    with pytest.raises(ValueError, match="rejects a plain 64px image .*need a prompt"):
        Captioner(loaded.model, needs_a_task_prompt, loaded.device, loaded.dtype, loaded.spec)


def test_absent_hub_model_offline_is_weights_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = CaptionSpec("realsyn-test/no-such-captioner", cache_dir=str(tmp_path))
    with pytest.raises(WeightsUnavailable, match="not in the local hub cache and the run is offline"):
        locate_weights(spec)
    with pytest.raises(WeightsUnavailable):
        load_captioner(spec, device="cpu")
    with pytest.raises(FileNotFoundError, match="neither a folder nor a hub id"):
        locate_weights(CaptionSpec(str(tmp_path / "missing-folder")))


def test_folder_without_weights_is_weights_unavailable(ved_captioner, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsUnavailable, match="needs config.json and a weights file"):
        locate_weights(CaptionSpec(str(tmp_path)))


# --- the mapInPandas function -----------------------------------------------------------------

def _run(fn, frames: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(list(fn(iter(frames))), ignore_index=True)


def test_caption_fn_gives_one_row_per_image_and_error_rows_for_bad_bytes(ved_captioner):
    spec = CaptionSpec(ved_captioner, batch_size=3, max_new_tokens=4)
    bad = bad_images()
    rows = {"good1": photo(), "good2": photo(DISTINCT_PHOTOS[0]), "corrupt": bad["undecodable"],
            "truncated": bad["truncated"], "bomb": bad["decompression_bomb"], "empty": b"", "missing": None,
            "big": photo(), "good3": photo(DISTINCT_PHOTOS[2])}
    frames = [pd.DataFrame({"image_id": list(rows)[:4], "bytes": list(rows.values())[:4]}),
              pd.DataFrame({"image_id": [], "bytes": []}),
              pd.DataFrame({"image_id": list(rows)[4:], "bytes": list(rows.values())[4:]})]
    fn = make_caption_fn(spec, max_image_bytes=len(photo()) - 1, max_pixels=10_000_000)
    out = _run(fn, frames).set_index("image_id")
    assert list(out.index) == list(rows)  # one row out per row in, in order
    assert out.loc["corrupt", "error"] == UNDECODABLE and out.loc["truncated", "error"] == UNDECODABLE
    assert out.loc["bomb", "error"] == TOO_MANY_PIXELS and out.loc["empty", "error"] == EMPTY_BYTES
    assert out.loc["missing", "error"] == MISSING_BYTES
    assert out.loc["good1", "error"] == TOO_LARGE and out.loc["big", "error"] == TOO_LARGE  # cap below the cat
    for good in ("good2", "good3"):
        assert out.loc[good, "error"] is None and isinstance(out.loc[good, "caption"], str)
    assert out["caption"][out["error"].notna()].isna().all()
    assert (out["model_id"] == spec.model_id).all()


def test_caption_fn_marks_only_the_images_the_processor_rejects(ved_captioner, monkeypatch):
    spec = CaptionSpec(ved_captioner, batch_size=4, max_new_tokens=4)
    captioner = load_captioner(spec)
    real_caption = captioner.caption

    def picky(images):  # a processor that cannot take a 1-pixel-high image
        if any(im.height == 1 for im in images):
            raise UnprocessableImages("ValueError: image too thin")
        return real_caption(images)

    monkeypatch.setattr(captioner, "caption", picky)
    buf = io.BytesIO()
    Image.new("RGB", (300, 1), "red").save(buf, "PNG")
    frame = pd.DataFrame({"image_id": ["a", "thin", "b"],
                          "bytes": [photo(), buf.getvalue(), photo(DISTINCT_PHOTOS[0])]})
    out = _run(make_caption_fn(spec), [frame]).set_index("image_id")
    assert out.loc["thin", "error"] == UNDECODABLE and out.loc["thin", "caption"] is None
    assert out.loc[["a", "b"], "error"].isna().all() and out.loc[["a", "b"], "caption"].map(type).eq(str).all()


def test_caption_fn_loads_no_model_for_an_empty_partition(ved_captioner):
    fn = make_caption_fn(CaptionSpec(ved_captioner))
    assert list(fn(iter([pd.DataFrame({"image_id": [], "bytes": []})]))) == []
    assert cache.load_count() == 0
