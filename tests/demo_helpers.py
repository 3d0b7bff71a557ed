"""One short `phibook demo`, shared by tests/test_demo.py and tests/test_report_browser.py.

The run is the kill-and-resume scenario itself, so one demo serves every test:
the first `phibook demo` process is SIGKILLed (whole process group) once training
has written a checkpoint past its calibration steps; the same command then runs
to the end. Built once per pytest process (a module-level cache, since the two
test modules each ask for it through their own session fixture).
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

REPO = Path(__file__).resolve().parents[1]
DEMO_MINUTES = 3
# Generous ceilings for a loaded 2-core machine; the demo itself aims at DEMO_MINUTES.
FIRST_RUN_TIMEOUT_S = 900
SECOND_RUN_TIMEOUT_S = 1200

_CACHE: dict[str, DemoRun] = {}


@dataclass
class DemoRun:
    out: Path
    first_log: str  # stderr of the killed run
    second_log: str  # stderr of the run that finished
    killed_at_checkpoint: int  # newest checkpoint step present when the first run was killed
    stages_at_kill: dict  # stages.json as it was when the first run was killed
    second_seconds: float


def _newest_step(run_dir: Path) -> int:
    ckpts = run_dir / "checkpoints"
    if not ckpts.is_dir():
        return 0
    steps = [int(p.name.split("_")[1]) for p in ckpts.iterdir() if p.name.startswith("step_") and p.name[5:].isdigit()]
    return max(steps, default=0)


def demo_command(out: Path, data_dir: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "phibook.cli", "demo", "--out", str(out), "--minutes", str(DEMO_MINUTES),
           "--no-progress"]
    return cmd + (["--data-dir", str(data_dir)] if data_dir else [])


def get_demo_run(tmp_path_factory, data_dir: Path | None) -> DemoRun:
    if "run" in _CACHE:
        return _CACHE["run"]
    from phibook.demo.run import CALIBRATION_STEPS

    root = tmp_path_factory.mktemp("demo")
    out = root / "out"
    cmd = demo_command(out, data_dir)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log1 = root / "first.log"
    with open(log1, "w") as err:
        proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=err, env=env,
                                start_new_session=True)
        deadline = time.monotonic() + FIRST_RUN_TIMEOUT_S
        killed_at = 0
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise AssertionError(
                        f"the demo exited (code {proc.returncode}) before it could be killed mid-training:\n"
                        + log1.read_text()[-3000:])
                state = out / "stages.json"
                step = _newest_step(out / "run")
                if step > CALIBRATION_STEPS and state.exists() and "train_plan" in json.loads(state.read_text()):
                    killed_at = step
                    break
                time.sleep(0.5)
            else:
                raise AssertionError("the demo did not reach a training checkpoint in time:\n" + log1.read_text()[-3000:])
            stages_at_kill = json.loads((out / "stages.json").read_text())
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    t0 = time.monotonic()
    second = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env, timeout=SECOND_RUN_TIMEOUT_S)
    secs = time.monotonic() - t0
    assert second.returncode == 0, f"the resumed demo failed (code {second.returncode}):\n{second.stderr[-4000:]}"
    run = DemoRun(out, log1.read_text(), second.stderr, killed_at, stages_at_kill, secs)
    _CACHE["run"] = run
    return run
