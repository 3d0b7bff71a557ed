"""Training checkpoints: atomic step directories, keep-last-K, and exact resume.

Layout (DESIGN.md's checkpoint contract)::

    RUN_DIR/checkpoints/step_00001000/
        model.safetensors, config.json, tokenizer.json   (phibook.weights.checkpoint.write_model_files)
        optimizer.pt      full (unsharded) AdamW state, keyed by parameter name
        rng.pt            python / numpy / torch (cpu, cuda) RNG states, one entry per rank
        train_state.json  step, tokens, elapsed, data-loader cursor, loss scaler, config
    RUN_DIR/checkpoints/latest   "step_00001000" (informational; resume scans the directories)

A checkpoint is written into a temporary directory beside it
(``.step_XXXXXXXX.tmp-PID-RANDOM``, ``phibook.io.atomic_directory``) and renamed to
``step_XXXXXXXX`` only when every file is on disk, so a crash never leaves a
half checkpoint under the real name; ``train_state.json`` is the last file
written, and a directory without it is never used. Resume picks the highest
complete step, so the ``latest`` file is a convenience for people and scripts.

Full (gathered) state dicts are saved even for FSDP, so a run can resume on a
different number of processes; the data stream does not depend on the world
size either. Every rank reads the checkpoint on resume, so RUN_DIR must sit on
storage that all nodes see.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from phibook import faults, io
from phibook.errors import PhibookError
from phibook.train.parallel import DistInfo, barrier, gather_objects

CHECKPOINTS = "checkpoints"
STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
MODEL_FILE = "model.safetensors"
LATEST_FILE = "latest"
STEP_DIR = re.compile(r"^step_(\d{8})$")
# Test hook (phibook.faults): "train.checkpoint_write@STEP", also spelled
# "kill_during_checkpoint@STEP", makes the process SIGKILL itself after the model
# and optimizer files of that checkpoint are written but before it is complete
# (no train_state.json, not renamed).
FAULT_ENV = faults.ENV


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every finished checkpoint under RUN_DIR/checkpoints, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / STATE_FILE).is_file() and (child / MODEL_FILE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def remove_stale_tmp(run_dir: Path) -> list[Path]:
    """Delete what a killed run's writers left half-written (rank 0 only): phibook.io's stale
    temporary files and directories in RUN_DIR/checkpoints and in RUN_DIR itself (the resolved
    config, the tokenizer copy, the metrics rewrite). Returns what was removed."""
    run_dir = Path(run_dir)
    return io.sweep(run_dir / CHECKPOINTS) + io.sweep(run_dir)


# --------------------------------------------------------------------------- RNG


def capture_rng(device: torch.device) -> dict[str, Any]:
    """Every generator a training step could draw from, as plain picklable values (no tensors,
    so the states of all ranks can be gathered with all_gather_object)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state().numpy().tobytes(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).numpy().tobytes()
    return state


def _bytes_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(_to_tuple(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(_bytes_tensor(state["cuda"]), device)


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list | tuple) else x


# --------------------------------------------------------------------------- save / load


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    export_model_fn,
    train_state: dict[str, Any],
    info: DistInfo,
    keep_last: int,
) -> Path | None:
    """Write RUN_DIR/checkpoints/step_XXXXXXXX atomically; every rank must call this (collectives).

    export_model_fn(state_dict, directory) writes model.safetensors, config.json
    and tokenizer.json from a full CPU state dict (rank 0 only).
    Returns the checkpoint path on rank 0, None elsewhere.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    # Gathers are collectives: all ranks take part, rank 0 receives full tensors.
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=opts)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    rng = gather_objects(capture_rng(info.device), info)
    final = None
    if info.is_main:
        root = Path(run_dir) / CHECKPOINTS
        root.mkdir(parents=True, exist_ok=True)
        final = root / step_dir_name(step)
        # The same step saved again (e.g. a rerun) replaces the old directory whole.
        with io.atomic_directory(final) as tmp:
            export_model_fn(model_sd, tmp)
            torch.save(optim_sd, tmp / OPTIMIZER_FILE)
            faults.point("train.checkpoint_write", step)
            torch.save({"world_size": info.world_size, "ranks": rng}, tmp / RNG_FILE)
            io.write_json(tmp / STATE_FILE, train_state, sort_keys=True)
        io.write_text(root / LATEST_FILE, final.name + "\n")
        prune_checkpoints(run_dir, keep_last)
    barrier(info)
    return final


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return
    for _, path in complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def read_train_state(ckpt: Path) -> dict[str, Any]:
    path = Path(ckpt) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PhibookError(f"cannot read training state {path}: {exc}") from exc


def load_checkpoint(
    ckpt: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    info: DistInfo,
) -> dict[str, Any]:
    """Load weights, optimizer state and this rank's RNG from ``ckpt`` into the (wrapped) model.

    Every rank reads the files; with FSDP each keeps its own shard of the full tensors.
    Returns the train_state.json dict.
    """
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    ckpt = Path(ckpt)
    state = read_train_state(ckpt)
    try:
        model_sd = load_file(ckpt / MODEL_FILE)
    except Exception as exc:
        raise PhibookError(f"cannot read weights {ckpt / MODEL_FILE}: {exc}") from exc
    _check_shapes(model, model_sd, ckpt)
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=opts)
    try:
        optim_sd = torch.load(ckpt / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        rng = torch.load(ckpt / RNG_FILE, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise PhibookError(f"cannot read optimizer/RNG state in {ckpt}: {exc}") from exc
    set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_sd, options=opts)
    ranks = rng.get("ranks", [])
    if info.rank < len(ranks):
        restore_rng(ranks[info.rank], info.device)
    return state


def _check_shapes(model: nn.Module, saved: dict[str, torch.Tensor], ckpt: Path) -> None:
    """Name the first tensor whose shape differs, instead of a long load_state_dict dump."""
    from phibook.train.parallel import unwrap

    expected = {k: tuple(shape) for k, shape in _full_shapes(unwrap(model)).items()}
    for name, shape in expected.items():
        if name not in saved:
            raise PhibookError(
                f"checkpoint {ckpt / MODEL_FILE} has no tensor {name} that the model being trained has "
                "(model config changed since the checkpoint?)"
            )
        if tuple(saved[name].shape) != shape:
            raise PhibookError(
                f"checkpoint {ckpt / MODEL_FILE}: tensor {name} has shape {tuple(saved[name].shape)}, "
                f"the model being trained expects {shape} (model config changed since the checkpoint?)"
            )


def _full_shapes(model: nn.Module) -> dict[str, torch.Size]:
    # DTensor parameters (FSDP2) report their global shape; checkpoint wrappers
    # add a prefix that their state_dict hook removes.
    return {
        name.replace("_checkpoint_wrapped_module.", ""): p.shape for name, p in model.named_parameters()
    }
