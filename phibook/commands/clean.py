"""`phibook clean`: dedup, decontaminate and filter document JSONL."""

from __future__ import annotations

import argparse
import sys

from phibook.data.options import CleanConfig, CleanInputs
from phibook.options import add_flags, from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "clean", help="deduplicate, decontaminate and filter documents",
        description="One pass over document JSONL: length and repetition filters, exact dedup (normalized "
        "hash), benchmark decontamination (word n-gram overlap with the files under --benchmarks), and "
        "near-duplicate removal (MinHash LSH). Writes the kept documents and a report of what was removed "
        "and why.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="document JSONL files")
    p.add_argument("--out", required=True, help="output JSONL of kept documents (written atomically)")
    add_flags(p, CleanInputs)
    add_flags(p, CleanConfig)
    p.add_argument("--report", default=None, help="JSON report path (default: OUT.report.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from phibook.data.clean import clean

    cfg = from_args(CleanConfig, args)
    report_path = args.report or args.out + ".report.json"
    rep = clean(args.inputs, args.out, cfg, args.benchmarks, report_path, progress=not args.no_progress)
    removed = ", ".join(f"{k} {v}" for k, v in sorted(rep.removed.items())) or "nothing"
    print(f"clean: read {rep.read}, kept {rep.kept}; removed: {removed}; bad lines {rep.bad_lines}; "
          f"{rep.seconds:.1f}s -> {args.out} (report {report_path})", file=sys.stderr)
    return 0
