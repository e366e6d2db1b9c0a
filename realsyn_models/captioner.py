"""Short image captions (RealSyn §3.2: an OFA-base caption per image feeds the LLM that writes the
synthetic text).

OFA has no transformers port, so the captioner is any Hugging Face image-to-text model behind the
Auto classes: BLIP, BLIP-2, GIT, Florence-2, ViT-GPT2-style VisionEncoderDecoder, or a small VLM
(SmolVLM, Qwen2-VL) asked by a chat prompt. `AutoModelForImageTextToText` maps all of these in
transformers 5 (there is no AutoModelForVision2Seq any more), so one code path serves them.

Decoding is greedy and the prompt is never part of the returned caption, whatever the model's
`generate()` echoes, so captions from different models read the same way downstream.

Like the CLIP encoder, a worker never downloads unless the hub is reachable and the run is not
offline: weights missing offline raise `WeightsUnavailable` (no random-init fallback here, a random
captioner writes noise the LLM would then paraphrase). The stage should call `locate_weights` on
the driver first so a missing model fails the stage before any task starts.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from realsyn_models import cache, sources
from realsyn_models.causal_lm import DTYPES
from realsyn_models.sources import resolve, weight_files
from realsyn_models.clip import (HUB, WeightsUnavailable, env_offline, hf_cached_file, hub_or_raise)
from realsyn_models.device import pick_device

CONFIG_FILE = "config.json"
MAX_ECHO_OFFSET = 2  # a decoded prompt echo may follow a space or newline (transformers' pipeline rule)
PROBE_SIDE = 64  # a plain image every processor must take


class UnprocessableImages(ValueError):
    """The model's processor rejected the batch (an image it cannot take): bad data, not a broken model."""


@dataclass(frozen=True)
class CaptionSpec:
    """Everything that identifies a loaded captioner; hashable, so it keys the worker cache."""

    source: str  # hub id ("Salesforce/blip-image-captioning-base"), a folder or "pkg:<package>/<folder>"
    precision: str = "bf16"  # fp16 / bf16 weights on GPU; CPU always fp32
    batch_size: int = 16
    prompt: str | None = None  # conditional-captioning prefix, or the user turn of a chat VLM
    max_new_tokens: int = 30
    offline: bool = False  # never touch the network for weights
    cache_dir: str | None = None  # hub cache; None: the hub's default

    @property
    def model_id(self) -> str:
        """What the captions table records: a hub id as given, a folder with its weights' fingerprint."""
        return sources.model_id(self.source)


def locate_weights(spec: CaptionSpec) -> str:
    """The folder holding the model (the local source, or its hub cache snapshot), or HUB to download.

    Raises WeightsUnavailable when it is not cached and cannot be downloaded.
    """
    from huggingface_hub.errors import HFValidationError

    folder = Path(resolve(spec.source)[0])
    if folder.is_dir():
        if not (folder / CONFIG_FILE).is_file() or not weight_files(folder):
            raise WeightsUnavailable(f"{folder}: needs {CONFIG_FILE} and a weights file")
        return str(folder)
    try:
        config = hf_cached_file(spec.source, (CONFIG_FILE,), spec.cache_dir)
    except HFValidationError:
        raise FileNotFoundError(f"captioner {spec.source!r} is neither a folder nor a hub id") from None
    if config is not None and weight_files(Path(config).parent):
        return str(Path(config).parent)
    return hub_or_raise(spec.offline or env_offline(), f"captioner {spec.source} is not in the local hub cache")


class Captioner:
    """A loaded captioner. `caption` is thread-safe: one generate() at a time per model."""

    def __init__(self, model, processor, device: str, dtype, spec: CaptionSpec):
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.spec = spec
        self.model_id = spec.model_id
        self._text = _prompt_text(processor, spec.prompt)
        # Decoder-only models continue the prompt: a batch must end its prompts where generation starts.
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"
        self._lock = threading.Lock()
        # A processor that rejects every image (Florence-2 without its task prompt) is a setting to
        # fix, not bad data: fail here instead of writing an error row per image.
        try:
            self._inputs([_plain_image()])
        except UnprocessableImages as e:
            raise ValueError(f"captioner {self.model_id}: its processor rejects a plain {PROBE_SIDE}px image "
                             f"({e}); does the model need a prompt?") from None

    @property
    def input_size(self) -> int | None:
        """Largest side the image processor resizes to, when it says (JPEG draft decoding uses it)."""
        size = dict(getattr(getattr(self.processor, "image_processor", None), "size", None) or {})  # or a SizeDict
        sides = [v for k, v in size.items() if k in ("height", "width", "shortest_edge", "longest_edge")]
        return max(sides) if sides else None

    def caption(self, images: list) -> list[str]:
        """One caption per RGB PIL image, in order. Raises UnprocessableImages when the processor
        rejects a batch; any other error is the model's."""
        step = self.spec.batch_size
        return [c for lo in range(0, len(images), step) for c in self._caption_batch(images[lo:lo + step])]

    def _inputs(self, images: list):
        try:
            if self._text is None:
                return self.processor(images=images, return_tensors="pt")
            # one image per prompt, nested as chat processors (SmolVLM) want them
            return self.processor(images=[[im] for im in images], text=[self._text] * len(images),
                                  return_tensors="pt", padding=True)
        except Exception as e:  # processors raise ValueError, TypeError, IndexError... on odd images
            raise UnprocessableImages(f"{type(e).__name__}: {e}") from e

    def _caption_batch(self, images: list) -> list[str]:
        import torch

        inputs = self._inputs(images).to(self.device, dtype=self.dtype)
        with self._lock, torch.inference_mode():
            generated = self.model.generate(**inputs, do_sample=False, num_beams=1,
                                            max_new_tokens=self.spec.max_new_tokens)
        captions = self.processor.batch_decode(generated, skip_special_tokens=True)
        if "input_ids" in inputs:
            prompts = self.processor.batch_decode(inputs["input_ids"], skip_special_tokens=True)
            captions = [_without_echo(c, p) for c, p in zip(captions, prompts)]
        return [c.strip() for c in captions]


def _plain_image():
    from PIL import Image

    return Image.new("RGB", (PROBE_SIDE, PROBE_SIDE), "gray")


def _prompt_text(processor, prompt: str | None) -> str | None:
    """The text the processor is given: the prompt itself, or a chat turn asking it of the image."""
    if prompt is None or getattr(processor, "chat_template", None) is None:
        return prompt
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def _without_echo(caption: str, prompt: str) -> str:
    """`caption` without the prompt that decoder-only models (and BLIP) repeat before it."""
    at = caption.find(prompt) if prompt.strip() else -1
    return caption[at + len(prompt):] if 0 <= at <= MAX_ECHO_OFFSET else caption


@dataclass
class _ImageProcessorAndTokenizer:
    """For folders that save an image processor and a tokenizer but no processor class (the
    ViT-GPT2 captioners): AutoProcessor returns only the tokenizer for those."""

    image_processor: object
    tokenizer: object

    def __call__(self, images, return_tensors: str):
        return self.image_processor(images=images, return_tensors=return_tensors)

    def batch_decode(self, ids, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(ids, **kwargs)


def load_captioner(spec: CaptionSpec, device: str | None = None) -> Captioner:
    """The worker's cached captioner for `spec` (loaded on first use) on `device` (default: the
    task's GPU, else CPU)."""
    device = device or pick_device()
    return cache.get_or_load(("captioner", spec), lambda: _load(spec, device), device=device)


def _load(spec: CaptionSpec, device: str) -> Captioner:
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
    from transformers.processing_utils import ProcessorMixin

    source = locate_weights(spec)
    path = spec.source if source == HUB else source  # cached: load from disk, no hub round trips
    kwargs = {"cache_dir": spec.cache_dir}
    processor = AutoProcessor.from_pretrained(path, **kwargs)
    if not isinstance(processor, ProcessorMixin):
        if spec.prompt is not None:
            raise ValueError(f"captioner {spec.source} has no processor that takes text: it cannot use a prompt")
        processor = _ImageProcessorAndTokenizer(AutoImageProcessor.from_pretrained(path, **kwargs),
                                                AutoTokenizer.from_pretrained(path, **kwargs))
    dtype = getattr(torch, DTYPES[spec.precision]) if device.startswith("cuda") else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **kwargs).to(device).eval()
    return Captioner(model, processor, device, dtype, spec)
