"""phibook checkpoints: atomic save, round trip, run-dir resolution, and clear errors on bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from phibook.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    find_checkpoint,
    load_model,
    model_fingerprint,
    save_checkpoint,
)
from phibook.config import PhiConfig
from phibook.model import PhiModel


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_round_trip_same_logits(tiny_checkpoint: Path) -> None:
    loaded = load_model(tiny_checkpoint)
    assert loaded.source == "phibook"
    assert loaded.path == tiny_checkpoint
    assert not loaded.model.training
    assert loaded.tokenizer is not None and loaded.tokenizer.vocab_size <= loaded.config.vocab_size
    # The fixture's model is deterministic: rebuild it and compare logits exactly.
    model = PhiModel(loaded.config)
    model.init_weights(torch.Generator().manual_seed(0))
    model.eval()
    ids = torch.tensor([loaded.tokenizer.encode("def fibonacci(n):\n    return n")])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), model(ids))
    assert loaded.model.rope_cos.dtype == torch.float32


def test_config_json_carries_format(tiny_checkpoint: Path) -> None:
    data = json.loads((tiny_checkpoint / CONFIG_FILE).read_text())
    assert data["format"] == "phibook" and "phibook_version" in data
    assert PhiConfig.from_dict(data).n_layer == 2


def test_bf16_load_keeps_rope_fp32(tiny_checkpoint: Path) -> None:
    loaded = load_model(tiny_checkpoint, dtype="bfloat16")
    assert loaded.model.embed.weight.dtype == torch.bfloat16
    assert loaded.model.rope_cos.dtype == torch.float32
    with torch.no_grad():
        out = loaded.model(torch.tensor([[1, 2, 3]]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_save_replaces_existing_dir_atomically(tmp_path: Path, tiny_checkpoint: Path) -> None:
    target = _copy(tiny_checkpoint, tmp_path / "ckpt")
    (target / "stale.txt").write_text("old")
    cfg = PhiConfig(n_layer=1, d_model=64, n_head=1, vocab_size=64, max_seq_len=32)
    model = PhiModel(cfg)
    model.init_weights(torch.Generator().manual_seed(1))
    save_checkpoint(target, model)
    assert sorted(os.listdir(target)) == [CONFIG_FILE, MODEL_FILE]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no tmp-/old- leftovers
    assert load_model(target).config.n_layer == 1


def test_crash_during_save_leaves_old_checkpoint(tmp_path: Path, tiny_checkpoint: Path) -> None:
    target = _copy(tiny_checkpoint, tmp_path / "ckpt")
    before = model_fingerprint(target)

    class Exploding(PhiModel):
        def state_dict(self, *args, **kwargs):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(target, Exploding(PhiConfig(n_layer=1, d_model=64, n_head=1, vocab_size=64)))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert model_fingerprint(target) == before


def test_run_dir_picks_latest_step(tmp_path: Path, tiny_checkpoint: Path) -> None:
    ckpts = tmp_path / "run" / "checkpoints"
    for step in (100, 2000, 300):
        _copy(tiny_checkpoint, ckpts / f"step_{step:08d}")
    # Half-written or unrelated dirs are ignored.
    (ckpts / "step_00009999.tmp-123").mkdir()
    (ckpts / "step_00005000").mkdir()
    assert find_checkpoint(tmp_path / "run") == ckpts / "step_00002000"
    assert find_checkpoint(ckpts) == ckpts / "step_00002000"
    assert load_model(tmp_path / "run").path == ckpts / "step_00002000"


def test_fingerprint_changes_with_weights_and_config(tmp_path: Path, tiny_checkpoint: Path) -> None:
    assert model_fingerprint(tiny_checkpoint) == load_model(tiny_checkpoint).fingerprint
    same = _copy(tiny_checkpoint, tmp_path / "same")
    assert model_fingerprint(same) == model_fingerprint(tiny_checkpoint)
    # A later training step: same config, names and shapes, different values.
    model = load_model(tiny_checkpoint).model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3)
    save_checkpoint(tmp_path / "stepped", model)
    assert model_fingerprint(tmp_path / "stepped") != model_fingerprint(tiny_checkpoint)
    cfg_changed = _copy(tiny_checkpoint, tmp_path / "cfg")
    data = json.loads((cfg_changed / CONFIG_FILE).read_text())
    data["rope_base"] = 500.0
    (cfg_changed / CONFIG_FILE).write_text(json.dumps(data))
    assert model_fingerprint(cfg_changed) != model_fingerprint(tiny_checkpoint)
