"""Pretraining: the training loop (the configuration is phibook.train.config).

One function, ``train``, runs the same way under ``python``/``phibook train``
(one process) and under ``torchrun`` (DDP or FSDP2 across processes and
nodes). The global batch is given in sequences and split as

    global_batch = micro_batch x grad_accum x world_size

so changing the number of processes changes only ``grad_accum``, not the
optimisation: every process reads its contiguous slice of the same global
batch (``PackedLoader.next_batch``).

``build_model`` (the model at step 0) and ``validation_loss`` (the mean loss over the
fixed validation windows) are public: the demo scores its step-0 model with them.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from phibook import faults, io
from phibook.data.loader import PackedLoader, has_validation, validation_batches
from phibook.data.mixture import load_data
from phibook.errors import PhibookError
from phibook.model.config import PhiConfig
from phibook.model.model import PhiModel
from phibook.model.tokenizer import Tokenizer
from phibook.train.config import (
    METRICS_FILE,
    RESOLVED_CONFIG,
    TOKENIZER_FILE,
    TrainConfig,
    lr_at,
    model_config,
    param_groups,
)
from phibook.train.cpu_malloc import keep_freed_memory
from phibook.train.parallel import (
    all_reduce_mean,
    barrier,
    broadcast_object,
    destroy_distributed,
    gather_objects,
    init_distributed,
    parallelize,
    set_grad_sync,
    unwrap,
)
from phibook.train.peak import busy_note, flops_per_token, peak_info
from phibook.train.rundir import find_tokenizer_file, finite_or_none, prepare_run_dir, rewrite_metrics
from phibook.train.state import (
    CHECKPOINTS,
    latest_checkpoint,
    load_checkpoint,
    read_train_state,
    remove_stale_tmp,
    save_checkpoint,
)
from phibook.weights.checkpoint import write_model_files

# --------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, data: str | Path, out: str | Path, resume: bool = False) -> int:
    """Train per ``cfg`` on ``data`` into the run directory ``out``; returns the exit code."""

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

            tqdm.write(f"phibook train: {msg}", file=sys.stderr)

    # -- setup ----------------------------------------------------------------

    def setup(self) -> None:


        cfg, info = self.cfg, self.info
        prepare_run_dir(self.out, self.resume)
        if cfg.cpu_keep_memory and info.device.type == "cpu":

            keep_freed_memory()
        world = info.world_size
        if cfg.global_batch % (cfg.micro_batch * world):
            raise PhibookError(
                f"global_batch={cfg.global_batch} is not divisible by micro_batch={cfg.micro_batch} x "
                f"world_size={world} = {cfg.micro_batch * world}; pick a global_batch that is a multiple "
                "of it (or another micro_batch)"
            )
        self.accum = cfg.global_batch // (cfg.micro_batch * world)


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
        model = build_model(mcfg, cfg.seed, info.device)
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

            for p in remove_stale_tmp(self.out):
                what = "checkpoint" if p.parent.name == CHECKPOINTS else "file"
                self.log(f"removed the unfinished {what} {p.name} left by a killed run")
            io.write_json(self.out / RESOLVED_CONFIG, self.resolved(), sort_keys=True)
            if self.tokenizer_src is not None and self.tokenizer_src != self.out / TOKENIZER_FILE:
                io.copy_file(self.tokenizer_src, self.out / TOKENIZER_FILE)
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

        fp = Tokenizer.from_file(src).fingerprint
        if fp != self.loader.tokenizer_fingerprint:
            raise PhibookError(
                f"tokenizer {src} has fingerprint {fp}, but the shards in {self.data} were made with "
                f"{self.loader.tokenizer_fingerprint}"
            )
        return src

    def _optimizer(self):


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

        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.amp_dtype)

    def train_step(self, step: int) -> tuple[float, float]:
        """Forward/backward over the accumulation micro-batches, then the optimizer step.
        Returns (global mean loss, gradient norm before clipping)."""


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

        info = self.info
        batch = self.cfg.micro_batch * info.world_size
        batches = list(
            validation_batches(
                self.mixture, self.seq_len, self.cfg.eval_sequences, batch, info.rank, info.world_size
            )
        )
        # FSDP forwards are collectives: every rank must run the same number of them.
        n = max(gather_objects(len(batches), info))
        self.model.eval()
        total = loss_sums(self.model, batches, info.device, self.autocast, self.fused_loss, steps=n)
        self.model.train()
        if info.distributed:

            dist.all_reduce(total)
        return float(total[0] / total[1])

    # -- checkpoints ----------------------------------------------------------

    def save(self, step: int, elapsed: float) -> None:

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

        with torch.device("meta"):
            model = PhiModel(self.mcfg)
        model.load_state_dict(state_dict, assign=True)
        tokenizer = None
        if self.tokenizer_src is not None:

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
                    # The peak is an upper bound by construction (phibook.train.peak); above it, the clock or
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
                    "grad_norm": finite_or_none(grad_norm),
                    "mfu": mfu,
                    "tokens": self.tokens,
                    "elapsed": self.elapsed0 + time.perf_counter() - start,
                }
                last = step == cfg.max_steps
                save_due = bool(cfg.save_every_s) and record["elapsed"] - last_save >= cfg.save_every_s
                if cfg.time_budget_s or cfg.save_every_s:
                    stop = self._budget_spent(record["elapsed"], step)
                    if info.distributed:  # every rank must stop and save at the same step: rank 0's clock decides

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


def build_model(mcfg: PhiConfig, seed: int, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The model at step 0: built on the meta device (no memory touched twice), then
    materialized on ``device`` and initialized from ``seed`` (the same on every rank)."""

    with torch.device("meta"):
        model = PhiModel(mcfg)
    device = torch.device(device)
    model.to_empty(device=device)
    model.init_weights(generator=torch.Generator(device=device).manual_seed(seed))
    return model


def loss_sums(model, batches: list, device: torch.device, autocast=contextlib.nullcontext,
              fused_loss: bool = False, steps: int | None = None) -> torch.Tensor:
    """[summed loss, token count] (float64) over ``batches`` of (x, y). ``steps`` > len(batches)
    runs the first batch again without counting it (FSDP ranks must run equal forwards)."""
    total = torch.zeros(2, device=device, dtype=torch.float64)
    with torch.no_grad():
        for i in range(len(batches) if steps is None else steps):
            real = i < len(batches)
            x, y = batches[i] if real else batches[0]
            x, y = x.to(device), y.to(device)
            with autocast():
                if fused_loss:
                    loss = model(x, targets=y) * y.numel()
                else:
                    logits = model(x)
                    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
            if real:
                total += torch.stack([loss.double(), torch.tensor(y.numel(), device=device).double()])
    return total


def validation_loss(model, data, seq_len: int, sequences: int, batch_size: int = 8) -> float | None:
    """Mean per-token loss of ``model`` over the trainer's fixed validation windows of ``data``
    (a manifest, mixture or shard directory) in one process; None without a validation split."""

    if not has_validation(data):
        return None
    total = loss_sums(model, list(validation_batches(data, seq_len, sequences, batch_size)), torch.device("cpu"))
    return float(total[0] / total[1]) if total[1] else None
