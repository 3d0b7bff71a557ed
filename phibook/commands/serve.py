"""`phibook serve`: an OpenAI-compatible HTTP server for one model (see phibook/serve/server.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from phibook.commands.generate import DTYPE_AUTO_HELP, add_dtype_arg, add_fast_arg, add_quant_args, use_fast

DESCRIPTION = """\
Serve a model over HTTP with the OpenAI API: POST /v1/completions and
/v1/chat/completions (both with SSE streaming, stream=true, and logprobs),
GET /v1/models, GET /health (status and counters) and GET /metrics (Prometheus).
Any OpenAI client works, e.g.
openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused"), and so does
lm-evaluation-harness's local-completions model (echo + logprobs scoring).

Chat messages are rendered in the report's chat format ("Alice: ..." for the
user, "Bob: ..." for the assistant, system text as leading lines, ending with
"Bob:"); a reply ends when the model starts Alice's next line. Extensions:
top_k and repetition_penalty. Unsupported OpenAI parameters (presence/frequency
penalties, logit_bias, suffix, best_of > 1) are answered with HTTP 400.

Continuous batching: one worker thread owns the model and a pool of
--max-batch-size KV-cache slots. A new request joins the running batch at the
next decode step after its prompt is read (--prefill-chunk tokens per step), and a
finished or cancelled one frees its slot at once. Past --max-queue waiting
sequences, requests get 503 with Retry-After. SIGTERM or Ctrl-C drains the
requests in flight (up to --drain-timeout seconds), then exits 0.
"""

EPILOG = """\
examples:
  phibook serve --model runs/phi-tiny/final
  phibook serve --model ~/models/phi-1_5 --dtype bf16 --port 8080 --served-model-name phi-1.5
  phibook serve --model ~/models/phi-1_5 --quant int8 --parallel 16
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "phi-1.5", "prompt": "def fib(n):", "max_tokens": 32, "temperature": 0}'
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (completions, chat, streaming, logprobs, continuous batching)",
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
    add_dtype_arg(p, "auto", f"weights and compute precision (default: auto). {DTYPE_AUTO_HELP}")
    p.add_argument("--device", default=None,
                   help="torch device, e.g. cpu or cuda (default: cuda when available, else cpu)")
    add_fast_arg(p)
    add_quant_args(p)
    p.add_argument("--max-batch-size", "--parallel", dest="max_batch_size", type=int, default=8, metavar="N",
                   help="KV-cache slots: the most sequences decoded together (default: 8; 1 turns batching off)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="sequences that may wait for a free slot; past that, requests get 503 + Retry-After "
                        "(default: 64)")
    p.add_argument("--prefill-chunk", type=int, default=256, metavar="TOKENS",
                   help="prompt tokens read per scheduler step, so a long prompt delays the running rows by "
                        "one chunk at a time (default: 256)")
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                   help="seconds after which an unfinished request is dropped and answered 504 (default: 600)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM/Ctrl-C, seconds to let requests in flight finish before exiting (default: 30)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="model id that clients send and /v1/models lists (default: the model directory's name)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="server log level (default: info)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging
    import signal
    import socket

    import torch

    from phibook.errors import PhibookError
    from phibook.inference.generate import Generator
    from phibook.serve.server import create_app, run_server

    if args.max_batch_size < 1:
        raise PhibookError(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if args.max_queue < 0:
        raise PhibookError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.prefill_chunk < 1:
        raise PhibookError(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    if not args.request_timeout > 0:
        raise PhibookError(f"--request-timeout must be > 0, got {args.request_timeout}")
    if not args.drain_timeout >= 0:
        raise PhibookError(f"--drain-timeout must be >= 0, got {args.drain_timeout}")
    if not 0 <= args.port <= 65535:
        raise PhibookError(f"--port must be in 0..65535, got {args.port}")
    path = Path(args.model).expanduser()
    if not path.exists():
        raise PhibookError(f"--model {path}: no such file or directory")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = args.served_model_name or path.resolve().name

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    # --quant swaps the model's linears in place (phibook.inference.quant): the engine runs it unchanged.
    generator = Generator.from_path(path, device=device, dtype=args.dtype, fast=use_fast(args, device),
                                    quant=args.quant, save_quant=args.save_quant)
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        generator.dtype, "?")
    app = create_app(generator, model_name=name, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                     prefill_chunk=args.prefill_chunk, request_timeout=args.request_timeout,
                     engine_thread=False)  # run_server runs it here, in the thread that loaded the model

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
    print(f"phibook serve: model {name!r} from {path} ({dtype_name}{', ' + args.quant if args.quant else ''}, "
          f"{device}) "
          f"listening on http://{host}:{port}/v1", file=sys.stderr, flush=True)
    # run_server drains on SIGINT and SIGTERM alike and returns: a drained stop is a normal stop,
    # exit code 0. A signal before it takes them over (or after) ends the process like Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        run_server(app, sock, log_level=args.log_level, drain_timeout=args.drain_timeout)
    except KeyboardInterrupt:
        pass
    print("phibook serve: stopped", file=sys.stderr)
    return 0
