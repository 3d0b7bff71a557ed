"""Weight-only int8 / int4: accuracy against fp32, decode speed, the prefill GEMM path, MC eval.

    # logit error and greedy stability of a (trained) checkpoint on real text
    python bench/bench_quant.py accuracy --model CKPT --text ../shared/corpora/.../some.md
    # ... and llama.cpp q8_0's KL against its own f32 on the same text and GGUF export
    python bench/bench_quant.py accuracy --model CKPT --text FILE --llama-perplexity BUILD/bin/llama-perplexity
    # decode ms/token, phi-1.5 shape, random weights (fp32 ~6 GB + int8 1.4 GB + int4 0.7 GB of RAM)
    flock /tmp/phibook-bigmem.lock python bench/bench_quant.py decode --new-tokens 16 --rounds 3
    # one phi-1.5 linear (8192 x 2048) at 1..512 rows: each kernel and dequantize + GEMM
    python bench/bench_quant.py gemm --rows 1 16 32 128 512
    # multiple-choice accuracy, fp32 against each mode, same documents
    python bench/bench_quant.py eval --model CKPT --tasks arc_easy,piqa,hellaswag --limit 200
    # the compiled decode step (phibook/inference/compiled.py) against eager, same tokens
    python bench/bench_quant.py compile --preset phi-small

Numbers from these runs, with the machine's load beside them, are in docs/inference.md and
docs/performance.md. Timings are medians of alternating rounds (memory bandwidth drifts).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine, median, now  # noqa: E402

from phibook.inference import quant as Q  # noqa: E402


def quantized_copy(model, mode: str, include_head: bool = True):
    """A quantized twin sharing every non-linear tensor with ``model`` (no second fp32 copy)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    twin = copy.deepcopy(model, memo)
    return Q.quantize_(twin, mode, include_head=include_head)


def kl_and_err(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float, float]:
    """(max |d logit|, mean KL(ref || got) nats, top-1 agreement) over positions."""
    lp, lq = ref.float().log_softmax(-1), got.float().log_softmax(-1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    return float((ref - got).abs().max()), kl, float((ref.argmax(-1) == got.argmax(-1)).float().mean())


@torch.inference_mode()
def greedy(model, prompt: list[int], n: int) -> list[int]:
    from phibook.model.model import KVCache

    cache = KVCache(model.config, 1, len(prompt) + n)
    logits = model(torch.tensor([prompt]), cache=cache)[:, -1]
    out = []
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = model(torch.tensor([[out[-1]]]), cache=cache)[:, -1]
    return out


def cmd_accuracy(args) -> None:
    from phibook.weights.checkpoint import load_model

    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    torch.set_num_threads(args.threads)
    ids = tok.encode(Path(args.text).read_text())
    L = min(args.window, model.config.max_seq_len)
    windows = [ids[i : i + L] for i in range(0, len(ids) - L, L)][: args.windows]
    print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; "
          f"{len(windows)} windows of {L} tokens from {args.text}")
    print("\n| mode | head | max abs d logit | mean KL (nats) | top-1 agree | greedy: identical prefix of "
          f"{args.new_tokens} (median, min over {args.prompts} prompts) |\n|---|---|---|---|---|---|")
    prompts = [w[:32] for w in windows[: args.prompts]]
    ref_tokens = [greedy(model, p, args.new_tokens) for p in prompts]
    with torch.inference_mode():
        ref = [model(torch.tensor([w])) for w in windows]
    for mode in Q.MODES:
        for head in (True, False):
            try:
                q = quantized_copy(model, mode, include_head=head)
            except Exception as exc:  # int4 shapes a small model lacks
                print(f"| {mode} | {'int8' if head else 'fp32'} | {exc} | | | |")
                continue
            with torch.inference_mode():
                errs = [kl_and_err(r, q(torch.tensor([w]))) for r, w in zip(ref, windows)]
            same = []
            for p, r in zip(prompts, ref_tokens):
                g = greedy(q, p, args.new_tokens)
                same.append(next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), args.new_tokens))
            print(f"| {mode} | {'int8' if head else 'fp32'} | {max(e[0] for e in errs):.4f} | "
                  f"{sum(e[1] for e in errs) / len(errs):.2e} | {sum(e[2] for e in errs) / len(errs):.4f} | "
                  f"{median(same):.0f}, {min(same)} |")
    if args.llama_perplexity:
        compare_with_llama(args, model, tok, windows, ref)


def llama_kl(binary: Path, work: Path, text: str, L: int, n: int, threads: int) -> tuple[float, float, float]:
    """llama.cpp's own KL of q8_0 against its f32 run of the same GGUF: (mean KL, +-, same top-1)."""
    import re
    import subprocess

    base = work / "f32-logits.bin"
    common = ["-f", text, "-c", str(L), "--chunks", str(n), "-t", str(threads), "-b", str(L)]
    for gguf, extra in (("f32.gguf", []), ("q8_0.gguf", ["--kl-divergence"])):
        run = subprocess.run([str(binary), "-m", str(work / gguf), *common, "--kl-divergence-base", str(base),
                              *extra], capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"{binary} on {gguf} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    out = run.stdout + run.stderr
    kl = re.search(r"Mean\s+KLD:\s+([0-9.eE+-]+)\s+±\s+([0-9.eE+-]+)", out)
    top = re.search(r"Same top p:\s+([0-9.]+)", out)
    if not (kl and top):
        raise SystemExit(f"no 'Mean KLD' / 'Same top p' in llama-perplexity's output:\n{out[-3000:]}")
    return float(kl.group(1)), float(kl.group(2)), float(top.group(1)) / 100


def write_f32_and_q8_0(model, tokenizer, work: Path) -> None:
    """f32.gguf and q8_0.gguf of ``model`` in ``work``, written by phibook's exporter."""
    from phibook.weights.gguf import write_gguf

    for fmt in ("f32", "q8_0"):
        write_gguf(model, tokenizer, work / f"{fmt}.gguf", fmt, name="bench")


def compare_with_llama(args, model, tokenizer, windows: list[list[int]], ref: list[torch.Tensor]) -> None:
    """Each mode's error next to llama.cpp q8_0's, on the positions llama-perplexity scores: it cuts
    the text into chunks of --window tokens and scores the second half of each (the logits at
    positions window/2 .. window-2), so the same slice of our windows is compared here."""
    import tempfile

    L = len(windows[0])
    half = slice(L // 2, L - 1)
    print(f"\nOn llama-perplexity's positions ({len(windows)} chunks of {L}, positions {L // 2}..{L - 2} of each):\n")
    print("| system | mean KL vs its own fp32 (nats) | top-1 agree |\n|---|---|---|")
    for mode in ("int8", "w8a8", "int4"):
        q = quantized_copy(model, mode)
        with torch.inference_mode():
            errs = [kl_and_err(r[0, half], q(torch.tensor([w]))[0, half]) for r, w in zip(ref, windows)]
        print(f"| phibook {mode} | {sum(e[1] for e in errs) / len(errs):.2e} | {sum(e[2] for e in errs) / len(errs):.4f} |")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_f32_and_q8_0(model, tokenizer, work)
        kl, unc, top = llama_kl(Path(args.llama_perplexity), work, args.text, L, len(windows), args.threads)
    print(f"| llama.cpp q8_0 (vs llama.cpp f32) | {kl:.2e} +- {unc:.1e} | {top:.4f} |")
    print("\n(llama-perplexity keeps its fp32 reference as 16-bit log-probabilities, which puts a floor of its"
          " own under its KL; its tokenizer is the GGUF's copy of ours.)")


def cmd_decode(args) -> None:
    from common import build_ours

    from phibook.inference.fast_decode import FastForward
    from phibook.model.model import KVCache

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = build_ours(args.preset, torch.float32)
    systems = {"fp32": model}
    for mode in args.modes:
        systems[mode] = quantized_copy(model, mode)
    for name in args.fast:
        if name == "fp32":  # oneDNN-packed against plain F.linear (MKL) on the same fused weights
            systems["fp32 fast packed"] = FastForward(systems[name], pack=True)
            systems["fp32 fast unpacked"] = FastForward(systems[name], pack=False)
        else:
            systems[f"{name} fast"] = FastForward(systems[name])
    print(f"built in {time.perf_counter() - t0:.0f}s; load {load_average()}", file=sys.stderr)
    prompt = torch.randint(0, min(50000, model.config.vocab_size), (1, args.prompt_len),
                           generator=torch.Generator().manual_seed(1))

    @torch.inference_mode()
    def run(forward) -> float:
        cache = KVCache(model.config, 1, args.prompt_len + args.new_tokens)
        token = forward(prompt, cache=cache)[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(args.new_tokens - 1):
            token = forward(token, cache=cache)[:, -1].argmax(-1, keepdim=True)
            int(token)
        return (time.perf_counter() - t) / (args.new_tokens - 1) * 1e3

    names = list(systems)
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in names:
        run(systems[n])  # warm-up
    for r in range(args.rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            times[n].append(run(systems[n]))
            print(f"round {r} {n}: {times[n][-1]:.1f} ms/token (load {load_average()})", file=sys.stderr)
    fp = median(times["fp32"])
    print(f"\ndecode, {args.preset} random weights, batch 1, {args.prompt_len}-token prompt, {args.new_tokens} new "
          f"tokens x {args.rounds} alternating rounds, {args.threads} threads\n")
    print("| system | median ms/token | min | max | vs fp32 |\n|---|---|---|---|---|")
    for n in names:
        m = median(times[n])
        print(f"| {n} | {m:.1f} | {min(times[n]):.1f} | {max(times[n]):.1f} | {fp / m:.2f}x |")


def forced_dequant(module, x: torch.Tensor) -> torch.Tensor:
    """The module's many-rows path (chunked dequantize + F.linear) whatever the row count."""
    saved = dict(Q.DEQUANT_ROWS)
    Q.DEQUANT_ROWS.update(int8=0, int4=0)
    try:
        return module(x)
    finally:
        Q.DEQUANT_ROWS.update(saved)


def cmd_gemm(args) -> None:
    torch.set_num_threads(args.threads)
    n, k = args.shape
    w = torch.randn(n, k) * 0.02
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(w)
    q8, q4 = Q.Int8Linear.from_linear(lin), Q.Int4Linear.from_linear(lin)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
    kernels = {
        "fp32 F.linear (MKL)": lambda x: torch.nn.functional.linear(x, w, lin.bias),
        "fp32 oneDNN packed": lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, lin.bias, "none", [], ""),
        "int8 kernel": lambda x: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q8.weight_int8, q8._scales_k),
        "int8 dequant+F.linear": lambda x: forced_dequant(q8, x),
        "int4 kernel": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), q4._packed_k, 32, q4._sz_k),
        "int4 dequant+F.linear": lambda x: forced_dequant(q4, x),
    }
    print(f"one {n} x {k} linear, {args.threads} threads, median of {args.repeats}; load {load_average()}\n")
    print("| rows | " + " | ".join(kernels) + " |\n" + "|---" * (len(kernels) + 1) + "|")
    with torch.inference_mode():
        for rows in args.rows:
            x = torch.randn(rows, k)
            cells = []
            for f in kernels.values():
                f(x)
                ts = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    f(x)
                    ts.append(time.perf_counter() - t)
                cells.append(f"{median(ts) * 1e3:.2f}")
            print(f"| {rows} | " + " | ".join(cells) + " ms |")


def cmd_eval(args) -> None:
    from phibook.eval.data_dir import require_data_dir
    from phibook.eval.runner import Runner, run_task
    from phibook.eval.task import get_task, load_task_modules
    from phibook.weights.checkpoint import load_model

    torch.set_num_threads(args.threads)
    load_task_modules()
    data_dir = require_data_dir(args.data_dir)
    loaded = load_model(args.model)
    models = {"fp32": loaded.model}
    for mode in args.modes:
        try:
            models[mode] = quantized_copy(loaded.model, mode)
        except Exception as exc:
            print(f"{mode}: {exc}", file=sys.stderr)
    rows = []
    for task_name in args.tasks.split(","):
        scores, choices = {}, {}
        for name, model in models.items():
            task = get_task(task_name)
            outcome = run_task(Runner(model, loaded.tokenizer, batch_size=16, progress=False), task, data_dir,
                               args.limit, log_samples=True)
            metric = "acc_norm" if "acc_norm" in outcome["metrics"] else "acc"
            scores[name] = (metric, outcome["metrics"][metric][0], outcome["n"])
            # The answer each document picks by raw log-likelihood: at chance-level accuracy a change
            # of accuracy says little, a changed pick says where the quantized model disagrees.
            choices[name] = [max(range(len(r["results"])), key=lambda i, r=r: r["results"][i][0])
                             for r in outcome["samples"]]
        flips = {m: sum(a != b for a, b in zip(choices["fp32"], choices[m])) for m in models if m != "fp32"}
        rows.append((task_name, scores, flips))
        print(task_name, scores, flips, file=sys.stderr)
    print(f"\n{args.model}, first {args.limit} documents per task; in brackets the change from fp32 and "
          "the documents whose raw log-likelihood pick differs from fp32's\n")
    print("| task | metric | n | " + " | ".join(models) + " |\n" + "|---" * (3 + len(models)) + "|")
    for task_name, scores, flips in rows:
        metric, _, n = scores["fp32"]
        cells = [f"{scores['fp32'][1]:.3f}"] + [
            f"{scores[m][1]:.3f} ({scores[m][1] - scores['fp32'][1]:+.3f}; {flips[m]} picks differ)"
            for m in models if m != "fp32"]
        print(f"| {task_name} | {metric} | {n} | " + " | ".join(cells) + " |")
    if args.llama_perplexity:
        llama_hellaswag(args, loaded, data_dir)


def llama_hellaswag(args, loaded, data_dir: Path) -> None:
    """llama.cpp's own hellaswag acc_norm (llama-perplexity --hellaswag: the mean log-probability of
    each ending's tokens, the lm-eval rule) on f32 and q8_0 GGUFs of the same checkpoint. It draws
    its tasks at random (a fixed seed), so both files score the same tasks in the same order and the
    per-task outcomes pair up; they are not the first --limit documents phibook scored above."""
    import bz2
    import re
    import subprocess
    import tempfile

    source = Path(data_dir) / "hellaswag" / "hellaswag_val_full.txt.bz2"
    if not source.is_file():
        raise SystemExit(f"{source}: not found (llama-perplexity --hellaswag reads this file's text format)")
    outcomes = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "hellaswag.txt").write_bytes(bz2.decompress(source.read_bytes()))
        write_f32_and_q8_0(loaded.model, loaded.tokenizer, work)
        for fmt in ("f32", "q8_0"):
            run = subprocess.run([args.llama_perplexity, "-m", str(work / f"{fmt}.gguf"), "-f",
                                  str(work / "hellaswag.txt"), "--hellaswag", "--hellaswag-tasks",
                                  str(args.llama_tasks), "-c", "1024", "-b", "1024", "-t", str(args.threads)],
                                 capture_output=True, text=True)
            if run.returncode != 0:
                raise SystemExit(f"llama-perplexity --hellaswag on {fmt} failed:\n{run.stderr[-3000:]}")
            running = [float(m.group(2)) for m in re.finditer(r"^(\d+)\t([0-9.]+)", run.stdout + run.stderr, re.M)]
            # The log gives the running accuracy (percent) after each task; the task's own outcome is
            # the step in the running count of correct answers.
            correct = [round(a * (i + 1) / 100) for i, a in enumerate(running)]
            outcomes[fmt] = [c - p for c, p in zip(correct, [0, *correct[:-1]])]
    f32, q8 = outcomes["f32"], outcomes["q8_0"]
    if not f32 or len(f32) != len(q8):
        raise SystemExit(f"llama-perplexity gave {len(f32)} and {len(q8)} task results")
    differ = sum(a != b for a, b in zip(f32, q8))
    print(f"\nllama.cpp hellaswag acc_norm, {len(f32)} tasks (its random draw, seed 1), same GGUF export: "
          f"f32 {sum(f32) / len(f32):.3f}, q8_0 {sum(q8) / len(q8):.3f} ({(sum(q8) - sum(f32)) / len(f32):+.3f}; "
          f"{differ} tasks answered right by one and wrong by the other)")


def cmd_compile(args) -> None:
    """Eager decode against the compiled StaticStep on the same model and prompt, alternating rounds."""
    from phibook.inference.compiled import StaticStep
    from phibook.model.model import KVCache

    torch.set_num_threads(args.threads)
    if args.model:
        from phibook.weights.checkpoint import load_model

        model = load_model(args.model).model
    else:
        from common import build_ours

        model = build_ours(args.preset, torch.float32)
    if args.quant:
        Q.quantize_(model, args.quant)
    cfg, n, slots = model.config, args.new_tokens, 256
    prompt = torch.randint(0, min(2000, cfg.vocab_size), (1, 16), generator=torch.Generator().manual_seed(0))
    step = StaticStep(model, compile=True)

    @torch.inference_mode()
    def run(compiled: bool) -> tuple[float, list[int]]:
        cache = KVCache(cfg, 1, slots)
        token = model(prompt, cache=cache)[:, -1].argmax(-1, keepdim=True)
        keep, pos = torch.ones(1, slots, dtype=torch.bool), torch.tensor([[prompt.shape[1]]])
        out, t = [], time.perf_counter()
        for _ in range(n):
            if compiled:
                token = step(token, pos, cache, keep)[:, -1].argmax(-1, keepdim=True)
                pos = pos + 1
            else:
                token = model(token, cache=cache)[:, -1].argmax(-1, keepdim=True)
            out.append(int(token))
        return (time.perf_counter() - t) / n * 1e3, out

    t = time.perf_counter()
    run(True)
    print(f"compile + first run: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    times: dict[bool, list[float]] = {False: [], True: []}
    tokens = {}
    for _ in range(args.rounds):
        for compiled in (False, True):
            ms, tokens[compiled] = run(compiled)
            times[compiled].append(ms)
    print(f"\ndecode ms/token, {args.model or args.preset}{' ' + args.quant if args.quant else ''}, "
          f"{n} tokens x {args.rounds} rounds, {args.threads} threads; same tokens: {tokens[False] == tokens[True]}\n")
    print("| step | median | min | max |\n|---|---|---|---|")
    for compiled in (False, True):
        v = times[compiled]
        print(f"| {'compiled' if compiled else 'eager'} | {median(v):.2f} | {min(v):.2f} | {max(v):.2f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("accuracy", help="logit error, KL, top-1 and greedy stability against fp32")
    a.add_argument("--model", required=True)
    a.add_argument("--text", required=True, help="a real text file (e.g. one of ../shared/corpora)")
    a.add_argument("--window", type=int, default=256)
    a.add_argument("--windows", type=int, default=16)
    a.add_argument("--prompts", type=int, default=8)
    a.add_argument("--new-tokens", type=int, default=32)
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--llama-perplexity", metavar="PATH", default=None,
                   help="a built llama-perplexity: also measure llama.cpp q8_0's KL against its own f32 on the "
                        "same text (GGUFs of --model written by phibook's exporter)")
    d = sub.add_parser("decode", help="decode ms/token, random weights")
    d.add_argument("--preset", default="phi-1.5")
    d.add_argument("--modes", nargs="+", default=["int8", "w8a8"], choices=Q.MODES)
    d.add_argument("--prompt-len", type=int, default=32)
    d.add_argument("--new-tokens", type=int, default=16)
    d.add_argument("--rounds", type=int, default=3)
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--fast", nargs="*", default=[], metavar="SYSTEM",
                   help="also time these systems (fp32, int8, ...) through FastForward (fp32: a second fp32 copy)")
    g = sub.add_parser("gemm", help="one linear at several row counts: kernels vs dequantize + GEMM")
    g.add_argument("--shape", type=int, nargs=2, default=[8192, 2048])
    g.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 128, 512])
    g.add_argument("--repeats", type=int, default=5)
    g.add_argument("--threads", type=int, default=2)
    e = sub.add_parser("eval", help="multiple-choice accuracy, fp32 against each mode")
    e.add_argument("--model", required=True)
    e.add_argument("--tasks", default="arc_easy,piqa,hellaswag")
    e.add_argument("--limit", type=int, default=200)
    e.add_argument("--data-dir", default=None)
    e.add_argument("--modes", nargs="+", default=["int8", "w8a8"], choices=Q.MODES)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--llama-perplexity", metavar="PATH", default=None,
                   help="a built llama-perplexity: also llama.cpp's own hellaswag acc_norm on f32 and q8_0 GGUFs "
                        "of --model")
    e.add_argument("--llama-tasks", type=int, default=400, help="hellaswag tasks for llama-perplexity")
    c = sub.add_parser("compile", help="eager decode step against the compiled StaticStep")
    c.add_argument("--model", default=None, help="a checkpoint (default: random weights of --preset)")
    c.add_argument("--preset", default="phi-small")
    c.add_argument("--quant", default=None, choices=Q.MODES)
    c.add_argument("--new-tokens", type=int, default=48)
    c.add_argument("--rounds", type=int, default=3)
    c.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    print(f"machine: {machine()}; load {load_average()}; {now()}", file=sys.stderr)
    {"accuracy": cmd_accuracy, "decode": cmd_decode, "gemm": cmd_gemm, "eval": cmd_eval,
     "compile": cmd_compile}[args.cmd](args)
    print(f"\nload average after: {load_average()}; command: python bench/bench_quant.py {' '.join(sys.argv[1:])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
