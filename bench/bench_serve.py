"""Serving throughput: `phibook serve` (continuous batching) vs llama.cpp's server, same weights.

    python bench/bench_serve.py --model runs/phi-1_5 --dtype fp32 --clients 1 4 16 --rounds 3
    python bench/bench_serve.py --model tiny/ckpt --clients 1 2 --max-tokens 8 --rounds 1   # smoke

Each system runs as its own server subprocess on loopback: ``phibook serve`` (slots = the
largest client count, queue large enough that nothing is refused) and llama-cpp-python's
``python -m llama_cpp.server`` on a GGUF of the same weights, written by ``phibook export
--format gguf`` in the same precision (or given with --gguf). At each concurrency level C,
C clients each send --requests streaming greedy completions one after another (a prompt of
about --prompt-len tokens, --max-tokens new tokens); the systems and levels run in
ALTERNATING rounds (system order flips every round: load drifts on shared machines).

Reported per system and level: aggregate output tokens/s (all tokens of the level / its wall
time; median over rounds), request latency p50/p95 and time to first token p50/p95 (pooled
over rounds). Output tokens are the server's usage count (phibook) or one per streamed chunk
(llama.cpp streams one token per chunk, before the finish chunk). Time to first token is to the
first chunk that carries a choice. The llama.cpp peer is skipped, with the reason
printed, when llama-cpp-python (extra ``llamacpp``) or the GGUF cannot be had.

``--llama-server PATH`` runs llama.cpp's own C++ server instead of llama-cpp-python's
(``llama-server -m GGUF -np <largest client count> -c <context x slots> -t --threads``: one
slot a client, continuous batching); build just that target from the source llama-cpp-python's
sdist carries under vendor/llama.cpp (cmake ... && cmake --build B --target llama-server).
With ``--quant int8|w8a8`` llama.cpp gets the q8_0 export of the same weights.

Every request asks for all its tokens (``ignore_eos``, vLLM's extension, which both servers
accept), and a request that returns fewer than --max-tokens stops the run: a fast server that
answers early measures nothing.

Goal (issue 14): phibook at 16 clients >= llama.cpp at 16 clients, and >= 3x phibook at 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_rev, load_average, machine, median, now  # noqa: E402

PHIBOOK = [sys.executable, "-m", "phibook.cli"]
TEXT = ("Alice and Bob are learning about numbers. A prime number has exactly two divisors. "
        "The students counted the apples in the basket, then they shared them among friends. ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise SystemExit(f"{what} was not ready after {timeout} s")


@contextlib.contextmanager
def server(cmd: list[str], url: str, what: str, env: dict | None = None) -> Iterator[None]:
    log = tempfile.TemporaryFile()  # the server's own output, shown when it fails
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(url, proc, what)
        yield
    except BaseException:
        log.seek(0)
        tail = log.read().decode(errors="replace").splitlines()[-15:]
        state = f"exited with {proc.returncode}" if proc.poll() is not None else "still running"
        print(f"{what} ({state}); the last lines it printed:\n" + "\n".join(tail), file=sys.stderr)
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def one_request(client: httpx.AsyncClient, url: str, body: dict, usage: bool) -> tuple[float, float, int]:
    """(latency s, time to first token s, output tokens) of one streamed completion."""
    start = time.perf_counter()
    first = None
    chunks = 0
    counted = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"{url}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if data.get("usage") and usage:
                counted = data["usage"]["completion_tokens"]
            if data.get("choices"):
                # llama.cpp: one chunk per token, its text possibly empty (a byte of a character,
                # or a padding id that random weights pick); the finish chunk carries no token.
                if first is None:
                    first = time.perf_counter()
                if data["choices"][0].get("finish_reason") is None:
                    chunks += 1
    end = time.perf_counter()
    return end - start, (first or end) - start, counted if counted is not None else chunks


async def level(url: str, clients: int, requests: int, body: dict, usage: bool) -> dict:
    # A fresh connection per request (no keep-alive): a pooled connection that the server closed
    # while idle fails the next request on it ("Server disconnected without sending a response",
    # seen twice with llama-server); a loopback connect costs far less than the timing's spread.
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker(w: int) -> list[tuple[float, float, int]]:
            # A prompt of its own per request (a distinct first word): a server's prompt cache
            # (llama-server reuses a slot's matching prefix) must not skip the prefill it times.
            return [await one_request(client, url, {**body, "prompt": f"{next(TAGS)} {body['prompt']}"}, usage)
                    for _ in range(requests)]

        start = time.perf_counter()
        results = await asyncio.gather(*(worker(w) for w in range(clients)))
        wall = time.perf_counter() - start
    flat = [r for rs in results for r in rs]
    short = [r[2] for r in flat if r[2] != body["max_tokens"]]
    if short:
        raise SystemExit(f"{url}: {len(short)} of {len(flat)} requests returned {sorted(set(short))} tokens, not "
                         f"the {body['max_tokens']} asked for (ignore_eos): their timing would mean nothing")
    return {"wall": wall, "tokens": sum(r[2] for r in flat), "latency": [r[0] for r in flat],
            "ttft": [r[1] for r in flat]}


TAGS = (f"Note{i}:" for i in itertools.count())


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] if s else float("nan")


def llama_peer(args, tmp: Path) -> tuple[Path | None, str]:
    """The GGUF for llama.cpp's server, or None and why it is skipped."""
    if args.llama_server is not None:
        if not args.llama_server.is_file():
            return None, f"--llama-server {args.llama_server} does not exist"
    elif importlib.util.find_spec("llama_cpp") is None:
        return None, "llama-cpp-python is not installed (pip install -e '.[llamacpp]' builds it)"
    probe = subprocess.run([sys.executable, "-c", "import llama_cpp.server.app"], capture_output=True, text=True)
    if args.llama_server is None and probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return None, (f"llama_cpp.server does not import ({last}); it needs llama-cpp-python's [server] extra: "
                      "pip install 'llama-cpp-python[server]==0.3.36'")
    if args.gguf:
        return args.gguf, ""
    out = tmp / "model.gguf"
    gguf_type = "q8_0" if args.quant in ("int8", "w8a8") else {"fp32": "f32", "bf16": "bf16"}[args.dtype]
    proc = subprocess.run([*PHIBOOK, "export", str(args.model), str(out), "--format", "gguf", "--gguf-type", gguf_type],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return None, f"phibook export --format gguf failed: {proc.stderr.strip()[-300:]}"
    return out, ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="phibook checkpoint (or HF phi directory) to serve")
    ap.add_argument("--gguf", type=Path, help="GGUF for llama.cpp (default: phibook export of --model)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--quant", choices=["int8", "w8a8", "int4", "int4-g128"],
                    help="phibook serve --quant; llama.cpp gets the q8_0 export for int8 and w8a8")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=4, help="requests per client per level (default: 4)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128, help="approximate prompt length in tokens")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads (default: all cores)")
    ap.add_argument("--systems", nargs="+", default=["phibook", "llama.cpp"], choices=["phibook", "llama.cpp"])
    ap.add_argument("--llama-server", type=Path, metavar="PATH",
                    help="llama.cpp's C++ llama-server binary for the llama.cpp system (default: llama-cpp-python's "
                         "python -m llama_cpp.server)")
    ap.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = ap.parse_args()
    if not args.model.exists():
        ap.error(f"--model {args.model}: no such file or directory")

    words = TEXT.split()
    prompt = " ".join(words[i % len(words)] for i in range(max(1, int(args.prompt_len * 0.75))))
    body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    n_ctx = 2048
    with contextlib.suppress(OSError, ValueError, KeyError):
        n_ctx = json.loads((args.model / "config.json").read_text()).get("max_seq_len", n_ctx)

    with tempfile.TemporaryDirectory() as tmp:
        urls, cmds, skipped = {}, {}, {}
        if "phibook" in args.systems:
            port = free_port()
            urls["phibook"] = f"http://127.0.0.1:{port}"
            cmds["phibook"] = [*PHIBOOK, "serve", "--model", str(args.model), "--port", str(port), "--dtype",
                               args.dtype, "--max-batch-size", str(max(args.clients)), "--max-queue", "4096",
                               "--log-level", "warning", *(["--quant", args.quant, "--no-save-quant"]
                                                           if args.quant else [])]
        if "llama.cpp" in args.systems:
            gguf, why = llama_peer(args, Path(tmp))
            if gguf is None:
                skipped["llama.cpp"] = why
                print(f"llama.cpp peer skipped: {why}", file=sys.stderr)
            else:
                port = free_port()
                urls["llama.cpp"] = f"http://127.0.0.1:{port}"
                if args.llama_server is not None:
                    slots = max(args.clients)
                    cmds["llama.cpp"] = [str(args.llama_server), "-m", str(gguf), "--host", "127.0.0.1", "--port",
                                         str(port), "-np", str(slots), "-c", str(n_ctx * slots), "-t",
                                         str(args.threads), "-tb", str(args.threads), "--no-webui"]
                else:
                    cmds["llama.cpp"] = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host",
                                         "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads",
                                         str(args.threads)]
        systems = list(urls)
        raw: dict[str, dict[int, list[dict]]] = {s: {c: [] for c in args.clients} for s in systems}
        with contextlib.ExitStack() as stack:
            for s in systems:
                stack.enter_context(server(cmds[s], urls[s], s))
            for s in systems:  # warm up: first-call allocations and page faults out of the numbers
                asyncio.run(level(urls[s], 1, 1, body, s == "phibook"))
            for r in range(args.rounds):
                for s in systems if r % 2 == 0 else systems[::-1]:
                    for c in args.clients:
                        b = {**body, "stream_options": {"include_usage": True}} if s == "phibook" else body
                        res = asyncio.run(level(urls[s], c, args.requests, b, s == "phibook"))
                        raw[s][c].append(res)
                        print(f"round {r + 1} {s:9s} clients {c:3d}: {res['tokens'] / res['wall']:8.1f} tok/s",
                              file=sys.stderr, flush=True)

    print(f"# bench_serve ({now()}, git {git_rev()})\n")
    print(f"machine: {machine()}; load average {load_average()}")
    print(f"model {args.model} ({args.dtype}{', ' + args.quant if args.quant else ''}), prompt ~{args.prompt_len} "
          f"tokens, {args.max_tokens} new tokens, greedy, {args.requests} requests per client, {args.rounds} "
          f"alternating rounds\n")
    print("| system | clients | output tok/s (median) | latency p50 / p95 s | TTFT p50 / p95 s |")
    print("|---|---|---|---|---|")
    summary: dict[str, dict[int, float]] = {}
    for s in systems:
        for c in args.clients:
            runs = raw[s][c]
            tps = median([x["tokens"] / x["wall"] for x in runs])
            summary.setdefault(s, {})[c] = tps
            lat = [v for x in runs for v in x["latency"]]
            ttft = [v for x in runs for v in x["ttft"]]
            print(f"| {s} | {c} | {tps:.1f} | {pct(lat, .5):.3f} / {pct(lat, .95):.3f} | "
                  f"{pct(ttft, .5):.3f} / {pct(ttft, .95):.3f} |")
    for s, why in skipped.items():
        print(f"\n{s}: skipped ({why})")
    hi, lo = max(args.clients), min(args.clients)
    if "phibook" in summary and hi != lo:
        print(f"\nphibook {hi} clients / phibook {lo}: {summary['phibook'][hi] / summary['phibook'][lo]:.2f}x")
    if "phibook" in summary and "llama.cpp" in summary:
        print(f"phibook / llama.cpp at {hi} clients: {summary['phibook'][hi] / summary['llama.cpp'][hi]:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "raw": raw,
                                         "skipped": skipped, "machine": machine()}, indent=1))


if __name__ == "__main__":
    main()
