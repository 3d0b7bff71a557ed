"""`phibook clean` throughput on this machine, and what the report's scale needs.

Makes N documents with the built-in teacher (fast, offline), then cleans them
twice: dedup + near-dup only, and with 13-gram decontamination against a
benchmark folder. Prints documents/s, MB/s and an estimate of core-hours for
20B tokens (the report's synthetic set), assuming the MinHash work shards by
file as in datatrove's multi-stage pipeline.

    python bench/bench_clean.py --docs 100000 --benchmarks ../shared/benchmarks
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from phibook.data.clean import CleanConfig, clean
from phibook.data.synth.prompts import load_templates, load_topics
from phibook.data.synth.run import run_synth
from phibook.data.synth.teachers import BuiltinTeacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--benchmarks", default=None, help="benchmark folder for decontamination")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        docs = Path(tmp) / "docs.jsonl"
        t0 = time.perf_counter()
        run_synth(docs, args.docs, BuiltinTeacher(), load_topics(), load_templates(), progress=False)
        synth_s = time.perf_counter() - t0
        size = docs.stat().st_size
        # Tokens estimated at 4 characters a token (the builtin teacher's own estimate).
        tokens = size / 4
        results = {"docs": args.docs, "mb": round(size / 1e6, 1), "synth_builtin_docs_per_s": round(args.docs / synth_s)}
        runs = [("dedup+near-dup", None)]
        if args.benchmarks:
            runs.append(("dedup+near-dup+decontamination", args.benchmarks))
        for name, bench in runs:
            rep = clean([docs], Path(tmp) / "out.jsonl", CleanConfig(), benchmarks=bench, progress=False)
            dps = rep.read / rep.seconds
            core_hours_20b = 20e9 / (tokens / rep.seconds) / 3600  # one core does the pass
            results[name] = {
                "seconds": round(rep.seconds, 1), "docs_per_s": round(dps), "mb_per_s": round(size / 1e6 / rep.seconds, 2),
                "kept": rep.kept, "removed": dict(rep.removed), "core_hours_for_20B_tokens": round(core_hours_20b),
            }
        results["cpu"] = os.cpu_count()
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
