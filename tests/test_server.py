"""`phibook serve`: a real uvicorn server on loopback, driven by the official openai client.

Every expected text comes from running the same Generator directly, one prompt
at a time, with greedy decoding; the server must reproduce it exactly, whether
a request is streamed, batched with others or sent as a list of prompts.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from phibook.inference.generate import Generator, SamplingParams
from phibook.serve.server import CHAT_STOPS, ChatMessage, create_app, render_chat, run_server

MODEL = "tiny-test"
TIMEOUT = 60.0  # seconds: bound on every HTTP call and wait below


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """Run ``app`` on a real uvicorn server on 127.0.0.1 (free port); yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        assert thread.is_alive(), "uvicorn thread died during startup"
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="x", timeout=TIMEOUT, max_retries=0)


def greedy(gen: Generator, prompt: str, max_tokens: int, stop: list[str] | None = None) -> str:
    """What the server must answer: the generator alone, one prompt, greedy (Generator.run,
    a separate code path from the server's continuous-batching engine)."""
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, stop=list(stop or []))
    return gen.run([prompt], params)[0].text


def wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def generator(tiny_checkpoint) -> Generator:
    return Generator.from_path(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def base(generator) -> Iterator[str]:
    with serve_in_thread(create_app(generator, MODEL, max_batch_size=8)) as url:
        yield url


# --------------------------------------------------------------------------- API shapes and parity


def test_health_and_models(base):
    health = httpx.get(f"{base}/health", timeout=TIMEOUT).json()
    assert health["status"] == "ok" and health["model"] == MODEL
    models = client(base).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client(base).models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client(base).models.retrieve("no-such-model")


def test_completion_equals_generator(base, generator):
    prompt = "def fibonacci(n):\n    "
    want = greedy(generator, prompt, 20)
    r = client(base).completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].text == want
    assert r.choices[0].finish_reason in ("length", "stop")
    n_prompt = len(generator.tokenizer.encode(prompt))
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.total_tokens == n_prompt + r.usage.completion_tokens
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 20


def test_completion_default_max_tokens_is_16(base):
    r = client(base).completions.create(model=MODEL, prompt="Once upon a time", temperature=0)
    assert r.usage.completion_tokens <= 16
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 16


def test_streaming_completion_equals_non_stream(base, generator):
    prompt = "The quick brown fox"
    want = greedy(generator, prompt, 24)
    stream = client(base).completions.create(
        model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1, "text should arrive in pieces"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert {c.id for c in chunks} == {chunks[0].id}


def test_raw_sse_ends_with_done(base):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    payloads = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(p["object"] == "text_completion" for p in payloads)


def test_list_prompt_and_echo(base, generator):
    prompts = ["import numpy as np\n", "Alice was"]
    wants = [greedy(generator, p, 8) for p in prompts]
    r = client(base).completions.create(model=MODEL, prompt=prompts, max_tokens=8, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == wants
    echoed = client(base).completions.create(model=MODEL, prompt=prompts[1], max_tokens=8, temperature=0,
                                             echo=True)
    assert echoed.choices[0].text == prompts[1] + wants[1]


def test_stop_strings(base, generator):
    prompt = "def add(a, b):"
    full = greedy(generator, prompt, 24)
    # A stop string taken from the middle of the greedy output: the reply must end just before it.
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), f"need a visible stop string in {full!r}"
    want = full[: full.find(stop)]
    r = client(base).completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=stop)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    streamed = client(base).completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                               stop=[stop, "\x00never"], stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want


def test_seeded_sampling_is_reproducible(base):
    # top_k and repetition_penalty are extensions: the client sends them through extra_body.
    kwargs = dict(model=MODEL, prompt="Once", max_tokens=12, temperature=1.0, seed=1234,
                  extra_body={"top_k": 50, "repetition_penalty": 1.1})
    a = client(base).completions.create(**kwargs).choices[0].text
    b = client(base).completions.create(**kwargs).choices[0].text
    assert a == b


def test_render_chat_uses_the_report_format():
    msgs = [ChatMessage(role="system", content="You are helpful."), ChatMessage(role="user", content=" Hi "),
            ChatMessage(role="assistant", content="Hello."),
            ChatMessage(role="user", content=[{"type": "text", "text": "Tell me a joke."}])]
    assert render_chat(msgs) == "You are helpful.\nAlice: Hi\nBob: Hello.\nAlice: Tell me a joke.\nBob:"


def test_chat_equals_generator(base, generator):
    messages = [{"role": "system", "content": "A friendly chat."}, {"role": "user", "content": "What is 2 + 2?"}]
    prompt = render_chat([ChatMessage(**m) for m in messages])
    want = greedy(generator, prompt, 20, stop=CHAT_STOPS).lstrip()
    r = client(base).chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(generator.tokenizer.encode(prompt))

    chunks = list(client(base).chat.completions.create(model=MODEL, messages=messages, max_tokens=20,
                                                        temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_chat_default_budget_runs_to_a_stop_or_the_context(base, generator):
    messages = [{"role": "user", "content": "Hi"}]
    r = client(base).chat.completions.create(model=MODEL, messages=messages, temperature=0)
    prompt_len = r.usage.prompt_tokens
    if r.choices[0].finish_reason == "length":
        assert prompt_len + r.usage.completion_tokens == generator.context
    assert "Alice:" not in r.choices[0].message.content


# --------------------------------------------------------------------------- errors


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_bad_requests_get_openai_errors_and_server_keeps_serving(base, generator):
    url = f"{base}/v1/completions"
    post = lambda **kw: httpx.post(url, timeout=TIMEOUT, **kw)  # noqa: E731

    err = _error(post(content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert "malformed JSON" in err["message"]
    _error(post(content=b"", headers={"content-type": "application/json"}), 400)
    err = _error(post(json={"model": MODEL, "prompt": "x", "max_tokens": -5}), 400)
    assert err["param"] == "max_tokens" and "-5" in err["message"]
    err = _error(post(json={"model": "gpt-4", "prompt": "x"}), 404)
    assert err["code"] == "model_not_found" and "gpt-4" in err["message"]
    err = _error(post(json={"model": MODEL, "prompt": 123}), 400)
    assert err["param"] == "prompt"
    err = _error(post(json={"model": MODEL, "prompt": "x", "temperature": "hot"}), 400)
    assert err["param"] == "temperature"
    err = _error(post(json={"model": MODEL, "prompt": "x", "frobnicate": 1}), 400)
    assert "frobnicate" in err["message"]
    for field, value in [("presence_penalty", 0.5), ("best_of", 3), ("suffix", "end")]:
        err = _error(post(json={"model": MODEL, "prompt": "x", field: value}), 400)
        assert err["param"] == field and "not supported" in err["message"]
    err = _error(post(json={"model": MODEL, "prompt": "x", "n": 1000}), 400)
    assert err["param"] == "n" and "1000" in err["message"]
    err = _error(post(json={"model": MODEL, "prompt": "x", "logprobs": 99}), 400)
    assert err["param"] == "logprobs"
    err = _error(post(json={"model": MODEL, "prompt": [5, 10**9]}), 400)
    assert err["param"] == "prompt" and str(10**9) in err["message"]

    # Too long: the message names both lengths.
    long_prompt = "hello " * (generator.context + 10)
    n_tokens = len(generator.tokenizer.encode(long_prompt))
    err = _error(post(json={"model": MODEL, "prompt": long_prompt}), 400)
    assert str(n_tokens) in err["message"] and str(generator.context) in err["message"]
    assert err["code"] == "context_length_exceeded"
    err = _error(post(json={"model": MODEL, "prompt": "hi", "max_tokens": generator.context + 1}), 400)
    assert str(generator.context) in err["message"]

    chat = f"{base}/v1/chat/completions"
    _error(httpx.post(chat, json={"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
                      timeout=TIMEOUT), 400)
    _error(httpx.post(chat, json={"model": MODEL, "messages": []}, timeout=TIMEOUT), 400)
    _error(httpx.post(chat, json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                  "max_tokens": -1}, timeout=TIMEOUT), 400)
    _error(httpx.get(f"{base}/v1/nothing-here", timeout=TIMEOUT), 404)

    # The same through the official client's exception types.
    c = client(base)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt="x", max_tokens=-1)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=300)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="unknown-model", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt=long_prompt, stream=True)

    # ...and a good request still works, with the right answer.
    r = c.completions.create(model=MODEL, prompt="After the errors", max_tokens=6, temperature=0)
    assert r.choices[0].text == greedy(generator, "After the errors", 6)
    assert httpx.get(f"{base}/health", timeout=TIMEOUT).json()["stats"]["rejected_requests"] >= 20


def test_ignore_eos_and_min_tokens_are_accepted_and_validated(base):
    # vLLM's extensions (what benchmark clients send); their effect is tested in test_server_engine.py.
    cmpl, chat = f"{base}/v1/completions", f"{base}/v1/chat/completions"
    msgs = [{"role": "user", "content": "x"}]
    cases = [
        (cmpl, {"prompt": "x", "min_tokens": -1}, "min_tokens", "greater than or equal to 0"),
        (cmpl, {"prompt": "x", "min_tokens": "x"}, "min_tokens", "valid integer"),
        (cmpl, {"prompt": "x", "min_tokens": True}, "min_tokens", "valid integer"),
        (cmpl, {"prompt": "x", "min_tokens": 2.5}, "min_tokens", "valid integer"),
        (cmpl, {"prompt": "x", "max_tokens": 4, "min_tokens": 5}, "min_tokens", "min_tokens=5 must not exceed max_tokens=4"),
        (cmpl, {"prompt": "x", "min_tokens": 17}, "min_tokens", "the 16 tokens this request may generate"),
        (cmpl, {"prompt": "x", "ignore_eos": "yes"}, "ignore_eos", "valid boolean"),
        (cmpl, {"prompt": "x", "ignore_eos": 1}, "ignore_eos", "valid boolean"),
        (chat, {"messages": msgs, "max_completion_tokens": 3, "min_tokens": 4}, "min_tokens", "max_tokens=3"),
        (chat, {"messages": msgs, "max_tokens": 3, "min_tokens": 4}, "min_tokens", "max_tokens=3"),
        (chat, {"messages": msgs, "min_tokens": 10**6}, "min_tokens", "max_tokens was not given"),
        (chat, {"messages": msgs, "min_tokens": -1}, "min_tokens", "greater than or equal to 0"),
        (chat, {"messages": msgs, "ignore_eos": "yes"}, "ignore_eos", "valid boolean"),
    ]
    for url, body, param, words in cases:
        err = _error(httpx.post(url, json={"model": MODEL, **body}, timeout=TIMEOUT), 400)
        assert err["param"] == param and param in err["message"] and words in err["message"], (body, err)
    # Accepted through the openai client's extra_body, the way benchmark clients send them.
    c = client(base)
    r = c.completions.create(model=MODEL, prompt="Once", max_tokens=5, temperature=0,
                             extra_body={"ignore_eos": True, "min_tokens": 5})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": False, "min_tokens": 4})
    assert r.usage.completion_tokens >= 4


# --------------------------------------------------------------------------- the CLI


# The installed console script when it is on PATH, else the same entry point through python -m.
PHIBOOK = [shutil.which("phibook")] if shutil.which("phibook") else [sys.executable, "-m", "phibook.cli"]


def _phibook(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([*PHIBOOK, *args], capture_output=True, text=True, timeout=timeout)


def test_serve_help_lists_flags():
    out = _phibook("serve", "--help").stdout
    for flag in ("--model", "--host", "--port", "--dtype", "--max-batch-size", "--parallel", "--served-model-name",
                 "--max-queue", "--prefill-chunk", "--request-timeout", "--drain-timeout", "--quant"):
        assert flag in out


def test_serve_bad_model_exits_2_before_serving(tmp_path: Path):
    missing = _phibook("serve", "--model", str(tmp_path / "nope"), "--port", "0")
    assert missing.returncode == 2
    assert "error:" in missing.stderr and "nope" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not a model")
    junk = _phibook("serve", "--model", str(tmp_path / "junk"), "--port", "0")
    assert junk.returncode == 2
    assert "error:" in junk.stderr and "Traceback" not in junk.stderr and "listening" not in junk.stderr


def test_serve_cli_subprocess_end_to_end(tiny_checkpoint, generator):
    with phibook_serve(tiny_checkpoint, "--max-batch-size", "4", name="cli-model") as (url, proc):
        c = client(url)
        assert [m.id for m in c.models.list().data] == ["cli-model"]
        r = c.completions.create(model="cli-model", prompt="def f(x):", max_tokens=8, temperature=0)
        assert r.choices[0].text == greedy(generator, "def f(x):", 8)
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model=MODEL, prompt="x")
    assert proc.returncode == 0


def test_run_server_runs_the_engine_in_the_calling_thread(generator):
    """phibook serve's path: the model runs in the thread that loaded it (one OpenMP pool;
    Engine.run says why), uvicorn in another, and SIGINT drains and returns instead of raising."""
    seen: set[str] = set()
    app = create_app(generator, MODEL, max_batch_size=2, engine_thread=False,
                     step_hook=lambda _: seen.add(threading.current_thread().name))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    answers: list[str] = []

    def drive() -> None:
        try:
            wait_for(lambda: _health_ok(url), "run_server's /health")
            r = client(url).completions.create(model=MODEL, prompt="def f(x):", max_tokens=6, temperature=0)
            answers.append(r.choices[0].text)
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # run_server's handler: drain and return

    driver = threading.Thread(target=drive)
    driver.start()
    run_server(app, sock, log_level="warning", drain_timeout=5)
    driver.join(TIMEOUT)
    sock.close()
    assert answers == [greedy(generator, "def f(x):", 6)]
    assert seen == {threading.main_thread().name}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "run_server restores the handlers"


@contextlib.contextmanager
def phibook_serve(checkpoint: Path, *flags: str, name: str = "tiny") -> Iterator[tuple[str, subprocess.Popen]]:
    """`phibook serve --port 0 ...` in a subprocess; yield its base URL and the process (stopped after)."""
    proc = subprocess.Popen(
        [*PHIBOOK, "serve", "--model", str(checkpoint), "--port", "0", "--served-model-name", name,
         "--dtype", "fp32", *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        url = None
        deadline = time.monotonic() + 2 * TIMEOUT
        while url is None:
            assert proc.poll() is None, f"phibook serve exited with {proc.returncode}"
            assert time.monotonic() < deadline, "phibook serve never printed its address"
            with contextlib.suppress(queue.Empty):
                m = re.search(r"listening on (http://\S+)/v1", lines.get(timeout=1))
                url = m.group(1) if m else None
        wait_for(lambda: _health_ok(url), "the server's /health")
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(TIMEOUT)


def _health_ok(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
