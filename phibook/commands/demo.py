"""``phibook demo``: the phi-1.5 recipe end to end on this machine, in a time budget, with a report."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Run the whole phi-1.5 recipe at toy scale on a CPU, offline, in about --minutes:

  1. synth      the built-in teacher writes textbook-and-exercise documents
                (plus any --text files, split into documents)
  2. clean      exact + near-duplicate removal, decontamination against the benchmarks
  3. tokenizer  a small byte-level BPE (up to 4,096 tokens) trained on the corpus
  4. tokenize   token shards with a 5% validation split
  5. baseline   the untrained (step-0) model scored on held-out exercises and benchmarks
  6. train      phi-tiny pretrained with the report's AdamW recipe (LR 2e-3 for the tiny model)
                until the budget's training seconds are spent (at least 200 steps); bf16 only
                on CPUs with AVX512-BF16/AMX, else fp32
  7. evaluate   the trained model on the same held-out exercises and benchmark subsets
  8. samples    one generation per report prompt format (completion, step-by-step, qa, chat, code)
  9. report     DIR/report.html (self-contained) and DIR/report.md

Every stage prints what it does, a progress bar and its duration. DIR/stages.json records
finished stages: rerun the same command after a crash or Ctrl-C and finished stages are
reused, an interrupted one resumes (training continues from its newest checkpoint).
Benchmark files (for decontamination and the benchmark table) come from --data-dir, else
$PHIBOOK_DATA_DIR, else ../shared/benchmarks beside the current directory or the repository;
without them those parts are skipped with a note.
"""

EPILOG = """\
examples:
  phibook demo                                  # ./demo-out, 15 minutes
  phibook demo --out /tmp/demo --minutes 5 --data-dir ~/benchmarks
  phibook demo --text notes.txt essays.txt      # mix your own text into the corpus
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the whole recipe end to end on this CPU in ~15 minutes, with an HTML report",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="demo-out", metavar="DIR",
                   help="output directory (default: ./demo-out); rerunning into it resumes")
    p.add_argument("--minutes", type=float, default=15.0, metavar="M",
                   help="time budget for the whole demo in minutes (default: 15); sets corpus size, "
                        "training steps and evaluation subset sizes")
    p.add_argument("--text", dest="texts", nargs="+", default=[], metavar="FILE",
                   help="plain-text files to add to the corpus (split into documents at blank lines)")
    p.add_argument("--data-dir", metavar="DIR", default=None,
                   help="benchmark folder laid out like shared/benchmarks (default: $PHIBOOK_DATA_DIR, "
                        "else ../shared/benchmarks if found)")
    p.add_argument("--seed", type=int, default=0, help="seed for the corpus, the init and the data order (default: 0)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars, the trainer's included (stage and log lines still print)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from phibook.demo.run import DemoOptions, run_demo

    opts = DemoOptions(out=Path(args.out), minutes=args.minutes, texts=[Path(t) for t in args.texts],
                       data_dir=Path(args.data_dir) if args.data_dir else None, seed=args.seed,
                       progress=not args.no_progress)
    report = run_demo(opts)
    print(report)
    return 0
