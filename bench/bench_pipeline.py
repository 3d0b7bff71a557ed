"""The datatrove path (`phibook pipeline run`) against the single-machine verbs, per stage.

Makes N documents with the built-in teacher (offline) in --files JSONL files,
then, in alternating rounds (verb, pipeline, verb, pipeline, ...), times:

- clean: `phibook clean` (one process) vs the pipeline's clean stage
  (filter -> MinHash signatures -> buckets -> cluster -> keep -> report);
- tokenize: `phibook tokenize --workers W` vs the pipeline's tokenize stage.

The pipeline runs twice per round: with 1 task on 1 worker (the engine's
overhead at equal parallelism: the number the issue bounds at 20%) and with
--tasks/--workers (what the cores buy). Prints documents/s and MB/s per
stage, the overhead, tokens and core-seconds per billion tokens, and the
machine and load average beside every number.

    python bench/bench_pipeline.py                     # 100K documents (the lead's run)
    python bench/bench_pipeline.py --docs 2000 --rounds 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_average, machine  # noqa: E402

from phibook.data.clean import CleanConfig, clean  # noqa: E402
from phibook.data.synth.prompts import load_templates, load_topics  # noqa: E402
from phibook.data.synth.run import run_synth  # noqa: E402
from phibook.data.synth.teachers import BuiltinTeacher  # noqa: E402
from phibook.data.tokenize import tokenize_inputs  # noqa: E402
from phibook.pipeline.config import load_pipeline  # noqa: E402
from phibook.pipeline.plan import run_pipeline  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_docs(root: Path, n: int, files: int) -> list[Path]:
    one = root / "all.jsonl"
    run_synth(one, n, BuiltinTeacher(), load_topics(), load_templates(), progress=False)
    lines = one.read_text().splitlines(keepends=True)
    raw = root / "raw"
    raw.mkdir()
    paths = []
    for k in range(files):
        p = raw / f"part-{k:03d}.jsonl"
        p.write_text("".join(lines[len(lines) * k // files : len(lines) * (k + 1) // files]))
        paths.append(p)
    one.unlink()
    return paths


def pipeline_toml(root: Path, name: str, stage: str, tokenizer: str, benchmarks: str | None) -> Path:
    bench = f'benchmarks = "{benchmarks}"\n' if benchmarks else ""
    body = (f'[pipeline]\ninput = ["raw/*.jsonl"]\noutput = "{name}"\nstages = ["{stage}"]\n'
            + (f"[clean]\n{bench}" if stage == "clean" else f'[tokenize]\ntokenizer = "{tokenizer}"\n'))
    path = root / f"{name}.toml"
    path.write_text(body)
    return path


def timed(fn, *a, **kw) -> float:
    t0 = time.perf_counter()
    fn(*a, **kw)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--files", type=int, default=8, help="input files (the first stage shards by file)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "tokenizer" / "codegen-mono"))
    ap.add_argument("--benchmarks", default=None, help="benchmark folder: include 13-gram decontamination")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    try:
        files = make_docs(tmp, args.docs, args.files)
        size = sum(p.stat().st_size for p in files)
        times: dict[str, list[float]] = {}
        tokens = 0

        def add(key: str, seconds: float) -> None:
            times.setdefault(key, []).append(seconds)

        for rnd in range(args.rounds):
            # clean
            out = tmp / f"verb_clean_{rnd}.jsonl"
            add("clean/verb", timed(clean, files, out, CleanConfig(), args.benchmarks, progress=False))
            for label, tasks, workers in (("1x1", 1, 1), (f"{args.tasks}x{args.workers}", args.tasks, args.workers)):
                cfg = load_pipeline(pipeline_toml(tmp, f"dt_clean_{label}_{rnd}", "clean", args.tokenizer,
                                                  args.benchmarks))
                add(f"clean/datatrove {label}", timed(run_pipeline, cfg, "local", tasks, workers))
            # tokenize
            tok_out = tmp / f"verb_tok_{rnd}"
            add("tokenize/verb", timed(tokenize_inputs, files, args.tokenizer, tok_out, workers=1, progress=False))
            add(f"tokenize/verb {args.workers} workers", timed(tokenize_inputs, files, args.tokenizer,
                                                               tmp / f"verb_tokw_{rnd}", workers=args.workers,
                                                               progress=False))
            tokens = json.loads((tok_out / "manifest.json").read_text())["total_tokens"]["train"]
            for label, tasks, workers in (("1x1", 1, 1), (f"{args.tasks}x{args.workers}", args.tasks, args.workers)):
                cfg = load_pipeline(pipeline_toml(tmp, f"dt_tok_{label}_{rnd}", "tokenize", args.tokenizer, None))
                add(f"tokenize/datatrove {label}", timed(run_pipeline, cfg, "local", tasks, workers))
            print(f"round {rnd + 1}/{args.rounds} done (load {load_average()})", file=sys.stderr)

        rows = {}
        for key, ts in times.items():
            s = statistics.median(ts)
            cores = 1 if key.endswith(("verb", "1x1")) else args.workers
            rows[key] = {"seconds": round(s, 3), "docs_per_s": round(args.docs / s), "mb_per_s": round(size / 1e6 / s, 2),
                         "core_s_per_billion_tokens": round(s * cores * 1e9 / max(tokens, 1))}
        for stage in ("clean", "tokenize"):
            verb, dt = rows[f"{stage}/verb"]["seconds"], rows[f"{stage}/datatrove 1x1"]["seconds"]
            rows[f"{stage}/engine_overhead_1x1"] = f"{100 * (dt / verb - 1):+.1f}%"
        print(json.dumps({"machine": machine(), "load_average": load_average(), "docs": args.docs,
                          "files": args.files, "mb": round(size / 1e6, 2), "tokens": tokens, "rounds": args.rounds,
                          "results": rows}, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
