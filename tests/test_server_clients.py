"""`phibook serve` as a subprocess (the real CLI, real uvicorn on loopback) driven by clients no one
here wrote: lm-evaluation-harness's local-completions model and the openai client under load;
and SIGTERM's drain.

lm-eval scores through the server's echo + logprobs answers and must reproduce `phibook eval`'s
per-choice log-likelihoods (1e-4) and accuracies on the same documents (the local, offline task
files of test_eval_lmeval_parity). About 25 s, most of it importing lm-eval.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from phibook.eval.runner import Runner
from phibook.eval.task import get_task
from phibook.inference.generate import Generator
from tests.test_eval_lmeval_parity import TASKS, UTILS, write_task
from tests.test_server import TIMEOUT, greedy, phibook_serve, wait_for

NAME = "tiny"
LMEVAL_TASKS = ("arc_easy", "piqa", "hellaswag")
LIMIT = 6


@pytest.fixture(scope="module")
def server(tiny_checkpoint) -> Iterator[tuple[str, subprocess.Popen]]:
    with phibook_serve(tiny_checkpoint, "--max-batch-size", "8", "--max-queue", "24") as served:
        yield served


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_lmeval_local_completions_matches_phibook_eval(server, tiny_checkpoint, shared_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity", reason="lm-eval's API models need tenacity (the test extra pins it)")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from phibook.weights.checkpoint import load_model
    from phibook.weights.export import export_hf

    url, _ = server
    # lm-eval tokenizes (tokenized_requests) with a local HF tokenizer directory: the checkpoint's export.
    hf_dir = export_hf(tiny_checkpoint, tmp_path / "hf")
    root = tmp_path / "tasks"
    root.mkdir()
    (root / "parity_utils.py").write_text(UTILS)
    docs, names = {}, {}
    for name in LMEVAL_TASKS:
        body, to_row = TASKS[name]
        docs[name] = get_task(name).load_docs(shared_dir / "benchmarks", LIMIT)
        names[name] = write_task(root, name, docs[name], body, to_row)
    loaded = load_model(tiny_checkpoint)
    context = loaded.model.config.max_seq_len
    out = simple_evaluate(
        model="local-completions",
        model_args=(f"model={NAME},base_url={url}/v1/completions,tokenizer_backend=huggingface,tokenizer={hf_dir},"
                    f"max_length={context},num_concurrent=4,max_retries=1,tokenized_requests=True"),
        tasks=list(names.values()),
        task_manager=TaskManager(include_path=str(root)),
        log_samples=True,
    )
    runner = Runner(loaded.model, loaded.tokenizer, batch_size=8, progress=False)
    for name, lm_task in names.items():
        task = get_task(name)
        samples = sorted(out["samples"][lm_task], key=lambda s: s["doc_id"])
        assert len(samples) == LIMIT
        per_doc = []
        for doc, sample in zip(docs[name], samples, strict=True):
            ours = runner.loglikelihood(task.requests(doc))
            theirs = [float(r[0][0]) for r in sample["resps"]]
            assert [ll for ll, _ in ours] == pytest.approx(theirs, abs=1e-4), name
            values = task.process_results(doc, ours)
            for metric in task.metrics:
                assert values[metric] == sample[metric], (name, metric)
            per_doc.append(values)
        agg = task.aggregate(per_doc)
        for metric in task.metrics:
            assert agg[metric][0] == pytest.approx(out["results"][lm_task][f"{metric},none"]), (name, metric)


def test_64_concurrent_streams_all_answered_or_503(server, tiny_checkpoint):
    url, proc = server
    gen = Generator.from_path(tiny_checkpoint)
    prompts = [f"Request {i}: the students counted" for i in range(64)]
    wants = [greedy(gen, p, 8) for p in prompts]
    httpx.post(f"{url}/v1/completions", json={"prompt": "warm up", "max_tokens": 8}, timeout=TIMEOUT)
    idle = rss_mb(proc.pid)
    before = httpx.get(f"{url}/health", timeout=TIMEOUT).json()["stats"]

    async def one(c: openai.AsyncOpenAI, i: int) -> tuple[int, str | int, set[str]]:
        try:
            s = await c.completions.create(model=NAME, prompt=prompts[i], max_tokens=8, temperature=0, stream=True)
            pieces, ids = [], set()
            async for chunk in s:
                ids.add(chunk.id)
                pieces.extend(ch.text for ch in chunk.choices)
            return i, "".join(pieces), ids
        except openai.APIStatusError as exc:
            return i, exc.status_code, set()

    async def run_all() -> list:
        c = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", timeout=TIMEOUT, max_retries=0)
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(c, i) for i in range(64))), 3 * TIMEOUT)
        finally:
            await c.close()

    results = asyncio.run(run_all())
    assert sorted(i for i, _, _ in results) == list(range(64)), "a request was lost or answered twice"
    answered = [(i, text, ids) for i, text, ids in results if isinstance(text, str)]
    busy = [i for i, code, _ in results if code == 503]
    assert len(answered) + len(busy) == 64, [r for r in results if r[1] != 503 and not isinstance(r[1], str)]
    assert len(answered) >= 8 + 24, "the first slots + queue worth of arrivals are always accepted"
    for i, text, ids in answered:
        assert text == wants[i], i
        assert len(ids) == 1
    assert len({next(iter(ids)) for _, _, ids in answered}) == len(answered), "response ids are unique"
    h = httpx.get(f"{url}/health", timeout=TIMEOUT).json()
    assert h["queued"] == 0 and h["running"] == 0
    # Server side: exactly the answered ones ran (none twice), and every refusal was a full queue.
    assert h["stats"]["finished_jobs"] - before["finished_jobs"] == len(answered)
    assert h["stats"]["queue_full_requests"] - before["queue_full_requests"] == len(busy)
    assert rss_mb(proc.pid) < idle + 150, "the server's memory returns near its idle level"


def _sse_outcome(url: str, path: str, body: dict) -> tuple[int, str]:
    """(usage.completion_tokens, finish_reason) of a streamed one-choice request, read as a benchmark does."""
    r = httpx.post(f"{url}{path}", json=body, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    return chunks[-1]["usage"]["completion_tokens"], finishes[0]


def test_vllm_benchmark_serving_bodies(server):
    """The bodies vLLM's benchmark_serving posts (openai-completions and openai-chat backends): with
    --ignore-eos (and min_tokens = output length, as some of its forks add) every answer is exactly
    the output length."""
    url, _ = server
    prompt, out_len = "Question: what is 2+2?\nAnswer:", 40
    body = {"model": NAME, "prompt": prompt, "temperature": 0.0, "repetition_penalty": 1.0, "best_of": 1,
            "max_tokens": out_len, "logprobs": None, "stream": True, "stream_options": {"include_usage": True}}
    n, finish = _sse_outcome(url, "/v1/completions", body)
    assert finish == "stop" and n < out_len, "the tiny model's greedy answer must end with EOS here"
    assert _sse_outcome(url, "/v1/completions", {**body, "ignore_eos": True}) == (out_len, "length")
    chat = {"model": NAME, "messages": [{"role": "user", "content": prompt}], "temperature": 0.0,
            "max_completion_tokens": out_len, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "ignore_eos": True, "min_tokens": out_len}  # min_tokens: the chat stops ("Alice:") wait too
    assert _sse_outcome(url, "/v1/chat/completions", chat) == (out_len, "length")


def test_sigterm_drains_requests_in_flight(tiny_checkpoint):
    gen = Generator.from_path(tiny_checkpoint)
    prompts, budget = ["Once upon a time", "def add(a, b):"], 64
    wants = [greedy(gen, p, budget) for p in prompts]
    with phibook_serve(tiny_checkpoint, "--max-batch-size", "1") as (url, proc):
        texts: dict[int, str] = {}
        started = threading.Event()

        def stream(i: int) -> None:
            body = {"model": NAME, "prompt": prompts[i], "max_tokens": budget, "temperature": 0, "stream": True}
            pieces = []
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=TIMEOUT) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        started.set()
                        pieces.append(httpx.Response(200, content=line[6:]).json()["choices"][0]["text"])
                    elif line == "data: [DONE]":
                        texts[i] = "".join(pieces)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        threads[0].start()
        assert started.wait(TIMEOUT)
        threads[1].start()  # queued behind the first (one slot)
        wait_for(lambda: httpx.get(f"{url}/health", timeout=TIMEOUT).json()["stats"]["requests"] == 2,
                 "the second request to arrive")
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(TIMEOUT)
        assert proc.wait(TIMEOUT) == 0
        assert [texts.get(i) for i in range(2)] == wants, "both requests ran to the end before exit"
