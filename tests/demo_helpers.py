"""One short `phibook demo`, shared by tests/test_demo.py and tests/test_report_browser.py.

The run is the kill-and-resume scenario itself, so one demo serves every test:
the first `phibook demo` process kills itself (SIGKILL, through the fault hook
PHIBOOK_FAULT_INJECT=train.step_done@KILL_AT_STEP) right after training step
KILL_AT_STEP, past the calibration steps and the recorded plan, wherever that
falls in time; the same command then runs to the end. Built once per pytest
process (a module-level cache, since the two test modules each ask for it
through their own session fixture).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from phibook.faults import ENV as FAULT_ENV

REPO = Path(__file__).resolve().parents[1]
DEMO_MINUTES = 3
# Generous ceilings for a loaded 2-core machine; the demo itself aims at DEMO_MINUTES.
FIRST_RUN_TIMEOUT_S = 900
SECOND_RUN_TIMEOUT_S = 1200
# The training step after which the first run dies: past the 6 calibration steps (so the plan is
# recorded), well before the 200-step minimum (so training is mid-way whatever the budget).
KILL_AT_STEP = 31

_CACHE: dict[str, DemoRun] = {}


@dataclass
class DemoRun:
    out: Path
    first_log: str  # stderr of the killed run (raw: carriage returns kept)
    second_log: str  # stderr of the run that finished (raw)
    killed_at_checkpoint: int  # newest checkpoint step present when the first run was killed
    steps_at_kill: list  # the steps in run/metrics.jsonl when the first run was killed
    stages_at_kill: dict  # stages.json as it was when the first run was killed
    second_seconds: float


def _newest_step(run_dir: Path) -> int:
    ckpts = run_dir / "checkpoints"
    if not ckpts.is_dir():
        return 0
    steps = [int(p.name.split("_")[1]) for p in ckpts.iterdir() if p.name.startswith("step_") and p.name[5:].isdigit()]
    return max(steps, default=0)


def _text(path: Path) -> str:
    """A log as written: no newline translation, so a carriage return stays one."""
    return path.read_bytes().decode("utf-8", errors="replace")


def demo_command(out: Path, data_dir: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "phibook.cli", "demo", "--out", str(out), "--minutes", str(DEMO_MINUTES),
           "--no-progress"]
    return cmd + (["--data-dir", str(data_dir)] if data_dir else [])


def get_demo_run(tmp_path_factory, data_dir: Path | None) -> DemoRun:
    if "run" in _CACHE:
        return _CACHE["run"]
    root = tmp_path_factory.mktemp("demo")
    out = root / "out"
    cmd = demo_command(out, data_dir)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop(FAULT_ENV, None)
    log1, log2 = root / "first.log", root / "second.log"
    with open(log1, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=err,
                                env={**env, FAULT_ENV: f"train.step_done@{KILL_AT_STEP}"}, start_new_session=True)
        try:
            proc.wait(timeout=FIRST_RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError("the demo did not reach training step "
                                 f"{KILL_AT_STEP} in time:\n" + _text(log1)[-3000:]) from None
    assert proc.returncode == -signal.SIGKILL, (
        f"the demo exited (code {proc.returncode}) instead of dying at training step {KILL_AT_STEP}:\n"
        + _text(log1)[-3000:])
    stages_at_kill = json.loads((out / "stages.json").read_text())
    killed_at = _newest_step(out / "run")
    steps_at_kill = [json.loads(line)["step"] for line in (out / "run/metrics.jsonl").read_text().splitlines()]
    t0 = time.monotonic()
    with open(log2, "wb") as err:
        second = subprocess.run(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=err, env=env,
                                timeout=SECOND_RUN_TIMEOUT_S)
    secs = time.monotonic() - t0
    assert second.returncode == 0, f"the resumed demo failed (code {second.returncode}):\n{_text(log2)[-4000:]}"
    run = DemoRun(out, _text(log1), _text(log2), killed_at, steps_at_kill, stages_at_kill, secs)
    _CACHE["run"] = run
    return run
