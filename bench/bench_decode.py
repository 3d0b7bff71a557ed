"""Decode ms/token and prefill tokens/s: phibook (eager and fast path) vs transformers, same weights.

    flock /tmp/phibook-bigmem.lock python bench/bench_decode.py --dtype bf16
    flock /tmp/phibook-bigmem.lock python bench/bench_decode.py --dtype fp32 --mode prefill

Random weights in the chosen preset (default phi-1.5), batch 1, greedy. The
systems run in ALTERNATING rounds within one process (memory bandwidth drifts
from minute to minute on shared machines), and the report gives medians and
ratios. Decode time per token is measured from the first generated token to
the last (prefill excluded): transformers through ``generate`` with its KV cache
and a streamer that timestamps each token; phibook through its own forward
with a preallocated ``KVCache`` and argmax. The models share one copy of the
weights; the fast path holds its own prepacked copy.

Prints a markdown table and (with --json) writes the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BANDWIDTH_GBS,
    DTYPES,
    build_ours,
    git_rev,
    hf_sharing,
    load_average,
    machine,
    median,
    now,
    weight_bytes_per_token,
)


class _Stamps:
    """A transformers streamer that records when each generated token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.first = True

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # generate() hands over the prompt first
            self.first = False
            return
        self.times.append(time.perf_counter())
        self.tokens.extend(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def decode_hf(hf, prompt: torch.Tensor, n: int) -> tuple[float, list[int]]:
    stamps = _Stamps()
    hf.generate(
        prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=stamps,
        attention_mask=torch.ones_like(prompt),
    )
    return (stamps.times[-1] - stamps.times[0]) / (n - 1), stamps.tokens


@torch.inference_mode()
def decode_ours(forward, cfg, dtype, prompt: torch.Tensor, n: int) -> tuple[float, list[int]]:
    from phibook.model.model import KVCache

    cache = KVCache(cfg, 1, prompt.shape[1] + n, dtype=dtype)
    token = forward(prompt, cache=cache)[:, -1].argmax(-1, keepdim=True)
    tokens, times = [int(token)], [time.perf_counter()]
    for _ in range(n - 1):
        token = forward(token, cache=cache)[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))  # the host sync a real generator makes to emit text
        times.append(time.perf_counter())
    return (times[-1] - times[0]) / (n - 1), tokens


@torch.inference_mode()
def prefill_hf(hf, prompt: torch.Tensor) -> float:
    t = time.perf_counter()
    hf(prompt, use_cache=True, logits_to_keep=1)  # what generate() runs for the prompt
    return prompt.shape[1] / (time.perf_counter() - t)


@torch.inference_mode()
def prefill_ours(forward, cfg, dtype, prompt: torch.Tensor, **kw) -> float:
    from phibook.model.model import KVCache

    cache = KVCache(cfg, 1, prompt.shape[1] + 1, dtype=dtype)
    t = time.perf_counter()
    forward(prompt, cache=cache, **kw)
    return prompt.shape[1] / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="phi-1.5", help="model preset (random weights)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weight and compute dtype")
    ap.add_argument("--mode", choices=["decode", "prefill"], default="decode", help="what to time")
    ap.add_argument("--prompt-len", type=int, default=128, help="decode: prompt tokens before decoding")
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=[128, 512], help="prefill: prompt lengths")
    ap.add_argument("--new-tokens", type=int, default=32, help="decode: tokens generated per round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per system")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--systems", nargs="+", default=["transformers", "phibook", "phibook-fast"],
                    help="systems to compare (transformers, phibook, phibook-fast)")
    ap.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = ap.parse_args()

    from phibook.inference.fast_decode import FastForward

    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    t0 = time.perf_counter()
    model = build_ours(args.preset, dtype)
    cfg = model.config
    hf = hf_sharing(model, dtype) if "transformers" in args.systems else None
    fast = FastForward(model) if "phibook-fast" in args.systems else None
    print(f"built models in {time.perf_counter() - t0:.0f}s; load {load_average()}", file=sys.stderr)

    gen = torch.Generator().manual_seed(1)
    results: dict[str, list[float]] = {s: [] for s in args.systems}
    tokens: dict[str, list[int]] = {}
    systems = list(args.systems)
    if args.mode == "decode":
        prompt = torch.randint(0, 50000, (1, args.prompt_len), generator=gen)
        runners = {
            "transformers": lambda: decode_hf(hf, prompt, args.new_tokens),
            "phibook": lambda: decode_ours(model, cfg, dtype, prompt, args.new_tokens),
            "phibook-fast": lambda: decode_ours(fast, cfg, dtype, prompt, args.new_tokens),
        }
        for s in systems:  # warm-up (allocator, oneDNN primitive caches)
            runners[s]()
        for r in range(args.rounds):
            for s in systems[r % len(systems):] + systems[: r % len(systems)]:
                sec, toks = runners[s]()
                results[s].append(sec * 1e3)
                tokens[s] = toks
                print(f"round {r} {s}: {sec * 1e3:.1f} ms/token", file=sys.stderr)
        floor_ms = weight_bytes_per_token(cfg, dtype) / (BANDWIDTH_GBS * 1e9) * 1e3
        ref = median(results["transformers"]) if "transformers" in results else None
        lines = [
            f"decode, {args.preset} {args.dtype}, batch 1, {args.prompt_len}-token prompt, "
            f"{args.new_tokens} new tokens x {args.rounds} alternating rounds, {args.threads} threads; "
            f"bandwidth floor {floor_ms:.0f} ms/token at {BANDWIDTH_GBS:.0f} GB/s",
            "",
            "| system | median ms/token | min | max | speed vs transformers | fraction of floor |",
            "|---|---|---|---|---|---|",
        ]
        for s in systems:
            m = median(results[s])
            ratio = f"{ref / m:.2f}x" if ref else "-"
            lines.append(
                f"| {s} | {m:.1f} | {min(results[s]):.1f} | {max(results[s]):.1f} | {ratio} | {floor_ms / m:.2f} |"
            )
        if "transformers" in tokens:
            for s in systems:
                same = sum(a == b for a, b in zip(tokens[s], tokens["transformers"]))
                lines.append(f"\n{s}: {same}/{len(tokens[s])} greedy tokens equal to transformers'")
    else:
        prompts = {n: torch.randint(0, 50000, (1, n), generator=gen) for n in args.prompt_lens}
        runners = {
            "transformers": lambda p: prefill_hf(hf, p),
            "phibook": lambda p: prefill_ours(model, cfg, dtype, p),
            "phibook-fast": lambda p: prefill_ours(fast, cfg, dtype, p, last_only=True),
        }
        results = {f"{s}@{n}": [] for s in systems for n in args.prompt_lens}
        for s in systems:
            runners[s](prompts[args.prompt_lens[0]])
        for r in range(args.rounds):
            for n in args.prompt_lens:
                for s in systems[r % len(systems):] + systems[: r % len(systems)]:
                    tps = runners[s](prompts[n])
                    results[f"{s}@{n}"].append(tps)
                    print(f"round {r} {s} {n}: {tps:.0f} tokens/s", file=sys.stderr)
        lines = [
            f"prefill, {args.preset} {args.dtype}, batch 1, {args.rounds} alternating rounds, {args.threads} threads",
            "",
            "| system | prompt | median tokens/s | min | max | vs transformers |",
            "|---|---|---|---|---|---|",
        ]
        for n in args.prompt_lens:
            ref = median(results[f"transformers@{n}"]) if "transformers" in systems else None
            for s in systems:
                v = results[f"{s}@{n}"]
                ratio = f"{median(v) / ref:.2f}x" if ref else "-"
                lines.append(f"| {s} | {n} | {median(v):.0f} | {min(v):.0f} | {max(v):.0f} | {ratio} |")
    lines.append(
        f"\nmachine: {machine()}; load average after: {load_average()}; {now()}; git {git_rev()}; "
        f"command: python bench/{Path(__file__).name} {' '.join(sys.argv[1:])}"
    )
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
