"""LLM fusion (RealSyn §3.2): one synthetic text per image, written by an instruction-tuned LLM from
the image's best retrieved real-world sentence, a short caption and object tags.

The prompt is data, not code: a `PromptTemplate` carries a version and a content hash, and every
generated row records both, so a changed wording is visible in the table and a run can tell which
rows came from which prompt.

Three backends serve the same batch call (`Backend.generate`: one `Generation` per prompt, in
order), because where the model runs is a deployment choice, not a pipeline one:
- `TransformersBackend`: the model in the Spark worker, on the task's GPU or on CPU (local profile,
  tests). It shares the per-worker cached model with the perplexity scorer
  (realsyn_models.causal_lm) when both name the same model and precision, since inside a Spark task
  the cache holds one model at a time.
- `VllmBackend`: vLLM in the worker (GPU clusters, in the vLLM environment of deploy/), one engine
  per Python worker on the Spark task's GPU, each batch submitted at once so that vLLM's continuous
  batching schedules it (give it whole Arrow batches, not small chunks).
- `OpenAIHttpBackend`: any OpenAI-compatible chat-completions server (a vLLM or llama.cpp server,
  a hosted API), with bounded concurrency and retries. Its API key is read from the environment at
  call time and never leaves the request header: not stored, logged, or put in any error text.

No backend raises for one bad prompt: a failure is a `Generation` with finish_reason "error" and a
readable `error`, so one prompt cannot fail a partition of thousands.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import string
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from realsyn_models import cache
from realsyn_models.causal_lm import DTYPES, load_model
from realsyn_models.sources import resolve
from realsyn_models.device import pick_device, task_gpu_addresses

log = logging.getLogger("realsyn.llm")

Messages = list[dict[str, str]]

SLOTS = ("sentence", "caption", "tags")
NO_CAPTION = "(no caption)"
NO_TAGS = "(no tags)"


@dataclass(frozen=True)
class PromptTemplate:
    """A versioned chat prompt: `system` as is, `user` with the slots {sentence}, {caption}, {tags}.

    A missing caption reads "(no caption)" and an empty tag list "(no tags)", so every template
    renders the same way whatever its labels; tags are stripped, de-duplicated in order and joined
    with ", ".
    """

    version: str
    system: str
    user: str

    def __post_init__(self) -> None:
        fields = {name for _, name, _, _ in string.Formatter().parse(self.user) if name is not None}
        if fields != set(SLOTS):
            raise ValueError(f"prompt {self.version!r}: the user text must use exactly the slots "
                             f"{{sentence}}, {{caption}}, {{tags}}; it uses {sorted(fields)}")
        if any(name is not None for _, name, _, _ in string.Formatter().parse(self.system)):
            raise ValueError(f"prompt {self.version!r}: the system text takes no slots")

    @property
    def hash(self) -> str:
        """12 hex digits of sha256 over version, system and user: any change of wording is a new hash."""
        body = json.dumps([self.version, self.system, self.user], ensure_ascii=False)
        return hashlib.sha256(body.encode("utf-8")).hexdigest()[:12]

    def messages(self, sentence: str, caption: str | None, tags: Sequence[str] | None) -> Messages:
        tag_list = list(dict.fromkeys(t.strip() for t in (tags if tags is not None else ()) if t and t.strip()))
        user = self.user.format(
            sentence=sentence.strip(),
            caption=caption.strip() if caption and caption.strip() else NO_CAPTION,
            tags=", ".join(tag_list) if tag_list else NO_TAGS,
        )
        out = [{"role": "system", "content": self.system}] if self.system else []
        return out + [{"role": "user", "content": user}]


DEFAULT_TEMPLATE = PromptTemplate(
    version="v1",
    system="You write short, factual descriptions of images for an image-text dataset.",
    user=(
        "Write one synthetic description of an image from the three pieces of information below.\n"
        "\n"
        "Sentence (real-world text found with the image): {sentence}\n"
        "Caption (what the image shows): {caption}\n"
        "Tags (objects seen in the image): {tags}\n"
        "\n"
        "Rules:\n"
        "- Keep the real-world details of the sentence: names, places, dates, numbers and events.\n"
        "- Use the caption and the tags to describe what is visible and to enrich the sentence.\n"
        "- Blend everything into fluent text; do not simply join the pieces one after another.\n"
        "- Do not add any fact that is not given above.\n"
        "- Reply with one or two sentences in English and nothing else."
    ),
)


def render_text(messages: Messages) -> str:
    """A chat as plain text, for tokenizers without a chat template: one "Role: content" block per
    message, then "Assistant:" for the model to continue."""
    blocks = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join([*blocks, "Assistant:"])


@dataclass
class Generation:
    text: str
    tokens_in: int | None  # None: unknown (an error, or a server that reports no usage)
    tokens_out: int | None
    finish_reason: str  # "stop" | "length" | "error"
    error: str | None = None


def failed(error: str) -> Generation:
    return Generation("", None, None, "error", error)


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 96
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0


class Backend(Protocol):
    @property
    def model_id(self) -> str: ...

    def generate(self, batch: list[Messages]) -> list[Generation]:
        """One Generation per prompt, in the order given; never raises for a single bad prompt."""
        ...

    def close(self) -> None: ...


# -- transformers ---------------------------------------------------------------------------------


class TransformersBackend:
    """A transformers causal LM in this worker, batched greedy (or seeded sampled) generation.

    The model comes from the same cache entry as the perplexity scorer's (key ("causal_lm", spec,
    precision), same loader), so one model serves both stages in a worker. The shared tokenizer is
    never modified: prompts are left-padded here by hand, as the scorer right-pads by hand, so
    neither depends on the tokenizer's `padding_side`.
    """

    def __init__(self, source: str, precision: str = "bf16", batch_size: int = 8,
                 sampling: SamplingConfig = SamplingConfig(), device: str | None = None):
        if precision not in DTYPES:
            raise ValueError(f"precision {precision!r}: expected one of {sorted(DTYPES)}")
        self.source = source
        self.batch_size = batch_size
        self.sampling = sampling
        self.device = device or pick_device()
        self.model, self.tokenizer = cache.get_or_load(
            ("causal_lm", source, precision), lambda: load_model(source, self.device, precision), device=self.device)
        eos = self.model.generation_config.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
            eos.append(self.tokenizer.eos_token_id)
        self._eos = eos
        self._pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (eos or [0])[0]
        self._context = getattr(self.model.config, "max_position_embeddings", None)

    @property
    def model_id(self) -> str:
        return self.source

    def close(self) -> None:
        """Nothing to release: the model stays cached for the worker's next task."""

    def _prompt_ids(self, messages: Messages) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return tok(text, add_special_tokens=False)["input_ids"]  # the template wrote them
        return tok(render_text(messages))["input_ids"]

    def generate(self, batch: list[Messages]) -> list[Generation]:
        out: list[Generation | None] = [None] * len(batch)
        ids: dict[int, list[int]] = {}
        for i, messages in enumerate(batch):
            try:
                ids[i] = self._prompt_ids(messages)
            except Exception as exc:  # a message the chat template refuses (e.g. a role it lacks)
                out[i] = failed(f"prompt: {type(exc).__name__}: {exc}")
                continue
            need = len(ids[i]) + self.sampling.max_new_tokens
            if self._context is not None and need > self._context:
                out[i] = failed(f"prompt is {len(ids[i])} tokens; with max_new_tokens="
                                f"{self.sampling.max_new_tokens} it exceeds the model's context of {self._context}")
                del ids[i]
        # Similar lengths in one batch: less padding, less wasted compute.
        order = sorted(ids, key=lambda i: len(ids[i]))
        for lo in range(0, len(order), self.batch_size):
            chunk = order[lo: lo + self.batch_size]
            try:
                results = self._generate_chunk([ids[i] for i in chunk])
            except Exception as exc:  # out of memory and the like: this chunk fails, the rest goes on
                results = [failed(f"generate: {type(exc).__name__}: {exc}") for _ in chunk]
            for i, gen in zip(chunk, results):
                out[i] = gen
        return out  # type: ignore[return-value]

    def _generate_chunk(self, rows: list[list[int]]) -> list[Generation]:
        import torch
        from transformers import GenerationConfig

        width = max(len(r) for r in rows)
        # Left padding: every row's last prompt token sits in the last column, where generation
        # continues; the attention mask (and the position ids generate derives from it) skip the pads.
        input_ids = torch.tensor([[self._pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        s = self.sampling
        sample = s.temperature > 0
        config = GenerationConfig(
            max_new_tokens=s.max_new_tokens, do_sample=sample,
            temperature=s.temperature if sample else None, top_p=s.top_p if sample else None,
            eos_token_id=self._eos or None, pad_token_id=self._pad)
        if sample:
            torch.manual_seed(s.seed)
        with torch.inference_mode():
            seqs = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                       generation_config=config)
        results = []
        for row, new in zip(rows, seqs[:, width:].tolist()):
            stop = next((k for k, t in enumerate(new) if t in self._eos), None)
            if stop is None:
                text_ids, n_out, reason = new, len(new), "length"
            else:  # the stop token counts as generated, as vLLM and OpenAI usage count it
                text_ids, n_out, reason = new[:stop], stop + 1, "stop"
            text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
            results.append(Generation(text.strip(), len(row), n_out, reason))
        return results


# -- OpenAI-compatible HTTP -----------------------------------------------------------------------

REDACTED = "[REDACTED]"
_BEARER = re.compile(r"(Bearer\s+)\S+", re.IGNORECASE)
_SNIPPET = 300  # characters of a response body quoted in an error


def redact(text: str, secret: str | None) -> str:
    """`text` without `secret` and without anything following "Bearer "."""
    if secret:
        text = text.replace(secret, REDACTED)
    return _BEARER.sub(r"\1" + REDACTED, text)


class OpenAIHttpBackend:
    """POST {base_url}/chat/completions, `concurrency` requests in flight.

    Retried (up to `retries` more attempts): 429, 5xx, timeouts and connection errors, after
    `Retry-After` seconds when the server sends them (capped at `max_backoff_s`), else after
    exponential backoff with jitter (backoff_s * 2^attempt, capped, times 0.5-1). Other 4xx answers
    are final. `timeout_s` bounds the connect and each read of one request.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, concurrency: int = 8,
                 timeout_s: float = 60, retries: int = 4, backoff_s: float = 1.0, max_backoff_s: float = 30,
                 sampling: SamplingConfig = SamplingConfig()):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.sampling = sampling
        self._random = random.Random()
        self._local = threading.local()
        self._sessions: list[Any] = []
        self._sessions_lock = threading.Lock()
        self._api_key()  # fail at construction (on the worker) when the variable is missing

    @property
    def model_id(self) -> str:
        return self.model

    def _api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise RuntimeError(f"OpenAIHttpBackend: environment variable {self.api_key_env} (the API key) "
                               "is not set in this process")
        return key

    def _session(self):
        """One requests.Session per thread: kept-alive connections without sharing one across threads."""
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        with self._sessions_lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def generate(self, batch: list[Messages]) -> list[Generation]:
        if not batch:
            return []
        key = self._api_key()
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(batch))) as pool:
            return list(pool.map(lambda messages: self._one(messages, key), batch))

    def _one(self, messages: Messages, key: str | None) -> Generation:
        try:
            gen = self._request(messages, key)
        except Exception as exc:  # nothing escapes for one prompt
            gen = failed(f"{type(exc).__name__}: {exc}")
        gen.text = redact(gen.text, key)
        gen.error = redact(gen.error, key) if gen.error is not None else None
        return gen

    def _request(self, messages: Messages, key: str | None) -> Generation:
        import requests

        s = self.sampling
        payload = {"model": self.model, "messages": messages, "max_tokens": s.max_new_tokens,
                   "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed}
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        attempts = self.retries + 1
        problem = ""
        for attempt in range(attempts):
            retry_after = None
            try:
                resp = self._session().post(self.url, json=payload, headers=headers, timeout=self.timeout_s)
            except requests.Timeout:
                problem = f"timed out after {self.timeout_s}s"
            except requests.ConnectionError as exc:
                problem = f"connection error: {exc}"
            else:
                if resp.status_code == 429 or resp.status_code >= 500:
                    problem = f"HTTP {resp.status_code}: {resp.text[:_SNIPPET]}"
                    retry_after = self._retry_after(resp.headers.get("Retry-After"))
                elif resp.status_code >= 400:
                    return failed(f"HTTP {resp.status_code}: {resp.text[:_SNIPPET]}")
                else:
                    return parse_chat_completion(resp.text)
            if attempt + 1 < attempts:
                delay = retry_after if retry_after is not None else self._backoff(attempt)
                log.debug("llm request %d/%d failed (%s); retrying in %.2fs",
                          attempt + 1, attempts, redact(problem, key), delay)
                time.sleep(delay)
        return failed(f"{problem} (gave up after {attempts} attempts)")

    def _retry_after(self, value: str | None) -> float | None:
        """The seconds form of Retry-After, capped; None for a date or garbage (then: backoff)."""
        try:
            seconds = float(value) if value is not None else None
        except ValueError:
            return None
        return None if seconds is None else min(max(seconds, 0.0), self.max_backoff_s)

    def _backoff(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * self._random.uniform(0.5, 1.0)


def parse_chat_completion(body: str) -> Generation:
    """A chat-completions response body -> Generation; malformed or incomplete -> an error Generation.

    The text is required; a missing `usage` leaves the token counts unknown (None); a missing
    finish_reason reads "stop"; one other than stop/length (content_filter, tool_calls) is an error.
    """
    try:
        data = json.loads(body)
    except ValueError:
        return failed(f"malformed JSON in response: {body[:_SNIPPET]!r}")
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return failed(f"response without choices[0].message.content: {body[:_SNIPPET]!r}")
    if not isinstance(text, str):
        return failed(f"response content is not text: {body[:_SNIPPET]!r}")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    tokens_in, tokens_out = usage.get("prompt_tokens"), usage.get("completion_tokens")
    reason = choice.get("finish_reason") or "stop"
    gen = Generation(text.strip(), tokens_in if isinstance(tokens_in, int) else None,
                     tokens_out if isinstance(tokens_out, int) else None, reason)
    if reason not in ("stop", "length"):
        gen.finish_reason, gen.error = "error", f"finish_reason {reason!r}"
    return gen


# -- vLLM -----------------------------------------------------------------------------------------


class VllmBackend:
    """vLLM's offline engine in this worker (GPU clusters; vllm is not a dependency of the project,
    it comes with deploy/constraints-vllm.txt's environment).

    Request building (`sampling_kwargs`, `requests`) and reading the results (`parse`) are plain
    data and testable without vllm; only `generate` touches the engine, created on first use.

    - **One engine per worker, on the task's GPU.** The engine is built with CUDA_VISIBLE_DEVICES
      narrowed to the GPU Spark assigned the task (`task_visible_devices`), in a spawned engine
      process that reads it at start (VLLM_WORKER_MULTIPROC_METHOD=spawn unless set): two tasks of
      a multi-GPU executor each get their own card whatever this worker's torch saw before. The
      worker's own variable is restored afterwards, so its other models keep their device mapping
      (realsyn_models/device.py). The engine is cached per worker keyed by that GPU
      (realsyn_models.cache): later tasks on the same GPU reuse it, a reused worker given another
      GPU frees it first. With the GPU profiles (one executor per GPU, a model task holding the
      whole GPU) that is one engine per executor.
    - **A partition at once.** `whole_partition`: udfs/generate.py hands it every prompt of the
      task's partition in one `generate` call, which is one `LLM.chat` call, so vLLM's continuous
      batching sees them all (models.llm.batch_size does not cut them).
    - **Bounded memory.** `gpu_memory_utilization` (the share of the card for weights, activations
      and KV cache) and `max_model_len` (the longest sequence the KV cache is sized for) come from
      config (models.llm).
    - A prompt vLLM refuses (longer than max_model_len, say) fails alone: the batch is retried one
      prompt at a time, each refusal its own error Generation.
    """

    whole_partition = True

    def __init__(self, model: str, sampling: SamplingConfig = SamplingConfig(), tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.85, max_model_len: int | None = None):
        self.model = model
        self.sampling = sampling
        self.tensor_parallel_size = tensor_parallel_size
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len

    @property
    def model_id(self) -> str:
        return self.model

    def close(self) -> None:
        """Nothing to release: the engine stays cached for the worker's next task."""

    def sampling_kwargs(self) -> dict[str, Any]:
        s = self.sampling
        return {"max_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed}

    def requests(self, batch: list[Messages]) -> list[Messages]:
        """The conversations for one `LLM.chat` call: the whole batch at once, plain dicts."""
        return [[{"role": m["role"], "content": m["content"]} for m in messages] for messages in batch]

    def parse(self, outputs: Sequence[Any]) -> list[Generation]:
        """vLLM RequestOutputs (in submission order) -> Generations."""
        gens = []
        for out in outputs:
            try:
                completion = out.outputs[0]
                reason = completion.finish_reason
                gen = Generation(completion.text.strip(), _count(out.prompt_token_ids),
                                 _count(completion.token_ids), reason)
                if reason not in ("stop", "length"):
                    gen.finish_reason, gen.error = "error", f"finish_reason {reason!r}"
            except (AttributeError, IndexError, TypeError) as exc:
                gen = failed(f"unreadable vLLM output: {type(exc).__name__}: {exc}")
            gens.append(gen)
        return gens

    def generate(self, batch: list[Messages]) -> list[Generation]:
        if not batch:
            return []
        llm, sampling_params = self._engine()
        params = sampling_params(**self.sampling_kwargs())
        try:
            outputs = llm.chat(self.requests(batch), params, use_tqdm=False)
        except ValueError as exc:
            # vLLM validates every prompt before it runs any: one it refuses fails the whole call.
            if len(batch) == 1:
                return [failed(f"vLLM refused the prompt: {exc}")]
            return [gen for messages in batch for gen in self._one_by_one(llm, params, messages)]
        gens = self.parse(outputs)
        if len(gens) != len(batch):
            return [failed(f"vLLM returned {len(gens)} outputs for {len(batch)} prompts") for _ in batch]
        return gens

    def _one_by_one(self, llm: Any, params: Any, messages: Messages) -> list[Generation]:
        try:
            gens = self.parse(llm.chat(self.requests([messages]), params, use_tqdm=False))
        except ValueError as exc:
            return [failed(f"vLLM refused the prompt: {exc}")]
        return gens if len(gens) == 1 else [failed(f"vLLM returned {len(gens)} outputs for 1 prompt")]

    def _engine(self) -> tuple[Any, Callable[..., Any]]:
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:
            raise RuntimeError("the vllm backend needs the vllm package (GPU machines), which is not installed "
                               "here; on CPU use the 'transformers' backend (TransformersBackend)") from exc
        folder, gguf = resolve(self.model)
        path = str(Path(folder) / gguf) if gguf else folder
        visible = task_visible_devices(self.tensor_parallel_size)
        key = ("vllm", self.model, self.tensor_parallel_size, self.gpu_memory_utilization, self.max_model_len)

        def load() -> Any:
            os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
            before = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible is not None:
                os.environ["CUDA_VISIBLE_DEVICES"] = visible
            try:
                return LLM(model=path, tensor_parallel_size=self.tensor_parallel_size,
                           gpu_memory_utilization=self.gpu_memory_utilization, max_model_len=self.max_model_len,
                           seed=self.sampling.seed)
            finally:
                if before is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = before

        llm = cache.get_or_load(key, load, device=f"CUDA_VISIBLE_DEVICES={visible}" if visible is not None else None)
        return llm, SamplingParams


def task_visible_devices(count: int = 1) -> str | None:
    """The CUDA_VISIBLE_DEVICES value that shows an engine exactly the GPUs Spark assigned the
    running task (its first `count`); None outside a Spark task or without GPUs (the process's
    own variable then stands).

    Spark's addresses are the discovery script's nvidia-smi indices, physical ones; where this
    process's CUDA_VISIBLE_DEVICES already lists physical ids without them (a container that
    renumbers), an address is read as a position in that list (as realsyn_models/device.py's
    cuda_index does)."""
    addresses = task_gpu_addresses()
    if not addresses:
        return None
    if len(addresses) < count:
        raise RuntimeError(f"vLLM with tensor_parallel_size={count} needs {count} GPUs per task; this task holds "
                           f"{len(addresses)} ({', '.join(addresses)}): set models.llm.tensor_parallel_size to "
                           "the GPUs a model task gets (spark.gpu.task_amount)")
    current = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in current.split(",") if v.strip()] if current else []
    physical = []
    for address in addresses[:count]:
        if ids and address not in ids and address.isdigit() and int(address) < len(ids):
            physical.append(ids[int(address)])
        else:
            physical.append(address)
    return ",".join(physical)


def _count(token_ids: Sequence[int] | None) -> int | None:
    return None if token_ids is None else len(token_ids)


# -- factory --------------------------------------------------------------------------------------

BACKENDS: dict[str, Callable[..., Backend]] = {
    "transformers": TransformersBackend,
    "openai": OpenAIHttpBackend,
    "vllm": VllmBackend,
}


def make_backend(kind: str, **kwargs: Any) -> Backend:
    """make_backend("transformers", source=..., ...): the backend of that kind with those arguments."""
    try:
        cls = BACKENDS[kind]
    except KeyError:
        raise ValueError(f"LLM backend {kind!r}: expected one of {sorted(BACKENDS)}") from None
    return cls(**kwargs)
