"""Decode ms/token at batch 1 on a CUDA GPU: phibook vs transformers, same random weights.

    python bench/bench_decode_gpu.py --dtype bf16
    python bench/bench_decode_gpu.py --dtype fp16 --no-compile

phibook's decode step is compiled with ``torch.compile(mode="reduce-overhead")``
(CUDA graphs): a static cache of fixed length, the new token's position and a
mask over the whole cache passed in as tensors, so every step has the same
shapes and replays one graph with no host sync until the token is read.
transformers runs ``generate`` with its static cache and the same compile mode
where it supports it, else its default dynamic cache. Rounds alternate between
the systems; medians and ratios are printed. The bandwidth floor is weight bytes
per token / --bandwidth-gbs (H200: about 4,800 GB/s, so ~0.55-0.66 ms in bf16).

Importing this file needs no GPU (so the test suite and linters can load it);
running it without CUDA exits with a message.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

GPU_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class StaticDecoder:
    """One fixed-shape decode step over a PhiModel: the whole cache, a mask, a position tensor."""

    def __init__(self, model, max_len: int, compile_mode: str | None) -> None:
        from phibook.model.model import KVCache

        self.model, self.cfg = model, model.config
        dtype = model.embed.weight.dtype
        dev = model.embed.weight.device
        self.cache = KVCache(self.cfg, 1, max_len, dtype=dtype, device=dev)
        self.max_len = max_len
        self.slots = torch.arange(max_len, device=dev)
        self.step_fn = torch.compile(self._step, mode=compile_mode, fullgraph=True) if compile_mode else self._step

    def _step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """token (1, 1), pos (1,) on the device: logits of the next token; writes cache slot pos."""
        m, cfg = self.model, self.cfg
        cos = m.rope_cos[pos].view(1, 1, 1, -1)
        sin = m.rope_sin[pos].view(1, 1, 1, -1)
        mask = (self.slots <= pos).view(1, 1, 1, -1)  # attend to slots 0..pos of the full cache
        x = m.embed(token)
        from phibook.model.model import apply_rotary

        for i, block in enumerate(m.blocks):
            h = block.ln(x)
            a = block.attn
            q, k, v = a.qkv(h).view(1, 1, 3, cfg.n_head, cfg.head_dim).permute(2, 0, 3, 1, 4)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            self.cache.k[i].index_copy_(2, pos, k)
            self.cache.v[i].index_copy_(2, pos, v)
            y = torch.nn.functional.scaled_dot_product_attention(q, self.cache.k[i], self.cache.v[i], attn_mask=mask)
            x = x + a.out(y.transpose(1, 2).reshape(1, 1, cfg.d_model)) + block.mlp(h)
        return m.lm_head(m.ln_f(x))[:, -1]

    @torch.inference_mode()
    def decode(self, prompt: torch.Tensor, n: int) -> tuple[float, list[int]]:
        self.cache.reset()
        logits = self.model(prompt, cache=self.cache)[:, -1]  # prefill (eager)
        token = logits.argmax(-1, keepdim=True)
        pos = torch.tensor([prompt.shape[1]], device=prompt.device)
        out = [token]
        _sync(prompt.device)
        t = time.perf_counter()
        for _ in range(n - 1):
            token = self.step_fn(token, pos).argmax(-1, keepdim=True)
            pos = pos + 1
            out.append(token)
        _sync(prompt.device)
        return (time.perf_counter() - t) / (n - 1), [int(x) for x in torch.cat(out).view(-1).tolist()]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def decode_hf(hf, prompt: torch.Tensor, n: int, static: bool) -> tuple[float, list[int]]:
    kw = {"cache_implementation": "static"} if static else {}
    torch.cuda.synchronize()
    t = time.perf_counter()
    one = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1, do_sample=False, **kw)
    torch.cuda.synchronize()
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, **kw)
    torch.cuda.synchronize()
    total = time.perf_counter() - t
    del one
    return (total - prefill) / (n - 1), out[0, prompt.shape[1]:].tolist()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="phi-1.5", help="model preset (random weights)")
    ap.add_argument("--dtype", choices=sorted(GPU_DTYPES), default="bf16", help="weight and compute dtype")
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt tokens before decoding")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per system")
    ap.add_argument("--no-compile", action="store_true", help="run phibook's static step eagerly (no CUDA graphs)")
    ap.add_argument("--bandwidth-gbs", type=float, default=4800.0, help="GPU memory bandwidth for the floor")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_decode_gpu.py: no CUDA device here; run it on a GPU machine", file=sys.stderr)
        return 2

    from common import build_ours, hf_sharing, median, weight_bytes_per_token

    dtype = GPU_DTYPES[args.dtype]
    model = build_ours(args.preset, dtype).cuda()
    model.reset_rope()
    hf = hf_sharing(model, dtype).cuda()
    hf.model.rotary_emb.inv_freq = hf.model.rotary_emb.inv_freq.cuda()
    dec = StaticDecoder(model, args.prompt_len + args.new_tokens, None if args.no_compile else "reduce-overhead")
    prompt = torch.randint(0, 50000, (1, args.prompt_len), generator=torch.Generator().manual_seed(1)).cuda()
    static_hf = True
    try:
        decode_hf(hf, prompt, 4, static=True)
    except Exception as exc:  # older transformers or a model without static-cache support
        print(f"transformers static cache unavailable ({exc}); using its dynamic cache", file=sys.stderr)
        static_hf = False
    runners = {
        "transformers": lambda: decode_hf(hf, prompt, args.new_tokens, static_hf),
        "phibook": lambda: dec.decode(prompt, args.new_tokens),
    }
    for run in runners.values():  # warm-up: compilation and CUDA graph capture
        run()
        run()
    results: dict[str, list[float]] = {k: [] for k in runners}
    tokens: dict[str, list[int]] = {}
    names = list(runners)
    for r in range(args.rounds):
        for name in names[r % 2:] + names[: r % 2]:
            sec, toks = runners[name]()
            results[name].append(sec * 1e3)
            tokens[name] = toks
    floor = weight_bytes_per_token(model.config, dtype) / (args.bandwidth_gbs * 1e9) * 1e3
    ref = median(results["transformers"])
    print(f"decode on {torch.cuda.get_device_name()}, {args.preset} {args.dtype}, batch 1, "
          f"{args.prompt_len}-token prompt, {args.new_tokens} new tokens, floor {floor:.2f} ms/token\n")
    print("| system | median ms/token | vs transformers | fraction of floor |\n|---|---|---|---|")
    for name in names:
        m = median(results[name])
        print(f"| {name} | {m:.2f} | {ref / m:.2f}x | {floor / m:.2f} |")
    same = sum(a == b for a, b in zip(tokens["phibook"], tokens["transformers"]))
    print(f"\ngreedy tokens equal: {same}/{len(tokens['phibook'])}; command: python bench/bench_decode_gpu.py "
          + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
