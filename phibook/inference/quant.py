"""Weight-only int8 / int4 quantization for CPU inference, as a module swap.

``quantize_(model, "int8" | "int4" | "int4-g128")`` replaces every ``nn.Linear`` of a
PhiModel (attention qkv/out, MLP fc1/fc2 and, by default, the LM head) with an
``Int8Linear`` or ``Int4Linear``. The model keeps its class and its forward, so every
caller (Generator, the eval runner, the server, FastForward) runs it unchanged.
The embedding, LayerNorms, attention and KV cache stay in the model's dtype.

Kernels: PyTorch's own, nothing extra to install (torchao 0.18 was measured: on the CPU
it routes int4 to the same ``_weight_int4pack_mm_for_cpu`` and int8 to a dequantize +
matmul or an int32 matmul fallback, both slower; it ships no CPU kernels of its own).

* int8: symmetric, one scale per output channel, ``torch.ops.aten._weight_int8pack_mm``
  (W8A16: the activations stay bf16).
* w8a8: the same saved int8 weights, run as int8 x int8 with int32 accumulation (as llama.cpp's
  q8_0 does): activations are quantized at run time by fbgemm's dynamic linear
  (``torch.ops.quantized.linear_dynamic``; asymmetric uint8, one scale for all rows of a call),
  the weights repacked for it at load. The engine's options come from the CPU's flags
  (``w8a8_engine``): fbgemm on x86 with AVX2; without VNNI its u8 x s8 dot products go through
  saturating 16-bit sums, so activations keep 7 bits (``reduce_range``). One scale per call means
  a row's result depends a little on the rows beside it (a batch, a prompt's other tokens):
  ``int8`` keeps results independent of batching; ``w8a8`` trades that for speed.
* int4: asymmetric, one (scale, zero) per group of 32 (or 128) input channels
  (w = (q - 8) * scale + zero, q in 0..15), kept in phibook's own layout (two values a byte,
  input channel 2j in the low nibble of byte j, 2j+1 in the high one): that is what is saved,
  what ``dequantize`` reads and what ``cat_rows`` joins. The kernel's packed form
  (``_convert_weight_to_int4pack_for_cpu``, whose layout differs between AVX2 and AVX-512
  builds and is private to PyTorch) is derived from it at load, on the running CPU, and never
  read back; ``torch.ops.aten._weight_int4pack_mm_for_cpu`` runs on it.

Each kernel is used only after ``phibook.inference.kernels.kernel_ok`` has proven it right on
this CPU (a probe in a child process, cached per torch version and CPU); a refused kernel
falls back to dequantize + ``F.linear``. Every tensor handed to a kernel is contiguous in
storage of its own, 64-byte aligned (``kernels.aligned_owned``): weights read back from a
safetensors file can start 8 bytes off, which crashed the int8 kernel on AVX-512.

Both kernels are fed bf16 activations on every CPU: on an AVX2 machine (no AVX-512) their
fp32-activation path is scalar, 7-12x slower than the bf16 one (measured, 8192 x 2048
matvec: int8 27 ms fp32 vs 2.9 ms bf16; int4 38 vs 2.9 ms), while the bf16 path is
vectorized on AVX2 and AVX-512 alike. Scales and zeros are rounded to bf16-representable
values when quantizing, so the kernel's bf16 copy of them is exact and the dequantized
weight (``Int8Linear.dequantize``) is exactly what the kernel multiplies by.

Many rows at once (prefill, eval batches) are faster as dequantize-then-GEMM: the
weight-only kernels are matrix-vector kernels, about 2x slower than fp32 GEMM at 128-512
rows on this machine. ``DEQUANT_ROWS`` is the crossover used (by shape, never by a
timing): at that many rows or more a linear dequantizes its weight, 64 MiB of it at a time
into a reused buffer, and runs ``F.linear`` on each piece.

Saved form (``save_quantized``): ``quant-<mode>.safetensors`` beside the checkpoint, plus
``quant-<mode>.json`` with the mode, group size, the source checkpoint's fingerprint and
the torch version; ``load_quantized`` uses it when the fingerprint matches and
re-quantizes (saying why) otherwise.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phibook import io
from phibook.errors import PhibookError
from phibook.inference.kernels import (
    aligned_input,
    aligned_owned,
    kernel_ok,
    w8a8_engine,
    w8a8_linear,
    w8a8_pack,
)

MODES = ("int8", "w8a8", "int4", "int4-g128")
KERNEL_DTYPE = torch.bfloat16
# At this many input rows or more, a quantized linear dequantizes and runs F.linear (see module
# doc). Measured crossovers, one 8192 x 2048 linear, one thread (bench_quant.py gemm): int8 kernel
# 62 ms vs dequantize + GEMM 51 ms at 64 rows (30 vs 32 at 32 rows); int4 122 vs 138 ms at 128
# rows, 526 vs 268 at 512 (unpacking nibbles costs ~60 ms a call, int8's conversion ~10 ms).
DEQUANT_ROWS = {"int8": 64, "int4": 256}
# Bump when the saved layout changes. 2: int4 in phibook's own nibble layout (1 held the
# kernel's CPU-specific packed layout, which another CPU reads differently).
QUANT_FORMAT = 2
INT4_LAYOUT = "phibook-nibbles-v1"


def parse_mode(mode: str | None) -> tuple[str, int] | None:
    """(kind, group size) for a --quant value; None for None/"none"; PhibookError for anything else."""
    if mode is None or mode == "none":
        return None
    if mode == "int8":
        return "int8", 0
    if mode == "w8a8":
        return "w8a8", 0
    if mode == "int4":
        return "int4", 32
    if mode == "int4-g128":
        return "int4", 128
    raise PhibookError(f"unknown quantization {mode!r}; use one of: {', '.join(MODES)} (or none)")


def _bf16_exact(t: Tensor, round_up: bool = False) -> Tensor:
    """fp32 values bf16 represents exactly: t rounded to nearest bf16, or (round_up, t > 0) to the
    nearest bf16 at or above t, so a scale never shrinks below what the range needs."""
    b = t.to(torch.bfloat16)
    if round_up:
        bits = b.view(torch.int16)
        b = torch.where(b.float() < t, bits + 1, bits).view(torch.bfloat16)  # next bf16 up (t > 0)
    return b.float()


# Dequantizing for many rows goes through a reused per-thread buffer, in chunks of output rows:
# a fresh weight-sized allocation page-faults on every call (measured on this VM: a fresh
# 8192 x 2048 int8 -> fp32 conversion 230 ms, the same into a warm buffer 21 ms), and chunks
# bound the buffer (64 MiB in fp32) whatever the weight (the LM head is 51200 rows).
_SCRATCH = threading.local()
CHUNK_ELEMENTS = 1 << 24


def _scratch(numel: int, dtype: torch.dtype) -> Tensor:
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    # A buffer made under inference_mode cannot be written outside it (torch.no_grad callers,
    # the eval runner): one buffer per mode.
    key = (dtype, torch.is_inference_mode_enabled())
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        buf = bufs[key] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def _chunked_linear(x2: Tensor, n: int, k: int, fill: Callable[[Tensor, int, int], None], step: int) -> Tensor:
    """x2 @ W^T with W built chunk by chunk: fill(buf (r, k), start, r) writes rows start..start+r."""
    rows = max(step, CHUNK_ELEMENTS // k // step * step)
    y = torch.empty(x2.shape[0], n, dtype=x2.dtype)
    for start in range(0, n, rows):
        r = min(rows, n - start)
        w = _scratch(r * k, x2.dtype).view(r, k)
        fill(w, start, r)
        y[:, start : start + r] = F.linear(x2, w)
    return y


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T + b with q int8 (out, in) and one scale per output channel.

    ``w8a8``: run as int8 x int8 (activations quantized per call, see the module docstring)
    when the ``w8a8`` kernel passed its check on this CPU; the saved weights are the same.
    """

    def __init__(self, weight_int8: Tensor, scales: Tensor, bias: Tensor | None, w8a8: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.w8a8 = w8a8
        self.register_buffer("weight_int8", aligned_owned(weight_int8))
        self.register_buffer("scales", aligned_owned(scales.float()))  # bf16-exact fp32
        self.register_buffer("bias", None if bias is None else aligned_owned(bias.float()))
        self.register_buffer("_scales_k", aligned_owned(self.scales.to(KERNEL_DTYPE)), persistent=False)
        # Decided once here, not per call on the decode path (as Int4Linear does).
        self._kernel = kernel_ok("int8pack")
        self._w8a8: torch.ScriptObject | None = None
        self._reduce_range = False
        engine = w8a8_engine() if w8a8 else None
        if engine is not None and kernel_ok("w8a8"):
            self._w8a8 = w8a8_pack(self.weight_int8, self.scales, self.bias, engine[0])
            self._reduce_range = engine[1]

    @classmethod
    def from_linear(cls, linear: nn.Linear, w8a8: bool = False) -> Int8Linear:
        w = linear.weight.detach().float()
        amax = w.abs().amax(dim=1)
        scales = _bf16_exact(torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)), round_up=True)
        q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(q, scales, linear.bias, w8a8)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.weight_int8.to(torch.float32) * self.scales[:, None]).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if x.device.type != "cpu":
            y = F.linear(x2, self.dequantize(x.dtype), bias)
        elif self._w8a8 is not None:  # every row count: int8 GEMM beats fp32 GEMM too
            y = w8a8_linear(x2.float().contiguous(), self._w8a8, self._reduce_range).to(x.dtype)
        elif x2.shape[0] >= DEQUANT_ROWS["int8"] or not self._kernel:
            # Per-row scales factor out of the dot product: the int8 values converted to float
            # (chunk by chunk, into a reused buffer), the scales applied to the result.
            q = self.weight_int8
            y = _chunked_linear(x2.contiguous(), self.out_features, self.in_features,
                                lambda w, i, r: w.copy_(q[i : i + r]), 1)
            y.mul_(self.scales.to(x.dtype))
            if bias is not None:
                y.add_(bias)
        else:
            y = torch.ops.aten._weight_int8pack_mm(aligned_input(x2.to(KERNEL_DTYPE)), self.weight_int8,
                                                   self._scales_k)
            y = y.to(x.dtype)
            if bias is not None:
                y = y + bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kind = "w8a8" if self.w8a8 else "int8"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind} per-channel"


# --------------------------------------------------------------------------- int4

def pack_nibbles(q: Tensor) -> Tensor:
    """(n, k) values 0..15 -> (n, k // 2) uint8 in phibook's layout: input 2j in the low nibble
    of byte j, 2j + 1 in the high one (the same on every CPU)."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: Tensor, k: int) -> Tensor:
    """pack_nibbles' inverse: (n, k // 2) uint8 -> (n, k) uint8 values 0..15."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], k)


class Int4Linear(nn.Module):
    """y = x @ W^T + b with W = (q - 8) * scale + zero per group of ``group_size`` input channels.

    ``weight_int4`` holds q in phibook's nibble layout (pack_nibbles); the kernel's packed
    form is made from it here, on this CPU, when the int4 kernel passed its check.
    """

    def __init__(self, weight_int4: Tensor, scales_zeros: Tensor, bias: Tensor | None, group_size: int,
                 in_features: int) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_int4.shape[0], in_features
        self.group_size = group_size
        self.register_buffer("weight_int4", aligned_owned(weight_int4.to(torch.uint8)))  # (out, in/2)
        self.register_buffer("scales_zeros", aligned_owned(scales_zeros.float()))  # (in/group, out, 2)
        self.register_buffer("bias", None if bias is None else aligned_owned(bias.float()))
        packed = sz_k = None
        if kernel_ok("int4pack"):
            q = unpack_nibbles(self.weight_int4, in_features).to(torch.int32)
            packed = aligned_owned(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
            sz_k = aligned_owned(self.scales_zeros.to(KERNEL_DTYPE))
        self.register_buffer("_packed_k", packed, persistent=False)
        self.register_buffer("_sz_k", sz_k, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> Int4Linear:
        w = linear.weight.detach().float()
        n, k = w.shape
        if k % group_size or n % 32 or k % 64:
            raise PhibookError(
                f"int4 needs in_features divisible by {max(group_size, 64)} and out_features by 32; "
                f"this linear is {n} x {k} (use --quant int8)"
            )
        g = w.reshape(n, k // group_size, group_size)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        span = hi - lo
        scale = _bf16_exact(torch.where(span > 0, span / 15.0, torch.ones_like(span)), round_up=True)
        zero = _bf16_exact(lo + 8 * scale)
        q = (torch.round((g - zero[..., None]) / scale[..., None]) + 8).clamp_(0, 15).reshape(n, k)
        scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (k/group, n, 2)
        return cls(pack_nibbles(q), scales_zeros, linear.bias, group_size, k)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        w = torch.empty(self.out_features, self.in_features, dtype=dtype)
        self._fill(w, 0, self.out_features)
        return w

    def _fill(self, w: Tensor, start: int, r: int) -> None:
        """Write rows start..start+r of the dequantized weight into w (r, in)."""
        k, gs = self.in_features, self.group_size
        w.copy_(unpack_nibbles(self.weight_int4[start : start + r], k))
        g = w.view(r, k // gs, gs)
        sz = self.scales_zeros[:, start : start + r].to(w.dtype)  # (k/group, r, 2)
        g.sub_(8).mul_(sz[..., 0].t()[..., None]).add_(sz[..., 1].t()[..., None])

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if x.device.type != "cpu":
            y = F.linear(x2, self.dequantize(x.dtype), bias)
        elif x2.shape[0] >= DEQUANT_ROWS["int4"] or self._packed_k is None:
            y = _chunked_linear(x2.contiguous(), self.out_features, self.in_features, self._fill, 1)
            if bias is not None:
                y.add_(bias)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                aligned_input(x2.to(KERNEL_DTYPE)), self._packed_k, self.group_size, self._sz_k
            ).to(x.dtype)
            if bias is not None:
                y = y + bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 group {self.group_size}")


QuantLinear = (Int8Linear, Int4Linear)


def cat_rows(a: nn.Module, b: nn.Module) -> nn.Module | None:
    """One quantized linear computing [a(x) | b(x)] (rows stacked), or None when they cannot be
    stacked exactly. Per-row quantization makes stacking exact: no value is re-quantized."""
    if (isinstance(a, Int8Linear) and isinstance(b, Int8Linear) and a.in_features == b.in_features
            and a.w8a8 == b.w8a8):
        bias = None if a.bias is None or b.bias is None else torch.cat([a.bias, b.bias])
        return Int8Linear(torch.cat([a.weight_int8, b.weight_int8]), torch.cat([a.scales, b.scales]), bias, a.w8a8)
    if (isinstance(a, Int4Linear) and isinstance(b, Int4Linear) and a.in_features == b.in_features
            and a.group_size == b.group_size):
        bias = None if a.bias is None or b.bias is None else torch.cat([a.bias, b.bias])
        # Rows of phibook's layout stack as they are; the kernel's form is re-derived from them.
        return Int4Linear(torch.cat([a.weight_int4, b.weight_int4]),
                          torch.cat([a.scales_zeros, b.scales_zeros], dim=1), bias, a.group_size, a.in_features)
    return None


# --------------------------------------------------------------------------- model swap


def _quant_targets(model: nn.Module, include_head: bool) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """(name, parent module, attribute, linear) for every nn.Linear to quantize."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if name == "lm_head" and not include_head:
                continue
            parent_name, _, attr = name.rpartition(".")
            out.append((name, model.get_submodule(parent_name) if parent_name else model, attr, module))
    return out


@torch.no_grad()
def quantize_(model: nn.Module, mode: str, include_head: bool = True) -> nn.Module:
    """Replace the model's nn.Linear modules in place with Int8Linear / Int4Linear; return the model.

    The LM head (include_head, default on) is int8 in every mode, int4 ones included (as
    llama.cpp keeps its output matrix at higher precision than q4): on a trained model the
    head's int4 error is a third of the whole model's KL (bench/bench_quant.py accuracy), while
    int4 reads no faster than int8 on an AVX2 CPU (both kernels are compute-bound there).
    One linear at a time, so the peak is the model plus one linear's temporaries.
    """
    parsed = parse_mode(mode)
    if parsed is None:
        return model
    from phibook.inference.pages import drop_file_pages

    kind, group = parsed
    for name, parent, attr, linear in _quant_targets(model, include_head):
        if linear.weight.device.type != "cpu":
            raise PhibookError(f"--quant {mode} runs on the CPU only; the model is on {linear.weight.device}")
        if kind in ("int8", "w8a8") or name == "lm_head":
            new: nn.Module = Int8Linear.from_linear(linear, w8a8=kind == "w8a8")
        else:
            new = Int4Linear.from_linear(linear, group)
        setattr(parent, attr, new)
        # A weight memory-mapped from safetensors stays mapped (and its pages, read while
        # quantizing, resident) while the embedding still uses the file: hand them back now.
        drop_file_pages(linear.weight)
    model.quant_mode = mode  # type: ignore[attr-defined]
    return model


def quant_mode_of(model: nn.Module) -> str | None:
    return getattr(model, "quant_mode", None)


# --------------------------------------------------------------------------- saving / loading


def quant_paths(checkpoint_dir: Path, mode: str) -> tuple[Path, Path]:
    return checkpoint_dir / f"quant-{mode}.safetensors", checkpoint_dir / f"quant-{mode}.json"


def _quant_state(model: nn.Module) -> dict[str, Tensor]:
    """The persistent tensors of every quantized linear, by module name."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            for key, t in module.state_dict().items():
                out[f"{name}.{key}"] = t.contiguous()
    return out


def save_quantized(model: nn.Module, checkpoint_dir: str | os.PathLike, mode: str | None = None,
                   fingerprint: str | None = None) -> Path:
    """Write quant-<mode>.safetensors + quant-<mode>.json beside a checkpoint (temp files, then rename).

    ``fingerprint`` is the source checkpoint's (phibook.weights.checkpoint.model_fingerprint),
    computed from ``checkpoint_dir`` when not given; a load checks it before using the file.
    """
    from safetensors.torch import save_file

    from phibook.weights.checkpoint import find_checkpoint, model_fingerprint

    mode = mode or quant_mode_of(model)
    parsed = parse_mode(mode)
    if parsed is None:
        raise PhibookError("save_quantized: the model is not quantized; call quantize_(model, mode) first")
    directory = find_checkpoint(checkpoint_dir)
    state = _quant_state(model)
    if not state:
        raise PhibookError("save_quantized: the model has no quantized linears")
    meta = {
        "format": QUANT_FORMAT,
        "mode": mode,
        "group_size": parsed[1],
        "source_fingerprint": fingerprint or model_fingerprint(directory),
        "torch": torch.__version__,
        "int4_layout": INT4_LAYOUT if parsed[0] == "int4" else None,
        "modules": sorted({k.rpartition(".")[0] for k in state}),
    }
    weights, info = quant_paths(directory, mode)
    tmp_w = io.temp_path(weights)
    try:
        save_file(state, str(tmp_w), metadata={"format": "phibook-quant", "mode": mode})
        # Weights first: a reader trusts the json only when the weights beside it are complete.
        io.commit(tmp_w, weights)
    finally:
        tmp_w.unlink(missing_ok=True)
    io.write_json(info, meta)
    return weights


@dataclass
class QuantLoad:
    """How load_quantized got its weights: "saved" file or "quantized" now (and why)."""

    source: str
    reason: str


def _stale_reason(info: Path, weights: Path, mode: str, fingerprint: str, source_files: list[Path]) -> str | None:
    """Why the saved quantized weights cannot be used (None when they can)."""
    if not weights.is_file() or not info.is_file():
        return f"no {weights.name} beside the checkpoint"
    try:
        meta = json.loads(info.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"{info} is unreadable ({exc})"
    if meta.get("format") != QUANT_FORMAT or meta.get("mode") != mode:
        return f"{info} is format {meta.get('format')} mode {meta.get('mode')}, not {QUANT_FORMAT} {mode}"
    if meta.get("source_fingerprint") != fingerprint:
        return f"{weights.name} was made from other weights than the checkpoint's current ones (fingerprint differs)"
    if meta.get("int4_layout") not in (None, INT4_LAYOUT):
        return f"{weights.name} holds int4 weights in layout {meta.get('int4_layout')!r}, not {INT4_LAYOUT!r}"
    # The fingerprint samples the weight files; a source file written after the quantized one
    # (an edit the samples missed, or a re-save) is caught by its time.
    newest = max(os.path.getmtime(p) for p in source_files)
    if newest > os.path.getmtime(weights):
        return f"the checkpoint's weights are newer than {weights.name}"
    return None


def _apply_saved(model: nn.Module, weights: Path, mode: str) -> None:
    """Swap in quantized linears built from the saved tensors (shapes checked against the model)."""
    from safetensors import safe_open

    kind, group = parse_mode(mode)  # type: ignore[misc]
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            keys = set(f.keys())

            def tensor(key: str) -> Tensor:
                # A copy in storage of its own: get_tensor can hand back memory 8 bytes off a
                # 64-byte boundary, which the int8 kernel crashed on (AVX-512).
                return f.get_tensor(key).clone()

            for name, parent, attr, linear in _quant_targets(model, include_head=True):
                bias = tensor(f"{name}.bias") if f"{name}.bias" in keys else None
                n, k = linear.weight.shape
                if f"{name}.weight_int8" in keys:
                    q = tensor(f"{name}.weight_int8")
                    if tuple(q.shape) != (n, k):
                        raise PhibookError(f"{weights}: {name}.weight_int8 has shape {list(q.shape)}, the model "
                                           f"expects {[n, k]}")
                    new: nn.Module = Int8Linear(q, tensor(f"{name}.scales"), bias, w8a8=kind == "w8a8")
                elif f"{name}.weight_int4" in keys and kind == "int4":
                    packed, sz = tensor(f"{name}.weight_int4"), tensor(f"{name}.scales_zeros")
                    if tuple(packed.shape) != (n, k // 2) or tuple(sz.shape) != (k // group, n, 2):
                        raise PhibookError(f"{weights}: {name}.weight_int4 does not fit a {n} x {k} linear "
                                           f"with group {group}")
                    new = Int4Linear(packed, sz, bias, group, k)
                else:
                    continue  # saved in full precision (quantize_(include_head=False))
                setattr(parent, attr, new)
    except PhibookError:
        raise
    except Exception as exc:  # SafetensorError, missing keys
        raise PhibookError(f"cannot read quantized weights {weights}: {exc}") from exc
    model.quant_mode = mode  # type: ignore[attr-defined]


def load_quantized(loaded, mode: str, save: bool = True, log=None) -> QuantLoad:
    """Quantize a LoadedModel's model in place: from quant-<mode>.safetensors beside it when that
    file matches the checkpoint's fingerprint, else by quantizing now (and saving the result
    when ``save`` and the directory is writable). ``log`` gets one line saying which."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    parse_mode(mode)
    weights, info = quant_paths(loaded.path, mode)
    from phibook.weights.checkpoint import weight_files

    reason = _stale_reason(info, weights, mode, loaded.fingerprint, weight_files(loaded.path))
    if reason is None:
        _apply_saved(loaded.model, weights, mode)
        return QuantLoad("saved", f"loaded {weights}")
    quantize_(loaded.model, mode)
    what = f"quantized to {mode} now ({reason})"
    if save:
        try:
            save_quantized(loaded.model, loaded.path, mode, fingerprint=loaded.fingerprint)
            what += f"; saved {weights.name} for next time"
        except OSError as exc:
            what += f"; could not save it ({exc})"
    log(f"quant: {what}")
    return QuantLoad("quantized", what)
