"""Pretraining: ``TrainConfig`` (the report's recipe as defaults) and the training loop.

One function, ``train``, runs the same way under ``python``/``phibook train``
(one process) and under ``torchrun`` (DDP or FSDP2 across processes and
nodes). The global batch is given in sequences and split as

    global_batch = micro_batch x grad_accum x world_size

so changing the number of processes changes only ``grad_accum``, not the
optimisation: every process reads its contiguous slice of the same global
batch (``PackedLoader.next_batch``).

Config precedence: TrainConfig defaults < model preset < config file (TOML)
< ``--set key=value``. Model fields are set under ``model.`` (e.g.
``--set model.n_layer=2``, or a ``[model]`` table in the TOML file).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from phibook import faults
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
        "(phibook/train/cpu_peak.py)",
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
) -> TrainConfig:
    """Defaults < preset < config file < --set. --preset beats a ``preset`` key in the file."""
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


# --------------------------------------------------------------------------- model config


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


def flops_per_token(mcfg: PhiConfig, seq_len: int) -> float:
    """Training FLOPs per token, PaLM's count: 6N for the weights' matmuls (forward + backward)
    plus 12 * n_layer * d_model * seq_len for attention scores and values. N leaves out the
    embedding table (a lookup, not a matmul) but keeps the LM head."""
    n = mcfg.num_params() - mcfg.vocab_size * mcfg.d_model
    return 6 * n + 12 * mcfg.n_layer * mcfg.d_model * seq_len


# Dense bf16/fp16 tensor-core peaks (TFLOP/s) by device name; fp32 runs count TF32 at half of it.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def peak_flops(cfg: TrainConfig, device, dtype) -> float:
    """Peak FLOP/s of one device, for MFU (see the peak_tflops option)."""
    return peak_info(cfg, device, dtype)[0]


def peak_info(cfg: TrainConfig, device, dtype) -> tuple[float, str]:
    """(peak FLOP/s of one device, where it comes from): ``peak_tflops``, the GPU table, else
    on CPU the theoretical peak from the CPU's features (never a timing: timed while other
    processes share the machine, it comes out too low and MFU reads above 100%)."""
    import torch

    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12, f"peak_tflops={cfg.peak_tflops:g}"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                half = dtype == torch.float32
                return tflops * 1e12 * (0.5 if half else 1.0), f"{key} table, {tflops:g} TFLOP/s" + (
                    " bf16, TF32 at half" if half else "")
        # An unknown GPU: a sustained matmul (a GPU is not shared the way a CPU is).
        return measure_matmul_flops(device, dtype), f"a matmul timed on {name}"
    from phibook.train.cpu_peak import cpu_peak

    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    peak = cpu_peak(names.get(dtype, "fp32"), cores=_cpu_cores())
    return peak.flops, peak.describe()


def _cpu_cores() -> int:
    import torch

    from phibook.train.cpu_peak import usable_cores

    return usable_cores(torch.get_num_threads())


def measure_matmul_flops(device, dtype, seconds: float = 1.0) -> float:
    """Sustained FLOP/s of a square matmul at ``dtype`` (the MFU denominator where no table applies)."""
    import torch

    n = 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    iters, start = 0, time.perf_counter()
    while True:
        a @ b
        iters += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if time.perf_counter() - start >= seconds / 4 and iters >= 3:
            break
    return 2 * n**3 * iters / (time.perf_counter() - start)


# --------------------------------------------------------------------------- run directory


def find_tokenizer_file(data: str | Path) -> Path | None:
    """The tokenizer.json that made the shards: the manifest's tokenizer path, or one beside a manifest."""
    from phibook.data.mixture import load_data

    mixture = load_data(data)
    for source in mixture.sources:
        manifest = source.manifest
        for key in ("path", "file", "tokenizer_path"):
            value = manifest.tokenizer.get(key)
            if value:
                p = Path(value)
                p = p if p.is_absolute() else manifest.directory / p
                if p.is_dir():
                    p = p / TOKENIZER_FILE
                if p.is_file():
                    return p
        beside = manifest.directory / TOKENIZER_FILE
        if beside.is_file():
            return beside
    return None


def prepare_run_dir(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PhibookError(f"--out {out} exists and is not a directory")
    if not resume and out.is_dir() and any(out.iterdir()):
        raise PhibookError(
            f"run directory {out} is not empty; pass --resume to continue it, or choose a new --out"
        )


def rewrite_metrics(path: Path, keep_through: int) -> None:
    """Drop metrics lines past the step we resume from (and any torn last line), atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and int(rec.get("step", 0)) <= keep_through:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    os.replace(tmp, path)


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


# --------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, data: str | Path, out: str | Path, resume: bool = False) -> int:
    """Train per ``cfg`` on ``data`` into the run directory ``out``; returns the exit code."""
    from phibook.train.parallel import destroy_distributed, init_distributed

    info = init_distributed(cfg.device)
    try:
        return _Trainer(cfg, str(data), Path(out), resume, info).run()
    finally:
        destroy_distributed()


class _Trainer:
    """Holds the run's state; ``run`` is the loop. Split into steps so each reads on its own."""

    def __init__(self, cfg: TrainConfig, data: str, out: Path, resume: bool, info) -> None:
        self.cfg, self.data, self.out, self.resume, self.info = cfg, data, out, resume, info

    def log(self, msg: str) -> None:
        if self.info.is_main:
            from tqdm import tqdm

            tqdm.write(f"phibook train: {msg}", file=sys.stderr)

    # -- setup ----------------------------------------------------------------

    def setup(self) -> None:
        import torch

        from phibook.data.loader import PackedLoader, has_validation
        from phibook.train.parallel import barrier, parallelize

        cfg, info = self.cfg, self.info
        prepare_run_dir(self.out, self.resume)
        if cfg.cpu_keep_memory and info.device.type == "cpu":
            from phibook.train.cpu_malloc import keep_freed_memory

            keep_freed_memory()
        world = info.world_size
        if cfg.global_batch % (cfg.micro_batch * world):
            raise PhibookError(
                f"global_batch={cfg.global_batch} is not divisible by micro_batch={cfg.micro_batch} x "
                f"world_size={world} = {cfg.micro_batch * world}; pick a global_batch that is a multiple "
                "of it (or another micro_batch)"
            )
        self.accum = cfg.global_batch // (cfg.micro_batch * world)

        from phibook.data.mixture import load_data

        mixture = load_data(self.data)
        mcfg = model_config(cfg, mixture.vocab_size, log=self.log)
        self.seq_len = cfg.seq_len or min(2048, mcfg.max_seq_len)
        if self.seq_len > mcfg.max_seq_len:
            raise PhibookError(
                f"seq_len={self.seq_len} is longer than the model's context model.max_seq_len={mcfg.max_seq_len}"
            )
        self.mcfg = mcfg
        self.loader = PackedLoader(mixture, self.seq_len, seed=cfg.seed)
        self.mixture = mixture
        self.has_val = cfg.eval_every > 0 and has_validation(mixture)
        if cfg.eval_every > 0 and not self.has_val:
            self.log(f"{self.data} has no validation split: validation loss is off")

        self.precision = cfg.precision
        if self.precision == "auto":
            bf16_ok = info.device.type == "cuda" and torch.cuda.is_bf16_supported()
            self.precision = "bf16" if bf16_ok else "fp32"
        self.amp_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        # fp16 keeps the plain loss: the fused loss stores unscaled logit gradients (probabilities
        # down to ~1e-5) in the compute dtype, where fp16 would flush the small ones to zero
        # before the GradScaler's scale reaches them.
        self.fused_loss = cfg.fused_loss and self.precision != "fp16"

        # Same init on every rank (same seed): DDP and FSDP need identical starting weights.
        with torch.device("meta"):
            model = _build_model(mcfg)
        model.to_empty(device=info.device)
        gen = torch.Generator(device=info.device).manual_seed(cfg.seed)
        model.init_weights(generator=gen)
        self.raw_model = model
        self.model = parallelize(
            model,
            info,
            activation_checkpointing=cfg.activation_checkpointing,
            compile=cfg.compile,
            distributed=cfg.distributed,
        )
        self.optimizer = self._optimizer()
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=self.precision == "fp16")
        # Runtime randomness (none in the phi recipe today: no dropout) differs per rank.
        torch.manual_seed(cfg.seed + info.rank)

        self.start_step, self.tokens, self.elapsed0 = 0, 0, 0.0
        self._maybe_resume()
        self.tokenizer_src = self._tokenizer_file()
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            from phibook.train.state import CHECKPOINTS, remove_stale_tmp, write_json_atomic

            for p in remove_stale_tmp(self.out, names=(f".{TOKENIZER_FILE}.tmp", f".{METRICS_FILE}.tmp")):
                what = "checkpoint" if p.parent.name == CHECKPOINTS else "file"
                self.log(f"removed the unfinished {what} {p.name} left by a killed run")
            write_json_atomic(self.out / RESOLVED_CONFIG, self.resolved())
            if self.tokenizer_src is not None and self.tokenizer_src != self.out / TOKENIZER_FILE:
                shutil.copyfile(self.tokenizer_src, self.out / f".{TOKENIZER_FILE}.tmp")
                os.replace(self.out / f".{TOKENIZER_FILE}.tmp", self.out / TOKENIZER_FILE)
            rewrite_metrics(self.out / METRICS_FILE, self.start_step)
        barrier(info)
        self.flops_token = flops_per_token(mcfg, self.seq_len)
        self.peak, self.peak_source = peak_info(cfg, info.device, self.amp_dtype)

    def _tokenizer_file(self) -> Path | None:
        src = find_tokenizer_file(self.data)
        if src is None and (self.out / TOKENIZER_FILE).is_file():
            src = self.out / TOKENIZER_FILE
        if src is None:
            self.log(
                "no tokenizer.json found beside the shards' manifest: checkpoints will hold weights "
                "and config only"
            )
            return None
        from phibook.model.tokenizer import Tokenizer

        fp = Tokenizer.from_file(src).fingerprint
        if fp != self.loader.tokenizer_fingerprint:
            raise PhibookError(
                f"tokenizer {src} has fingerprint {fp}, but the shards in {self.data} were made with "
                f"{self.loader.tokenizer_fingerprint}"
            )
        return src

    def _optimizer(self):
        import torch

        from phibook.train.parallel import unwrap

        groups = param_groups(unwrap(self.model), self.cfg)
        for g in groups:
            g.pop("names")
        # fused: one kernel per parameter group for the whole update (CPU and CUDA) instead of
        # ~10 elementwise passes per parameter; the same math, deterministic, DTensor-aware (FSDP2).
        return torch.optim.AdamW(
            groups, lr=self.cfg.lr, betas=(self.cfg.beta1, self.cfg.beta2), eps=self.cfg.eps,
            fused=self.cfg.fused_adamw and self.info.device.type in ("cpu", "cuda"),
        )

    def _maybe_resume(self) -> None:
        from phibook.train.state import latest_checkpoint, load_checkpoint, read_train_state

        if not self.resume:
            return
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            self.log(f"--resume: no complete checkpoint under {self.out}/checkpoints; starting from step 0")
            return
        state = read_train_state(ckpt)
        saved_fp = state.get("tokenizer_fingerprint")
        if saved_fp != self.loader.tokenizer_fingerprint:
            raise PhibookError(
                f"cannot resume: checkpoint {ckpt} was trained on data tokenized with fingerprint {saved_fp}, "
                f"but {self.data} was tokenized with {self.loader.tokenizer_fingerprint} (another tokenizer)"
            )
        old = state.get("config", {})
        for key in ("seed", "global_batch", "seq_len", "lr_schedule", "preset"):
            if key in old and old[key] != self.resolved()[key]:
                self.log(f"warning: {key} was {old[key]!r} in the checkpoint, now {self.resolved()[key]!r}")
        state = load_checkpoint(ckpt, self.model, self.optimizer, self.info)
        self.loader.load_state_dict(state["loader"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.start_step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.elapsed0 = float(state.get("elapsed", 0.0))
        self.log(f"resumed from {ckpt} at step {self.start_step}")

    def resolved(self) -> dict[str, Any]:
        return {
            **asdict(self.cfg),
            "precision": self.precision,
            "seq_len": self.seq_len,
            "model": self.mcfg.to_dict(),
            "data": str(self.data),
            "out": str(self.out),
            "world_size": self.info.world_size,
            "grad_accum": self.accum,
            "tokenizer_fingerprint": self.loader.tokenizer_fingerprint,
            "data_vocab_size": self.loader.vocab_size,
        }

    # -- one step -------------------------------------------------------------

    def autocast(self):
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.amp_dtype)

    def train_step(self, step: int) -> tuple[float, float]:
        """Forward/backward over the accumulation micro-batches, then the optimizer step.
        Returns (global mean loss, gradient norm before clipping)."""
        import torch
        import torch.nn.functional as F

        from phibook.train.parallel import all_reduce_mean, set_grad_sync

        cfg, info = self.cfg, self.info
        lr = lr_at(cfg, step - 1)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = self.loader.next_batch(cfg.global_batch, info.rank, info.world_size)
        x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
        loss_sum = torch.zeros((), device=info.device)
        m, fused = cfg.micro_batch, self.fused_loss
        for i in range(self.accum):
            set_grad_sync(self.model, i == self.accum - 1)
            xi, yi = x[i * m : (i + 1) * m], y[i * m : (i + 1) * m]
            with self.autocast():
                if fused:
                    loss = self.model(xi, targets=yi)
                else:
                    logits = self.model(xi)
            if not fused:
                loss = F.cross_entropy(logits.float().flatten(0, 1), yi.flatten())
            self.scaler.scale(loss / self.accum).backward()
            loss_sum += loss.detach()
        loss_val = float(all_reduce_mean(loss_sum / self.accum, info))
        if not math.isfinite(loss_val):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(step, loss_val)
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_val, float(norm)

    def evaluate(self) -> float:
        """Mean loss per token over the fixed validation sequences (same set every time)."""
        import torch
        import torch.nn.functional as F

        from phibook.data.loader import validation_batches
        from phibook.train.parallel import gather_objects

        info = self.info
        batch = self.cfg.micro_batch * info.world_size
        batches = list(
            validation_batches(
                self.mixture, self.seq_len, self.cfg.eval_sequences, batch, info.rank, info.world_size
            )
        )
        # FSDP forwards are collectives: every rank must run the same number of them.
        n = max(gather_objects(len(batches), info))
        total = torch.zeros(2, device=info.device, dtype=torch.float64)
        self.model.eval()
        with torch.no_grad():
            for i in range(n):
                real = i < len(batches)
                x, y = batches[i] if real else batches[0]
                x, y = x.to(info.device), y.to(info.device)
                with self.autocast():
                    if self.fused_loss:
                        loss = self.model(x, targets=y) * y.numel()
                    else:
                        logits = self.model(x)
                        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
                if real:
                    total += torch.stack([loss.double(), torch.tensor(y.numel(), device=info.device).double()])
        self.model.train()
        if info.distributed:
            import torch.distributed as dist

            dist.all_reduce(total)
        return float(total[0] / total[1])

    # -- checkpoints ----------------------------------------------------------

    def save(self, step: int, elapsed: float) -> None:
        from phibook.train.state import save_checkpoint

        state = {
            "step": step,
            "tokens": self.tokens,
            "elapsed": elapsed,
            "loader": self.loader.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "tokenizer_fingerprint": self.loader.tokenizer_fingerprint,
            "config": self.resolved(),
        }
        path = save_checkpoint(
            self.out, step, self.model, self.optimizer, self._export, state, self.info, self.cfg.keep_last
        )
        if path is not None:
            self.log(f"saved checkpoint {path}")

    def _export(self, state_dict: dict, directory: Path) -> None:
        """Write model.safetensors + config.json (+ tokenizer.json) from a full CPU state dict."""
        import torch

        from phibook.weights.checkpoint import write_model_files

        with torch.device("meta"):
            model = _build_model(self.mcfg)
        model.load_state_dict(state_dict, assign=True)
        tokenizer = None
        if self.tokenizer_src is not None:
            from phibook.model.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_file(self.tokenizer_src)
        write_model_files(directory, model, tokenizer=tokenizer)

    # -- the loop -------------------------------------------------------------

    def run(self) -> int:
        self.setup()
        cfg, info = self.cfg, self.info
        if self.start_step >= cfg.max_steps:
            self.log(f"already at step {self.start_step} >= max_steps={cfg.max_steps}; nothing to do")
            return 0
        if self._budget_spent(self.elapsed0, self.start_step):
            self.log(f"already at step {self.start_step} with {self.elapsed0:.0f} s of the time_budget_s="
                     f"{cfg.time_budget_s:g} spent; nothing to do")
            return 0
        writer = self._tensorboard()
        metrics = open(self.out / METRICS_FILE, "a") if info.is_main else None  # noqa: SIM115
        from tqdm import tqdm

        bar = tqdm(
            total=None if cfg.time_budget_s else cfg.max_steps,
            initial=self.start_step,
            disable=not (info.is_main and cfg.progress),
            dynamic_ncols=True,
            desc="train",
            unit="step",
            file=sys.stderr,
        )
        start = time.perf_counter()
        tokens_per_step = cfg.global_batch * self.seq_len
        self.log(
            f"model {self.mcfg.num_params() / 1e6:.1f}M params, {info.world_size} process(es) on "
            f"{info.device.type}, {self.precision}, global batch {cfg.global_batch} x {self.seq_len} tokens "
            f"= micro {cfg.micro_batch} x accum {self.accum} x world {info.world_size}"
        )
        self.log(f"MFU against a peak of {self.peak_source}")
        if cfg.time_budget_s:
            self.log(f"time budget: {cfg.time_budget_s:.0f} s of training ({self.elapsed0:.0f} s spent), "
                     f"at least {cfg.min_steps} and at most {cfg.max_steps} steps")
        pace = _Pace(self.start_step, self.elapsed0)
        last_save = self.elapsed0
        mfu_warned = overrun_warned = False
        target = cfg.max_steps
        try:
            for step in range(self.start_step + 1, cfg.max_steps + 1):
                t0 = time.perf_counter()
                try:
                    loss, grad_norm = self.train_step(step)
                except NonFiniteLoss as exc:
                    raise PhibookError(self._nonfinite_message(exc)) from None
                dt = time.perf_counter() - t0
                self.tokens += tokens_per_step
                tps = tokens_per_step / dt
                mfu = tps * self.flops_token / (self.peak * info.world_size)
                if mfu > 1.0:
                    # The peak is an upper bound by construction (cpu_peak.py); above it, the clock or
                    # the peak_tflops given is wrong. Say so once, and never report more than 100%.
                    if not mfu_warned:
                        self.log(f"warning: measured {100 * mfu:.0f}% of the peak ({self.peak_source}); the peak "
                                 "is too low (a clock reading under the real one?); MFU is clamped at 100%, "
                                 "set peak_tflops to correct it")
                        mfu_warned = True
                    mfu = 1.0
                record = {
                    "step": step,
                    "loss": loss,
                    "lr": lr_at(cfg, step - 1),
                    "tokens_per_s": tps,
                    "grad_norm": _finite_or_none(grad_norm),
                    "mfu": mfu,
                    "tokens": self.tokens,
                    "elapsed": self.elapsed0 + time.perf_counter() - start,
                }
                last = step == cfg.max_steps
                save_due = bool(cfg.save_every_s) and record["elapsed"] - last_save >= cfg.save_every_s
                if cfg.time_budget_s or cfg.save_every_s:
                    stop = self._budget_spent(record["elapsed"], step)
                    if info.distributed:  # every rank must stop and save at the same step: rank 0's clock decides
                        from phibook.train.parallel import broadcast_object

                        stop, save_due = broadcast_object((stop, save_due), info)
                    last = last or stop
                if cfg.time_budget_s:
                    pace.add(step, record["elapsed"])
                    target = pace.projected_end(step, record["elapsed"], cfg)
                    if target != bar.total:
                        bar.total = target
                        bar.refresh()
                    if target <= cfg.min_steps and not overrun_warned and pace.steps() >= 10:
                        need = (cfg.min_steps - step) * pace.seconds_per_step()
                        over = record["elapsed"] + need - cfg.time_budget_s
                        if over > 0:
                            from phibook.train.cpu_peak import busy_note

                            why = busy_note() or "this machine is too slow for the budget"
                            self.log(f"{why}: at {pace.seconds_per_step():.2f} s/step, min_steps={cfg.min_steps} "
                                     f"ends about {over:.0f} s past the time budget")
                            overrun_warned = True
                if self.has_val and (step % cfg.eval_every == 0 or last):
                    record["val_loss"] = self.evaluate()
                if metrics is not None:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                if writer is not None:
                    for key in ("loss", "lr", "tokens_per_s", "grad_norm", "mfu", "val_loss"):
                        if record.get(key) is not None:
                            writer.add_scalar(f"train/{key}", record[key], step)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}", mfu=f"{100 * mfu:.1f}%")
                bar.update(1)
                if cfg.log_every and (step % cfg.log_every == 0 or last):
                    val = f" val_loss {record['val_loss']:.4f}" if "val_loss" in record else ""
                    of = str(cfg.max_steps) if not cfg.time_budget_s else str(step) if last else f"~{target}"
                    self.log(
                        f"step {step}/{of} loss {loss:.4f}{val} lr {record['lr']:.3g} "
                        f"tok/s {tps:,.0f} mfu {100 * mfu:.1f}%"
                    )
                if last and cfg.time_budget_s and step < cfg.max_steps:
                    self.log(f"time budget spent: stopping at step {step} after {record['elapsed']:.0f} s "
                             f"of training (time_budget_s={cfg.time_budget_s:g})")
                if last or save_due or (cfg.save_every and step % cfg.save_every == 0):
                    self.save(step, record["elapsed"])
                    last_save = record["elapsed"]
                # Test hook: PHIBOOK_FAULT_INJECT=train.step_done@K kills the run here (tests/test_resume.py).
                faults.point("train.step_done", step)
                if last:
                    break
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
            if writer is not None:
                writer.close()
        return 0

    def _budget_spent(self, elapsed: float, step: int) -> bool:
        cfg = self.cfg
        return bool(cfg.time_budget_s) and elapsed >= cfg.time_budget_s and step >= cfg.min_steps

    def _nonfinite_message(self, exc: NonFiniteLoss) -> str:
        from phibook.train.state import latest_checkpoint

        last = latest_checkpoint(self.out)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been saved yet"
        return (
            f"loss is {exc.loss} at step {exc.step}: training stopped before applying that update "
            f"(nothing saved for it); {kept}. Lower lr (or check the data), then --resume from the last good checkpoint."
        )

    def _tensorboard(self):
        if not (self.cfg.tensorboard and self.info.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.log("tensorboard is not installed: no TensorBoard events (metrics.jsonl has everything)")
            return None
        # purge_step drops events a killed run wrote past the step we resume from.
        return SummaryWriter(str(self.out / "tb"), purge_step=self.start_step + 1)


class _Pace:
    """The recent rate of training (all of it: steps, validation, checkpoints), for re-planning
    how many steps fit the time budget: the last ``window`` steps, the first step of a process
    (allocator and thread warm-up) left out once there are others."""

    def __init__(self, step: int, elapsed: float, window: int = 50) -> None:
        from collections import deque

        self.points: deque[tuple[int, float]] = deque(maxlen=window + 1)
        self.first = (step, elapsed)

    def add(self, step: int, elapsed: float) -> None:
        self.points.append((step, elapsed))

    def steps(self) -> int:
        return self.points[-1][0] - self.points[0][0] if len(self.points) > 1 else 0

    def seconds_per_step(self) -> float:
        if len(self.points) > 1:
            (s0, e0), (s1, e1) = self.points[0], self.points[-1]
        else:
            (s0, e0), (s1, e1) = self.first, self.points[-1]
        return max(1e-9, (e1 - e0) / max(1, s1 - s0))

    def projected_end(self, step: int, elapsed: float, cfg: TrainConfig) -> int:
        """The step at which the budget runs out at the recent rate, within [min_steps, max_steps]."""
        more = max(0.0, cfg.time_budget_s - elapsed) / self.seconds_per_step()
        return int(min(cfg.max_steps, max(cfg.min_steps, step + math.ceil(more), step)))


class NonFiniteLoss(Exception):
    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"loss {loss} at step {step}")
        self.step, self.loss = step, loss


def _build_model(mcfg: PhiConfig):
    from phibook.model.model import PhiModel

    return PhiModel(mcfg)
