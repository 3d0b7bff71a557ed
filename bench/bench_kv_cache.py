"""A bf16 model's decode over an fp32 KV cache against a bf16 one: the attention kernel alone, and whole steps.

    python bench/bench_kv_cache.py --mode attention --shapes 1x1024 16x512
    python bench/bench_kv_cache.py --mode steps --batches 1 16 --contexts 128 1024

A bf16 model's keys and values are bf16 values, so FastForward decodes it over a bf16 cache where
phibook's attention runs (``FastForward.cache_dtype``); this measures what that buys, in one
process, the two caches in ALTERNATING rounds (memory bandwidth drifts from minute to minute).

- attention: ``attention_f32`` (the build this ATen level picks) over ``--layers`` layers' caches of
  phi-1.5's head shape, one call per layer, so each call reads memory as a decode step's does;
  ms per step.
- steps: random phi-1.5 weights (``--preset``) in bf16 through ``FastForward``; each batch and
  context is prefilled once into an fp32 cache and copied into a bf16 one (exact: the values are
  bf16), then both decode ``--steps`` greedy tokens from there; ms per step, and whether both
  chose the same tokens.

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

CACHES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _shape(text: str) -> tuple[int, int]:
    rows, _, keys = text.partition("x")
    try:
        return int(rows), int(keys)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is ROWSxKEYS, e.g. 16x512; got {text!r}") from None


def bench_attention(args) -> list[str]:
    from phibook.inference.kernels import attention_kernel

    attention = attention_kernel()
    if attention is None:
        sys.exit("error: phibook's attention kernel does not run here (its reason is on stderr)")
    heads, dim, layers = 32, 64, args.layers
    lines = []
    for rows, keys in args.shapes:
        times: dict[str, list[float]] = {name: [] for name in CACHES}
        caches = {name: (torch.randn(layers, rows, heads, keys, dim).to(dt), torch.randn(layers, rows, heads, keys, dim).to(dt))
                  for name, dt in CACHES.items()}
        q = torch.randn(rows, heads, 1, dim)
        no_mask = torch.empty(0, dtype=torch.bool)
        for r in range(args.rounds):
            for name in (CACHES if r % 2 == 0 else reversed(CACHES)):
                k, v = caches[name]
                t0 = time.perf_counter()
                for layer in range(layers):
                    attention(q, k[layer], v[layer], no_mask)
                times[name].append((time.perf_counter() - t0) * 1000)
        f, b = median(times["fp32"]), median(times["bf16"])
        lines.append(f"| {rows} x {keys} keys | {f:.2f} | {b:.2f} | {f / b:.2f}x |")
        del caches
    return ["| rows x keys | fp32 cache ms/step | bf16 cache ms/step | bf16 speed-up |", "|---|---:|---:|---:|", *lines]


@torch.inference_mode()
def bench_steps(args) -> list[str]:
    from phibook.inference.fast_decode import FastForward
    from phibook.inference.pages import huge_page_zeros
    from phibook.model.model import KVCache

    fast = FastForward(build_ours(args.preset, torch.bfloat16), release_model=True)
    if fast.cache_dtype != torch.bfloat16:
        sys.exit("error: this FastForward does not read a bf16 cache here (our attention is refused or switched off)")
    cfg = fast.config
    g = torch.Generator().manual_seed(0)
    lines = []
    for batch in args.batches:
        for context in args.contexts:
            caches = {name: KVCache(cfg, batch, context + args.steps, dtype=dt, allocate=huge_page_zeros)
                      for name, dt in CACHES.items()}
            prompt = torch.randint(0, cfg.vocab_size, (batch, context), generator=g)
            for start in range(0, context, 512):  # the Generator's prefill chunk
                logits = fast(prompt[:, start : start + 512], cache=caches["fp32"], last_only=True)
            first = logits[:, -1:].float().argmax(-1)
            caches["bf16"].k.copy_(caches["fp32"].k)
            caches["bf16"].v.copy_(caches["fp32"].v)
            times: dict[str, list[float]] = {name: [] for name in CACHES}
            tokens: dict[str, list[list[int]]] = {}
            for r in range(args.rounds):
                for name in (CACHES if r % 2 == 0 else reversed(CACHES)):
                    cache, token, chosen = caches[name], first, []
                    cache.pos = context
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        token = fast(token, cache=cache)[:, -1:].float().argmax(-1)
                        chosen.append(token.flatten().tolist())  # the host sync a generator makes
                    times[name].append((time.perf_counter() - t0) * 1000 / args.steps)
                    tokens.setdefault(name, chosen)
            f, b = median(times["fp32"]), median(times["bf16"])
            same = "yes" if tokens["fp32"] == tokens["bf16"] else "NO"
            lines.append(f"| {batch} | {context} | {f:.1f} | {b:.1f} | {f / b:.2f}x | {same} |")
            del caches
    return ["| batch | cached tokens | fp32 cache ms/step | bf16 cache ms/step | bf16 speed-up | same tokens |",
            "|---:|---:|---:|---:|---:|---|", *lines]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("attention", "steps"), default="attention", help="what to time")
    ap.add_argument("--shapes", type=_shape, nargs="+", default=[(1, 1024), (16, 512)],
                    help="attention: ROWSxKEYS per call (rows = batch rows, 32 heads of 64)")
    ap.add_argument("--layers", type=int, default=24, help="attention: layers' caches per step")
    ap.add_argument("--preset", default="phi-1.5", help="steps: model preset (random weights, bf16)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="steps: batch sizes")
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 1024], help="steps: cached tokens before decoding")
    ap.add_argument("--steps", type=int, default=16, help="steps: decode steps per round")
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds per cache dtype")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    title = f"{args.mode}, bf16 model, {args.rounds} alternating rounds, {args.threads} threads"
    run_between_bandwidth_probes(title, lambda: bench_attention(args) if args.mode == "attention" else bench_steps(args), args.threads)


if __name__ == "__main__":
    main()
