"""``phibook report``: report.md + self-contained report.html for a training run or a demo directory."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Write report.md and report.html for RUN_DIR: a `phibook train` run directory (configuration,
loss and validation curves, throughput, sample generations from the newest checkpoint when the
model is small, and any `phibook eval` results JSON found in it) or a `phibook demo` output
directory (everything the demo measured: data statistics, what cleaning removed, held-out
exercise accuracy before/after, benchmarks beside the report's numbers, samples, timings).
report.html is one self-contained file (inline CSS, plots as embedded PNGs, no scripts, no
network); report.md links PNG files written beside it.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="HTML + Markdown report (plots, tables, samples) for a training run or a demo directory",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="training run directory or demo output directory")
    p.add_argument("--out", metavar="DIR", default=None, help="where to write the report (default: RUN_DIR)")
    p.add_argument("--no-samples", action="store_true",
                   help="do not generate samples from the newest checkpoint of a run directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from phibook.demo.report import write_report
    from phibook.demo.samples import sample_training_run

    if not args.no_samples:  # the one step that runs a model; the renderer only reads files
        sample_training_run(args.run_dir, args.out)
    paths = write_report(args.run_dir, args.out)
    for p in paths[:2]:
        print(p)
    return 0
