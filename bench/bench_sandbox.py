"""The code sandbox's cost: per-program overhead, and HumanEval canonical-solution throughput.

    python bench/bench_sandbox.py                 # 5 rounds of 40 trivial programs, 3 HumanEval rounds
    python bench/bench_sandbox.py --trivial 100 --rounds 7 --he-rounds 5

Systems, in ALTERNATING rounds (the machine is shared; medians are reported):

- ``sandbox``: ``phibook.eval.sandbox.run_python`` / ``check_many`` with the defaults phibook eval
  uses (fresh temp dir, scrubbed env, RLIMITs, no children, Landlock write/network/signal
  confinement, a new network namespace, uid 65534 when run as root: see ``capabilities()``).
- ``subprocess``: the peer, no isolation at all: ``subprocess.run([python, "-c", code],
  timeout=...)`` from a thread pool of the same size.

1. Overhead per program: a trivial program (``print(1)``) run one at a time; milliseconds per
   program, and the sandbox's extra cost over the peer.
2. Throughput: the 164 HumanEval canonical solutions with their tests (``prompt +
   canonical_solution``, then ``test`` and ``check(entry_point)``, the program phibook eval
   builds), 2 workers; programs per second and how many pass (both must pass 164).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_rev, load_average, machine, median, now  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCH = ROOT.parent / "shared" / "benchmarks"


def peer_run(code: str, timeout_s: float = 10.0) -> bool:
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=timeout_s).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def trivial_round(system: str, n: int) -> float:
    """Milliseconds per trivial program, run one after another."""
    from phibook.eval.sandbox import run_python

    code = "print(1)\n"
    t = time.perf_counter()
    for _ in range(n):
        ok = run_python(code, timeout_s=10).ok if system == "sandbox" else peer_run(code)
        assert ok, system
    return (time.perf_counter() - t) / n * 1000


def humaneval_programs() -> list[tuple[str, str]]:
    from phibook.eval.task import get_task

    task = get_task("humaneval")
    docs = task.load_docs(BENCH, None)
    return [task.program(doc, doc["canonical_solution"]) for doc in docs]


def humaneval_round(system: str, pairs: list[tuple[str, str]], workers: int) -> tuple[float, int]:
    """(programs per second, programs passed) over all pairs, `workers` at a time."""
    from phibook.eval.sandbox import check_many

    t = time.perf_counter()
    if system == "sandbox":
        passed = sum(o.passed for o in check_many(pairs, workers=workers, timeout_s=10.0))
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            passed = sum(pool.map(lambda p: peer_run(p[0] + "\n\n" + p[1] + "\n"), pairs))
    return len(pairs) / (time.perf_counter() - t), passed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trivial", type=int, default=40, help="trivial programs per round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the overhead test")
    ap.add_argument("--he-rounds", type=int, default=3, help="rounds of the HumanEval test")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    from phibook.eval.sandbox import capabilities

    caps = capabilities()
    systems = ["sandbox", "subprocess"]
    ms: dict[str, list[float]] = {s: [] for s in systems}
    for r in range(args.rounds):
        for system in systems if r % 2 == 0 else systems[::-1]:
            ms[system].append(trivial_round(system, args.trivial))
        print(f"overhead round {r + 1}: " + ", ".join(f"{s} {ms[s][-1]:.1f} ms" for s in systems)
              + f" (load {load_average()})", file=sys.stderr)

    pairs = humaneval_programs()
    rate: dict[str, list[float]] = {s: [] for s in systems}
    passed: dict[str, int] = {}
    for r in range(args.he_rounds):
        for system in systems if r % 2 == 0 else systems[::-1]:
            per_s, passed[system] = humaneval_round(system, pairs, args.workers)
            rate[system].append(per_s)
        print(f"humaneval round {r + 1}: " + ", ".join(f"{s} {rate[s][-1]:.1f}/s" for s in systems)
              + f" (load {load_average()})", file=sys.stderr)

    sb, peer = median(ms["sandbox"]), median(ms["subprocess"])
    print(f"# bench_sandbox  {now()}  git {git_rev()}")
    print(f"# {machine()}; load average at the end {load_average()}")
    print(f"# sandbox layers here: {caps}")
    print()
    print(f"Overhead per trivial program (`print(1)`, one at a time, {args.trivial} per round, "
          f"median of {args.rounds} alternating rounds):")
    print()
    print("| system | ms per program (median) | rounds |")
    print("|---|---|---|")
    for s, label in (("sandbox", "phibook sandbox (run_python)"), ("subprocess", "subprocess.run([python, '-c'])")):
        print(f"| {label} | {median(ms[s]):.1f} | {', '.join(f'{x:.1f}' for x in ms[s])} |")
    print()
    print(f"sandbox extra cost over a bare interpreter start: {sb - peer:.1f} ms per program ({sb / peer:.2f}x)")
    print()
    print(f"HumanEval canonical solutions ({len(pairs)} programs + tests, {args.workers} workers, "
          f"median of {args.he_rounds} alternating rounds):")
    print()
    print("| system | programs/s (median) | rounds | passed |")
    print("|---|---|---|---|")
    for s, label in (("sandbox", "phibook sandbox (check_many)"), ("subprocess", "subprocess.run pool")):
        print(f"| {label} | {median(rate[s]):.1f} | {', '.join(f'{x:.1f}' for x in rate[s])} | "
              f"{passed[s]}/{len(pairs)} |")
    print()
    print(f"sandbox throughput vs the unsandboxed peer: {median(rate['sandbox']) / median(rate['subprocess']):.2f}x")


if __name__ == "__main__":
    main()
