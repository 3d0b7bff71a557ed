"""Training tokens/s and MFU of the phi-1.5 config on one GPU, through phibook's real trainer step.

    python bench/bench_train_gpu.py                          # bf16, compile, micro 8 x 2048, accum 4
    python bench/bench_train_gpu.py --micro-batch 4 --accum 8 --no-compile
    python bench/bench_train_gpu.py --preset phi-tiny --device cpu --seq-len 256 --micro-batch 2 --accum 1 --steps 2

The report's recipe (section 2.3): AdamW (0.9, 0.98), eps 1e-7, lr 2e-4,
weight decay 0.1, sequence length 2048, the 51,200-row vocabulary; bf16
autocast over fp32 master weights (the report used fp16 + DeepSpeed ZeRO-2;
one GPU has nothing to shard). The global batch here is micro-batch x accum
sequences, not the report's 2,048: tokens/s per GPU does not depend on the
accumulation count beyond the one optimizer step it amortizes.

Data: random token ids written once as shards (the model's speed does not
depend on the text). Timing: ``--warmup`` untimed steps (compilation), then
``--steps`` timed steps; ``train_step`` returns the loss to the host, so each
step ends with the GPU idle. MFU = tokens/s x PaLM's 6N + 12 L d T FLOPs per
token / the GPU's dense bf16 peak (989 TFLOP/s for H100/H200, from
``phibook.train.peak.GPU_PEAK_TFLOPS``; a measured matmul rate elsewhere).

The target in issue 3: MFU >= 50% on one H200; the report's 1.5K A100-hours
for 150B tokens is about 28K tokens/s per A100.

Importing this file is safe without a GPU; it only needs one when run with --device cuda.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_rev, median, now  # noqa: E402


def random_shards(out: Path, tokens: int, vocab: int = 50295, eos: int = 50256, seed: int = 0) -> Path:
    """A shard set of random documents (lengths 200-4000 tokens) with a made-up tokenizer identity."""
    import numpy as np

    from phibook.data.shards import write_shard_set

    if (out / "manifest.json").is_file():
        return out
    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < tokens:
        n = int(rng.integers(200, 4000))
        docs.append(rng.integers(0, eos, n))
        total += n + 1
    tokenizer = {"fingerprint": f"random-{vocab}-{seed}", "vocab_size": vocab, "eos_id": eos}
    write_shard_set(out, {"train": docs}, tokenizer, source="random")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="phi-1.5", help="model preset")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where to train")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"], help="autocast dtype")
    ap.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (report: 2048)")
    ap.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward")
    ap.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step")
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    ap.add_argument("--no-compile", action="store_true", help="eager blocks (default: torch.compile per block)")
    ap.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward")
    ap.add_argument("--unfused-loss", action="store_true", help="fused_loss=false (full logits)")
    ap.add_argument("--data", type=Path, help="shard folder (default: random tokens, made once in /tmp)")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()

    import torch

    from phibook.train.config import resolve_config
    from phibook.train.parallel import init_distributed
    from phibook.train.trainer import _Trainer

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark needs a GPU (or pass --device cpu for a smoke run)")
    gbatch = args.micro_batch * args.accum
    total_steps = args.warmup + args.steps
    data = args.data or random_shards(
        Path(tempfile.gettempdir()) / "phibook-bench-gpu-shards",
        tokens=max(2_000_000, gbatch * (args.seq_len + 1) * (total_steps + 2)),
    )
    sets = {
        "global_batch": str(gbatch), "micro_batch": str(args.micro_batch), "seq_len": str(args.seq_len),
        "precision": args.precision, "compile": str(not args.no_compile).lower(),
        "activation_checkpointing": str(args.activation_checkpointing).lower(),
        "fused_loss": str(not args.unfused_loss).lower(), "eval_every": "0", "save_every": "0",
        "tensorboard": "false", "log_every": "0", "device": args.device, "max_steps": "1000000",
    }
    if args.preset != "phi-1.5":
        sets["model.vocab_size"] = "51200"
    cfg = resolve_config(preset=args.preset, sets=sets)
    out = Path(tempfile.mkdtemp(prefix="phibook-bench-gpu-run-"))
    trainer = _Trainer(cfg, str(data), out / "run", False, init_distributed(args.device))
    trainer.setup()
    tokens = gbatch * trainer.seq_len
    times, losses = [], []
    for step in range(1, total_steps + 1):
        t0 = time.perf_counter()
        loss, _ = trainer.train_step(step)  # returns host floats: the step is finished
        dt = time.perf_counter() - t0
        losses.append(loss)
        if step > args.warmup:
            times.append(dt)
        print(f"step {step}: {dt:.3f}s loss {loss:.4f} ({tokens / dt:,.0f} tokens/s)", file=sys.stderr)
    tps = tokens / median(times)
    mfu = tps * trainer.flops_token / trainer.peak
    mem = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = {
        "date": now(), "git": git_rev(), "device": name, "preset": args.preset, "precision": trainer.precision,
        "compile": not args.no_compile, "activation_checkpointing": args.activation_checkpointing,
        "fused_loss": not args.unfused_loss, "micro_batch": args.micro_batch, "accum": args.accum,
        "seq_len": trainer.seq_len, "params": trainer.mcfg.num_params(), "tokens_per_s": tps,
        "step_s": times, "mfu": mfu, "peak_tflops": trainer.peak / 1e12,
        "flops_per_token": trainer.flops_token, "max_memory_gib": mem, "losses": losses,
    }
    print(f"{name}: {args.preset} {trainer.precision}, micro {args.micro_batch} x accum {args.accum} x "
          f"{trainer.seq_len} tokens: {tps:,.0f} tokens/s, MFU {100 * mfu:.1f}% of {trainer.peak / 1e12:,.0f} "
          f"TFLOP/s, peak memory {mem:.1f} GiB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
