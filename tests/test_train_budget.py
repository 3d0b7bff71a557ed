"""The trainer's time budget, progress switch and MFU: numbers that mean something on a
shared machine. Every assertion holds however fast or busy the machine is: a budget of a
few milliseconds with ``min_steps`` makes the step count exact, and kills land at a chosen
step through PHIBOOK_FAULT_INJECT."""

from __future__ import annotations

import random
import signal
import subprocess
from pathlib import Path

import pytest

from tests.train_helpers import REPO, env, make_shards, metrics, run, train_cmd

SETS = ["global_batch=4", "micro_batch=4", "seq_len=32", "eval_every=0", "keep_last=0", "lr=1e-3"]


@pytest.fixture(scope="module")
def data(shared_dir: Path, tmp_path_factory) -> Path:
    return make_shards(shared_dir, tmp_path_factory.mktemp("data"))


def test_time_budget_stops_at_the_first_step_past_it_with_a_checkpoint(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = run(train_cmd(data, out, *SETS, "time_budget_s=1.5", "min_steps=2", "save_every=0", steps=100000))
    assert res.returncode == 0, res.stderr
    got = metrics(out)
    steps = [m["step"] for m in got]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2
    # the first step whose training time reached the budget is the last, never one later
    assert got[-1]["elapsed"] >= 1.5 and all(m["elapsed"] < 1.5 for m in got[:-1] if m["step"] >= 2)
    assert (out / "checkpoints" / f"step_{steps[-1]:08d}").is_dir()
    assert "time budget spent: stopping at step" in res.stderr
    # a rerun finds the budget spent and does nothing
    again = run([*train_cmd(data, out, *SETS, "time_budget_s=1.5", "min_steps=2", steps=100000), "--resume"])
    assert again.returncode == 0 and "nothing to do" in again.stderr, again.stderr
    assert [m["step"] for m in metrics(out)] == steps


def test_min_steps_outlast_the_budget_and_say_why(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = run(train_cmd(data, out, *SETS, "time_budget_s=0.001", "min_steps=12", "log_every=1", steps=100000))
    assert res.returncode == 0, res.stderr
    assert [m["step"] for m in metrics(out)] == list(range(1, 13))
    # the overrun is announced with its cause: a busy machine, or a slow one
    assert ("the machine is busy (load" in res.stderr) or ("this machine is too slow for the budget" in res.stderr)
    assert "ends about" in res.stderr and "past the time budget" in res.stderr
    assert "step 5/~12 " in res.stderr  # the projected last step, re-planned from the measured rate


@pytest.mark.parametrize("kill_at", [7, random.Random().randint(1, 8)], ids=["chosen", "random"])
def test_time_budget_run_killed_at_a_chosen_step_resumes_without_repeating_or_skipping(
    data: Path, tmp_path: Path, kill_at: int
) -> None:
    out = tmp_path / "run"
    cmd = train_cmd(data, out, *SETS, "time_budget_s=0.001", "min_steps=9", "save_every=3", steps=100000)
    res = run(cmd, PHIBOOK_FAULT_INJECT=f"train.step_done@{kill_at}")
    assert res.returncode == -signal.SIGKILL, (kill_at, res.stderr)
    assert [m["step"] for m in metrics(out)] == list(range(1, kill_at + 1)), kill_at
    res = run([*cmd, "--resume"])
    assert res.returncode == 0, res.stderr
    newest = kill_at // 3 * 3  # resumed from the newest checkpoint before the kill
    assert (f"step_{newest:08d}" in res.stderr) if newest else ("no complete checkpoint" in res.stderr), kill_at
    got = metrics(out)
    assert [m["step"] for m in got] == list(range(1, 10))
    # the training seconds continue across the resume (the budget's clock is the checkpoint's)
    assert all(b["elapsed"] >= a["elapsed"] for a, b in zip(got, got[1:], strict=False))


def stderr_bytes(cmd: list[str]) -> bytes:
    """The raw stderr: text mode would turn a carriage return into a newline."""
    res = subprocess.run(cmd, capture_output=True, timeout=300, env=env(), cwd=REPO)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    return res.stderr


def test_no_progress_means_no_carriage_returns(data: Path, tmp_path: Path) -> None:
    quiet = stderr_bytes(train_cmd(data, tmp_path / "run", *SETS, "progress=false", steps=4))
    assert b"\r" not in quiet and b"step 4/4" in quiet
    assert b"\r" in stderr_bytes(train_cmd(data, tmp_path / "run2", *SETS, steps=4))  # the bar, when asked for


def test_mfu_never_exceeds_100_percent(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = run(train_cmd(data, out, *SETS, steps=4))
    assert res.returncode == 0, res.stderr
    assert "MFU against a peak of" in res.stderr and "FLOPs/cycle" in res.stderr
    assert all(0 < m["mfu"] <= 1.0 for m in metrics(out))
    # a peak set far too low (1 MFLOP/s) is caught: clamped at 100%, with a warning saying so
    low = tmp_path / "low"
    res = run(train_cmd(data, low, *SETS, "peak_tflops=0.000001", steps=3))
    assert res.returncode == 0, res.stderr
    assert [m["mfu"] for m in metrics(low)] == [1.0, 1.0, 1.0]
    assert res.stderr.count("MFU is clamped at 100%") == 1
