"""open_clip image+text dual encoder: any architecture, pretrained tag, `hf-hub:` id, `local-dir:`
folder or local checkpoint file; L2-normalised float32 vectors out.

Where the weights come from is decided once, on the driver, by `resolve()`: it never downloads
(the driver of an EVA02-E job must not pull 10 GB), it only looks in the local caches and, unless
offline, checks the hub is reachable. When weights cannot be had, `allow_random_init` chooses
between a loud random init of the same architecture (its own model id, so its vectors never mix
with real ones) and an error. Workers then load exactly what the driver decided: a worker that
cannot get weights the driver promised fails its task instead of quietly going random.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from realsyn_models import cache
from realsyn_models.device import pick_device
from realsyn_models.sources import WEIGHT_SUFFIXES, fingerprint, weight_files

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
HF_WEIGHT_FILES = ("open_clip_pytorch_model.bin",)  # open_clip's default; its safetensors twin first
HF_CONFIG_FILE = "open_clip_config.json"
HUB = "<hub>"  # weights source: not cached here, download when loading
HUB_PROBE_TIMEOUT_S = 3.0
RANDOM_INIT_NOTE = "RANDOM INIT (pretrained weights unavailable offline)"
RANDOM_INIT_TAG = "@random-init"  # in the model id of a random-init fallback


def is_random_init(model_id: str) -> bool:
    """Whether embeddings recorded under `model_id` came from a random-init fallback."""
    return RANDOM_INIT_TAG in model_id


class WeightsUnavailable(RuntimeError):
    """The configured pretrained weights are neither cached locally nor downloadable."""


@dataclass(frozen=True)
class ClipSpec:
    """Everything that identifies a loaded encoder; hashable, so it keys the worker cache."""

    model: str  # architecture name, "hf-hub:org/repo" or "local-dir:/path"
    pretrained: str | None = None  # tag or checkpoint file; only with an architecture name
    precision: str = "fp32"  # fp16 / bf16: low-precision weights + autocast on GPU; CPU always fp32
    random_init: bool = False  # set by resolve(), never by a worker
    seed: int = 0  # random init is seeded so every worker builds the same weights
    model_config_dir: str | None = None  # extra architecture JSONs (open_clip.add_model_config)
    cache_dir: str | None = None  # weights cache; None: the hub's default
    offline: bool = False  # never touch the network for weights
    device: str | None = None  # None: pick_device()

    @property
    def model_id(self) -> str:
        """What the embedding tables record: same id <=> same vectors."""
        if self.random_init:
            return f"{self.model}{RANDOM_INIT_TAG}-seed{self.seed}"
        if self.model.startswith(LOCAL_DIR_PREFIX):
            return f"{self.model}#{fingerprint(*weight_files(Path(self.model[len(LOCAL_DIR_PREFIX):])))}"
        if self.pretrained and _looks_like_path(self.pretrained):
            return f"{self.model}@{Path(self.pretrained).name}#{fingerprint(Path(self.pretrained))}"
        return f"{self.model}@{self.pretrained}" if self.pretrained else self.model


def resolve(spec: ClipSpec, allow_random_init: bool) -> tuple[ClipSpec, str]:
    """Decide where the weights come from: (spec to load, a note for the `runs` table).

    Raises WeightsUnavailable when there are none and random init is not allowed.
    """
    try:
        source = locate_weights(spec)
    except WeightsUnavailable as e:
        if not allow_random_init:
            raise WeightsUnavailable(f"{e}; allow_random_init (in the model's config) runs on a random init") from None
        if spec.model.startswith(HF_HUB_PREFIX) and _hf_arch_snapshot(spec) is None:
            raise WeightsUnavailable(f"{e}; its architecture config is not cached either, so not even a "
                                     "random init is possible") from None
        note = f"{RANDOM_INIT_NOTE}: {spec.model} pretrained={spec.pretrained} ({e})"
        banner(note)
        return replace(spec, random_init=True), note
    where = "download from hub" if source == HUB else source
    return spec, f"pretrained: {spec.model_id} ({where})"


def banner(message: str) -> None:
    line = "!" * 100
    logging.getLogger("realsyn").warning(
        "\n%s\n!!! %s\n!!! Vectors from this model are NOT meaningful; do not train on them.\n%s", line, message, line)


def locate_weights(spec: ClipSpec) -> str:
    """Local path of the weights (file, or folder for hf-hub/local-dir), or HUB to download them."""
    offline = spec.offline or env_offline()
    if spec.model.startswith(LOCAL_DIR_PREFIX):
        folder = Path(spec.model[len(LOCAL_DIR_PREFIX):])
        if not (folder / HF_CONFIG_FILE).is_file() or not weight_files(folder):
            raise WeightsUnavailable(f"{folder}: needs {HF_CONFIG_FILE} and a weights file")
        return str(folder)
    if spec.model.startswith(HF_HUB_PREFIX):
        repo = spec.model[len(HF_HUB_PREFIX):]
        snapshot = _hf_cached_snapshot(repo, spec.cache_dir)
        if snapshot is not None:
            return snapshot
        return hub_or_raise(offline, f"{repo} is not in the local hub cache")
    if not spec.pretrained:
        raise WeightsUnavailable(f"{spec.model}: no pretrained weights configured")
    if _looks_like_path(spec.pretrained):
        if not Path(spec.pretrained).is_file():
            raise FileNotFoundError(f"checkpoint file not found: {spec.pretrained}")
        return spec.pretrained
    tag_cfg = _tag_cfg(spec)
    hub_path = tag_cfg.get("hf_hub", "")
    if hub_path:
        repo, filename = os.path.split(hub_path)
        cached = hf_cached_file(repo, (filename,) if filename else HF_WEIGHT_FILES, spec.cache_dir)
        if cached:
            return cached
    if tag_cfg.get("url"):
        cached = Path(spec.cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(tag_cfg["url"])
        if cached.is_file():
            return str(cached)
    return hub_or_raise(offline, f"{spec.model}/{spec.pretrained} weights are not in the local cache")


def hub_or_raise(offline: bool, why: str) -> str:
    if offline:
        raise WeightsUnavailable(f"{why} and the run is offline")
    host = urlparse(_hf_endpoint()).hostname or "huggingface.co"
    try:  # one quick connect instead of the hub client's minute of retries
        socket.create_connection((host, 443), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise WeightsUnavailable(f"{why} and {host} is unreachable ({e})") from None
    return HUB


def env_offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "REALSYN_OFFLINE"))


def _hf_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hf_cached_file(repo: str, filenames: tuple[str, ...], cache_dir: str | None) -> str | None:
    """First cached file among `filenames` (each preceded by its safetensors twin, as open_clip does)."""
    from huggingface_hub import try_to_load_from_cache
    from open_clip.pretrained import _get_safe_alternatives

    for name in filenames:
        for candidate in (*_get_safe_alternatives(name), name):
            path = try_to_load_from_cache(repo, candidate, cache_dir=cache_dir)
            if isinstance(path, str):  # otherwise None or a "known missing" marker
                return path
    return None


def _hf_cached_snapshot(repo: str, cache_dir: str | None) -> str | None:
    config = hf_cached_file(repo, (HF_CONFIG_FILE,), cache_dir)
    if config is None:
        return None
    folder = Path(config).parent
    return str(folder) if weight_files(folder) else None


def _hf_arch_snapshot(spec: ClipSpec) -> str | None:
    """Cached folder holding an hf-hub model's open_clip_config.json (weights or not)."""
    config = hf_cached_file(spec.model[len(HF_HUB_PREFIX):], (HF_CONFIG_FILE,), spec.cache_dir)
    return str(Path(config).parent) if config else None


def _tag_cfg(spec: ClipSpec) -> dict:
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    _register_configs(spec.model_config_dir)
    cfg = get_pretrained_cfg(spec.model, spec.pretrained)
    if not cfg:
        raise ValueError(f"unknown pretrained tag {spec.pretrained!r} for {spec.model}; "
                         f"known: {list_pretrained_tags_by_model(spec.model)}")
    return cfg


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith(WEIGHT_SUFFIXES)


_registered: set[str] = set()


def _register_configs(model_config_dir: str | None) -> None:
    if model_config_dir and model_config_dir not in _registered:
        import open_clip

        open_clip.add_model_config(model_config_dir)
        _registered.add(model_config_dir)


# --- the encoder --------------------------------------------------------------------------------

class ClipEncoder:
    """A loaded dual encoder. `preprocess` is CPU-only and thread-safe; `encode_*` run the model."""

    def __init__(self, model, preprocess, tokenizer, device: str, spec: ClipSpec):
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.spec = spec
        self.model_id = spec.model_id
        self.pretrained = not spec.random_init
        self._autocast_dtype = _autocast_dtype(spec.precision, device)
        self._text_tower = _causal_text_tower(model)  # None: texts run at full width
        # Threads from a decode pool may ask for vectors too; one forward at a time per model.
        self._lock = threading.Lock()
        self.dim = int(self.encode_texts([""]).shape[1])

    def encode_images(self, pixels) -> np.ndarray:
        """Preprocessed image tensor (n, 3, H, W) -> (n, dim) float32, unit norm."""
        return self._encode(self.model.encode_image, pixels)

    def encode_pil(self, images: list) -> np.ndarray:
        import torch

        return self.encode_images(torch.stack([self.preprocess(im) for im in images]))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return self._encode(self._encode_text_trimmed, self.tokenizer(list(texts)))

    def _encode_text_trimmed(self, tokens):
        """model.encode_text over only the positions up to the batch's last pooled token.

        The tokenizer pads every text to the context length (77), while a sentence is ~20 tokens:
        at full width most of the text tower's work is on padding. Where the tower is causal and
        pools at the end-of-text token (open_clip's own text towers: CLIP's, and the custom one of
        EVA02-E-14-plus), no position after that token reaches the pooled vector, so the trimmed
        batch gives the same vectors. Other towers (non-causal such as SigLIP's, Hugging Face
        text models, CoCa's appended class token) run at full width.
        """
        tower = self._text_tower
        width = None if tower is None else _pooled_width(tower, tokens)
        if width is None or width >= tokens.shape[1]:
            return self.model.encode_text(tokens)
        import torch

        # Swapped in for this call only (callers hold self._lock), so open_clip's own
        # encode_text runs: casting, pooling and projection stay exactly the library's.
        positions, mask = tower.positional_embedding, tower.attn_mask
        tower.positional_embedding = torch.nn.Parameter(positions[:width], requires_grad=False)
        tower.attn_mask = mask[:width, :width]
        try:
            return self.model.encode_text(tokens[:, :width])
        finally:
            tower.positional_embedding, tower.attn_mask = positions, mask

    def _encode(self, forward, batch) -> np.ndarray:
        import torch

        if len(batch) == 0:
            return np.zeros((0, getattr(self, "dim", 0)), dtype=np.float32)
        device_type = self.device.split(":")[0]
        with self._lock, torch.inference_mode(), torch.autocast(
            device_type, dtype=self._autocast_dtype or torch.float32, enabled=self._autocast_dtype is not None
        ):
            out = forward(batch.to(self.device, non_blocking=True))
            out = torch.nn.functional.normalize(out.float(), dim=-1)
        return out.cpu().numpy().astype(np.float32, copy=False)


def _causal_text_tower(model):
    """The module holding the text tower's causal mask and position table (the CLIP model itself,
    or a custom-text model's TextTransformer), or None where trimming would change the vectors."""
    from open_clip.model import CLIP, CustomTextCLIP
    from open_clip.transformer import TextTransformer

    if type(model) is CLIP:
        tower = model
    elif isinstance(model, CustomTextCLIP) and type(model.text) is TextTransformer and model.text.cls_emb is None:
        tower = model.text
    else:
        return None
    return tower if getattr(tower, "attn_mask", None) is not None else None


def _pooled_width(tower, tokens) -> int | None:
    """1 + the last position the tower's pooling reads in `tokens`; None where it does not pool at
    a token (first / last position, no pooling)."""
    # CLIP names them text_pool_type / text_eos_id, TextTransformer pool_type / eos_id.
    pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", None))
    eos = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
    if pool == "argmax":
        index = tokens.argmax(dim=-1)
    elif pool == "eos" and eos is not None:
        index = (tokens == eos).int().argmax(dim=-1)
    else:
        return None
    return int(index.max()) + 1


def _autocast_dtype(precision: str, device: str):
    import torch

    if not device.startswith("cuda") or precision == "fp32":
        return None  # CPU autocast is slower than fp32 for these models
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def get_encoder(spec: ClipSpec) -> ClipEncoder:
    """The worker's cached encoder for `spec` (loaded on first use) on this task's device."""
    device = spec.device or pick_device()
    return cache.get_or_load(("clip", replace(spec, device=None)), lambda: load(replace(spec, device=device)),
                             device=device)


def load(spec: ClipSpec) -> ClipEncoder:
    import open_clip
    import torch

    device = spec.device or pick_device()
    _register_configs(spec.model_config_dir)
    # On GPU, fp16/bf16 weights (OpenAI-style: layer norms stay fp32) halve memory -- EVA02-E is
    # 4.4B parameters -- and the forward runs under autocast. CPU stays fp32.
    precision = spec.precision if device.startswith("cuda") else "fp32"
    kwargs = dict(precision=precision, device=device, weights_only=True, load_weights=not spec.random_init,
                  cache_dir=spec.cache_dir)
    model_name, pretrained, tokenizer_name = spec.model, spec.pretrained, spec.model
    if spec.model.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
        pretrained = None
        if spec.model.startswith(HF_HUB_PREFIX):
            snapshot = _hf_arch_snapshot(spec) if spec.random_init else \
                _hf_cached_snapshot(spec.model[len(HF_HUB_PREFIX):], spec.cache_dir)
            if snapshot is not None:  # cached: load from disk, no hub round trips
                model_name = tokenizer_name = LOCAL_DIR_PREFIX + snapshot
    elif spec.pretrained and not _looks_like_path(spec.pretrained):
        # A tag: load its file from the cache ourselves so open_clip never retries the network,
        # and keep the tag's preprocessing (mean/std/resize).
        tag_cfg = _tag_cfg(spec)
        kwargs.update({f"image_{k}": tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode")
                       if k in tag_cfg})
        kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
        if spec.random_init:
            pretrained = None
        else:
            source = locate_weights(spec)
            pretrained = spec.pretrained if source == HUB else source
    elif spec.random_init:
        pretrained = None

    if spec.random_init:
        # resolve() already warned loudly, once, on the driver; workers only note it.
        logging.getLogger("realsyn").info("%s: loading %s", RANDOM_INIT_NOTE, spec.model_id)
        logging.disable(logging.WARNING)  # open_clip's own "no pretrained weights" line, per worker
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(spec.seed)
                model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained,
                                                                             **kwargs)
        finally:
            logging.disable(logging.NOTSET)
    else:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, **kwargs)
    model.eval()
    tokenizer = open_clip.get_tokenizer(tokenizer_name, cache_dir=spec.cache_dir)
    return ClipEncoder(model, preprocess, tokenizer, device, replace(spec, device=device))
