"""Training tokens/s (forward + backward + optimizer step): phibook's trainer vs transformers.

    python bench/bench_train.py                         # phi-tiny and phi-mini, fp32 and bf16
    python bench/bench_train.py --presets phi-tiny --precisions bf16 --rounds 7

Shape: the preset's layers and width with a 51,200-row vocabulary (the
report's) and a batch of 8 x 256 tokens, the shape of the reference numbers
in issue 3. Data: real token shards (the shared textbooks tokenized with
codegen-mono, made once into --data if missing).

Systems, each in its own worker process (its own memory and allocator, as
its users would run it), all starting from the same initial weights:

- ``phibook``: the real trainer step, ``_Trainer.train_step`` (the packed
  loader's batch, autocast, the fused LM-head loss, backward, gradient
  clipping, fused AdamW, zero_grad, the loss read back to the host), built by
  ``_Trainer.setup`` from the same settings ``phibook train --set ...``
  resolves (so with its CPU allocator setting, ``cpu_keep_memory``).
- ``phibook-compile``: the same with ``compile=true`` (torch.compile per block).
- ``hf`` / ``hf-compile``: ``transformers.PhiForCausalLM`` (SDPA attention) at
  the same shape; loss = cross entropy on fp32 logits (what its ``labels=``
  path computes), torch's AdamW with the same groups and hyperparameters and
  its default implementation, gradient clipping to 1.0. ``hf-compile`` wraps
  forward and loss in one ``torch.compile``.
- ablations (optional): ``phibook-compile-nokeep`` (``cpu_keep_memory=false``),
  ``phibook-compile-unfusedloss`` (``fused_loss=false``),
  ``phibook-compile-plainadam`` (``fused_adamw=false``).
- ``hf-compile-tuned`` (optional): ``hf-compile`` plus ``AdamW(fused=True)``
  and the same allocator setting as phibook: the strongest peer we know how
  to build, to separate what our code does from what process settings do.

The systems run in ALTERNATING rounds driven by one parent process (the
machine is shared and its speed drifts; only one system runs at a time); each
round times ``--steps`` steps per system after warm-up (compilation happens in
warm-up). Tokens per CPU-second (all threads) is reported too: it is less
sensitive to other load on a shared machine than wall time. The report gives medians
over rounds, ratios to transformers at the same precision, and MFU: PaLM's
training FLOPs per token (``phibook.train.peak.flops_per_token``) over a square
matmul's rate at that precision, measured in every round (the median is used).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_rev, load_average, machine, median, now  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEFAULT_DATA = Path(tempfile.gettempdir()) / "phibook-bench-train-shards"
SYSTEMS = ("phibook", "phibook-compile", "hf", "hf-compile", "hf-compile-tuned",
           "phibook-compile-nokeep", "phibook-compile-unfusedloss", "phibook-compile-plainadam")
# Ablations: phibook-compile with one of its optimizations turned off.
ABLATIONS = {"nokeep": {"cpu_keep_memory": "false"}, "unfusedloss": {"fused_loss": "false"},
             "plainadam": {"fused_adamw": "false"}}
DEFAULT_SYSTEMS = ("phibook", "phibook-compile", "hf", "hf-compile")
PRECISION_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}


def ensure_data(data: Path) -> Path:
    """Token shards of the shared textbooks (codegen-mono), made once with `phibook tokenize`."""
    if (data / "manifest.json").is_file():
        return data
    books = SHARED / "corpora" / "library_of_phi" / "textbooks"
    tok = SHARED / "tokenizer" / "codegen-mono"
    if not books.is_dir() or not tok.is_dir():
        sys.exit(f"no --data given and {books} or {tok} is missing; pass --data SHARD_DIR")
    cmd = [sys.executable, "-m", "phibook.cli", "tokenize", "--tokenizer", str(tok), "--out", str(data),
           "--text-unit", "paragraph", "--no-progress", str(books)]
    subprocess.run(cmd, check=True)
    return data


# --------------------------------------------------------------------------- systems


class PhibookSystem:
    """The trainer itself: setup() as `phibook train` does it, then train_step per step."""

    def __init__(self, args, preset: str, precision: str, compile: bool, data: Path, workdir: Path,
                 extra: dict[str, str] | None = None) -> None:
        from phibook.train.config import resolve_config
        from phibook.train.parallel import init_distributed
        from phibook.train.trainer import _Trainer

        sets = {
            "model.vocab_size": str(args.vocab), "global_batch": str(args.batch), "micro_batch": str(args.batch),
            "seq_len": str(args.seq_len), "precision": precision, "compile": str(compile).lower(),
            "eval_every": "0", "save_every": "0", "tensorboard": "false", "log_every": "0",
            "device": "cpu", "max_steps": "1000000", **(extra or {}),
        }
        cfg = resolve_config(preset=preset, sets=sets)
        self.trainer = _Trainer(cfg, str(data), workdir / "run", False, init_distributed("cpu"))
        self.trainer.setup()
        self.step_no = 0

    def step(self) -> float:
        self.step_no += 1
        loss, _ = self.trainer.train_step(self.step_no)
        return loss


def initial_state(args, preset: str) -> dict[str, torch.Tensor]:
    """The weights phibook's trainer starts from (its init, seed 0), built the same way."""
    from phibook.model.config import PhiConfig
    from phibook.model.model import PhiModel

    with torch.device("meta"):
        model = PhiModel(PhiConfig.from_name(preset, vocab_size=args.vocab))
    model.to_empty(device="cpu")
    model.init_weights(generator=torch.Generator(device="cpu").manual_seed(0))
    return model.state_dict()


class HFSystem:
    """transformers.PhiForCausalLM, a plain training step with torch's AdamW."""

    def __init__(self, args, preset: str, precision: str, compile: bool, fused_adam: bool, data: Path) -> None:
        import torch.nn.functional as F
        import transformers

        from phibook.data.loader import PackedLoader
        from phibook.model.config import PhiConfig
        from phibook.train.config import TrainConfig
        from phibook.weights.hf import phi_to_hf, phi_to_hf_config

        mcfg = PhiConfig.from_name(preset, vocab_size=args.vocab)
        hf_cfg = transformers.PhiConfig(**phi_to_hf_config(mcfg))
        hf_cfg._attn_implementation = "sdpa"
        model = transformers.PhiForCausalLM(hf_cfg)
        model.load_state_dict(phi_to_hf(initial_state(args, preset), mcfg), strict=True)
        model.train()
        self.model = model
        tc = TrainConfig()
        # The same decay groups as phibook (matrices decay; norms, biases, embedding do not).
        named = dict(model.named_parameters())
        groups = []
        for decay in (True, False):
            ps = [p for n, p in named.items() if (p.dim() >= 2 and "embed_tokens" not in n) == decay]
            groups.append({"params": ps, "weight_decay": tc.weight_decay if decay else 0.0})
        kw = {"fused": True} if fused_adam else {}
        self.opt = torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps, **kw)
        self.loader = PackedLoader(str(data), args.seq_len, seed=0)
        self.batch = args.batch
        self.amp = precision == "bf16"

        def loss_fn(x, y):
            logits = model(input_ids=x).logits
            return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

        self.loss_fn = torch.compile(loss_fn) if compile else loss_fn

    def step(self) -> float:
        x, y = self.loader.next_batch(self.batch, 0, 1)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
        with ctx:
            loss = self.loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def build(name: str, args, preset: str, precision: str, data: Path, workdir: Path):
    if name.startswith("phibook"):
        extra = ABLATIONS.get(name.rsplit("-", 1)[-1], {})
        return PhibookSystem(args, preset, precision, name.startswith("phibook-compile"), data, workdir, extra)
    tuned = name == "hf-compile-tuned"
    if tuned:
        from phibook.train.cpu_malloc import keep_freed_memory

        keep_freed_memory()
    return HFSystem(args, preset, precision, compile=name != "hf", fused_adam=tuned, data=data)


def _rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def worker(name: str, args, preset: str, precision: str, data: Path, workdir: Path, conn) -> None:
    """One system in its own process (its own allocator state and settings, as its users run it).
    Protocol: reply ("ready", warm-up seconds, losses); then for each n received, run n steps and
    reply (wall seconds, CPU seconds, losses, RSS MiB); None ends."""
    if args.threads:
        torch.set_num_threads(args.threads)
    system = build(name, args, preset, precision, data, workdir)
    t0 = time.perf_counter()
    losses = [system.step() for _ in range(args.warmup)]
    conn.send(("ready", time.perf_counter() - t0, losses))
    while (n := conn.recv()) is not None:
        w0, c0 = time.perf_counter(), time.process_time()
        losses = [system.step() for _ in range(n)]
        conn.send((time.perf_counter() - w0, time.process_time() - c0, losses, _rss_mib()))
    conn.close()


# --------------------------------------------------------------------------- bench


def bench_config(args, preset: str, precision: str, data: Path, workdir: Path) -> dict:
    import multiprocessing as mp

    from phibook.model.config import PhiConfig
    from phibook.train.peak import cpu_peak, flops_per_token, measure_matmul_flops

    flops_tok = flops_per_token(PhiConfig.from_name(preset, vocab_size=args.vocab), args.seq_len)
    ctx = mp.get_context("spawn")
    procs, conns = {}, {}
    losses: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    try:
        # Build and warm up one at a time (compilation would otherwise compete for the cores).
        for name in args.systems:
            parent, child = ctx.Pipe()
            wd = workdir / f"{preset}-{precision}-{name}"
            p = ctx.Process(target=worker, args=(name, args, preset, precision, data, wd, child), daemon=True)
            p.start()
            procs[name], conns[name] = p, parent
            _, warm_s, losses[name] = parent.recv()
            print(f"{preset} {precision} {name}: warm-up {warm_s:.0f}s, losses "
                  + " ".join(f"{x:.4f}" for x in losses[name]), file=sys.stderr)
        print(f"{preset} {precision}: built and warmed up in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        tokens = args.batch * args.seq_len * args.steps
        rates: dict[str, list[float]] = {n: [] for n in args.systems}
        cpu_rates: dict[str, list[float]] = {n: [] for n in args.systems}
        rss: dict[str, float] = {}
        peaks, loads = [], []
        order = list(args.systems)
        for r in range(args.rounds):
            peaks.append(measure_matmul_flops(torch.device("cpu"), PRECISION_DTYPE[precision], seconds=1.0))
            loads.append(load_average())
            for name in order[r % len(order):] + order[: r % len(order)]:
                conns[name].send(args.steps)
                wall, cpu, step_losses, rss[name] = conns[name].recv()
                losses[name] += step_losses
                rates[name].append(tokens / wall)
                cpu_rates[name].append(tokens / cpu)
            print(f"{preset} {precision} round {r}: " + ", ".join(f"{n} {rates[n][-1]:,.0f}" for n in order)
                  + f" tok/s; matmul {peaks[-1] / 1e9:,.0f} GFLOP/s; load {loads[-1]}", file=sys.stderr)
    finally:
        for conn in conns.values():
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(None)
        for p in procs.values():
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    # MFU against the CPU's theoretical peak (cores x FLOPs/cycle x clock, phibook.train.peak),
    # never against a timing: timed on a shared machine it comes out low and MFU passes 100%. The
    # matmul timings between rounds stay in the output as what a square matmul reached.
    derived = cpu_peak({"fp32": "fp32", "bf16": "bf16"}.get(precision, "fp32"), cores=torch.get_num_threads())
    peak = derived.flops
    rows = {}
    for name in order:
        tps = median(rates[name])
        rows[name] = {"tokens_per_s": tps, "min": min(rates[name]), "max": max(rates[name]),
                      "tokens_per_cpu_s": median(cpu_rates[name]), "mfu": tps * flops_tok / peak,
                      "rounds": rates[name], "rss_mib": rss.get(name), "first_losses": losses[name][:3]}
    return {"preset": preset, "precision": precision, "flops_per_token": flops_tok, "peak_flops": peak,
            "peak_derivation": derived.describe(), "matmul_flops": peaks, "loads": loads, "systems": rows}


def _ratio(rows: dict, name: str, ref: str) -> str:
    return f"{rows[name]['tokens_per_s'] / rows[ref]['tokens_per_s']:.2f}x" if ref in rows else "-"


def table(results: list[dict]) -> str:
    lines = [
        "| model | precision | system | tokens/s (median) | range | vs hf eager | vs hf compiled | MFU "
        "| tokens per CPU-s | RSS MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        rows = res["systems"]
        for name, row in rows.items():
            lines.append(
                f"| {res['preset']} | {res['precision']} | {name} | {row['tokens_per_s']:,.0f} | "
                f"{row['min']:,.0f}-{row['max']:,.0f} | {_ratio(rows, name, 'hf')} | "
                f"{_ratio(rows, name, 'hf-compile')} | "
                f"{100 * row['mfu']:.1f}% | {row['tokens_per_cpu_s']:,.0f} | {row['rss_mib']:,.0f} |"
            )
    lines.append("")
    for r in results:
        lines.append(f"MFU denominator, {r['preset']} {r['precision']}: {r['peak_derivation']}; a square matmul "
                     f"reached {median(r['matmul_flops']) / 1e9:,.0f} GFLOP/s (median between rounds).")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["phi-tiny", "phi-mini"], help="model presets (layers, width)")
    ap.add_argument("--precisions", nargs="+", choices=sorted(PRECISION_DTYPE), default=["bf16", "fp32"],
                    help="fp32, or bf16 autocast over fp32 weights")
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(DEFAULT_SYSTEMS), help="what to compare")
    ap.add_argument("--vocab", type=int, default=51200, help="embedding / LM head rows (the report's 51,200)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (one micro-batch)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per system per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per system first (compilation)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="token shard folder (made if missing)")
    ap.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = ensure_data(args.data)
    load_before = load_average()
    workdir = Path(tempfile.mkdtemp(prefix="phibook-bench-train-"))
    results = []
    try:
        for preset in args.presets:
            for precision in args.precisions:
                results.append(bench_config(args, preset, precision, data, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    header = (
        f"Training throughput, {now()}, git {git_rev()}\n\n"
        f"Machine: {machine()}, {torch.get_num_threads()} threads. Load average before: {load_before}, "
        f"after: {load_average()}.\n\n"
        f"Command: python bench/bench_train.py {' '.join(sys.argv[1:])}\n\n"
        f"Shape: vocab {args.vocab}, batch {args.batch} x {args.seq_len} tokens per step; "
        f"{args.rounds} alternating rounds of {args.steps} steps after {args.warmup} warm-up steps.\n"
    )
    print(header)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
