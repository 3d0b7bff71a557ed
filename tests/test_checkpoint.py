"""phibook checkpoints: atomic save, round trip, run-dir resolution, and clear errors on bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phibook.errors import PhibookError
from phibook.model.config import PhiConfig
from phibook.model.model import PhiModel
from phibook.weights.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    find_checkpoint,
    load_model,
    model_fingerprint,
    save_checkpoint,
)


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


# --------------------------------------------------------------------------- bad input
# Each case builds a broken directory from the tiny checkpoint and names the words the
# error must contain (the file/tensor at fault), checked through load_model and the CLI.


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _rewrite_tensors(ckpt: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(ckpt / MODEL_FILE)
    edit(state)
    save_file(state, str(ckpt / MODEL_FILE), metadata={"format": "phibook"})


def _edit_config(ckpt: Path, **changes) -> None:
    data = json.loads((ckpt / CONFIG_FILE).read_text())
    data.update(changes)
    (ckpt / CONFIG_FILE).write_text(json.dumps(data))


def _not_a_checkpoint(d: Path) -> None:
    shutil.rmtree(d)
    d.mkdir()
    (d / "notes.txt").write_text("hello")


def _no_weights(d: Path) -> None:
    (d / MODEL_FILE).unlink()


def _truncated(d: Path) -> None:
    _truncate(d / MODEL_FILE)


def _garbage_header(d: Path) -> None:
    (d / MODEL_FILE).write_bytes(b"\xff" * 64)


def _shape_mismatch(d: Path) -> None:
    _edit_config(d, d_ff=256)


def _missing_tensor(d: Path) -> None:
    _rewrite_tensors(d, lambda s: s.pop("blocks.1.mlp.fc2.bias"))


def _unexpected_tensor(d: Path) -> None:
    _rewrite_tensors(d, lambda s: s.__setitem__("blocks.2.ln.weight", torch.ones(128)))


def _tokenizer_too_big(d: Path) -> None:
    _rewrite_tensors(d, lambda s: s.update({k: v[:256].clone() for k, v in s.items() if k in (
        "embed.weight", "lm_head.weight", "lm_head.bias")}))
    _edit_config(d, vocab_size=256)


def _unknown_model_type(d: Path) -> None:
    (d / CONFIG_FILE).write_text(json.dumps({"model_type": "llama", "hidden_size": 128}))


def _bad_config_json(d: Path) -> None:
    (d / CONFIG_FILE).write_text("{not json")


def _missing_shard(d: Path) -> None:
    index = {"weight_map": {"embed.weight": "model-00001-of-00002.safetensors",
                            "ln_f.weight": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    (d / MODEL_FILE).rename(d / "model-00001-of-00002.safetensors")


def _truncated_bin(d: Path) -> None:
    from safetensors.torch import load_file

    torch.save(load_file(d / MODEL_FILE), d / "pytorch_model.bin")
    (d / MODEL_FILE).unlink()
    _truncate(d / "pytorch_model.bin")


BAD_INPUTS = {
    "not-a-checkpoint": (_not_a_checkpoint, ["is not a checkpoint", "config.json", "notes.txt"]),
    "no-weights": (_no_weights, ["no weights file", "model.safetensors"]),
    "truncated-safetensors": (_truncated, ["truncated", MODEL_FILE]),
    "garbage-safetensors": (_garbage_header, ["not safetensors", MODEL_FILE]),
    "truncated-bin": (_truncated_bin, ["cannot read weights file", "pytorch_model.bin"]),
    "missing-shard": (_missing_shard, ["model-00002-of-00002.safetensors", "missing", "ln_f.weight"]),
    "shape-mismatch": (_shape_mismatch, ["blocks.0.mlp.fc1.weight", "[512, 128]", "[256, 128]"]),
    "missing-tensor": (_missing_tensor, ["missing", "blocks.1.mlp.fc2.bias"]),
    "unexpected-tensor": (_unexpected_tensor, ["unexpected", "blocks.2.ln.weight"]),
    "tokenizer-too-big": (_tokenizer_too_big, ["tokenizer.json", "512 tokens", "256"]),
    "unknown-model-type": (_unknown_model_type, ["unsupported model_type 'llama'"]),
    "bad-config-json": (_bad_config_json, ["cannot read model config", CONFIG_FILE]),
}


@pytest.fixture(params=sorted(BAD_INPUTS))
def bad_checkpoint(request, tiny_checkpoint: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    breaker, words = BAD_INPUTS[request.param]
    directory = _copy(tiny_checkpoint, tmp_path / "bad")
    breaker(directory)
    return directory, words


def test_load_model_names_the_fault(bad_checkpoint) -> None:
    directory, words = bad_checkpoint
    with pytest.raises(PhibookError) as info:
        load_model(directory)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


def test_export_cli_reports_bad_input_cleanly(bad_checkpoint, tmp_path: Path, capsys) -> None:
    from phibook.cli import main

    directory, words = bad_checkpoint
    out = tmp_path / "out"
    assert main(["export", str(directory), str(out)]) == 2
    err = capsys.readouterr().err
    assert "phibook export: error:" in err and "Traceback" not in err
    for word in words:
        assert word in err
    assert not out.exists()


def test_export_cli_subprocess_exit_code(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The real console entry point: exit status 2, one-line message, no traceback."""
    missing = tmp_path / "nowhere"
    proc = subprocess.run(
        [sys.executable, "-m", "phibook.cli", "export", str(missing), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert f"model path {missing} does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_export_refuses_to_overwrite_without_force(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    from phibook.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(["export", str(tiny_checkpoint), str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(tiny_checkpoint), str(out), "--force"]) == 2  # not a model dir
    assert (out / "precious.txt").read_text() == "keep me"
    assert main(["export", str(tiny_checkpoint), str(tmp_path / "hf")]) == 0
    assert main(["export", str(tiny_checkpoint), str(tmp_path / "hf"), "--force"]) == 0


def test_missing_path_mentions_interrupted_save(tmp_path: Path, tiny_checkpoint: Path) -> None:
    _copy(tiny_checkpoint, tmp_path / ".ckpt.tmp-4242-0badc0de")  # phibook.io.temp_path
    with pytest.raises(PhibookError, match="interrupted save"):
        load_model(tmp_path / "ckpt")


def test_hf_dir_errors_use_hf_tensor_names(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from phibook.weights.export import export_hf

    hf_dir = export_hf(tiny_checkpoint, tmp_path / "hf")
    data = json.loads((hf_dir / CONFIG_FILE).read_text())
    data["intermediate_size"] = 384
    (hf_dir / CONFIG_FILE).write_text(json.dumps(data))
    with pytest.raises(PhibookError, match=r"model\.layers\.0\.mlp\.fc1\.weight has shape \[512, 128\].*\[384, 128\]"):
        load_model(hf_dir)
    data["intermediate_size"] = 512
    data["num_hidden_layers"] = 3
    (hf_dir / CONFIG_FILE).write_text(json.dumps(data))
    with pytest.raises(PhibookError, match=r"missing: model\.layers\.2\."):
        load_model(hf_dir)
