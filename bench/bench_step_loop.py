"""FastForward's decode step as one loop of native calls against the block-by-block step.

    python bench/bench_step_loop.py --dtype bf16 --batches 1 16 --contexts 128 1024

Where the ``decode-step`` check passed, a one-token step runs each block as GEMV, ``attend_step``
(rotary, the cache writes, attention and GELU in one call), GEMV, then ``add_layer_norm`` (the
residual add with the next LayerNorm); ``FastForward(step_loop=False)`` runs the same blocks as
some ten calls each (the glue ops, the cache's update, ATen's add and LayerNorm). Both forwards
are built from one set of random weights (``--preset``), each batch and context is prefilled
once and the cache copied, then both decode ``--steps`` greedy tokens from there in ALTERNATING
rounds (memory bandwidth drifts from minute to minute); ms per step, and how many of the greedy
tokens agree (the LayerNorms round differently, so a near-tie of random weights may flip).

Beside the table: the CPU's SIMD flags, read bandwidth before and after, and the load.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_ours, median, run_between_bandwidth_probes  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def bench(args) -> list[str]:
    from phibook.inference.fast_decode import FastForward
    from phibook.inference.pages import huge_page_zeros
    from phibook.model.model import KVCache

    model = build_ours(args.preset, DTYPES[args.dtype])
    forwards = {"one loop": FastForward(model), "block by block": FastForward(model, step_loop=False)}
    del model
    if not forwards["one loop"].own_step:
        sys.exit("error: the one-loop decode step does not run here (the decode-step verdict is on stderr)")
    fast = forwards["one loop"]
    cfg = fast.config
    g = torch.Generator().manual_seed(0)
    lines = []
    for batch in args.batches:
        for context in args.contexts:
            caches = {name: KVCache(cfg, batch, context + args.steps, dtype=fast.cache_dtype, allocate=huge_page_zeros)
                      for name in forwards}
            prompt = torch.randint(0, cfg.vocab_size, (batch, context), generator=g)
            for start in range(0, context, 512):  # the Generator's prefill chunk
                logits = fast(prompt[:, start : start + 512], cache=caches["one loop"], last_only=True)
            first = logits[:, -1:].float().argmax(-1)
            caches["block by block"].k.copy_(caches["one loop"].k)
            caches["block by block"].v.copy_(caches["one loop"].v)
            times: dict[str, list[float]] = {name: [] for name in forwards}
            tokens: dict[str, list[int]] = {}
            for r in range(args.rounds):
                for name in (list(forwards) if r % 2 == 0 else list(forwards)[::-1]):
                    cache, token, chosen = caches[name], first, []
                    cache.pos = context
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        token = forwards[name](token, cache=cache)[:, -1:].float().argmax(-1)
                        chosen.extend(token.flatten().tolist())  # the host sync a generator makes
                    times[name].append((time.perf_counter() - t0) * 1000 / args.steps)
                    tokens.setdefault(name, chosen)
            one, each = median(times["one loop"]), median(times["block by block"])
            agree = sum(a == b for a, b in zip(tokens["one loop"], tokens["block by block"]))
            spread = " / ".join(f"{min(times[n]):.1f}-{max(times[n]):.1f}" for n in forwards)
            lines.append(f"| {batch} | {context} | {each:.1f} | {one:.1f} | {each / one:.3f}x | {spread} | "
                         f"{agree}/{len(tokens['one loop'])} |")
            del caches
    return ["| batch | cached tokens | block by block ms/step | one loop ms/step | speed-up | "
            "spread (one loop / block by block) | same greedy tokens |",
            "|---:|---:|---:|---:|---:|---|---|", *lines]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="model dtype")
    ap.add_argument("--preset", default="phi-1.5", help="model preset (random weights)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes")
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 1024], help="cached tokens before decoding")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=6, help="alternating rounds per forward")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    title = f"{args.dtype} model, {args.rounds} alternating rounds of {args.steps} steps, {args.threads} threads"
    run_between_bandwidth_probes(title, lambda: bench(args), args.threads)


if __name__ == "__main__":
    main()
