"""Loading a model for inference: the dtype the CPU really supports, and optional quantization.

``choose_dtype("auto", device)`` reads the CPU's features (phibook.cpu_features, the same
flags the trainer uses; never a timing): bf16 only where AVX512-BF16 or AMX run it natively,
else fp32. A bf16 model asked for there decodes faster than fp32 (phibook's kernels widen its
weights as they read them: half the bytes; docs/performance.md), but ``auto`` never rounds a
model's weights for speed. ``load_inference_model`` is what
``Generator.from_path``, ``phibook eval --quant`` and the server use: load, choose the dtype,
quantize (or read the saved quantized weights), and say once on stderr what was chosen.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from phibook.errors import PhibookError

DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
               "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def choose_dtype(requested: str | torch.dtype | None, device: str | torch.device = "cpu",
                 cpuinfo: str | None = None) -> tuple[torch.dtype, str]:
    """(dtype, why) for ``requested`` ("auto", a name, a torch.dtype or None = fp32)."""
    if requested is None:
        return torch.float32, "requested"
    if isinstance(requested, torch.dtype):
        return requested, "requested"
    if requested != "auto":
        if requested not in DTYPE_NAMES:
            raise PhibookError(f"unknown dtype {requested!r}; use auto, {', '.join(DTYPE_NAMES)}")
        return DTYPE_NAMES[requested], "requested"
    if torch.device(device).type == "cuda":
        return torch.bfloat16, "a CUDA device"
    from phibook.cpu_features import precision_choice

    choice, why = precision_choice(cpuinfo)
    return DTYPE_NAMES[choice], why.replace("this CPU has no AVX512-BF16/AMX, so bf16 would be emulated",
                                           "no AVX512-BF16/AMX on this CPU")


def describe_choice(dtype: torch.dtype, why: str, quant: str | None) -> str:
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    line = f"dtype: {name} ({why})"
    if quant == "w8a8":
        line += "; linear weights and LM head w8a8 (int8 weights; activations rounded to int8 per call)"
    elif quant:
        head = "" if quant == "int8" else ", LM head int8"
        line += f"; linear weights {quant}{head} (the int kernels take bf16 activations)"
    return line


def load_inference_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = "auto",
    quant: str | None = None,
    save_quant: bool = True,
    log: Callable[[str], None] | None = stderr_log,
):
    """A LoadedModel (phibook.weights.checkpoint) ready for inference, quantized when asked.

    quant: None | "int8" | "w8a8" | "int4" | "int4-g128". The quantized weights come from
    ``quant-<mode>.safetensors`` beside the checkpoint when it matches the checkpoint
    (fingerprint and time); otherwise the model is quantized now and, with ``save_quant``,
    the result is written there (atomically) for the next load. ``loaded.load_seconds`` is
    the wall time of all of it.
    """
    from phibook.inference.quant import load_quantized, parse_mode
    from phibook.weights.checkpoint import load_model

    t0 = time.perf_counter()
    parse_mode(quant)  # a bad value fails before the (slow) load
    if quant and torch.device(device).type != "cpu":
        raise PhibookError(f"--quant {quant} runs on the CPU only (its kernels are CPU kernels); got --device {device}")
    torch_dtype, why = choose_dtype(dtype, device)
    loaded = load_model(path, device=device, dtype=torch_dtype)
    if log is not None and (dtype == "auto" or quant):
        log(describe_choice(torch_dtype, why, quant))
    if quant:
        load_quantized(loaded, quant, save=save_quant, log=log or (lambda _m: None))
    loaded.load_seconds = time.perf_counter() - t0
    return loaded
