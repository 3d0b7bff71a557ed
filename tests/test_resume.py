"""Exact resume: a run killed with SIGKILL (between steps, or in the middle of writing a
checkpoint) and resumed gives bitwise the same per-step losses and final weights as a
run that was never interrupted (fp32, CPU, one thread per process)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

try:  # tests/ may or may not be a package (tests/__init__.py)
    from tests.train_helpers import env, make_shards, metrics, run, train_cmd
except ImportError:
    from train_helpers import env, make_shards, metrics, run, train_cmd

SETS = ["global_batch=8", "micro_batch=4", "seq_len=32", "eval_every=0", "keep_last=0", "lr=1e-3"]


@pytest.fixture(scope="module")
def data(shared_dir: Path, tmp_path_factory) -> Path:
    return make_shards(shared_dir, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def straight(data: Path, tmp_path_factory) -> Path:
    """The reference: 8 steps without interruption, a checkpoint every 2 steps."""
    out = tmp_path_factory.mktemp("straight") / "run"
    res = run(train_cmd(data, out, *SETS, "save_every=2", steps=8))
    assert res.returncode == 0, res.stderr
    return out


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"tensor {name} differs after resume"


def test_sigkill_between_checkpoints_then_resume_is_exact(data: Path, straight: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = train_cmd(data, out, *SETS, "save_every=4", steps=8)
    # The delay hook spaces the steps out so the kill lands after checkpoint 4 but
    # well before step 8; the process is killed from outside with SIGKILL.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=env(PHIBOOK_TEST_STEP_DELAY="0.4"),
    )
    ckpt4 = out / "checkpoints" / "step_00000004"
    deadline = time.monotonic() + 240
    while not ckpt4.is_dir():
        assert proc.poll() is None, f"training exited early: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "checkpoint 4 never appeared"
        time.sleep(0.02)
    time.sleep(0.5)  # let it get into step 5 or 6, so the kill loses work in progress
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "checkpoints" / "step_00000008").exists()
    killed_steps = [m["step"] for m in metrics(out)]
    assert max(killed_steps) >= 5, "the kill should land after step 4's checkpoint, mid-run"

    res = run([*cmd, "--resume"])
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stderr and "step_00000004" in res.stderr
    got, want = metrics(out), metrics(straight)
    assert [m["step"] for m in got] == list(range(1, 9)), "metrics.jsonl must hold each step exactly once"
    assert [m["loss"] for m in got] == [m["loss"] for m in want]  # bitwise: JSON floats round-trip
    assert [m["tokens"] for m in got] == [m["tokens"] for m in want]
    assert_same_weights(out / "checkpoints" / "step_00000008", straight / "checkpoints" / "step_00000008")


def test_kill_during_checkpoint_keeps_previous_and_resume_uses_it(
    data: Path, straight: Path, tmp_path: Path
) -> None:
    from phibook.weights.checkpoint import load_model

    out = tmp_path / "run"
    cmd = train_cmd(data, out, *SETS, "save_every=2", steps=6)
    # The hook SIGKILLs the process after checkpoint 4's weights and optimizer
    # state are written but before it is complete and renamed.
    res = run(cmd, PHIBOOK_FAULT_INJECT="kill_during_checkpoint@4")
    assert res.returncode == -signal.SIGKILL, res.stderr
    ckpts = out / "checkpoints"
    assert (ckpts / ".tmp-step_00000004" / "model.safetensors").is_file()  # the half-written one
    assert not (ckpts / "step_00000004").exists()
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    loaded = load_model(out)  # what eval/generate would pick: the last complete checkpoint
    assert loaded.model.embed.weight.shape[0] == 384
    assert_same_weights(ckpts / "step_00000002", straight / "checkpoints" / "step_00000002")

    res = run([*cmd, "--resume"])
    assert res.returncode == 0, res.stderr
    assert "step_00000002" in res.stderr and "unfinished checkpoint" in res.stderr
    assert not (ckpts / ".tmp-step_00000004").exists()
    got, want = metrics(out), metrics(straight)[:6]
    assert [m["step"] for m in got] == list(range(1, 7))
    assert [m["loss"] for m in got] == [m["loss"] for m in want]
    assert_same_weights(ckpts / "step_00000006", straight / "checkpoints" / "step_00000006")


def test_keep_last_prunes_old_checkpoints(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = run(train_cmd(data, out, *SETS[:-2], "save_every=1", "keep_last=2", steps=4))
    assert res.returncode == 0, res.stderr
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["latest", "step_00000003", "step_00000004"]
    ckpt = out / "checkpoints" / "step_00000004"
    assert {p.name for p in ckpt.iterdir()} >= {
        "model.safetensors", "config.json", "tokenizer.json", "optimizer.pt", "rng.pt", "train_state.json"
    }


def test_resume_without_checkpoint_starts_fresh_and_existing_dir_needs_resume(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')  # a killed run's torn log
    res = run(train_cmd(data, out, *SETS, steps=1))
    assert res.returncode == 2 and "pass --resume" in res.stderr and "Traceback" not in res.stderr
    res = run([*train_cmd(data, out, *SETS, steps=2), "--resume"])
    assert res.returncode == 0, res.stderr
    assert "no complete checkpoint" in res.stderr
    assert [m["step"] for m in metrics(out)] == [1, 2]
    assert metrics(out)[0]["loss"] != 9.0
