"""The code sandbox's cost: per-program overhead, and HumanEval canonical-solution throughput.

    python bench/bench_sandbox.py                 # 5 rounds of 40 trivial programs, 3 HumanEval rounds
    python bench/bench_sandbox.py --trivial 100 --rounds 7 --he-rounds 5

Systems, in ALTERNATING rounds (the machine is shared; medians are reported):

- ``jail``: ``phibook.sandbox.runner.run_python`` / ``check_many`` as phibook eval runs them: two
  bubblewrap jails per program (namespaces, read-only binds, tmpfs, seccomp, uid 65534), one
  for the program and one for the harness that runs the tests and calls it across a pipe
  (issue 22), RLIMITs.
- ``launcher``: the same two processes without the jails (``unsafe=True``, what
  --unsafe-no-sandbox runs): the jails' own share is the difference.
- ``floor``: the interpreter start the launcher itself pays, ``python -I -S -c pass`` (no site).
- ``bare``: what a harness without a sandbox runs, ``subprocess.run([python, "-c", code])``
  (``pass`` for the overhead test; the program and its tests for HumanEval, from a thread pool of
  the same size): no isolation at all and an exit status for a verdict.

1. Overhead per program: a trivial program run one at a time; milliseconds per program.
2. Throughput: the 164 HumanEval canonical solutions with their tests (the programs phibook eval
   builds), 2 workers; programs per second and how many pass (all must pass 164).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_flags, git_rev, load_average, machine, median, memory_bandwidth_gbs, now  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCH = ROOT.parent / "shared" / "benchmarks"


def bare_run(code: str, timeout_s: float = 10.0, flags: tuple[str, ...] = ()) -> bool:
    try:
        return subprocess.run([sys.executable, *flags, "-c", code], capture_output=True,
                              timeout=timeout_s).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def trivial_round(system: str, n: int) -> float:
    """Milliseconds per trivial program, run one after another."""
    from phibook.sandbox.runner import run_python

    t = time.perf_counter()
    for _ in range(n):
        if system in ("bare", "floor"):
            ok = bare_run("pass", flags=("-I", "-S") if system == "floor" else ())
        else:
            ok = run_python("pass", timeout_s=10, unsafe=system == "launcher").ok
        assert ok, system
    return (time.perf_counter() - t) / n * 1000


def humaneval_programs() -> list[tuple[str, str]]:
    from phibook.eval.task import get_task

    task = get_task("humaneval")
    docs = task.load_docs(BENCH, None)
    return [task.program(doc, doc["canonical_solution"]) for doc in docs]


def humaneval_round(system: str, pairs: list[tuple[str, str]], workers: int) -> tuple[float, int]:
    """(programs per second, programs passed) over all pairs, `workers` at a time."""
    from phibook.sandbox.runner import check_many

    t = time.perf_counter()
    if system == "bare":
        with ThreadPoolExecutor(max_workers=workers) as pool:
            passed = sum(pool.map(lambda p: bare_run(p[0] + "\n\n" + p[1] + "\n"), pairs))
    else:
        outcomes = check_many(pairs, workers=workers, timeout_s=10.0, unsafe=system == "launcher")
        passed = sum(o.passed for o in outcomes)
    return len(pairs) / (time.perf_counter() - t), passed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trivial", type=int, default=40, help="trivial programs per round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the overhead test")
    ap.add_argument("--he-rounds", type=int, default=3, help="rounds of the HumanEval test")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    from phibook.sandbox.runner import capabilities

    caps = capabilities()
    systems = ["jail", "launcher", "floor", "bare"]
    ms: dict[str, list[float]] = {s: [] for s in systems}
    for r in range(args.rounds):
        for system in systems if r % 2 == 0 else systems[::-1]:
            ms[system].append(trivial_round(system, args.trivial))
        print(f"overhead round {r + 1}: " + ", ".join(f"{s} {ms[s][-1]:.1f} ms" for s in systems)
              + f" (load {load_average()})", file=sys.stderr)

    pairs = humaneval_programs()
    he_systems = ["jail", "launcher", "bare"]
    rate: dict[str, list[float]] = {s: [] for s in he_systems}
    passed: dict[str, int] = {}
    for r in range(args.he_rounds):
        for system in he_systems if r % 2 == 0 else he_systems[::-1]:
            per_s, passed[system] = humaneval_round(system, pairs, args.workers)
            rate[system].append(per_s)
        print(f"humaneval round {r + 1}: " + ", ".join(f"{s} {rate[s][-1]:.1f}/s" for s in he_systems)
              + f" (load {load_average()})", file=sys.stderr)

    labels = {"jail": "phibook sandbox (bubblewrap jail + launcher)", "launcher": "launcher only, both processes (unsafe=True)",
              "floor": "`python -I -S -c pass` (the launcher's interpreter start)",
              "bare": "bare `python -c` (no isolation)"}
    print(f"# bench_sandbox  {now()}  git {git_rev()}")
    print(f"# {machine()}; CPU flags: {cpu_flags()}; copy bandwidth {memory_bandwidth_gbs():.1f} GB/s; "
          f"load average at the end {load_average()}")
    print(f"# jail: {caps['tool']}; verified: {', '.join(k for k, v in caps['verified'].items() if v)}; "
          f"NOT verified: {', '.join(k for k, v in caps['verified'].items() if not v) or 'none'}")
    print()
    print(f"Overhead per trivial program (`pass`, one at a time, {args.trivial} per round, "
          f"median of {args.rounds} alternating rounds):")
    print()
    print("| system | ms per program (median) | rounds |")
    print("|---|---|---|")
    for s in systems:
        print(f"| {labels[s]} | {median(ms[s]):.1f} | {', '.join(f'{x:.1f}' for x in ms[s])} |")
    jail, launcher, floor, bare = (median(ms[s]) for s in systems)
    print()
    print(f"the sandbox per program: {jail:.1f} ms, {jail - bare:+.1f} ms vs a bare `python -c pass`; over the "
          f"interpreter start it needs anyway ({floor:.1f} ms): the jail {jail - launcher:.1f} ms, the launcher "
          f"{launcher - floor:.1f} ms")
    print()
    print(f"HumanEval canonical solutions ({len(pairs)} programs + tests, {args.workers} workers, "
          f"median of {args.he_rounds} alternating rounds):")
    print()
    print("| system | programs/s (median) | rounds | passed |")
    print("|---|---|---|---|")
    for s in he_systems:
        print(f"| {labels[s]} | {median(rate[s]):.1f} | {', '.join(f'{x:.1f}' for x in rate[s])} | "
              f"{passed[s]}/{len(pairs)} |")
    print()
    print(f"sandbox throughput vs the bare interpreter: {median(rate['jail']) / median(rate['bare']):.2f}x")


if __name__ == "__main__":
    main()
