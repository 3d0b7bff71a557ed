"""Wall time of the eight zero-shot multiple-choice tasks: `phibook eval` vs lm-evaluation-harness.

    python bench/bench_eval.py                         # phi-mini-sized model, --limit 100, 3 rounds
    python bench/bench_eval.py --limit 20 --rounds 1   # a quick look

Model: random weights of the --preset shape (default phi-mini: 12 layers, d=512) with the
codegen-mono tokenizer (the phi-1.5 tokenizer, so the vocabulary is phi-1.5's 51,200 rows), saved as
a phibook checkpoint and exported to an HF directory (phibook.weights.export.export_hf). BOTH systems load
that same HF directory, in float32, on the CPU.

Data: the first --limit documents of winogrande, arc_easy, arc_challenge, boolq, siqa, piqa,
hellaswag and openbookqa from shared/benchmarks. phibook reads the files itself (--data-dir);
lm-eval gets the same documents through the local task YAMLs of tests/test_eval_lmeval_parity.py
(official prompts and metrics, `dataset_path: json`, offline).

Systems, each the command a user runs, in a subprocess, in ALTERNATING rounds, same batch size:

- ``phibook``: ``phibook eval --model HF_DIR --tasks <8 tasks> --data-dir shared/benchmarks
  --limit N --batch-size B --output r.json --no-progress``
- ``lm-eval``: ``lm_eval --model hf --model_args pretrained=HF_DIR,dtype=float32 --tasks <8 local
  tasks> --include_path DIR --batch_size B --device cpu --output_path OUT`` (HF_HUB_OFFLINE=1,
  HF_DATASETS_OFFLINE=1; the json dataset cache is warm after the first round)

Both run with the same torch thread count, --threads (OMP_NUM_THREADS/MKL_NUM_THREADS; default
1: on the shared 2-core dev VM, 2 OpenMP threads per process under a load of 5-7 spend most of their
time in barrier waits and the timings are erratic). Wall time includes start-up and model loading.
The accuracies (acc, acc_norm) of the two systems are compared task by task.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_rev, load_average, machine, median, now  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
BENCH = SHARED / "benchmarks"
TOKENIZER = SHARED / "tokenizer" / "codegen-mono"
MC_TASKS = ["winogrande", "arc_easy", "arc_challenge", "boolq", "siqa", "piqa", "hellaswag", "openbookqa"]


def build_model(preset: str, work: Path) -> Path:
    """Random-weight checkpoint of `preset` with the codegen tokenizer, exported to HF; returns the HF dir."""
    import torch

    from phibook.model.config import PhiConfig, padded_vocab_size
    from phibook.model.model import PhiModel
    from phibook.model.tokenizer import Tokenizer
    from phibook.weights.checkpoint import save_checkpoint
    from phibook.weights.export import export_hf

    tok = Tokenizer.from_file(TOKENIZER)
    cfg = PhiConfig.from_name(preset, vocab_size=padded_vocab_size(tok.vocab_size))
    model = PhiModel(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    # init zeroes biases and sets LayerNorms to 1: perturb them so every tensor matters.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln" in name or name.startswith("ln_f"):
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    ckpt = save_checkpoint(work / "ckpt", model, tok)
    return export_hf(ckpt, work / "hf")


def write_lmeval_tasks(root: Path, limit: int) -> list[str]:
    """The parity test's local task YAMLs over the first `limit` docs of each task; their names."""
    from phibook.eval.task import get_task
    from tests.test_eval_lmeval_parity import TASKS, UTILS, write_task

    root.mkdir(parents=True, exist_ok=True)
    (root / "parity_utils.py").write_text(UTILS)
    names = []
    for name in MC_TASKS:
        body, to_row = TASKS[name]
        names.append(write_task(root, name, get_task(name).load_docs(BENCH, limit), body, to_row))
    return names


def thread_env(threads: int) -> dict[str, str]:
    n = str(threads)
    return dict(os.environ, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, TOKENIZERS_PARALLELISM="false")


def run_phibook(hf_dir: Path, limit: int, batch: int, out: Path, threads: int) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "phibook.cli", "eval", "--model", str(hf_dir), "--tasks", ",".join(MC_TASKS),
           "--data-dir", str(BENCH), "--limit", str(limit), "--batch-size", str(batch), "--output", str(out),
           "--no-progress"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(threads))
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"phibook eval failed:\n{proc.stderr[-3000:]}")
    res = json.loads(out.read_text())["results"]
    return wall, {t: {m: res[t][m] for m in ("acc", "acc_norm") if m in res[t]} for t in MC_TASKS}


def run_lmeval(hf_dir: Path, task_dir: Path, names: list[str], batch: int, out: Path,
               threads: int) -> tuple[float, dict]:
    exe = shutil.which("lm_eval") or shutil.which("lm-eval")
    if exe is None:
        raise SystemExit('lm_eval not found: pip install "lm-eval[hf]"')
    env = dict(thread_env(threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [exe, "--model", "hf", "--model_args", f"pretrained={hf_dir},dtype=float32", "--tasks", ",".join(names),
           "--include_path", str(task_dir), "--batch_size", str(batch), "--device", "cpu", "--output_path", str(out)]
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"lm_eval failed:\n{proc.stderr[-3000:]}")
    (path,) = sorted(out.rglob("results_*.json"))[-1:]
    res = json.loads(path.read_text())["results"]
    accs = {}
    for ours, theirs in zip(MC_TASKS, names, strict=True):
        accs[ours] = {m: res[theirs][f"{m},none"] for m in ("acc", "acc_norm") if f"{m},none" in res[theirs]}
    return wall, accs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="phi-mini", help="model shape (PRESETS); vocabulary from codegen-mono")
    ap.add_argument("--limit", type=int, default=100, help="documents per task")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of BOTH systems")
    ap.add_argument("--work", default=None, help="working folder (default: a temp dir, removed)")
    args = ap.parse_args()

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_eval_"))
    try:
        hf_dir = work / "hf" if (work / "hf" / "config.json").is_file() else build_model(args.preset, work)
        names = write_lmeval_tasks(work / "tasks", args.limit)
        walls: dict[str, list[float]] = {"phibook": [], "lm-eval": []}
        accs: dict[str, dict] = {}
        for r in range(args.rounds):
            order = ["phibook", "lm-eval"] if r % 2 == 0 else ["lm-eval", "phibook"]
            for system in order:
                if system == "phibook":
                    wall, acc = run_phibook(hf_dir, args.limit, args.batch_size, work / "phibook.json", args.threads)
                else:
                    wall, acc = run_lmeval(hf_dir, work / "tasks", names, args.batch_size, work / "lmeval_out",
                                           args.threads)
                walls[system].append(wall)
                accs[system] = acc
                print(f"round {r + 1} {system}: {wall:.1f} s (load {load_average()})", file=sys.stderr)

        ours, theirs = median(walls["phibook"]), median(walls["lm-eval"])
        print(f"# bench_eval  {now()}  git {git_rev()}")
        print(f"# {machine()}; load average at the end {load_average()}")
        print(f"# model: {args.preset} shape, random weights, codegen-mono vocabulary, float32, CPU; "
              f"8 MC tasks x {args.limit} docs; batch size {args.batch_size}; {args.threads} thread(s) each; "
              f"{args.rounds} alternating rounds")
        print()
        print("| system | wall s (median) | rounds | vs lm-eval |")
        print("|---|---|---|---|")
        print(f"| phibook eval | {ours:.1f} | {', '.join(f'{w:.1f}' for w in walls['phibook'])} | "
              f"**{theirs / ours:.2f}x faster** |")
        print(f"| lm-evaluation-harness | {theirs:.1f} | {', '.join(f'{w:.1f}' for w in walls['lm-eval'])} | 1.00x |")
        print()
        print("| task | metric | phibook | lm-eval | equal |")
        print("|---|---|---|---|---|")
        all_equal = True
        for task in MC_TASKS:
            for metric, value in accs["phibook"][task].items():
                ref = accs["lm-eval"][task].get(metric)
                same = ref is not None and abs(value - ref) < 1e-9
                all_equal &= same
                print(f"| {task} | {metric} | {value:.4f} | {ref:.4f} | {'yes' if same else 'NO'} |")
        print()
        print(f"accuracies identical: {'yes' if all_equal else 'NO'}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
