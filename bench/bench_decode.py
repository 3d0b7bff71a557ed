"""Decode ms/token and prefill tokens/s: phibook (eager, fast path, int8/int4) vs transformers
and llama.cpp, same weights.

    flock /tmp/phibook-bigmem.lock python bench/bench_decode.py --dtype bf16
    flock /tmp/phibook-bigmem.lock python bench/bench_decode.py --dtype fp32 --mode prefill
    flock /tmp/phibook-bigmem.lock python bench/bench_decode.py --dtype fp32 \
        --systems transformers phibook-fast phibook-int8 phibook-int4 llama.cpp llama.cpp-q8_0 \
        --llama-bench ~/llama.cpp/build/bin/llama-bench

Random weights in the chosen preset (default phi-1.5), batch 1, greedy. The
systems run in ALTERNATING rounds within one process (memory bandwidth drifts
from minute to minute on shared machines), and the report gives medians and
ratios. Decode time per token is measured from the first generated token to
the last (prefill excluded): transformers through ``generate`` with its KV cache
and a streamer that timestamps each token; phibook through its own forward
with a preallocated ``KVCache`` and argmax. The models share one copy of the
weights; the fast path holds its own prepacked copy.

llama.cpp runs the SAME random weights, written by phibook's own GGUF exporter
(phibook.weights.gguf) in the run's dtype (f32 or bf16) and as q8_0, either in
process through llama-cpp-python (systems llama.cpp, llama.cpp-q8_0: greedy
``generate``, timed per token like transformers) or, with --llama-bench PATH,
as a built llama-bench binary (systems llama-bench, llama-bench-q8_0: its own
tg timing at depth --prompt-len, no Python at all). phibook-int8 / phibook-int4
load a checkpoint of the same weights through
``Generator.from_path(path, quant=...)``. The tokenizer written into the GGUF is
codegen-mono from ../shared when it fits the preset, else a byte-level BPE.

Beside the table: the CPU's SIMD flags, copy and read bandwidth measured before
and after the rounds (STREAM-like, on --threads threads), and each system's
fraction of its bandwidth floor = bytes of weights its decode step reads (its
own format: f32, bf16, q8_0, int8, int4 with scales) / read bandwidth.

Prints a markdown table and (with --json) writes the raw numbers.
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DTYPES,
    bench_tokenizer,
    build_ours,
    cpu_flags,
    gguf_bytes_per_token,
    git_rev,
    hf_sharing,
    load_average,
    machine,
    median,
    memory_bandwidth_gbs,
    module_bytes_per_token,
    now,
    read_bandwidth_gbs,
    weight_bytes_per_token,
)

# phibook-fast-onednn: the fast path on library kernels alone (oneDNN packed linears, ATen SDPA), to see in one
# run what phibook's own GEMV and attention add on this CPU (phibook-fast where no build serves).
BASE_SYSTEMS = ("transformers", "phibook", "phibook-fast", "phibook-fast-onednn")
QUANT_SYSTEMS = {"phibook-int8": "int8", "phibook-w8a8": "w8a8", "phibook-int4": "int4"}
LLAMA_SYSTEMS = ("llama.cpp", "llama.cpp-q8_0")
GGUF_TYPE = {"fp32": "f32", "bf16": "bf16"}


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
def decode_ours(forward, cfg, prompt: torch.Tensor, n: int) -> tuple[float, list[int]]:
    from phibook.model.model import KVCache

    cache = KVCache(cfg, 1, prompt.shape[1] + n, dtype=forward.cache_dtype)  # as Generator allocates
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
def prefill_ours(forward, cfg, prompt: torch.Tensor, **kw) -> float:
    from phibook.model.model import KVCache

    cache = KVCache(cfg, 1, prompt.shape[1] + 1, dtype=forward.cache_dtype)  # as Generator allocates
    t = time.perf_counter()
    forward(prompt, cache=cache, **kw)
    return prompt.shape[1] / (time.perf_counter() - t)


def decode_llama(llm, prompt: list[int], n: int) -> tuple[float, list[int]]:
    """llama-cpp-python greedy decoding (its own sampler, temperature 0), timed per token."""
    llm.reset()
    times, tokens = [], []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        times.append(time.perf_counter())
        tokens.append(int(token))
        if len(tokens) == n:
            break
    return (times[-1] - times[0]) / (n - 1), tokens


def decode_llama_bench(binary: Path, gguf_path: Path, threads: int, depth: int, n: int) -> float:
    """Seconds per token of llama-bench's text-generation test at ``depth`` tokens of context."""
    cmd = [str(binary), "-m", str(gguf_path), "-t", str(threads), "-p", "0", "-n", str(n),
           "-d", str(depth), "-r", "1", "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"llama-bench failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    rows = [r for r in json.loads(proc.stdout) if r.get("n_gen") == n]
    if not rows:
        raise SystemExit(f"llama-bench printed no tg{n} result: {proc.stdout[:500]}")
    return 1.0 / float(rows[0]["avg_ts"])


def load_quantized(path: Path, quant: str, dtype: torch.dtype):
    """(generator, None) or (None, why it cannot run): the quant= argument comes with issue 13 part 1."""
    from phibook.errors import PhibookError
    from phibook.inference.generate import Generator

    if "quant" not in inspect.signature(Generator.from_path).parameters:
        return None, "Generator.from_path has no quant= argument in this checkout"
    try:
        return Generator.from_path(path, dtype=dtype, quant=quant), None
    except (PhibookError, NotImplementedError, RuntimeError) as exc:
        return None, f"Generator.from_path(quant={quant!r}) failed: {exc}"


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
    ap.add_argument("--systems", nargs="+", default=list(BASE_SYSTEMS),
                    choices=[*BASE_SYSTEMS, *QUANT_SYSTEMS, *LLAMA_SYSTEMS],
                    help="systems to compare (default: %(default)s); phibook-int8/int4 and the llama.cpp "
                         "ones are decode-only; llama.cpp* need llama-cpp-python (pip install -e .[llamacpp])")
    ap.add_argument("--llama-bench", type=Path, metavar="PATH",
                    help="a built llama-bench binary: adds systems llama-bench (run dtype) and llama-bench-q8_0 "
                         "on the same GGUF files")
    ap.add_argument("--workdir", type=Path,
                    help="where the GGUF files and the quantization checkpoint go (default: a temp dir, removed)")
    ap.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = ap.parse_args()
    extra = [s for s in args.systems if s not in BASE_SYSTEMS] + (["llama-bench"] if args.llama_bench else [])
    if args.mode == "prefill" and extra:
        ap.error(f"--mode prefill compares {', '.join(BASE_SYSTEMS)} only; drop {', '.join(extra)}")
    if args.llama_bench and not args.llama_bench.is_file():
        ap.error(f"--llama-bench {args.llama_bench}: no such file")

    from phibook.inference.fast_decode import FastForward

    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    t0 = time.perf_counter()
    model = build_ours(args.preset, dtype)
    cfg = model.config
    hf = hf_sharing(model, dtype) if "transformers" in args.systems else None
    fast = FastForward(model) if "phibook-fast" in args.systems else None
    fast_onednn = FastForward(model, gemv=False, own_attention=False) if "phibook-fast-onednn" in args.systems else None
    systems = list(args.systems)
    bytes_per_token = {s: weight_bytes_per_token(cfg, dtype) for s in BASE_SYSTEMS}
    skipped: dict[str, str] = {}
    llamas: dict[str, object] = {}
    ggufs: dict[str, Path] = {}
    quantized: dict[str, object] = {}
    tmp = None
    if extra:
        if args.workdir:
            work = args.workdir
            work.mkdir(parents=True, exist_ok=True)
        else:
            tmp = tempfile.TemporaryDirectory(prefix="bench_decode-")
            work = Path(tmp.name)
        tok = bench_tokenizer(cfg.vocab_size)
        wanted_llama = [s for s in LLAMA_SYSTEMS if s in systems]
        if args.llama_bench:
            wanted_llama += ["llama-bench", "llama-bench-q8_0"]
        if wanted_llama:
            ggufs = export_ggufs(model, tok, work, args.dtype, wanted_llama)
        for s in [x for x in systems if x in LLAMA_SYSTEMS]:
            try:
                import llama_cpp
            except ImportError:
                skipped[s] = "llama-cpp-python is not installed (pip install -e .[llamacpp])"
                continue
            llamas[s] = llama_cpp.Llama(
                model_path=str(ggufs[s]), n_ctx=args.prompt_len + args.new_tokens + 8, n_batch=512,
                n_threads=args.threads, n_threads_batch=args.threads, verbose=False,
            )
        if args.llama_bench:
            systems += ["llama-bench", "llama-bench-q8_0"]
        for s, path in ggufs.items():
            bytes_per_token[s] = gguf_bytes_per_token(path)
        if any(s in QUANT_SYSTEMS for s in systems):
            from phibook.weights.checkpoint import save_checkpoint

            ckpt = save_checkpoint(work / "ckpt", model, tok)
            for s in [x for x in systems if x in QUANT_SYSTEMS]:
                gen_q, why = load_quantized(ckpt, QUANT_SYSTEMS[s], dtype)
                if gen_q is None:
                    skipped[s] = why
                    continue
                quantized[s] = gen_q
                bytes_per_token[s] = module_bytes_per_token(gen_q.model)
        systems = [s for s in systems if s not in skipped]
        for s, why in skipped.items():
            print(f"skipping {s}: {why}", file=sys.stderr)
    print(f"built models in {time.perf_counter() - t0:.0f}s; load {load_average()}", file=sys.stderr)
    bw_before = (memory_bandwidth_gbs(), read_bandwidth_gbs(threads=args.threads))

    gen = torch.Generator().manual_seed(1)
    results: dict[str, list[float]] = {s: [] for s in systems}
    tokens: dict[str, list[int]] = {}
    if args.mode == "decode":
        prompt = torch.randint(0, min(50000, cfg.vocab_size), (1, args.prompt_len), generator=gen)
        runners = {
            "transformers": lambda: decode_hf(hf, prompt, args.new_tokens),
            "phibook": lambda: decode_ours(model, cfg, prompt, args.new_tokens),
            "phibook-fast": lambda: decode_ours(fast, cfg, prompt, args.new_tokens),
            "phibook-fast-onednn": lambda: decode_ours(fast_onednn, cfg, prompt, args.new_tokens),
        }
        for s, g in quantized.items():
            runners[s] = lambda g=g: decode_ours(g.forward, cfg, prompt, args.new_tokens)
        for s, llm in llamas.items():
            runners[s] = lambda llm=llm: decode_llama(llm, prompt[0].tolist(), args.new_tokens)
        for s in ("llama-bench", "llama-bench-q8_0"):
            if s in systems:
                runners[s] = lambda s=s: (decode_llama_bench(args.llama_bench, ggufs[s], args.threads,
                                                             args.prompt_len, args.new_tokens), None)
        for s in systems:  # warm-up (allocator, oneDNN primitive caches)
            runners[s]()
        for r in range(args.rounds):
            for s in systems[r % len(systems):] + systems[: r % len(systems)]:
                sec, toks = runners[s]()
                results[s].append(sec * 1e3)
                if toks is not None:
                    tokens[s] = toks
                print(f"round {r} {s}: {sec * 1e3:.1f} ms/token; load {load_average()}", file=sys.stderr)
        bw_after = (memory_bandwidth_gbs(), read_bandwidth_gbs(threads=args.threads))
        # The floor uses the better of the two read measurements: the fastest the weights could stream.
        read_gbs = max(bw_before[1], bw_after[1])
        ref = median(results["transformers"]) if "transformers" in results else None
        lines = [
            f"decode, {args.preset} {args.dtype}, batch 1, {args.prompt_len}-token prompt, "
            f"{args.new_tokens} new tokens x {args.rounds} alternating rounds, {args.threads} threads",
            f"CPU flags: {cpu_flags()}; bandwidth on {args.threads} threads, before / after the rounds: "
            f"copy {bw_before[0]:.1f} / {bw_after[0]:.1f} GB/s, read {bw_before[1]:.1f} / {bw_after[1]:.1f} GB/s; "
            f"floor = weight bytes read per token / {read_gbs:.1f} GB/s",
            "",
            "| system | median ms/token | min | max | speed vs transformers | weight MB/token | floor ms | "
            "fraction of floor |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in systems:
            m = median(results[s])
            ratio = f"{ref / m:.2f}x" if ref else "-"
            floor_ms = bytes_per_token[s] / (read_gbs * 1e9) * 1e3
            lines.append(
                f"| {s} | {m:.1f} | {min(results[s]):.1f} | {max(results[s]):.1f} | {ratio} | "
                f"{bytes_per_token[s] / 1e6:.1f} | {floor_ms:.1f} | {floor_ms / m:.2f} |"
            )
        for s, why in skipped.items():
            lines.append(f"\n{s}: not run ({why})")
        ref_tokens = "transformers" if "transformers" in tokens else "phibook" if "phibook" in tokens else None
        if ref_tokens:
            for s in [x for x in systems if x in tokens and x != ref_tokens]:
                same = sum(a == b for a, b in zip(tokens[s], tokens[ref_tokens]))
                lines.append(f"\n{s}: {same}/{len(tokens[s])} greedy tokens equal to {ref_tokens}'s")
    else:
        prompts = {n: torch.randint(0, 50000, (1, n), generator=gen) for n in args.prompt_lens}
        runners = {
            "transformers": lambda p: prefill_hf(hf, p),
            "phibook": lambda p: prefill_ours(model, cfg, p),
            "phibook-fast": lambda p: prefill_ours(fast, cfg, p, last_only=True),
            "phibook-fast-onednn": lambda p: prefill_ours(fast_onednn, cfg, p, last_only=True),
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
        raw = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "results": results, "bytes_per_token": bytes_per_token if args.mode == "decode" else None,
               "bandwidth_gbs": {"copy_before": bw_before[0], "read_before": bw_before[1]}, "skipped": skipped}
        args.json.write_text(json.dumps(raw, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


def export_ggufs(model, tok, work: Path, dtype_name: str, systems: list[str]) -> dict[str, Path]:
    """One GGUF per format the llama.cpp systems need, written by phibook's exporter."""
    from phibook.weights.gguf import write_gguf

    out: dict[str, Path] = {}
    for s in systems:
        fmt = "q8_0" if s.endswith("q8_0") else GGUF_TYPE[dtype_name]
        path = work / f"bench-{fmt}.gguf"
        if not path.exists():
            t = time.perf_counter()
            write_gguf(model, tok, path, fmt, name="bench-random")
            print(f"wrote {path} in {time.perf_counter() - t:.0f}s", file=sys.stderr)
        out[s] = path
    return out


if __name__ == "__main__":
    raise SystemExit(main())
