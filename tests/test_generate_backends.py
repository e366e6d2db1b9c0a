"""LLM backends for fusion, each against the real thing it talks to.

- TransformersBackend: a tiny GPT-2 (lm_fixtures) trained here for a second to continue the fixture
  sentences, so greedy outputs depend on the prompt and the left-padding, ordering, token-count and
  finish-reason checks mean something; a chat template is set on its tokenizer for that branch.
- OpenAIHttpBackend: a threaded http.server on 127.0.0.1 (ephemeral port) speaking chat
  completions, scripted per prompt: 429 + Retry-After, 500, a hang past the timeout, malformed
  JSON, and a server that echoes the API key back.
- VllmBackend: request building and parsing on RequestOutput-shaped data; vllm is not installed, so
  the engine is a fake `vllm` module (FakeLLM) that records what vLLM would have been given: the
  GPU it sees, one chat call per batch, the memory bounds.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from lm_fixtures import VOCAB_TEXT
from realsyn_models import cache
from realsyn_models.llm import (DEFAULT_TEMPLATE, Generation, OpenAIHttpBackend, PromptTemplate, SamplingConfig,
                                TransformersBackend, VllmBackend, make_backend, render_text, task_visible_devices)

USER_ONLY_TEMPLATE = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"


def train_chat_lm(base: str, out: Path, texts: list[str], steps: int = 120) -> str:
    """Copy of the tiny LM at `base`, trained to continue `texts` (each ending with EOS), with a chat
    template that renders the user turn as is. Single-threaded: on a shared 2-core machine torch's
    default threads make these few hundred tiny steps 30x slower."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    seqs = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [tok.eos_token_id] * (width - len(s)) for s in seqs])
    labels = torch.tensor([s + [-100] * (width - len(s)) for s in seqs])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(steps):
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    tok.chat_template = USER_ONLY_TEMPLATE
    tok.save_pretrained(out)
    model.eval().save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def chat_lm(tiny_lm, tmp_path_factory) -> str:
    return train_chat_lm(tiny_lm, tmp_path_factory.mktemp("chat-gpt2"), VOCAB_TEXT)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def backend(path: str, batch_size: int = 8, max_new_tokens: int = 20, **sampling) -> TransformersBackend:
    return TransformersBackend(path, precision="fp32", batch_size=batch_size, device="cpu",
                               sampling=SamplingConfig(max_new_tokens=max_new_tokens, **sampling))


# -- transformers ---------------------------------------------------------------------------------


def test_left_padding_and_order(chat_lm):
    lm = backend(chat_lm)
    short, long = user("Serve with"), user("When the onions have become")
    alone_short, alone_long = lm.generate([short])[0], lm.generate([long])[0]
    assert alone_short == Generation("apple sauce .", 2, 4, "stop")  # 3 words + EOS
    assert alone_long == Generation("sufficiently cooked , add potatoes .", 5, 7, "stop")
    # One padded batch, given long-first: the short prompt is left-padded by 3 and still greedy-decodes
    # the same; sorting by length inside generate does not reorder the answers.
    assert lm.generate([long, short, long]) == [alone_long, alone_short, alone_long]
    assert lm.generate([]) == []


def test_length_finish_and_context_limit(chat_lm):
    lm = backend(chat_lm, max_new_tokens=3)
    cut, fits = lm.generate([user("Cut onions into"), user("Serve with")])
    assert cut == Generation("half - rings", 3, 3, "length")
    assert fits == Generation("apple sauce .", 2, 3, "length")  # the stop token would have been the 4th
    # The tiny model's context is 64 positions: a prompt that cannot fit fails alone, with the numbers.
    lm = backend(chat_lm, max_new_tokens=20)
    too_long, ok = lm.generate([user(" ".join(["Serve"] * 50)), user("Serve with")])
    assert too_long.finish_reason == "error" and too_long.text == "" and too_long.tokens_in is None
    assert "50 tokens" in too_long.error and "context of 64" in too_long.error
    assert ok.text == "apple sauce ."


def test_chat_template_and_plain_text_prompts(chat_lm, tiny_lm):
    from transformers import AutoTokenizer

    template = PromptTemplate("short", "Be brief.", "{sentence} {caption} {tags}")
    messages = template.messages("Serve with", "potatoes", ["butter"])
    # Without a chat template the whole chat goes in as render_text; with one, the template decides
    # (this one keeps only the user turn). Token counts follow the text the model really saw.
    plain_ids = AutoTokenizer.from_pretrained(tiny_lm)(render_text(messages))["input_ids"]
    chat_tok = AutoTokenizer.from_pretrained(chat_lm)
    chat_ids = chat_tok("Serve with potatoes butter", add_special_tokens=False)["input_ids"]
    assert len(plain_ids) > len(chat_ids) == 4
    assert backend(tiny_lm, max_new_tokens=1).generate([messages])[0].tokens_in == len(plain_ids)
    assert backend(chat_lm, max_new_tokens=1).generate([messages])[0].tokens_in == len(chat_ids)
    # The tiny model's 64 positions are too few for the default prompt: an error, not a crash.
    full = backend(chat_lm).generate([DEFAULT_TEMPLATE.messages("Serve with", "potatoes", ["butter"])])[0]
    assert full.finish_reason == "error" and "exceeds the model's context of 64" in full.error


def test_shares_the_perplexity_scorers_model_and_leaves_its_tokenizer_alone(chat_lm):
    from realsyn_models.causal_lm import load_scorer

    cache.clear()
    scorer = load_scorer(chat_lm, batch_size=4, precision="fp32", device="cpu")
    before = scorer.perplexity(VOCAB_TEXT)
    side = scorer.tokenizer.padding_side
    lm = backend(chat_lm)
    assert lm.model is scorer.model and cache.load_count() == 1
    lm.generate([user("Serve with"), user("Cut onions into")])
    assert scorer.tokenizer.padding_side == side
    assert (scorer.perplexity(VOCAB_TEXT) == before).all()


def test_sampling_is_seeded(chat_lm):
    a = backend(chat_lm, temperature=5.0, seed=7).generate([user("Serve with")] * 3)
    b = backend(chat_lm, temperature=5.0, seed=7).generate([user("Serve with")] * 3)
    greedy = backend(chat_lm).generate([user("Serve with")])[0]
    assert a == b and any(g.text != greedy.text for g in a)


# -- OpenAI-compatible HTTP -----------------------------------------------------------------------

SECRET = "sk-test-SECRET-0123456789abcdef"
KEY_ENV = "REALSYN_TEST_LLM_KEY"


class ChatServer(ThreadingHTTPServer):
    """Chat completions on 127.0.0.1; what it does depends on the user turn's text (`script`)."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), ChatHandler)
        self.seen: list[tuple[str, float, str | None]] = []  # (prompt, time, Authorization header)
        self.lock = threading.Lock()

    def handle_error(self, request, client_address):
        """A client that timed out has gone; writing to it fails, as expected."""

    def count(self, prompt: str) -> int:
        with self.lock:
            return sum(1 for p, _, _ in self.seen if p == prompt)


class ChatHandler(BaseHTTPRequestHandler):
    HANG_S = 0.6  # past the client's 0.3 s timeout

    def log_message(self, *args):
        pass

    def do_POST(self):
        server: ChatServer = self.server  # type: ignore[assignment]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        auth = self.headers.get("Authorization")
        with server.lock:
            server.seen.append((prompt, time.monotonic(), auth))
        attempt = server.count(prompt)
        if prompt == "rate-limited" and attempt == 1:
            return self.reply(429, b'{"error": "slow down"}', {"Retry-After": "5"})
        if prompt == "flaky" and attempt == 1:
            return self.reply(500, b"upstream exploded")
        if prompt == "hang" and attempt == 1:
            time.sleep(self.HANG_S)
        if prompt == "down":
            return self.reply(503, f"overloaded; your header was {auth}".encode())
        if prompt == "bad-request":
            return self.reply(400, b'{"error": "no such model"}')
        if prompt == "malformed":
            return self.reply(200, b'{"choices": [{"message": ')
        if prompt == "no-content":
            return self.reply(200, b'{"choices": []}')
        if prompt == "filtered":
            return self.reply(200, completion("partial", "content_filter"))
        content = f"echo {auth}" if prompt == "echo-key" else f"fused: {prompt}"
        self.reply(200, completion(content, "length" if prompt == "long" else "stop", body))

    def reply(self, status: int, data: bytes, headers: dict | None = None):
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


def completion(content: str, finish: str, request: dict | None = None) -> bytes:
    return json.dumps({
        "id": "x", "object": "chat.completion", "model": "test-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 11, "completion_tokens": (request or {}).get("max_tokens", 5)},
    }).encode()


@pytest.fixture
def server():
    srv = ChatServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def http_backend(srv: ChatServer, **kwargs) -> OpenAIHttpBackend:
    options = dict(model="test-model", api_key_env=KEY_ENV, concurrency=4, timeout_s=0.3, retries=2,
                   backoff_s=0.01, max_backoff_s=0.4, sampling=SamplingConfig(max_new_tokens=7))
    return OpenAIHttpBackend(f"http://127.0.0.1:{srv.server_port}/v1", **{**options, **kwargs})


def test_http_retries_then_succeeds(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    llm = http_backend(server)
    prompts = ["rate-limited", "flaky", "hang", "fine", "long"]
    started = time.monotonic()
    gens = llm.generate([user(p) for p in prompts])
    assert time.monotonic() - started < 4
    assert [g.text for g in gens] == [f"fused: {p}" for p in prompts]  # in order
    assert [g.finish_reason for g in gens] == ["stop"] * 4 + ["length"]
    assert all(g.tokens_in == 11 and g.tokens_out == 7 and g.error is None for g in gens)
    assert [server.count(p) for p in prompts] == [2, 2, 2, 1, 1]
    # Retry-After: 5 is honoured but capped at max_backoff_s (0.4), far above the 0.01 s backoff.
    first, second = [t for p, t, _ in server.seen if p == "rate-limited"]
    assert 0.38 <= second - first < 2
    assert {a for _, _, a in server.seen} == {f"Bearer {SECRET}"}
    llm.close()


def test_http_final_failures_are_error_generations(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    llm = http_backend(server, retries=1)
    down, bad, malformed, empty, filtered = llm.generate(
        [user(p) for p in ["down", "bad-request", "malformed", "no-content", "filtered"]])
    assert down.finish_reason == "error" and down.error.startswith("HTTP 503: overloaded")
    assert "gave up after 2 attempts" in down.error and server.count("down") == 2
    assert bad.error == 'HTTP 400: {"error": "no such model"}' and server.count("bad-request") == 1
    assert malformed.error.startswith("malformed JSON in response") and server.count("malformed") == 1
    assert "choices[0].message.content" in empty.error
    assert filtered.finish_reason == "error" and filtered.error == "finish_reason 'content_filter'"
    # A hang on every attempt is a timeout, then an error after the retries.
    hang = http_backend(server, retries=0, timeout_s=0.2).generate([user("hang")])[0]
    assert hang.finish_reason == "error" and hang.error.startswith("timed out after 0.2s")


def test_http_connection_refused_is_retried_then_an_error(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    port = server.server_port
    server.shutdown()
    server.server_close()
    llm = OpenAIHttpBackend(f"http://127.0.0.1:{port}/v1", "m", api_key_env=None, retries=1, backoff_s=0.01,
                            timeout_s=0.5)
    gen = llm.generate([user("fine")])[0]
    assert gen.finish_reason == "error" and gen.error.startswith("connection error")


def test_api_key_never_leaves_the_header(server, monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, SECRET)
    # Attached directly as well: etl.logs.setup() turns off the realsyn logger's propagation.
    loggers = [logging.getLogger(name) for name in ("realsyn", "urllib3")]
    for lg in loggers:
        caplog.set_level(logging.DEBUG, logger=lg.name)
        lg.addHandler(caplog.handler)
    try:
        llm = http_backend(server, retries=1)
        # The server echoes the key in a reply and in an error body; a retried 503 logs its body.
        gens = llm.generate([user(p) for p in ["echo-key", "down", "flaky"]])
        # A key the HTTP library refuses (a newline) ends up in its exception text.
        monkeypatch.setenv(KEY_ENV, SECRET + "\nx")
        gens += llm.generate([user("fine")])
    finally:
        for lg in loggers:
            lg.removeHandler(caplog.handler)
    echo, down, flaky, refused = gens
    assert echo.text == "echo Bearer [REDACTED]" and down.error.startswith("HTTP 503")
    assert flaky.text == "fused: flaky" and refused.finish_reason == "error" and "InvalidHeader" in refused.error
    assert server.count("echo-key") == 1 and f"Bearer {SECRET}" in {a for _, _, a in server.seen}
    records = caplog.records
    assert any(r.name == "realsyn.llm" for r in records) and any(r.name.startswith("urllib3") for r in records)
    texts = [repr(g) for g in gens] + [r.getMessage() for r in records] + [caplog.text]
    assert not [t for t in texts if "SECRET" in t]
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(RuntimeError, match=KEY_ENV) as info:
        llm.generate([user("fine")])
    assert "SECRET" not in str(info.value)
    with pytest.raises(RuntimeError, match="is not set"):
        http_backend(server)


# -- vLLM (not installed) -------------------------------------------------------------------------


def request_output(text, finish, prompt_ids=(1, 2, 3), token_ids=(4, 5)):
    return SimpleNamespace(prompt_token_ids=list(prompt_ids) if prompt_ids is not None else None,
                           outputs=[SimpleNamespace(text=text, finish_reason=finish, token_ids=list(token_ids))])


def test_vllm_requests_and_parse_without_vllm():
    llm = make_backend("vllm", model="Qwen/Qwen2.5-7B-Instruct",
                       sampling=SamplingConfig(max_new_tokens=64, temperature=0.7, top_p=0.9, seed=3))
    assert isinstance(llm, VllmBackend) and llm.model_id == "Qwen/Qwen2.5-7B-Instruct"
    assert llm.sampling_kwargs() == {"max_tokens": 64, "temperature": 0.7, "top_p": 0.9, "seed": 3}
    batch = [DEFAULT_TEMPLATE.messages("A sentence.", None, []), user("two")]
    requests = llm.requests(batch)
    assert requests == batch and requests[1][0] is not batch[1][0]  # one chat call, plain copies
    gens = llm.parse([request_output(" A fused text. ", "stop"), request_output("cut", "length", token_ids=[9] * 64),
                      request_output("", "abort", prompt_ids=None, token_ids=()), SimpleNamespace(outputs=[])])
    assert gens[0] == Generation("A fused text.", 3, 2, "stop")
    assert gens[1] == Generation("cut", 3, 64, "length")
    assert gens[2] == Generation("", None, 0, "error", "finish_reason 'abort'")
    assert gens[3].finish_reason == "error" and gens[3].error.startswith("unreadable vLLM output")


def test_vllm_missing_names_the_cpu_alternative(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # missing, whether or not it is installed here
    with pytest.raises(RuntimeError, match="'transformers' backend"):
        VllmBackend("some/model").generate([user("hi")])
    assert VllmBackend("some/model").generate([]) == []


class FakeLLM:
    """vllm.LLM as the backend uses it: built once per engine, `chat(conversations, params)` gives one
    RequestOutput per conversation; "too long" in a prompt is refused with vLLM's ValueError."""

    built: list["FakeLLM"] = []

    def __init__(self, model, tensor_parallel_size, gpu_memory_utilization, max_model_len, seed):
        self.kwargs = dict(model=model, tensor_parallel_size=tensor_parallel_size,
                           gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, seed=seed)
        # What the engine process would see: the variable at construction, and how it is started.
        self.visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.method = os.environ.get("VLLM_WORKER_MULTIPROC_METHOD")
        self.calls: list[int] = []
        FakeLLM.built.append(self)

    def chat(self, conversations, params, use_tqdm=True):
        self.calls.append(len(conversations))
        texts = [c[-1]["content"] for c in conversations]
        if any("too long" in t for t in texts):
            raise ValueError("The decoder prompt (length 9000) is longer than the maximum model length of 2048.")
        return [request_output(f"fused: {t}", "stop", token_ids=[7] * params["max_tokens"]) for t in texts]


@pytest.fixture
def fake_vllm(monkeypatch):
    module = SimpleNamespace(LLM=FakeLLM, SamplingParams=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    FakeLLM.built = []
    cache.clear()
    yield FakeLLM
    cache.clear()


def on_task_gpus(monkeypatch, *addresses):
    """As inside a Spark task that holds these GPU addresses."""
    monkeypatch.setattr("realsyn_models.llm.task_gpu_addresses", lambda: list(addresses))


def test_vllm_engine_per_worker_on_the_tasks_gpu_with_a_batch_per_call(fake_vllm, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    on_task_gpus(monkeypatch, "2")
    llm = make_backend("vllm", model="org/llm", gpu_memory_utilization=0.6, max_model_len=2048,
                       sampling=SamplingConfig(max_new_tokens=5, seed=3))
    batch = [user(f"prompt {i}") for i in range(40)]
    gens = llm.generate(batch)
    assert [g.text for g in gens] == [f"fused: prompt {i}" for i in range(40)] and gens[0].tokens_out == 5
    (engine,) = fake_vllm.built
    # The engine process saw only the task's GPU and starts by spawn; the worker's variable is back.
    assert engine.visible == "2" and engine.method == "spawn"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    assert engine.kwargs == dict(model="org/llm", tensor_parallel_size=1, gpu_memory_utilization=0.6,
                                 max_model_len=2048, seed=3)
    assert engine.calls == [40]  # the whole batch in one call
    # A later task on the same GPU (a reused worker, a new backend object): the same engine.
    make_backend("vllm", model="org/llm", gpu_memory_utilization=0.6, max_model_len=2048).generate(batch[:3])
    assert fake_vllm.built == [engine] and engine.calls == [40, 3]
    # The worker is given another GPU: that engine is freed, a new one starts on the new card.
    on_task_gpus(monkeypatch, "3")
    llm.generate(batch[:1])
    assert len(fake_vllm.built) == 2 and fake_vllm.built[1].visible == "3" and cache.load_count() == 2


def test_vllm_task_gpu_mapping(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    on_task_gpus(monkeypatch)
    assert task_visible_devices() is None  # outside a task: the process's own variable stands
    on_task_gpus(monkeypatch, "3")
    assert task_visible_devices() == "3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert task_visible_devices() == "3"  # a physical id the variable lists
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")
    on_task_gpus(monkeypatch, "1")
    assert task_visible_devices() == "7"  # a container that renumbers: a position in the list
    with pytest.raises(RuntimeError, match="tensor_parallel_size=2 needs 2 GPUs per task"):
        task_visible_devices(2)


def test_vllm_a_refused_prompt_fails_alone(fake_vllm, monkeypatch):
    on_task_gpus(monkeypatch)
    llm = make_backend("vllm", model="org/llm", sampling=SamplingConfig(max_new_tokens=4))
    gens = llm.generate([user("fine"), user("too long " * 3), user("also fine")])
    assert [g.finish_reason for g in gens] == ["stop", "error", "stop"]
    assert gens[1].error.startswith("vLLM refused the prompt: The decoder prompt")
    assert [g.text for g in (gens[0], gens[2])] == ["fused: fine", "fused: also fine"]
    assert fake_vllm.built[0].calls == [3, 1, 1, 1]  # the batch, then one prompt at a time
    (alone,) = llm.generate([user("too long")])
    assert alone.finish_reason == "error" and "maximum model length" in alone.error


def test_make_backend_kinds():
    with pytest.raises(ValueError, match="expected one of"):
        make_backend("llama")
