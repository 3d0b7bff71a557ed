"""`phibook serve`: an OpenAI-compatible HTTP server for one model (see phibook/serve/server.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from phibook.commands.generate import add_fast_arg, use_fast

DESCRIPTION = """\
Serve a model over HTTP with the OpenAI API: POST /v1/completions and
/v1/chat/completions (both with SSE streaming, stream=true), GET /v1/models and
GET /health (status and batching counters). Any OpenAI client works, e.g.
openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused").

Chat messages are rendered in the report's chat format ("Alice: ..." for the
user, "Bob: ..." for the assistant, system text as leading lines, ending with
"Bob:"); a reply ends when the model starts Alice's next line. Extensions:
top_k and repetition_penalty. Unsupported OpenAI parameters (n > 1, logprobs,
presence/frequency penalties, logit_bias) are answered with HTTP 400.

Concurrent requests are batched: one worker thread owns the model and runs
everything waiting (up to --max-batch-size prompts) as one batch.
"""

EPILOG = """\
examples:
  phibook serve --model runs/phi-tiny/final
  phibook serve --model ~/models/phi-1_5 --dtype bf16 --port 8080 --served-model-name phi-1.5
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "phi-1.5", "prompt": "def fib(n):", "max_tokens": 32, "temperature": 0}'
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (completions, chat, streaming, batching)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="PATH",
                   help="phibook checkpoint or Hugging Face phi directory (config.json, weights, tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1; use 0.0.0.0 to accept other machines)")
    p.add_argument("--port", type=int, default=8000,
                   help="TCP port (default: 8000; 0 picks a free port, printed at startup)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="weight and compute dtype (default: fp32; bf16 halves memory and is faster on CPUs with BF16)")
    p.add_argument("--device", default=None,
                   help="torch device, e.g. cpu or cuda (default: cuda when available, else cpu)")
    add_fast_arg(p)
    p.add_argument("--max-batch-size", type=int, default=8, metavar="N",
                   help="most prompts decoded together in one batch (default: 8; 1 turns batching off)")
    p.add_argument("--batch-window-ms", type=float, default=5.0, metavar="MS",
                   help="how long the first waiting request waits for others to join its batch (default: 5)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="model id that clients send and /v1/models lists (default: the model directory's name)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="server log level (default: info; info logs each batch's size)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging
    import socket

    import torch

    from phibook.errors import PhibookError
    from phibook.inference.generate import Generator
    from phibook.serve.server import create_app, run_server

    if args.max_batch_size < 1:
        raise PhibookError(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if not 0 <= args.port <= 65535:
        raise PhibookError(f"--port must be in 0..65535, got {args.port}")
    path = Path(args.model).expanduser()
    if not path.exists():
        raise PhibookError(f"--model {path}: no such file or directory")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    name = args.served_model_name or path.resolve().name

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    generator = Generator.from_path(path, device=device, dtype=dtype, fast=use_fast(args, device))
    app = create_app(generator, model_name=name, max_batch_size=args.max_batch_size,
                     batch_window_ms=args.batch_window_ms)

    # Bind here, not in uvicorn, so a busy port is a clean error and --port 0
    # can report the port it got before serving starts.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        sock.close()
        raise PhibookError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from exc
    sock.listen(128)
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"phibook serve: model {name!r} from {path} ({args.dtype}, {device}) "
          f"listening on http://{host}:{port}/v1", file=sys.stderr, flush=True)
    try:
        run_server(app, sock, log_level=args.log_level)
    except KeyboardInterrupt:
        # uvicorn shuts down gracefully on Ctrl-C and then re-raises it; that is a normal stop.
        pass
    print("phibook serve: stopped", file=sys.stderr)
    return 0
