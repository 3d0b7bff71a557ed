"""`phibook clean`: dedup, decontaminate and filter document JSONL."""

from __future__ import annotations

import argparse
import sys


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
    p.add_argument("--benchmarks", default=None,
                   help="benchmark folder (e.g. ../shared/benchmarks); its questions and answers are the "
                   "decontamination set")
    p.add_argument("--near-dup-threshold", type=float, default=0.8, help="MinHash Jaccard threshold, in (0, 1)")
    p.add_argument("--no-near-dup", action="store_true",
                   help="skip MinHash near-dup removal (e.g. when datatrove does it across shards)")
    p.add_argument("--ngram", type=int, default=13, help="decontamination n-gram length in words")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    p.add_argument("--min-chars", type=int, default=50, help="drop documents shorter than this")
    p.add_argument("--max-chars", type=int, default=1_000_000, help="drop documents longer than this")
    p.add_argument("--max-dup-line-frac", type=float, default=0.3,
                   help="drop documents whose repeated lines hold more than this share of characters")
    p.add_argument("--report", default=None, help="JSON report path (default: OUT.report.json)")
    p.add_argument("--skip-bad", action="store_true", help="count and skip malformed JSONL lines")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from phibook.data.clean import CleanConfig, clean

    cfg = CleanConfig(
        near_dup_threshold=args.near_dup_threshold, near_dup=not args.no_near_dup, num_perm=args.num_perm, ngram=args.ngram,
        min_chars=args.min_chars, max_chars=args.max_chars, max_dup_line_frac=args.max_dup_line_frac,
        skip_bad=args.skip_bad,
    )
    report_path = args.report or args.out + ".report.json"
    rep = clean(args.inputs, args.out, cfg, args.benchmarks, report_path, progress=not args.no_progress)
    removed = ", ".join(f"{k} {v}" for k, v in sorted(rep.removed.items())) or "nothing"
    print(f"clean: read {rep.read}, kept {rep.kept}; removed: {removed}; bad lines {rep.bad_lines}; "
          f"{rep.seconds:.1f}s -> {args.out} (report {report_path})", file=sys.stderr)
    return 0
