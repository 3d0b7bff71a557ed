"""The trainer: config precedence and the recipe defaults, learning on a real corpus,
run-directory outputs, and clear errors for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

try:  # tests/ may or may not be a package (tests/__init__.py)
    from tests.train_helpers import TINY_MODEL, make_shards, metrics, run, train_cmd
except ImportError:
    from train_helpers import TINY_MODEL, make_shards, metrics, run, train_cmd

from phibook.cli import main
from phibook.errors import PhibookError
from phibook.train.config import TrainConfig, lr_at, model_config, param_groups, resolve_config


@pytest.fixture(scope="module")
def data(shared_dir: Path, tmp_path_factory) -> Path:
    return make_shards(shared_dir, tmp_path_factory.mktemp("data"))


# --------------------------------------------------------------------------- config


def test_defaults_are_the_reports_recipe() -> None:
    cfg = TrainConfig()
    assert (cfg.beta1, cfg.beta2, cfg.eps) == (0.9, 0.98, 1e-7)
    assert (cfg.lr, cfg.lr_schedule, cfg.warmup_steps, cfg.weight_decay) == (2e-4, "constant", 0, 0.1)
    assert cfg.global_batch == 2048 and cfg.preset == "phi-1.5"
    assert cfg.distributed == "fsdp"  # ZeRO-2 equivalent, as in the report
    assert all(lr_at(cfg, s) == 2e-4 for s in (0, 1, 1000, 35_000))


def test_precedence_defaults_preset_file_set(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "phi-mini"\nlr = 1e-3\nmicro_batch = 4\n[model]\nn_layer = 3\n')
    cfg = resolve_config(config_file=toml, sets={"lr": "5e-4", "model.d_model": "256", "compile": "true"})
    assert cfg.preset == "phi-mini" and cfg.micro_batch == 4 and cfg.compile is True
    assert cfg.lr == 5e-4  # --set beats the file
    assert cfg.model == {"n_layer": 3, "d_model": 256}
    assert resolve_config(preset="phi-tiny", config_file=toml).preset == "phi-tiny"  # --preset beats the file
    mcfg = model_config(cfg, data_vocab=1000, log=lambda m: None)
    assert (mcfg.n_layer, mcfg.d_model, mcfg.n_head) == (3, 256, 8)  # preset fills what is not overridden


@pytest.mark.parametrize(
    "sets, needle",
    [
        ({"lrr": "1"}, "unknown training option 'lrr'"),
        ({"model.layers": "2"}, "unknown model field model.layers"),
        ({"micro_batch": "four"}, "micro_batch='four' is not a valid int"),
        ({"precision": "fp8"}, "precision='fp8'; choose one of"),
        ({"preset": "phi-9"}, "unknown preset 'phi-9'"),
    ],
)
def test_bad_options_are_named(sets: dict, needle: str) -> None:
    with pytest.raises(PhibookError, match=needle.replace("(", r"\(")):
        resolve_config(sets=sets)


def test_vocab_auto_and_too_small() -> None:
    quiet = lambda m: None
    assert model_config(TrainConfig(), 50295, quiet).vocab_size == 51200  # phi-1.5 keeps the report's rows
    assert model_config(TrainConfig(preset="phi-tiny"), 384, quiet).vocab_size == 384
    assert model_config(TrainConfig(preset="phi-tiny"), 385, quiet).vocab_size == 448
    with pytest.raises(PhibookError, match="model.vocab_size=256 is smaller than the data tokenizer's vocabulary of 384"):
        model_config(TrainConfig(preset="phi-tiny", model={"vocab_size": 256}), 384, quiet)


def test_weight_decay_groups_and_schedule() -> None:
    from phibook.model.config import PhiConfig
    from phibook.model.model import PhiModel

    model = PhiModel(PhiConfig(n_layer=2, d_model=64, n_head=2, rotary_dim=16, vocab_size=128, max_seq_len=32))
    decay, no_decay = param_groups(model, TrainConfig())
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "embed.weight" in no_decay["names"] and "lm_head.weight" in decay["names"]
    assert all(n.endswith("bias") or ".ln" in n or n.startswith("ln_f") or n == "embed.weight" for n in no_decay["names"])
    assert "embed.weight" in param_groups(model, TrainConfig(decay_embedding=True))[0]["names"]
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, lr_schedule="cosine", max_steps=110)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 60) == pytest.approx(0.55) and lr_at(cfg, 110) == pytest.approx(0.1)


def test_help_lists_every_option_with_default(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--preset", "--config", "--data", "--out", "--max-steps", "--resume", "--set"):
        assert flag in text
    for f in TrainConfig.__dataclass_fields__.values():
        default = f.default if f.default_factory is None or not callable(f.default_factory) else f.default_factory()
        assert f"  {f.name} = {default!r}" in text, f.name


# --------------------------------------------------------------------------- learning


def unigram_entropy(manifest_dir: Path) -> float:
    """Entropy (nats/token) of the training tokens' unigram distribution: the loss of the
    best model that ignores context."""
    manifest = json.loads((manifest_dir / "manifest.json").read_text())
    tokens = np.concatenate(
        [np.fromfile(manifest_dir / s["file"], dtype="<u2") for s in manifest["shards"] if s["split"] == "train"]
    )
    p = np.bincount(tokens) / len(tokens)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_tiny_model_learns_below_unigram_entropy(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = run(
        train_cmd(
            data, out,
            "global_batch=16", "micro_batch=16", "lr=3e-3", "warmup_steps=20", "eval_every=100",
            "eval_sequences=32", "save_every=150", "tensorboard=true", "log_every=50",
            steps=300,
        )
    )
    assert res.returncode == 0, res.stderr
    bound = unigram_entropy(data)
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 301))
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "mfu", "elapsed", "tokens"} <= rows[0].keys()
    evals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(evals) == 3
    # Well below what any context-free model can reach on this corpus.
    assert evals[-1] < 0.75 * bound, (evals, bound)
    assert rows[0]["loss"] > bound  # and it started above it (an untrained model)

    resolved = json.loads((out / "config.resolved.json").read_text())
    assert resolved["model"]["vocab_size"] == 384 and resolved["grad_accum"] == 1 and resolved["lr"] == 3e-3
    assert (out / "tokenizer.json").is_file()
    assert any((out / "tb").glob("events.out.tfevents.*"))

    from phibook.weights.checkpoint import load_model

    loaded = load_model(out)  # the newest checkpoint, with its tokenizer
    assert loaded.model.config.n_layer == 2 and loaded.tokenizer is not None


# --------------------------------------------------------------------------- errors


def cli(args: list[str]) -> int:
    # args come last so that their --set values win over the tiny defaults.
    return main(["train", "--preset", "phi-tiny", "--set", *TINY_MODEL, "tensorboard=false", "seq_len=32", *args])


def test_global_batch_not_divisible_names_all_three(data: Path, tmp_path: Path, capsys) -> None:
    rc = cli(["--data", str(data), "--out", str(tmp_path / "r"), "--max-steps", "1", "--set", "global_batch=10", "micro_batch=4"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "global_batch=10 is not divisible by micro_batch=4 x world_size=1" in err


def test_resume_with_another_tokenizer_or_model(data: Path, tmp_path: Path, shared_dir: Path, capsys) -> None:
    out = tmp_path / "run"
    assert cli(["--data", str(data), "--out", str(out), "--max-steps", "1", "--set", "global_batch=4", "micro_batch=4"]) == 0
    other = make_shards(shared_dir, tmp_path / "other", vocab_size=320)
    capsys.readouterr()
    rc = cli(["--data", str(other), "--out", str(out), "--max-steps", "2", "--resume", "--set", "global_batch=4", "micro_batch=4"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "another tokenizer" in err and "step_00000001" in err
    # A model config that no longer matches the checkpoint is named too.
    rc = cli(["--data", str(data), "--out", str(out), "--max-steps", "2", "--resume", "--set", "global_batch=4",
              "micro_batch=4", "model.n_layer=3"])
    err = capsys.readouterr().err
    assert rc == 2 and "has no tensor blocks.2.ln.weight" in err


def test_model_vocab_smaller_than_tokenizer(data: Path, tmp_path: Path, capsys) -> None:
    rc = cli(["--data", str(data), "--out", str(tmp_path / "r"), "--set", "model.vocab_size=256"])
    assert rc == 2 and "smaller than the data tokenizer's vocabulary of 384" in capsys.readouterr().err


def test_missing_and_truncated_shard(data: Path, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "shards"
    shutil.copytree(data, broken)
    (broken / "train-00002.bin").unlink()
    assert cli(["--data", str(broken), "--out", str(tmp_path / "a"), "--max-steps", "1"]) == 2
    assert "train-00002.bin" in capsys.readouterr().err
    shutil.copy(data / "train-00002.bin", broken / "train-00002.bin")
    with open(broken / "train-00003.bin", "r+b") as f:
        f.truncate(100)
    assert cli(["--data", str(broken), "--out", str(tmp_path / "b"), "--max-steps", "1"]) == 2
    assert "train-00003.bin" in capsys.readouterr().err


def test_empty_mixture(tmp_path: Path, capsys) -> None:
    mix = tmp_path / "mix.toml"
    mix.write_text('name = "nothing"\n')
    assert cli(["--data", str(mix), "--out", str(tmp_path / "r")]) == 2
    assert "mixture is empty" in capsys.readouterr().err


def test_nonfinite_loss_stops_at_that_step_and_keeps_last_checkpoint(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # lr=1e30 turns the weights to inf after the first update: step 2's loss is not finite.
    res = run(train_cmd(data, out, "global_batch=8", "micro_batch=4", "seq_len=32", "save_every=1", "lr=1e30", steps=5))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "loss is nan at step 2" in res.stderr or "loss is inf at step 2" in res.stderr
    assert "step_00000001" in res.stderr
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["latest", "step_00000001"]
    assert [m["step"] for m in metrics(out)] == [1]

    from phibook.weights.checkpoint import load_model

    assert load_model(out).model.embed.weight.isfinite().all()
