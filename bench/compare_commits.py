"""One command timed under two commits, in alternating rounds: did a change make it slower?

    python bench/compare_commits.py --before 46c0787 --after HEAD --rounds 2 -- \\
        python bench/bench_decode.py --dtype fp32 --systems phibook phibook-fast --json {out}/decode.json

Each commit is checked out once as a detached git worktree in a temporary folder; the command
runs with that worktree as its working directory and on ``PYTHONPATH`` (so ``python -m
phibook.cli`` and subprocesses the command starts import that commit's phibook, whatever is
installed). The order flips every round (before, after, after, before, ...): load and memory
bandwidth drift on shared machines, and alternation spreads the drift over both. ``{out}`` in
the command becomes a per-run folder; every run's stdout is kept there, and its wall time, the
load average before it and its exit status are printed as a table at the end. A run that fails
stops the comparison (a timing of a crash means nothing).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_flags, load_average, machine, median  # noqa: E402


def _worktree(repo: Path, rev: str, where: Path) -> Path:
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", rev], capture_output=True, text=True,
                         check=True).stdout.strip()
    path = where / sha
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "-q", str(path), sha], check=True)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="git revision measured first in round 1")
    ap.add_argument("--after", default="HEAD", help="git revision to compare it with (default: HEAD)")
    ap.add_argument("--rounds", type=int, default=2, help="runs per commit (default: 2)")
    ap.add_argument("--out", type=Path, default=None, help="folder for the runs' outputs (default: a temp dir)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command; {out} = the run's folder")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command to time after --")
    repo = Path(__file__).resolve().parents[1]
    out = args.out or Path(tempfile.mkdtemp(prefix="phibook-compare-"))
    trees = Path(tempfile.mkdtemp(prefix="phibook-trees-"))
    revs = {"before": _worktree(repo, args.before, trees), "after": _worktree(repo, args.after, trees)}
    rows = []
    try:
        for r in range(args.rounds):
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            for which in order:
                tree = revs[which]
                run_dir = out / f"{which}-{r}"
                run_dir.mkdir(parents=True, exist_ok=True)
                argv = [a.replace("{out}", str(run_dir)) for a in command]
                env = {**os.environ, "PYTHONPATH": str(tree)}
                load = load_average()
                t0 = time.perf_counter()
                with open(run_dir / "stdout.txt", "w") as f:
                    rc = subprocess.run(argv, cwd=tree, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
                wall = time.perf_counter() - t0
                rows.append((which, r, wall, load, rc))
                print(f"{which} ({tree.name}) round {r}: {wall:.1f} s, rc {rc}, load before {load}", flush=True)
                if rc != 0:
                    print(f"stopped: the run failed; see {run_dir / 'stdout.txt'}", file=sys.stderr)
                    return 1
    finally:
        for tree in revs.values():
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], check=False)
    print(f"\nmachine: {machine()}; flags: {cpu_flags()}")
    print(f"command: {shlex.join(command)}  (outputs under {out})\n")
    print("| commit | rev | wall s per run | median |")
    print("|---|---|---|---:|")
    for which in ("before", "after"):
        walls = [w for k, _, w, _, _ in rows if k == which]
        print(f"| {which} | {revs[which].name} | {', '.join(f'{w:.1f}' for w in walls)} | {median(walls):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
