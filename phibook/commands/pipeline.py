"""`phibook pipeline run`: the data stages as one datatrove pipeline (local, Slurm or Ray)."""

from __future__ import annotations

import argparse
import json
import os

DESCRIPTION = """\
Run the stages a PIPELINE.toml lists (synth, filter, clean, tokenize: each
table takes the same option names as its single-machine verb) as datatrove
pipelines: on this machine (--executor local), as Slurm job arrays (slurm) or
on a Ray cluster (ray). Deduplication is global: exact and MinHash near
duplicates are found across all tasks, as `phibook clean` over the whole
input would. OUT/<stage>/ holds each document stage's JSONL (one file per
task), OUT/clean/report.json what clean removed and why, OUT/tokenize/ the
token shards and manifest.json. The TOML is checked completely before
anything runs. Rerunning continues where a killed or failed run stopped
(datatrove's per-task completion markers under --logs)."""

EPILOG = """\
example PIPELINE.toml:
  [pipeline]
  input = ["raw/*.jsonl"]          # globs, relative to the TOML's folder
  output = "out"
  stages = ["clean", "tokenize"]
  [clean]
  near_dup_threshold = 0.8
  benchmarks = "../shared/benchmarks"
  [tokenize]
  tokenizer = "tok"

shipped examples: examples/pipelines/ (phi-1.5-web path, synthetic path); docs/scale.md"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="run data stages as a datatrove pipeline (local, Slurm, Ray)",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(dest="pipeline_command", metavar="SUBVERB", required=True)
    r = verbs.add_parser("run", help="run (or continue) the pipeline a TOML describes", description=DESCRIPTION,
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("toml", metavar="PIPELINE.toml", help="the pipeline description")
    r.add_argument("--executor", choices=["local", "slurm", "ray"], default="local",
                   help="local (default): a process pool here; slurm: submit job arrays ([slurm] table); "
                        "ray: tasks on the Ray cluster at $RAY_ADDRESS or [ray] address (else a local one)")
    r.add_argument("--tasks", type=int, default=None, metavar="N",
                   help="tasks per document step (default: the number of CPU cores); the first stage's input "
                        "files are split among them, so more tasks than files leaves some idle. Keep it fixed "
                        "across reruns of one output folder")
    r.add_argument("--workers", type=int, default=None, metavar="W",
                   help="tasks running at once (default: the number of CPU cores; Slurm: no limit)")
    r.add_argument("--logs", default=None, metavar="DIR",
                   help="datatrove logs, stats and completion markers (default: OUT/.logs)")
    r.set_defaults(func=run_cmd)


def run_cmd(args: argparse.Namespace) -> int:
    from phibook.errors import PhibookError

    try:
        import datatrove  # noqa: F401
    except ImportError as exc:
        raise PhibookError(f"phibook pipeline needs datatrove: pip install 'phibook[datatrove]' ({exc})") from exc
    from phibook.pipeline.config import load_pipeline
    from phibook.pipeline.plan import run_pipeline

    cfg = load_pipeline(args.toml)
    cores = os.cpu_count() or 1
    tasks = args.tasks if args.tasks is not None else cores
    # Slurm: 0 = no limit on array tasks running at once.
    workers = args.workers if args.workers is not None else (cores if args.executor != "slurm" else 0)
    records = run_pipeline(cfg, args.executor, tasks, workers, args.logs)
    print(json.dumps({"output": str(cfg.output), "executor": args.executor, "steps": records}))
    return 0
