"""Exact resume: a run killed with SIGKILL (between steps, or in the middle of writing a
checkpoint) and resumed gives bitwise the same per-step losses and final weights as a
run that was never interrupted (fp32, CPU, one thread per process)."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

try:  # tests/ may or may not be a package (tests/__init__.py)
    from tests.train_helpers import make_shards, metrics, run, train_cmd
except ImportError:
    from train_helpers import make_shards, metrics, run, train_cmd

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


def assert_resume_is_exact(cmd: list[str], out: Path, straight: Path, steps: int, from_step: int) -> str:
    """Resume the killed run: same per-step losses (bitwise) and final weights as the straight run,
    and nothing half-written left; returns the resumed run's log."""
    res = run([*cmd, "--resume"])
    assert res.returncode == 0, res.stderr
    if from_step:
        assert f"step_{from_step:08d} at step {from_step}" in res.stderr
    else:
        assert "no complete checkpoint" in res.stderr
    got, want = metrics(out), metrics(straight)[:steps]
    assert [m["step"] for m in got] == list(range(1, steps + 1)), "metrics.jsonl must hold each step exactly once"
    assert [m["loss"] for m in got] == [m["loss"] for m in want]  # bitwise: JSON floats round-trip
    assert [m["tokens"] for m in got] == [m["tokens"] for m in want]
    name = f"step_{steps:08d}"
    assert_same_weights(out / "checkpoints" / name, straight / "checkpoints" / name)
    leftovers = [p.name for p in [*out.glob(".*.tmp-*"), *(out / "checkpoints").glob(".*.tmp-*")]]
    assert leftovers == [], "partial files left behind"
    return res.stderr


def test_sigkill_between_checkpoints_then_resume_is_exact(data: Path, straight: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = train_cmd(data, out, *SETS, "save_every=4", steps=8)
    # The hook SIGKILLs the process once step 6 is finished: after checkpoint 4, two steps of work lost.
    res = run(cmd, PHIBOOK_FAULT_INJECT="train.step_done@6")
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert [m["step"] for m in metrics(out)] == list(range(1, 7))
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000004"]
    assert_resume_is_exact(cmd, out, straight, steps=8, from_step=4)


def test_sigkill_at_a_random_point_then_resume_is_exact(data: Path, straight: Path, tmp_path: Path) -> None:
    """The extra: a kill at a seeded random point (the seed is in the message; PHIBOOK_FAULT_SEED repeats
    one), after any step or inside any checkpoint write."""
    seed = int(os.environ.get("PHIBOOK_FAULT_SEED") or random.SystemRandom().randrange(2**31))
    rng = random.Random(seed)
    out = tmp_path / "run"
    cmd = train_cmd(data, out, *SETS, "save_every=2", steps=8)
    if rng.random() < 0.5:
        k = rng.randint(1, 7)
        fault, from_step = f"train.step_done@{k}", k - k % 2
    else:
        k = rng.choice([2, 4, 6, 8])
        fault, from_step = f"train.checkpoint_write@{k}", k - 2
    print(f"PHIBOOK_FAULT_SEED={seed}: {fault}")  # shown with a failure
    res = run(cmd, PHIBOOK_FAULT_INJECT=fault)
    assert res.returncode == -signal.SIGKILL, f"seed {seed}: {fault}: {res.stderr}"
    assert [m["step"] for m in metrics(out)] == list(range(1, k + 1)), f"seed {seed}: {fault}"
    assert_resume_is_exact(cmd, out, straight, steps=8, from_step=from_step)


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
    [half] = ckpts.glob(".step_00000004.tmp-*")  # the half-written one (phibook.io.temp_path)
    assert (half / "model.safetensors").is_file()
    assert not (ckpts / "step_00000004").exists()
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    loaded = load_model(out)  # what eval/generate would pick: the last complete checkpoint
    assert loaded.model.embed.weight.shape[0] == 384
    assert_same_weights(ckpts / "step_00000002", straight / "checkpoints" / "step_00000002")

    # What a kill inside the run directory's other atomic writes leaves (the resolved config, the tokenizer copy).
    (out / ".config.resolved.json.tmp-999999-0badc0de").write_text("{")
    (out / ".tokenizer.json.tmp-999999-0badc0de").write_text("{")
    log = assert_resume_is_exact(cmd, out, straight, steps=6, from_step=2)
    assert f"unfinished checkpoint {half.name}" in log and "unfinished file .tokenizer.json.tmp-999999-0badc0de" in log
    assert not (out / ".tokenizer.json.tmp-999999-0badc0de").exists()


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
