"""Peak resident memory holding phi-1.5 in bf16 after a long prefill: phibook vs transformers.

    flock /tmp/phibook-bigmem.lock python bench/bench_prefill_memory.py --dir /tmp/phi15-random

The first run writes a random-weight phi-1.5 checkpoint in bf16 to DIR/phibook
and its HF export to DIR/hf (about 2.8 GB each; reused afterwards). Then each
system runs in a FRESH subprocess, one after the other: load the model from
disk in bf16, prefill a 2048-token prompt the way its generate() does, and
report the process's peak resident memory (VmHWM in /proc/self/status).

- phibook: ``load_model(dtype=bf16)`` (meta device + assign), prefill in
  512-token chunks into a 2048-slot ``KVCache``, as ``Generator`` does.
- phibook-fast: the same checkpoint through ``FastForward.from_path``, which
  packs block by block and frees each source block (one copy of the weights).
- transformers: ``AutoModelForCausalLM.from_pretrained(dtype=bfloat16)`` and
  ``generate(max_new_tokens=1)`` (its prefill, with its dynamic cache).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SYSTEMS = ["phibook", "phibook-fast", "transformers"]


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def make_checkpoints(root: Path, preset: str) -> None:
    import torch
    from common import build_ours

    from phibook.weights.checkpoint import save_checkpoint
    from phibook.weights.export import export_hf

    if not (root / "phibook" / "config.json").exists():
        print(f"writing a random {preset} bf16 checkpoint to {root / 'phibook'}", file=sys.stderr)
        model = build_ours(preset, torch.bfloat16)
        # No tokenizer: neither side loads one, so it cannot tilt the comparison.
        save_checkpoint(root / "phibook", model, None)
        del model
    if not (root / "hf" / "config.json").exists():
        print(f"exporting it to {root / 'hf'}", file=sys.stderr)
        export_hf(root / "phibook", root / "hf")


def child(system: str, root: Path, tokens: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    prompt = torch.randint(0, 50000, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        if system == "transformers":
            import transformers

            model = transformers.AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.bfloat16)
            model.generation_config.pad_token_id = 0
            loaded_kib = _status_kib("VmHWM")
            t1 = time.perf_counter()
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1, do_sample=False)
        else:
            from phibook.model.model import KVCache
            from phibook.weights.checkpoint import load_model

            if system == "phibook-fast":
                from phibook.inference.fast_decode import FastForward

                forward, loaded = FastForward.from_path(root / "phibook", dtype=torch.bfloat16)
                kw = {"last_only": True}
            else:
                loaded = load_model(root / "phibook", dtype=torch.bfloat16, load_tokenizer=False)
                forward, kw = loaded.model, {}
            loaded_kib = _status_kib("VmHWM")
            t1 = time.perf_counter()
            cache = KVCache(loaded.config, 1, tokens, dtype=forward.cache_dtype)  # as Generator allocates
            for start in range(0, tokens, 512):  # Generator's prefill chunk
                forward(prompt[:, start : start + 512], cache=cache, **kw)
    t2 = time.perf_counter()
    return {
        "system": system,
        "peak_gib": _status_kib("VmHWM") / 2**20,
        "peak_after_load_gib": loaded_kib / 2**20,
        "rss_end_gib": _status_kib("VmRSS") / 2**20,
        "load_s": t1 - t0,
        "prefill_s": t2 - t1,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/phi15-random"), help="where the random checkpoints live")
    ap.add_argument("--preset", default="phi-1.5", help="model preset for the random checkpoint")
    ap.add_argument("--tokens", type=int, default=2048, help="prompt length to prefill")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS, help="systems to measure")
    ap.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        print(json.dumps(child(args.child, args.dir, args.tokens, args.threads)))
        return 0

    from common import git_rev, load_average, machine, now

    make_checkpoints(args.dir, args.preset)
    rows = []
    for system in args.systems:
        cmd = [sys.executable, __file__, "--child", system, "--dir", str(args.dir), "--tokens", str(args.tokens),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            raise SystemExit(f"{system} failed (exit {out.returncode})")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{system}: {rows[-1]}", file=sys.stderr)
    lines = [
        f"peak resident memory (VmHWM), {args.preset} bf16 loaded from disk, {args.tokens}-token prefill, batch 1",
        "",
        "| system | peak GiB | peak after load GiB | RSS at end GiB | load s | prefill s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['system']} | {r['peak_gib']:.2f} | {r['peak_after_load_gib']:.2f} | {r['rss_end_gib']:.2f} "
            f"| {r['load_s']:.1f} | {r['prefill_s']:.1f} |"
        )
    lines.append(
        f"\nmachine: {machine()}; load average after: {load_average()}; {now()}; git {git_rev()}; "
        f"command: python bench/{Path(__file__).name} {' '.join(sys.argv[1:])}"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
