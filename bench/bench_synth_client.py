"""Teacher client overhead: phibook's synth job vs a bare openai-client loop.

Both drive the same fast local OpenAI-compatible endpoint (a uvicorn app in a
subprocess that answers instantly) at the same concurrency. The number that
matters is the client's CPU time per request: everything phibook adds (prompt
rendering, retries bookkeeping, ids, JSONL writes, progress) on top of the
openai client itself. Rounds alternate between the two clients.

    python bench/bench_synth_client.py --requests 2000 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

SERVER = textwrap.dedent(
    """
    import sys, uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route
    BODY = b'{"id":"c","object":"chat.completion","created":0,"model":"m","choices":[{"index":0,' \\
           b'"finish_reason":"stop","message":{"role":"assistant","content":"' + b"A short passage. " * 40 + \\
           b'"}}],"usage":{"prompt_tokens":50,"completion_tokens":160,"total_tokens":210}}'
    async def chat(request):
        await request.body()
        return Response(BODY, media_type="application/json")
    async def models(request):
        return Response(b'{"object":"list","data":[{"id":"m","object":"model"}]}', media_type="application/json")
    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models)])
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error")
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def bare_loop(url: str, n: int, concurrency: int) -> None:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0)
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            r = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"Write about topic {i}"}], max_tokens=256
            )
            assert r.choices[0].message.content

    await asyncio.gather(*(one(i) for i in range(n)))
    await client.close()


def run_bare(url: str, n: int, concurrency: int) -> tuple[float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    asyncio.run(bare_loop(url, n, concurrency))
    return time.process_time() - c0, time.perf_counter() - w0


def run_phibook(url: str, n: int, concurrency: int, out: Path) -> tuple[float, float]:
    from phibook.data.synth.prompts import load_templates, load_topics
    from phibook.data.synth.run import run_synth
    from phibook.data.synth.teachers import OpenAITeacher

    out.unlink(missing_ok=True)
    teacher = OpenAITeacher([url], "m", max_tokens=256)
    topics, templates = load_topics(), load_templates()
    c0, w0 = time.process_time(), time.perf_counter()
    stats = run_synth(out, n, teacher, topics, templates, concurrency=concurrency, progress=False)
    assert stats.written == n, stats.summary()
    return time.process_time() - c0, time.perf_counter() - w0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        run_bare(url, 50, 8)  # warm-up both paths
        rows = {"bare openai client": [], "phibook synth run": []}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.rounds):
                rows["bare openai client"].append(run_bare(url, args.requests, args.concurrency))
                rows["phibook synth run"].append(run_phibook(url, args.requests, args.concurrency, Path(tmp) / "o.jsonl"))
        result = {}
        for name, runs in rows.items():
            cpu = sorted(r[0] for r in runs)[len(runs) // 2]
            wall = sorted(r[1] for r in runs)[len(runs) // 2]
            result[name] = {"client_cpu_ms_per_request": 1000 * cpu / args.requests, "docs_per_s": args.requests / wall}
        bare, ours = result["bare openai client"], result["phibook synth run"]
        result["phibook_overhead_ms_per_request"] = ours["client_cpu_ms_per_request"] - bare["client_cpu_ms_per_request"]
        result["throughput_ratio_phibook_vs_bare"] = ours["docs_per_s"] / bare["docs_per_s"]
        print(json.dumps(result, indent=2))
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
