"""`phibook serve`'s continuous batching, logprobs and failure handling, on a real uvicorn on loopback.

Ordering is asserted by counting the engine's iterations, never by timing: a ``Gate`` passed
as the engine's step_hook parks the worker at the top of an iteration until the test allows
it a number of iterations. Expected texts come from ``Generator.run`` on one prompt alone
(a separate code path); expected logprobs from one plain forward of the model, scored as
``phibook eval`` scores (phibook.eval.runner.token_scores).
"""

from __future__ import annotations

import json
import socket
import threading

import httpx
import pytest
import torch

from phibook.eval.runner import token_scores
from phibook.inference.generate import Generator, SamplingParams
from tests.test_server import MODEL, TIMEOUT, _error, client, greedy, serve_in_thread, wait_for

LONG = 200  # tokens: the long request of the ordering tests


class Gate:
    """Engine step_hook: lets the worker run ``allow(n)`` more iterations, then parks it."""

    def __init__(self, budget: int | None = 0) -> None:
        self.cond = threading.Condition()
        self.budget = budget  # None: no limit
        self.parked = False

    def __call__(self, engine) -> None:
        with self.cond:
            while self.budget == 0:
                self.parked = True
                self.cond.notify_all()
                assert self.cond.wait(TIMEOUT), "test never reopened the gate"
            self.parked = False
            if self.budget is not None:
                self.budget -= 1

    def allow(self, n: int | None) -> None:
        with self.cond:
            self.budget = n
            self.parked = False
            self.cond.notify_all()

    def is_parked(self) -> bool:
        with self.cond:
            return self.parked and self.budget == 0

    def wait_parked(self) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.parked and self.budget == 0, TIMEOUT), "worker never parked"


@pytest.fixture(scope="module")
def generator(tiny_checkpoint) -> Generator:
    return Generator.from_path(tiny_checkpoint, device="cpu")


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=TIMEOUT).json()


def in_thread(fn, *args) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # re-raised by the test that joins
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def joined(t: threading.Thread, out: dict):
    t.join(TIMEOUT)
    assert not t.is_alive(), "request thread did not finish"
    if "error" in out:
        raise out["error"]
    return out["value"]


def complete(url: str, prompt, max_tokens: int, stream: bool = False, **kw) -> str:
    c = client(url)
    if stream:
        s = c.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True, **kw)
        return "".join(ch.choices[0].text for ch in s if ch.choices)
    return c.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw).choices[0].text


# --------------------------------------------------------------------------- continuous batching


def test_short_request_sent_later_finishes_first(generator):
    long_prompt, short_prompt = "Once upon a time", "def add(a, b):"
    assert generator.run([long_prompt], SamplingParams(max_new_tokens=LONG))[0].finish_reason == "length"
    gate = Gate()
    with serve_in_thread(_app(generator, step_hook=gate, max_batch_size=4)) as url:
        long_t, long_out = in_thread(complete, url, long_prompt, LONG, True)
        wait_for(lambda: health(url)["running"] == 1, "the long request to take a slot")
        gate.allow(3)  # its prefill and a couple of decode steps
        gate.wait_parked()
        short_t, short_out = in_thread(complete, url, short_prompt, 4)
        wait_for(lambda: health(url)["queued"] == 1, "the short request to queue")
        # 30 iterations: plenty for the short one (prefill + 4 steps), far from the long one's 200 tokens.
        gate.allow(30)
        assert joined(short_t, short_out) == greedy(generator, short_prompt, 4)
        gate.wait_parked()
        h = health(url)
        assert h["running"] == 1 and h["stats"]["finished_jobs"] == 1, "the long request must still be running"
        assert long_t.is_alive()
        gate.allow(None)
        assert joined(long_t, long_out) == greedy(generator, long_prompt, LONG)


def test_concurrent_requests_equal_each_served_alone(generator):
    prompts = [f"Question {i}: what is {i} times {i + 1}?\nAnswer:" * (1 + i % 3) for i in range(6)]
    budgets = [6, 19, 12, 7, 25, 9]
    wants = [greedy(generator, p, n) for p, n in zip(prompts, budgets)]
    seeded = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=40, seed=7)
    want_sample = generator.run([prompts[0]], seeded)[0].text
    gate = Gate()
    # 4 slots for 7 requests (slots are reused); 8-token prefill chunks interleave with decode steps.
    with serve_in_thread(_app(generator, step_hook=gate, max_batch_size=4, prefill_chunk=8)) as url:
        threads = [in_thread(complete, url, p, n, i % 2 == 1) for i, (p, n) in enumerate(zip(prompts, budgets))]
        c = client(url)
        threads.append(in_thread(lambda: c.completions.create(
            model=MODEL, prompt=prompts[0], max_tokens=10, temperature=0.9, seed=7,
            extra_body={"top_k": 40}).choices[0].text))
        wait_for(lambda: health(url)["queued"] + health(url)["running"] == 7, "all requests to arrive")
        gate.allow(None)
        got = [joined(t, out) for t, out in threads]
        assert got[:6] == wants
        assert got[6] == want_sample
        s = health(url)["stats"]
        assert s["max_running_seen"] == 4 and s["finished_jobs"] == 7
        assert s["prefill_chunks"] > 7, "long prompts are read in several chunks"


def test_cancelled_stream_frees_its_slot_for_the_next_request(generator):
    prompt = "Once upon a time"
    gate = Gate()
    with serve_in_thread(_app(generator, step_hook=gate, max_batch_size=1)) as url:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": LONG, "temperature": 0, "stream": True}
        gate.allow(12)  # iterations run only once the request is in, and its headers need its first token
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=TIMEOUT) as r:
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["text"]
        # The client hung up after one piece. The worker frees the slot at its next iteration: either
        # within its 12 (it then idles) or at the first one after the gate reopens.
        wait_for(lambda: health(url)["stats"]["disconnected_jobs"] == 1, "the server to notice the disconnect")
        wait_for(lambda: gate.is_parked() or health(url)["running"] == 0, "the worker to free the slot or park")
        t, out = in_thread(complete, url, "next", 4)
        gate.allow(None)
        assert joined(t, out) == greedy(generator, "next", 4)
        s = health(url)["stats"]
        assert s["cancelled_jobs"] == 1 and s["finished_jobs"] == 1
        assert s["generation_tokens"] <= 2 * 12 + 4, "the cancelled row stopped decoding"


def test_non_streaming_client_gone_is_dropped_before_it_runs(generator):
    gate = Gate()
    with serve_in_thread(_app(generator, step_hook=gate)) as url:
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"model": MODEL, "prompt": "Hello there", "max_tokens": 50}).encode()
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_for(lambda: health(url)["running"] == 1, "the request to take a slot")
        wait_for(lambda: health(url)["stats"]["disconnected_jobs"] == 1, "the server to notice the disconnect")
        gate.allow(None)
        assert complete(url, "after", 3) == greedy(generator, "after", 3)
        s = health(url)["stats"]
        assert s["cancelled_jobs"] == 1 and s["generation_tokens"] == 3


def test_full_queue_answers_503_with_retry_after(generator):
    gate = Gate()
    with serve_in_thread(_app(generator, step_hook=gate, max_batch_size=1, max_queue=1)) as url:
        a = in_thread(complete, url, "first", 3)
        wait_for(lambda: health(url)["running"] == 1, "the first request to take the slot")
        b = in_thread(complete, url, "second", 3)
        wait_for(lambda: health(url)["queued"] == 1, "the second request to queue")
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "third"}, timeout=TIMEOUT)
        err = _error(r, 503)
        assert r.headers["retry-after"] == "1" and err["code"] == "server_busy"
        gate.allow(None)
        assert joined(*a) == greedy(generator, "first", 3)
        assert joined(*b) == greedy(generator, "second", 3)
        assert health(url)["stats"]["queue_full_requests"] == 1


def test_request_timeout_is_504_and_the_server_goes_on(generator):
    # A deadline of a microsecond has always passed by the worker's next look.
    with serve_in_thread(_app(generator, request_timeout=1e-6)) as url:
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "slow", "max_tokens": 5},
                       timeout=TIMEOUT)
        err = _error(r, 504)
        assert err["code"] == "timeout" and "--request-timeout" in err["message"]
        assert health(url)["stats"]["timed_out_jobs"] == 1


class _FailingPrefill(Generator):
    """The real generator; its forward raises on a prompt made only of token MARK (a model failure)."""

    MARK = 7

    def __init__(self, base: Generator) -> None:
        super().__init__(base.model, base.tokenizer)
        plain = self.forward

        def forward(idx, *args, **kwargs):
            if idx.shape[1] > 1 and bool((idx == self.MARK).all()):
                raise RuntimeError("injected failure")
            return plain(idx, *args, **kwargs)

        forward.parameters = plain.parameters
        self.forward = forward


def test_failure_in_one_row_fails_only_its_request(generator):
    gate = Gate()
    with serve_in_thread(_app(_FailingPrefill(generator), step_hook=gate)) as url:
        good = [in_thread(complete, url, p, 5) for p in ("First prompt", "Third prompt")]
        bad = in_thread(lambda: httpx.post(f"{url}/v1/completions", timeout=TIMEOUT, json={
            "model": MODEL, "prompt": [_FailingPrefill.MARK] * 4, "max_tokens": 5}))
        wait_for(lambda: health(url)["queued"] + health(url)["running"] == 3, "three requests in")
        gate.allow(None)
        err = _error(joined(*bad), 500)
        assert err["type"] == "server_error" and "injected failure" in err["message"]
        assert [joined(*g) for g in good] == [greedy(generator, p, 5) for p in ("First prompt", "Third prompt")]
        assert complete(url, "still alive", 3) == greedy(generator, "still alive", 3)


@pytest.mark.parametrize("fast", [False, True], ids=["model", "fast"])
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_model_is_served_unchanged(tiny_checkpoint, quant, fast):
    # --quant swaps the linears in place; the engine needs nothing special. fp32 activations and
    # whole-prompt prefill chunks, so the quantized kernels take the same path as Generator.run's.
    # fast: FastForward's quantized blocks, whose decode steps take the one loop over the slot cache.
    gen = Generator.from_path(tiny_checkpoint, quant=quant, save_quant=False, log=lambda _: None, fast=fast)
    prompts = ["def add(a, b):", "Alice and Bob are learning"]
    with serve_in_thread(_app(gen, prefill_chunk=512)) as url:
        threads = [in_thread(complete, url, p, 10) for p in prompts]
        assert [joined(*t) for t in threads] == [greedy(gen, p, 10) for p in prompts]


# --------------------------------------------------------------------------- logprobs


def _reference(generator: Generator, ids: list[int]) -> tuple[list[float], torch.Tensor]:
    """log p(ids[i] | ids[:i]) for i >= 1 from one plain forward, as phibook eval scores; and the logits."""
    with torch.no_grad():
        logits = generator.model(torch.tensor([ids]))[0]
    logp, _ = token_scores(logits[:-1], torch.tensor(ids[1:]))
    return logp.tolist(), logits


@pytest.fixture(scope="module")
def base(generator):
    with serve_in_thread(_app(generator, prefill_chunk=16)) as url:
        yield url


def test_echo_logprobs_equal_the_models_forward(base, generator):
    prompt = "Alice was counting the apples in the basket, then she shared them with her friends. " * 2
    ids = generator.tokenizer.encode(prompt)
    assert len(ids) > 16, "the prompt must span several prefill chunks"
    r = httpx.post(f"{base}/v1/completions", timeout=TIMEOUT, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 3}).json()
    ch = r["choices"][0]
    assert ch["text"] == prompt and r["usage"]["completion_tokens"] == 0
    lp = ch["logprobs"]
    want, logits = _reference(generator, ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-5)
    assert lp["tokens"] == [generator.tokenizer.decode([t]) for t in ids]
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(ids))]
    top1 = (logits[:-1] - torch.logsumexp(logits[:-1], -1, keepdim=True)).max(-1).values.tolist()
    for i, top in enumerate(lp["top_logprobs"][1:]):
        assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(top1[i], abs=1e-5)

    # Token-id prompts (what lm-eval's local-completions sends), two at once, one generated token.
    ids2 = generator.tokenizer.encode("def fibonacci(n):")
    r = httpx.post(f"{base}/v1/completions", timeout=TIMEOUT, json={
        "model": MODEL, "prompt": [ids, ids2], "max_tokens": 1, "echo": True, "logprobs": 1,
        "temperature": 0}).json()
    for ch, row in zip(r["choices"], (ids, ids2)):
        lps = ch["logprobs"]["token_logprobs"]
        assert len(lps) == len(row) + 1
        assert lps[1:-1] == pytest.approx(_reference(generator, row)[0], abs=1e-5)
    # Streamed, each choice's first chunk is its prompt with the prompt's logprobs.
    lines = httpx.post(f"{base}/v1/completions", timeout=TIMEOUT, json={
        "model": MODEL, "prompt": [ids, ids2], "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0,
        "stream": True}).text.splitlines()
    chunks = [json.loads(line[6:])["choices"][0] for line in lines if line.startswith("data: {")]
    for i, row in enumerate((ids, ids2)):
        mine = [c for c in chunks if c["index"] == i]
        assert mine[0]["text"] == generator.tokenizer.decode(row)
        assert mine[0]["logprobs"]["token_logprobs"][1:] == pytest.approx(_reference(generator, row)[0], abs=1e-5)
        assert sum(len(c["logprobs"]["tokens"]) for c in mine) == len(row) + 1


def test_generated_token_logprobs_and_streaming(base, generator):
    prompt = "The students counted"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 2}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=TIMEOUT).json()
    lp = r["choices"][0]["logprobs"]
    out = r["choices"][0]
    n = r["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == n and lp["text_offset"][0] == len(prompt)
    ids = generator.tokenizer.encode(prompt)
    sampled = generator.run([prompt], SamplingParams(max_new_tokens=8))[0].token_ids
    want, _ = _reference(generator, ids + sampled)
    assert lp["token_logprobs"] == pytest.approx(want[len(ids) - 1:], abs=1e-5)
    # greedy: the chosen token is the top alternative
    for val, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert max(top.values()) == pytest.approx(val, abs=1e-6)
    chunks = [json.loads(line[6:]) for line in httpx.post(
        f"{base}/v1/completions", json={**body, "stream": True}, timeout=TIMEOUT).text.splitlines()
        if line.startswith("data: {")]
    streamed = [t for c in chunks for t in (c["choices"][0]["logprobs"] or {}).get("tokens", [])]
    assert streamed == lp["tokens"] and "".join(c["choices"][0]["text"] for c in chunks) == out["text"]
    offsets = [o for c in chunks for o in (c["choices"][0]["logprobs"] or {}).get("text_offset", [])]
    assert offsets == lp["text_offset"] == [len(prompt) + len("".join(lp["tokens"][:i])) for i in range(n)]

    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    c = client(base).chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0,
                                             logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob == pytest.approx(item.logprob)
        assert bytes(item.bytes).decode() == item.token


def test_n_choices(base, generator):
    r = client(base).completions.create(model=MODEL, prompt="Once", max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == r.choices[1].text == greedy(generator, "Once", 6)
    sampled = client(base).completions.create(model=MODEL, prompt="Once", max_tokens=12, temperature=1.0, n=3,
                                              seed=3)
    again = client(base).completions.create(model=MODEL, prompt="Once", max_tokens=12, temperature=1.0, n=3,
                                            seed=3)
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]
    assert len({c.text for c in sampled.choices}) > 1, "choices draw from different seeds"


def test_metrics_are_prometheus_text(base):
    complete(base, "count me", 3)
    text = httpx.get(f"{base}/metrics", timeout=TIMEOUT).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    for name in ("phibook_queue_length", "phibook_running_rows", "phibook_generation_tokens_total",
                 "phibook_generation_tokens_per_second", "phibook_time_to_first_token_seconds_count",
                 "phibook_request_latency_seconds_count", 'phibook_request_latency_seconds_bucket{le="+Inf"}'):
        assert name in values, name
    assert values["phibook_generation_tokens_total"] >= 3 and values["phibook_request_latency_seconds_count"] >= 1
    assert "# TYPE phibook_time_to_first_token_seconds histogram" in text


# --------------------------------------------------------------------------- ignore_eos / min_tokens (vLLM's)


CMPL, CHAT = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def eos_heavy(tiny_checkpoint) -> Generator:
    """The tiny model with an lm_head bias that puts EOS far above every other token (logits are within
    +-1): greedy picks EOS first, and with EOS masked it picks what the plain model picks."""
    gen = Generator.from_path(tiny_checkpoint, device="cpu")
    with torch.no_grad():
        gen.model.lm_head.bias[gen.tokenizer.eos_id] += 20.0
    return gen


def outcome(url: str, path: str, body: dict) -> tuple[str, str, int]:
    """(text, finish_reason, usage.completion_tokens) of a one-choice request, streamed or not."""
    if body.get("stream"):
        body = {**body, "stream_options": {"include_usage": True}}
    r = httpx.post(f"{url}{path}", json=body, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    if not body.get("stream"):
        out = r.json()
        ch = out["choices"][0]
        return ch["text"] if path == CMPL else ch["message"]["content"], ch["finish_reason"], \
            out["usage"]["completion_tokens"]
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    text = "".join(c["text"] if path == CMPL else c["delta"].get("content") or "" for c in choices)
    finishes = [c["finish_reason"] for c in choices if c["finish_reason"]]
    assert len(finishes) == 1 and chunks[-1]["choices"] == []
    return text, finishes[0], chunks[-1]["usage"]["completion_tokens"]


def test_ignore_eos_runs_to_max_tokens(eos_heavy):
    eos_text = eos_heavy.tokenizer.decode([eos_heavy.tokenizer.eos_id])
    assert eos_text == "<|endoftext|>"
    prompt = "Once upon a time"
    assert eos_heavy.run([prompt], SamplingParams(max_new_tokens=8, stop_at_eos=False))[0].text == eos_text * 8
    with serve_in_thread(_app(eos_heavy)) as url:
        for stream in (False, True):
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": stream}
            assert outcome(url, CMPL, body) == ("", "stop", 1), "EOS must come first, or ignore_eos shows nothing"
            assert outcome(url, CMPL, {**body, "ignore_eos": True}) == (eos_text * 8, "length", 8)
            # A stop string still ends it: "><" is complete once the second EOS is decoded.
            assert outcome(url, CMPL, {**body, "ignore_eos": True, "stop": "><"}) == (eos_text[:-1], "stop", 2)
            # ignore_eos has no EOS to mask: min_tokens changes nothing then.
            assert outcome(url, CMPL, {**body, "ignore_eos": True, "min_tokens": 3})[0] == eos_text * 8
            chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 6,
                    "temperature": 0, "stream": stream}
            assert outcome(url, CHAT, chat) == ("", "stop", 1)
            assert outcome(url, CHAT, {**chat, "ignore_eos": True}) == (eos_text * 6, "length", 6)


def test_min_tokens_masks_eos_row_by_row_in_one_batch(eos_heavy, generator):
    prompts = ["Once upon a time", "Alice was", "The quick brown fox", "Bob said"]
    extras: list[dict] = [{"min_tokens": 5}, {"min_tokens": 2}, {"ignore_eos": True}, {}]
    eos = eos_heavy.tokenizer.eos_id
    # With EOS masked the biased model picks what the plain one does (its own greedy has no EOS here).
    for p in prompts[:2]:
        assert eos not in generator.run([p], SamplingParams(max_new_tokens=5))[0].token_ids
    eos_text = eos_heavy.tokenizer.decode([eos])
    want = [(greedy(generator, prompts[0], 5), "stop", 6),  # 5 tokens, then EOS as the 6th
            (greedy(generator, prompts[1], 2), "stop", 3),
            (eos_text * 10, "length", 10),
            ("", "stop", 1)]
    # Generator.run (the same rules, another code path) batches the four rows the same way.
    params = [SamplingParams(max_new_tokens=10, min_tokens=e.get("min_tokens", 0),
                             stop_at_eos=not e.get("ignore_eos", False)) for e in extras]
    assert [(c.text, c.finish_reason, c.completion_tokens) for c in eos_heavy.run(prompts, params)] == want
    bodies = [{"model": MODEL, "prompt": p, "max_tokens": 10, "temperature": 0, "stream": i % 2 == 0, **e}
              for i, (p, e) in enumerate(zip(prompts, extras))]
    gate = Gate()
    with serve_in_thread(_app(eos_heavy, step_hook=gate, max_batch_size=4)) as url:
        # All four decode in the same steps: a mask that leaked to other rows would keep B (min 2) from
        # its EOS while A (min 5) is still masked, and put a non-EOS token into C (ignore_eos).
        # D (done at its first token) parks the worker as its only row; the other three arrive while
        # it waits and must join that same first step, or D would finish alone before they start.
        last = in_thread(outcome, url, CMPL, bodies[3])
        gate.wait_parked()
        threads = [in_thread(outcome, url, CMPL, b) for b in bodies[:3]] + [last]
        wait_for(lambda: health(url)["queued"] + health(url)["running"] == 4, "all four requests in")
        gate.allow(None)
        assert [joined(*t) for t in threads] == want
        assert health(url)["stats"]["max_running_seen"] == 4
        # One at a time and streamed the other way: the same answers.
        assert [outcome(url, CMPL, {**b, "stream": not b["stream"]}) for b in bodies] == want
        # Chat: min_tokens through max_completion_tokens, streamed and not.
        for stream in (False, True):
            text, finish, n = outcome(url, CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                  "max_completion_tokens": 9, "min_tokens": 4, "temperature": 0,
                                                  "stream": stream})
            assert (finish, n) == ("stop", 5) and eos_text not in text


def _app(generator: Generator, **kw):
    from phibook.serve.server import create_app

    return create_app(generator, MODEL, **kw)


def test_bf16_model_is_served_on_the_cache_its_forward_reads(tiny_checkpoint, generator):
    """A bf16 model's slot cache is its forward's cache_dtype (bf16 where our attention runs, else
    float32). Three rows decode in one batch through it to their full length, and a prompt's echoed
    log-probabilities (prefill through the cache) stay within bf16's tolerance of the fp32 model's.
    Tolerances, not equal tokens: bf16 rounding differs with the batch's row count, and a near-tie
    may flip on another CPU."""
    gen = Generator.from_path(tiny_checkpoint, device="cpu", dtype=torch.bfloat16, fast=True)
    prompts = ["Once upon a time", "Alice was counting the apples in the basket", "Bob"]
    bodies = [{"model": MODEL, "prompt": p, "max_tokens": 6, "temperature": 0, "ignore_eos": True} for p in prompts]
    gate = Gate()
    app = _app(gen, step_hook=gate, prefill_chunk=8)
    with serve_in_thread(app) as url:
        threads = [in_thread(outcome, url, CMPL, b) for b in bodies]
        wait_for(lambda: health(url)["queued"] + health(url)["running"] == 3, "three requests in")
        gate.allow(None)
        assert [joined(*t)[1:] for t in threads] == [("length", 6)] * 3
        assert health(url)["stats"]["max_running_seen"] == 3
        assert app.state.service.engine.cache.k.dtype == gen.forward.cache_dtype
        ids = generator.tokenizer.encode(prompts[1] + ", then she shared them with her friends.")
        r = httpx.post(f"{url}/v1/completions", timeout=TIMEOUT, json={
            "model": MODEL, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1}).json()
        got = r["choices"][0]["logprobs"]["token_logprobs"][1:]
    want, _ = _reference(generator, ids)  # the fp32 model
    assert got == pytest.approx(want, abs=0.1)


class _CountingSlotCache:
    """Counts the ``decode_slots`` calls a SlotCache answers; with ``hide=True`` it has none, so
    FastForward takes its block-by-block path through ``update``."""

    def __init__(self, inner, hide: bool) -> None:
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "hide", hide)
        object.__setattr__(self, "slot_calls", 0)

    def __getattr__(self, name: str):
        if name != "decode_slots":
            return getattr(self.inner, name)
        if self.hide:
            raise AttributeError(name)

        def counted(layer: int):
            object.__setattr__(self, "slot_calls", self.slot_calls + 1)
            return self.inner.decode_slots(layer)

        return counted

    def __setattr__(self, name: str, value) -> None:
        setattr(self.inner, name, value)


@torch.inference_mode()
def test_slot_cache_decode_slots_write_where_update_writes() -> None:
    """Slots of different lengths (one outgrowing the first columns), an idle slot below the
    highest and a slot sitting a step out: FastForward's one-loop steps over ``decode_slots``
    write the same columns as its block-by-block steps over ``update`` and give the same logits
    within fp32 rounding; a one-token prefill chunk takes the one loop too."""
    from phibook.inference.fast_decode import FastForward
    from phibook.model.config import PhiConfig
    from phibook.model.model import PhiModel
    from phibook.serve.engine import SlotCache

    cfg = PhiConfig(n_layer=2, d_model=128, n_head=2, vocab_size=320, max_seq_len=64, init_std=0.1)
    model = PhiModel(cfg)
    model.init_weights(torch.Generator().manual_seed(3))
    fast = FastForward(model.eval())
    if not fast.own_step:
        pytest.skip("phibook's one-call decode step does not run here (see the decode-step kernel verdict)")
    caches = [_CountingSlotCache(SlotCache(cfg, 4, fast.cache_dtype, "cpu", initial=8), hide) for hide in (False, True)]
    g = torch.Generator().manual_seed(4)
    prompts = {0: torch.randint(0, 320, (5,), generator=g), 1: torch.randint(0, 320, (9,), generator=g),
               3: torch.randint(0, 320, (3,), generator=g)}
    last: list[dict[int, torch.Tensor]] = [{}, {}]
    for cache, got in zip(caches, last):
        for slot, ids in prompts.items():
            for start, end in ((0, len(ids) - 1), (len(ids) - 1, len(ids))):  # the last token alone
                cache.bind_prefill(slot, end - start)
                logits = fast(ids[None, start:end], positions=torch.arange(start, end), cache=cache, last_only=True)
                cache.lengths[slot] = end
            got[slot] = logits[0, -1].float()
    assert caches[0].slot_calls == len(prompts) * cfg.n_layer and caches[1].slot_calls == 0
    for slot in prompts:
        torch.testing.assert_close(last[0][slot], last[1][slot], atol=1e-4, rtol=0)
    tokens = {slot: int(last[0][slot].argmax()) for slot in prompts}
    for step, slots in enumerate(([0, 1, 3], [1, 3], [0, 1, 3], [0, 3])):
        logits = []
        for cache in caches:
            positions, keep = cache.bind_decode(slots, torch.device("cpu"))
            idx = torch.zeros((positions.shape[0], 1), dtype=torch.long)
            idx[slots, 0] = torch.tensor([tokens[s] for s in slots])
            logits.append(fast(idx, positions=positions, cache=cache, attention_mask=keep, last_only=True)[slots, -1])
            for s in slots:
                cache.lengths[s] += 1
        torch.testing.assert_close(logits[0].float(), logits[1].float(), atol=1e-4, rtol=0, msg=f"step {step}")
        tokens.update({s: int(t) for s, t in zip(slots, logits[0].float().argmax(-1))})
    one_loop, block_by_block = (c.inner for c in caches)
    assert one_loop.lengths == block_by_block.lengths == [8, 12, 0, 7]
    for s, n in enumerate(one_loop.lengths):
        torch.testing.assert_close(one_loop.k[:, s, :, :n], block_by_block.k[:, s, :, :n], atol=1e-5, rtol=0)
        torch.testing.assert_close(one_loop.v[:, s, :, :n], block_by_block.v[:, s, :, :n], atol=1e-5, rtol=0)
