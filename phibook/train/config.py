"""The training configuration: ``TrainConfig`` (the report's recipe as defaults), how it is
resolved from a preset, a TOML file and ``--set`` overrides, and the pure functions of it
(the model's config, the learning-rate schedule, the AdamW groups).

Config precedence: TrainConfig defaults < model preset < config file (TOML) < Python
``values`` < ``--set key=value``. Model fields are set under ``model.`` (e.g. ``--set
model.n_layer=2``, or a ``[model]`` table in the TOML file).

This module imports neither torch nor numpy: ``phibook train --help`` and config checks
load it alone (the loop is phibook.train.trainer).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from phibook.errors import PhibookError
from phibook.model.config import PRESETS, PhiConfig, padded_vocab_size

METRICS_FILE = "metrics.jsonl"
RESOLVED_CONFIG = "config.resolved.json"
TOKENIZER_FILE = "tokenizer.json"


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None):
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every training option; ``phibook train --help`` prints this list with defaults."""

    preset: str = _f("phi-1.5", "model preset to build from scratch: " + ", ".join(PRESETS))
    model: dict = _f(
        {},
        "PhiConfig overrides on top of the preset (model.n_layer=2, model.vocab_size=auto|N, ...). "
        "vocab_size=auto: the preset's rows for phi-1.5 when the tokenizer fits (the report's 51,200), "
        "otherwise the data tokenizer's vocab padded to a multiple of 64",
    )
    max_steps: int = _f(36000, "optimizer steps to train for (report: 150B tokens / (2048 x 2048) ~ 35.8K)")
    global_batch: int = _f(2048, "sequences per optimizer step, across all processes (report: 2048)")
    micro_batch: int = _f(8, "sequences per forward/backward on one process; accumulation fills the rest")
    seq_len: int = _f(0, "tokens per sequence; 0 = min(2048, model.max_seq_len) (report: 2048)")
    lr: float = _f(2e-4, "peak learning rate (report: 2e-4, constant)")
    lr_schedule: str = _f("constant", "constant or cosine (decays to min_lr at max_steps)", ("constant", "cosine"))
    warmup_steps: int = _f(0, "linear warm-up steps from 0 to lr (report: none)")
    min_lr: float = _f(2e-5, "final learning rate of the cosine schedule")
    weight_decay: float = _f(0.1, "AdamW decoupled weight decay on matrices (not norms or biases)")
    decay_embedding: bool = _f(
        False,
        "also decay the token embedding; off by default: an embedding row only gets gradient when its "
        "token appears, so decay would shrink rare tokens' rows toward zero between updates",
    )
    beta1: float = _f(0.9, "AdamW beta1 (report: 0.9)")
    beta2: float = _f(0.98, "AdamW beta2 (report: 0.98)")
    eps: float = _f(1e-7, "AdamW epsilon (report: 1e-7)")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this; 0 = off")
    precision: str = _f(
        "auto",
        "fp32, bf16 or fp16 autocast (fp16 uses a dynamic loss scaler); auto = bf16 on CUDA with bf16, "
        "else fp32",
        ("auto", "fp32", "bf16", "fp16"),
    )
    activation_checkpointing: bool = _f(False, "recompute each block in backward to save activation memory")
    compile: bool = _f(False, "torch.compile each block")
    cpu_keep_memory: bool = _f(
        True,
        "on CPU (glibc): keep freed memory in the process instead of unmapping it, so the large "
        "per-step tensors reuse pages rather than page-faulting fresh ones every step (phibook/train/cpu_malloc.py)",
    )
    fused_adamw: bool = _f(
        True, "AdamW as one fused kernel per parameter group (CPU and CUDA); false = torch's default loop"
    )
    fused_loss: bool = _f(
        True,
        "compute the LM head and cross entropy together in chunks of rows, never holding the full "
        "(tokens x vocab) logits; false = F.cross_entropy on materialized fp32 logits (slower, more memory)",
    )
    distributed: str = _f(
        "fsdp",
        "with several processes: ddp, fsdp (FSDP2, ZeRO-2 equivalent: grads + optimizer state sharded) "
        "or fsdp-zero3 (parameters sharded too)",
        ("ddp", "fsdp", "fsdp-zero3"),
    )
    eval_every: int = _f(500, "validation loss every N steps and at the last step; 0 = off")
    eval_sequences: int = _f(256, "held-out sequences per validation (the manifest's val split)")
    save_every: int = _f(1000, "checkpoint every N steps (and always at the last step); 0 = only at the end")
    keep_last: int = _f(3, "keep the newest K checkpoints; 0 = keep all")
    log_every: int = _f(10, "print a log line every N steps (metrics.jsonl gets every step)")
    tensorboard: bool = _f(True, "write TensorBoard events to RUN_DIR/tb")
    seed: int = _f(0, "seed for the init and the data order (runtime RNG is offset by rank)")
    device: str = _f("auto", "auto (cuda when present), cuda or cpu", ("auto", "cuda", "cpu"))
    peak_tflops: float = _f(
        0.0,
        "peak TFLOP/s of one device at the training precision, for MFU; 0 = a table for known GPUs, "
        "else on CPU the theoretical peak from its features: cores x FLOPs/cycle x max clock "
        "(phibook/train/peak.py)",
    )
    time_budget_s: float = _f(
        0.0,
        "stop at the first step where the training time (metrics' elapsed, continued across resumes) "
        "reaches this many seconds, with validation and a checkpoint there; max_steps stays the upper "
        "bound and the progress bar's total follows the measured rate; 0 = off",
    )
    min_steps: int = _f(0, "with time_budget_s: train at least this many steps, even past the budget")
    save_every_s: float = _f(
        0.0, "also checkpoint when this many seconds of training passed since the last checkpoint; 0 = off"
    )
    progress: bool = _f(True, "a tqdm progress bar on stderr (rank 0); false = log lines only")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _field_types(cls) -> dict[str, str]:
    return {f.name: str(f.type) for f in fields(cls)}


def _coerce(key: str, value: Any, typ: str, where: str) -> Any:
    """Turn a TOML value or a --set string into the field's type, naming the key on failure."""
    try:
        if typ == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in _TRUE:
                return True
            if str(value).lower() in _FALSE:
                return False
            raise ValueError("want true/false")
        if typ == "int":
            if isinstance(value, bool):
                raise ValueError("want an integer")
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("want an integer")
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if typ == "float":
            if isinstance(value, bool):
                raise ValueError("want a number")
            return float(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise PhibookError(f"{where}: {key}={value!r} is not a valid {typ} ({exc})") from None


def _model_value(key: str, value: Any, where: str) -> Any:
    types = _field_types(PhiConfig)
    if key not in types:
        raise PhibookError(f"{where}: unknown model field model.{key}; valid: {', '.join(types)}")
    if key == "vocab_size" and str(value).lower() == "auto":
        return "auto"
    return _coerce(f"model.{key}", value, types[key], where)


def _apply(values: dict[str, Any], cfg: dict[str, Any], where: str) -> None:
    types = _field_types(TrainConfig)
    for key, value in values.items():
        if key == "model" and isinstance(value, dict):
            for mk, mv in value.items():
                cfg["model"][mk] = _model_value(mk, mv, where)
        elif key.startswith("model."):
            mk = key.split(".", 1)[1]
            cfg["model"][mk] = _model_value(mk, value, where)
        elif key in types and key != "model":
            cfg[key] = _coerce(key, value, types[key], where)
        else:
            raise PhibookError(
                f"{where}: unknown training option {key!r}; valid: {', '.join(types)} "
                "(model fields as model.NAME)"
            )


def parse_sets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PhibookError(f"--set {item!r}: want key=value")
        out[key.strip()] = value.strip()
    return out


def resolve_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    sets: dict[str, str] | None = None,
    values: dict[str, Any] | None = None,
) -> TrainConfig:
    """Defaults < preset < config file < ``values`` < --set. --preset beats a ``preset`` key in the file.

    ``values`` are typed settings from Python callers (the demo), checked and coerced exactly
    as the file's and --set's are, so no caller turns values back into strings.
    """
    cfg = asdict(TrainConfig())
    file_values: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        try:
            file_values = tomllib.loads(path.read_text())
        except OSError as exc:
            raise PhibookError(f"cannot read config file {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise PhibookError(f"{path}: not valid TOML: {exc}") from exc
        _apply(file_values, cfg, str(path))
    if values:
        _apply(values, cfg, "settings")
    if sets:
        _apply(sets, cfg, "--set")
    if preset:
        cfg["preset"] = preset
    config = TrainConfig(**cfg)
    check_config(config)
    return config


def check_config(cfg: TrainConfig) -> None:
    for f in fields(TrainConfig):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise PhibookError(f"{f.name}={getattr(cfg, f.name)!r}; choose one of {', '.join(choices)}")
    if cfg.preset not in PRESETS:
        raise PhibookError(f"unknown preset {cfg.preset!r}; valid presets: {', '.join(PRESETS)}")
    for name in ("max_steps", "global_batch", "micro_batch"):
        if getattr(cfg, name) < 1:
            raise PhibookError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("seq_len", "warmup_steps", "eval_every", "eval_sequences", "save_every", "keep_last",
                 "min_steps", "time_budget_s", "save_every_s"):
        if getattr(cfg, name) < 0:
            raise PhibookError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.lr <= 0 or cfg.grad_clip < 0 or cfg.weight_decay < 0:
        raise PhibookError("lr must be > 0, grad_clip and weight_decay >= 0")


def config_help() -> str:
    """The option list for --help: key, default, meaning."""
    lines = ["training options (set with --set KEY=VALUE or in the --config TOML file):"]
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else f.default_factory()
        lines.append(f"  {f.name} = {default!r}")
        lines.append(f"      {f.metadata['help']}")
    lines.append("model fields (--set model.NAME=VALUE or a [model] table): " + ", ".join(_field_types(PhiConfig)))
    return "\n".join(lines)


# --------------------------------------------------------------------------- model config and schedule


def model_config(cfg: TrainConfig, data_vocab: int, log=print) -> PhiConfig:
    """The preset plus model overrides, with vocab_size resolved against the data's tokenizer."""
    overrides = dict(cfg.model)
    preset = PRESETS[cfg.preset]
    vocab = overrides.pop("vocab_size", "auto")
    if vocab == "auto":
        if cfg.preset == "phi-1.5" and preset["vocab_size"] >= data_vocab:
            vocab = preset["vocab_size"]
        else:
            vocab = padded_vocab_size(data_vocab)
            if vocab != preset["vocab_size"]:
                log(
                    f"vocab_size=auto: {vocab} embedding rows for the data's {data_vocab}-token tokenizer "
                    f"(preset {cfg.preset} has {preset['vocab_size']})"
                )
    elif vocab < data_vocab:
        raise PhibookError(
            f"model.vocab_size={vocab} is smaller than the data tokenizer's vocabulary of {data_vocab}: "
            "token ids would index past the embedding (use model.vocab_size=auto)"
        )
    return PhiConfig.from_name(cfg.preset, **overrides, vocab_size=int(vocab))


def param_groups(model, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: matrices decay; LayerNorm weights and biases (1-D) never do, and the
    token embedding only with decay_embedding. Each group lists its parameter names."""
    groups = {True: {"params": [], "names": [], "weight_decay": cfg.weight_decay},
              False: {"params": [], "names": [], "weight_decay": 0.0}}
    for name, p in model.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "")
        decay = p.dim() >= 2 and (cfg.decay_embedding or name != "embed.weight")
        groups[decay]["params"].append(p)
        groups[decay]["names"].append(name)
    return [groups[True], groups[False]]


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): warm-up, then constant or cosine."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
