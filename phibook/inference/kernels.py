"""Native kernels are used only once they are proven right on the running CPU.

PyTorch's fast CPU kernels are chosen at run time by instruction set (``ATEN_CPU_CAPABILITY``,
oneDNN's own ISA dispatch), so a kernel that is right on the machine the code was written on
can crash or give wrong numbers on the next one: ``_weight_int8pack_mm`` segfaulted on an
AVX-512/AMX Xeon for a weight 8 bytes off a 64-byte boundary, and ``_convert_weight_to_int4pack``
packs differently on AVX-512 than on AVX2. So before phibook calls one of these kernels it asks
``kernel_ok(name)``, which:

1. runs the kernel once on small probes (the row counts and memory layouts phibook's callers
   pass) against a plain reference, **in a child process**, so a crash is caught and never
   takes the caller down;
2. caches the verdict per (kernel, torch version, CPU flags, ATen capability, oneDNN ISA cap)
   in ``kernel-verdicts.json`` under the cache directory (``$PHIBOOK_CACHE_DIR``, else
   ``$XDG_CACHE_HOME/phibook``, else ``~/.cache/phibook``), so a machine pays for each probe
   once;
3. on a refusal, prints one line on stderr saying which kernel was refused and why; the caller
   then takes its plain path (dequantize + ``F.linear``, unpacked weights, eager steps). A
   broken kernel costs speed, never a wrong answer or a crash.

A probe that runs past its time limit refuses the kernel for this process only (a busy
machine is no verdict), so it is probed again next time.

Kernels (``KERNELS``): ``int8pack`` (``_weight_int8pack_mm``), ``w8a8`` (fbgemm's
``quantized.linear_prepack`` + ``linear_dynamic``), ``int4pack``
(``_convert_weight_to_int4pack_for_cpu`` + ``_weight_int4pack_mm_for_cpu``), ``onednn-fp32`` /
``onednn-bf16`` / ``onednn-fp16`` (``mkldnn._reorder_linear_weight`` + ``_linear_pointwise``,
FastForward's prepacked linears), ``inductor`` (``torch.compile`` on the CPU, ``--compile``),
``gemv-bf16`` and ``gemv-fp32`` (phibook's own matrix-vector kernels, ``csrc/gemv_bf16.cpp``
for AVX512-BF16 and ``csrc/decode_f32.cpp``, which also multiplies bf16 weights widened to fp32 on
AVX2 and AVX-512F, built here with torch.utils.cpp_extension for the ISA level ATen runs at:
FastForward's steps of 1 to 16 rows; ``GEMV_BUILDS``) and ``attention-fp32`` (one query's
attention in fp32 over an fp32 or bf16 KV cache, in the fp32 build: FastForward's decode steps),
``decode-glue`` (the elementwise work around it, ``DecodeGlue``) and ``decode-step`` (that work, the
cache writes and the attention in one call).

The AVX-512 builds are checked on CPUs without AVX-512 too: ``emulated_builds`` compiles them for
AVX2 with their intrinsics emulated in software (SIMDe), and ``check_emulated`` (``python -m
phibook.inference.kernels --emulated``) holds them to the probes' references; logic, not speed.

Test hook: ``PHIBOOK_KERNEL_PROBE_FAULT=name:crash`` (or ``name:wrong``) makes that kernel's
probe child die with SIGSEGV (or see a wrong result), as a broken kernel would.

``aligned_owned(t)`` is the other half of the contract: every tensor handed to one of these
kernels lives in storage of its own that starts on a 64-byte boundary (never a view into a
file buffer, which safetensors can hand back 8 bytes off).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from phibook import io

ALIGN = 64  # bytes: a cache line, and what AVX-512 loads want
FAULT_ENV = "PHIBOOK_KERNEL_PROBE_FAULT"
CACHE_FILE = "kernel-verdicts.json"
# Child time limits (s). Importing torch is most of a plain probe; inductor compiles C++.
PROBE_TIMEOUT_S = {"inductor": 600.0, "gemv-bf16": 600.0, "gemv-fp32": 600.0, "attention-fp32": 600.0,
                  "decode-glue": 600.0, "decode-step": 600.0}
DEFAULT_PROBE_TIMEOUT_S = 180.0


# --------------------------------------------------------------------------- memory


def is_aligned_owned(t: Tensor) -> bool:
    """Whether t is contiguous and starts a storage of its own on an ALIGN-byte boundary."""
    return (t.is_contiguous() and t.storage_offset() == 0 and t.data_ptr() % ALIGN == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def aligned_owned(t: Tensor) -> Tensor:
    """t itself when is_aligned_owned(t), else a contiguous copy in fresh ALIGN-aligned storage."""
    t = t.detach()
    if t.device.type != "cpu" or is_aligned_owned(t):
        return t
    out = torch.empty(t.shape, dtype=t.dtype)  # the CPU allocator aligns to 64 bytes
    if out.data_ptr() % ALIGN:
        # An allocator with less alignment: over-allocate and start at the first boundary.
        nbytes = t.numel() * t.element_size()
        raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
        skip = -raw.data_ptr() % ALIGN
        out = raw[skip : skip + nbytes].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def aligned_input(x: Tensor) -> Tensor:
    """An activation as a kernel takes it: contiguous and starting on an ALIGN-byte boundary."""
    x = x.contiguous()
    return x if x.data_ptr() % ALIGN == 0 else aligned_owned(x)


# --------------------------------------------------------------------------- W8A8 (fbgemm)


@functools.cache
def w8a8_engine() -> tuple[str, bool] | None:
    """(PyTorch quantized engine, reduce_range) for W8A8 on this CPU, from its flags; None when
    there is none (fbgemm needs x86 with AVX2). Read once a process: every Int8Linear asks."""
    from phibook.cpu_features import cpu_flags, read_cpuinfo

    flags = cpu_flags(read_cpuinfo()) or set()
    if "avx2" not in flags or "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    return "fbgemm", not ({"avx512_vnni", "avx_vnni"} & flags)


def w8a8_pack(weight_int8: Tensor, scales: Tensor, bias: Tensor | None, engine: str) -> torch.ScriptObject:
    """fbgemm's packed form of per-channel int8 weights (q * scale exactly: the scales are
    bf16-exact, so q * scale / scale rounds back to q). Built on this CPU, never saved."""
    import warnings

    torch.backends.quantized.engine = engine
    n = weight_int8.shape[0]
    with warnings.catch_warnings():
        # PyTorch 2.13 marks quantized tensor constructors deprecated; linear_prepack still takes one.
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        qw = torch.quantize_per_channel(weight_int8.float() * scales[:, None], scales.double(),
                                        torch.zeros(n, dtype=torch.long), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.float())


def w8a8_linear(x2: Tensor, packed: torch.ScriptObject, reduce_range: bool) -> Tensor:
    """(rows, in) fp32 -> (rows, out) fp32 through fbgemm's dynamic int8 linear (bias included)."""
    return torch.ops.quantized.linear_dynamic(x2, packed, reduce_range)


# --------------------------------------------------------------------------- GEMV (our own)

CSRC = Path(__file__).resolve().parent / "csrc"
GEMV_ENV = "PHIBOOK_GEMV"  # "0": never use the kernels (FastForward takes oneDNN's instead)
GEMV_MAX_ROWS = 16  # input rows per call (kMaxRows in csrc/gemv_*.cpp): a batched decode step
GEMV_COLS_MULTIPLE = 32  # the input width must be a multiple of this (one bf16 vector)


@dataclass(frozen=True)
class GemvBuild:
    """One build of one of phibook's GEMV sources, for one dtype: the dtype it multiplies, the ATen
    ISA level it serves (a process held at a lower level by ``ATEN_CPU_CAPABILITY`` gets that
    level's build, or none), the CPU flags it needs and the compiler flags that target them. The
    entries of one source and flags (decode_f32.cpp's fp32 and bf16) are one library, built and
    loaded once."""

    dtype: torch.dtype
    level: str
    source: Path
    cpu_flags: tuple[str, ...]
    cflags: tuple[str, ...]
    emulated: bool = False  # the level's branch run in software (``emulated_builds``): checks only
    variant: str = ""  # names a build of the same source and level with other cflags (GEMV_CANDIDATES)

    @property
    def namespace(self) -> str:
        """The operator namespace of this build's library (``torch.ops.<namespace>``): one per
        source, level, variant and emulation, so builds never clash."""
        variant = f"_{self.variant}" if self.variant else ""
        return f"phibook_{self.source.stem}_{self.level.lower()}{variant}{'_emulated' if self.emulated else ''}"

    @property
    def label(self) -> str:
        """How benchmarks and tests name the build: dtype, source, level and variant."""
        return " ".join(filter(None, (DTYPE_SHORT[self.dtype], self.source.name, self.level, self.variant)))

    @property
    def op(self) -> str:
        return f"gemv_{'f32' if self.dtype == torch.float32 else 'bf16'}"


_AVX512F = (("avx512f", "fma"), ("-mavx512f", "-mfma"))  # decode_f32.cpp's two builds: CPU flags, cflags
_AVX2 = (("avx2", "fma"), ("-mavx2", "-mfma"))
_AVX512_BF16 = (("avx512f", "avx512bw", "avx512_bf16"), ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"))
# In order of preference: the first whose flags the CPU has, at the level ATen runs at, serves.
# bf16: AVX512-BF16's dot products where the CPU has them, else the weights widened to fp32 as read.
GEMV_BUILDS = (
    GemvBuild(torch.bfloat16, "AVX512", CSRC / "gemv_bf16.cpp", *_AVX512_BF16),
    GemvBuild(torch.bfloat16, "AVX512", CSRC / "decode_f32.cpp", *_AVX512F),
    GemvBuild(torch.bfloat16, "AVX2", CSRC / "decode_f32.cpp", *_AVX2),
    GemvBuild(torch.float32, "AVX512", CSRC / "decode_f32.cpp", *_AVX512F),
    GemvBuild(torch.float32, "AVX2", CSRC / "decode_f32.cpp", *_AVX2),
)
# Builds that never serve: bench/bench_gemv.py times them beside GEMV_BUILDS' on a CPU that runs
# them, so a measurement, not a guess, decides whether one earns a place in GEMV_BUILDS.
# gemv_bf16.cpp reading four runs of weight rows a thread at one input row, as decode_f32.cpp does:
# on the AVX2 EPYC four streams a thread read 1.11x faster than one (eighth session); on the Zen 4
# EPYC two changed nothing in this kernel (sixth session); four have not run on an AVX512-BF16 CPU.
GEMV_CANDIDATES = (
    GemvBuild(torch.bfloat16, "AVX512", CSRC / "gemv_bf16.cpp", _AVX512_BF16[0],
              (*_AVX512_BF16[1], "-DPHIBOOK_GEMV_STREAMS=4"), variant="streams4"),
)
GEMV_PROBES = {torch.bfloat16: "gemv-bf16", torch.float32: "gemv-fp32"}


SIMDE_ENV = "PHIBOOK_SIMDE_INCLUDE"  # a directory holding simde/x86/avx512.h, if not a system one


def simde_include_dir() -> Path | None:
    """The include directory of SIMDe's headers (``$PHIBOOK_SIMDE_INCLUDE``, else /usr/include or
    /usr/local/include, where Debian's libsimde-dev puts them), or None."""
    env = os.environ.get(SIMDE_ENV)
    for base in ([env] if env else ["/usr/include", "/usr/local/include"]):
        if (Path(base) / "simde" / "x86" / "avx512.h").is_file():
            return Path(base)
    return None


def emulated_builds() -> list[GemvBuild]:
    """The AVX-512 builds (decode_f32.cpp's AVX-512F branch, fp32 and bf16; gemv_bf16.cpp's
    AVX512-BF16 kernel) compiled for AVX2 + FMA with their AVX-512 intrinsics emulated by SIMDe
    (``csrc/emulated_avx512.h``), so a CPU without AVX-512 runs them against the same references
    as the probes (tests/test_emulated_avx512.py). Never in GEMV_BUILDS, never serving a model:
    they check logic, not speed. Raises Unsupported (with the reason) without SIMDe or AVX2 + FMA."""
    from phibook.cpu_features import cpu_flags, read_cpuinfo

    include = simde_include_dir()
    if include is None:
        raise Unsupported(f"SIMDe's headers are not installed (Debian: apt-get install libsimde-dev; or set {SIMDE_ENV})")
    flags = cpu_flags(read_cpuinfo()) or set()
    if not {"avx2", "fma"} <= flags:
        raise Unsupported(f"the emulated builds target AVX2 + FMA; the CPU lacks {', '.join(sorted({'avx2', 'fma'} - flags))}")
    cflags = ("-mavx2", "-mfma", "-DPHIBOOK_EMULATE_AVX512", f"-I{include}")
    # a variant's own define (-D...) goes with it; the AVX-512 target flags do not
    return [GemvBuild(b.dtype, b.level, b.source, ("avx2", "fma"),
                      cflags + tuple(f for f in b.cflags if f.startswith("-D")), emulated=True, variant=b.variant)
            for b in (*GEMV_BUILDS, *GEMV_CANDIDATES) if b.level == "AVX512"]


def gemv_builds_here(candidates: bool = False) -> list[GemvBuild]:
    """Every GEMV build this process can run, in GEMV_BUILDS' order of preference (then
    GEMV_CANDIDATES' with ``candidates``): the CPU has its flags and ATen runs at its level (what
    ``gemv_build`` picks from; a benchmark times them all)."""
    from phibook.cpu_features import cpu_flags, read_cpuinfo

    flags = cpu_flags(read_cpuinfo()) or set()
    level = torch.backends.cpu.get_cpu_capability()
    return [b for b in (*GEMV_BUILDS, *(GEMV_CANDIDATES if candidates else ()))
            if set(b.cpu_flags) <= flags and b.level == level]


def gemv_bound(x: Tensor, w: Tensor, want: Tensor, dtype: torch.dtype) -> Tensor:
    """Elementwise bound on |GEMV(x, w) - want| (want: the float64 product plus bias): bf16 products
    are exact in fp32, so the fp32 sum and one bf16 rounding of the result are the error; fp32 is
    the sum's rounding, in another order than the reference's."""
    terms = x.double().abs() @ w.double().abs().T
    if dtype == torch.bfloat16:
        return want.abs() * 2.0**-8 + terms * 1e-5 + 1e-6
    return want.abs() * 2.0**-20 + terms * (w.shape[1] * 2.0**-23) + 1e-6


def gemv_build(dtype: torch.dtype) -> tuple[GemvBuild | None, str | None]:
    """(build, None) when one of phibook's GEMV builds serves ``dtype`` in this process, else (None,
    why). Decided from the CPU's flags and the ISA level ATen runs at, never a timing: bf16 takes
    AVX512-BF16's build at ATen's AVX512 level where the CPU has it, else decode_f32.cpp's (weights
    widened to fp32); fp32 has an AVX-512F build and an AVX2+FMA build; a process held at
    ``ATEN_CPU_CAPABILITY=default`` gets none (the library kernels its level picks)."""
    from phibook.cpu_features import cpu_flags, read_cpuinfo

    if os.environ.get(GEMV_ENV, "1") == "0":
        return None, f"{GEMV_ENV}=0"
    builds = [b for b in GEMV_BUILDS if b.dtype == dtype]
    if not builds:
        return None, f"no GEMV of phibook's for {dtype}"
    for build in gemv_builds_here():
        if build.dtype == dtype:
            return build, None
    flags = cpu_flags(read_cpuinfo()) or set()
    usable = [b for b in builds if set(b.cpu_flags) <= flags]
    if not usable:
        missing = sorted(set(builds[-1].cpu_flags) - flags)
        return None, f"the CPU lacks {', '.join(missing)}"
    level = torch.backends.cpu.get_cpu_capability()
    return None, f"ATen runs at {level} here, not {' or '.join(b.level for b in usable)}"


def load_gemv(build: GemvBuild) -> None:
    """Build (once a machine, under torch's extensions directory) and load one GEMV build's library
    (once a process, whichever of its dtypes asks first); raises Unsupported with the reason when it
    cannot be built here (no compiler, no ninja)."""
    _load_library(build.source, build.namespace, build.cflags)


@functools.cache
def _load_library(source: Path, namespace: str, cflags: tuple[str, ...]) -> None:
    from torch.utils import cpp_extension

    # The name carries the digest of the source, the headers beside it and the flags: torch keeps
    # each build under its extensions directory ($TORCH_EXTENSIONS_DIR, else
    # ~/.cache/torch_extensions) and rebuilds on a change.
    headers = b"".join(path.read_bytes() for path in sorted(source.parent.glob("*.h")))
    digest = hashlib.sha1(source.read_bytes() + headers + " ".join(cflags).encode()).hexdigest()[:12]
    try:
        cpp_extension.load(name=f"{namespace}_{digest}", sources=[str(source)],
                           # -fopenmp: at::parallel_for is inlined from ATen's headers and runs on
                           # OpenMP; the library's libgomp.so.1 resolves to the copy torch loaded
                           # (one soname, one thread pool, torch's thread count).
                           extra_cflags=["-O3", "-fopenmp", f"-DPHIBOOK_GEMV_NS={namespace}", *cflags],
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as exc:  # a missing compiler or ninja is a refusal, not a crash
        raise Unsupported(f"the kernel did not build here ({type(exc).__name__}: {str(exc)[-300:]})") from exc


GemvOp = Callable[[Tensor, Tensor, Tensor], Tensor]


def onednn_supports(dtype: torch.dtype) -> bool:
    """Whether oneDNN's linear runs ``dtype`` on this CPU at all (its check is kernel_ok's
    ``onednn-<dtype>``): fp32 always, bf16 and fp16 where oneDNN reports the CPU can."""
    if not (torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()):
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return False


def long_step_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype oneDNN's linear runs a GEMV model's steps of more than GEMV_MAX_ROWS rows in: the
    model's own where oneDNN takes it here, else fp32 (a bf16 model on AVX2: its weights widened to
    fp32 a chunk of rows at a time, which is exact; ATen's own bf16 matmul there ran at a fifth of
    oneDNN's fp32 speed, docs/performance.md)."""
    return dtype if onednn_supports(dtype) else torch.float32


def gemv_kernel(dtype: torch.dtype) -> GemvOp | None:
    """phibook's GEMV for ``dtype`` in this process, or None: a build serves it here (``gemv_build``),
    its check passed on this CPU (in a child, cached) and it loaded. Silent where the flags rule it
    out. The op computes (m, out) = x (m <= GEMV_MAX_ROWS, in) @ weight (out, in)^T + bias_fp32
    (out,) or empty, x and weight in ``dtype``, reading each weight row once for all m rows."""
    if dtype not in GEMV_PROBES:  # fp16: no build (oneDNN packs it where the CPU has AVX512-FP16)
        return None
    return _checked_op(dtype, GEMV_PROBES[dtype], None, "oneDNN")


def _checked_op(dtype: torch.dtype, probe: str, op: str | None, fallback: str) -> Callable | None:
    """Operator ``op`` (None: the build's GEMV) of the build serving ``dtype`` here, once probe
    ``probe`` passed and the build loaded; None (and one line on stderr when it passed but did not
    load) otherwise."""
    build, _why = gemv_build(dtype)
    if build is None or not kernel_ok(probe):
        return None
    try:
        load_gemv(build)
    except Unsupported as exc:
        _stderr(f"kernel check: {probe} passed its check but did not load here ({exc}); using {fallback}")
        return None
    return getattr(getattr(torch.ops, build.namespace), op or build.op)


AttentionOp = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
ATTENTION_PROBE = "attention-fp32"
ATTENTION_HEAD_MULTIPLE = 16  # the head size must be a multiple of this (csrc/decode_f32.cpp)


def attention_kernel() -> AttentionOp | None:
    """phibook's one-query attention, in fp32 over an fp32 or bf16 KV cache (``attention_f32`` in
    ``csrc/decode_f32.cpp``, in the fp32 GEMV's build for this ATen level), or None: that build
    serves this process (``gemv_build(torch.float32)``; ``PHIBOOK_GEMV=0`` switches both off), its
    own check passed and it loaded. The op takes q (B, H, 1, D) fp32, k and v (B, H, S, D) both
    fp32 or both bf16 (widened as read) and a bool mask (1|B, 1, 1, S) or an empty tensor, and
    returns (B, H, 1, D) fp32."""
    return _checked_op(torch.float32, ATTENTION_PROBE, "attention_f32", "SDPA")


GLUE_PROBE = "decode-glue"
STEP_PROBE = "decode-step"


@dataclass(frozen=True)
class DecodeGlue:
    """The elementwise work of a decode step's block, in two ops of the fp32 build
    (``csrc/decode_f32.cpp``) instead of some 20 ATen ops a layer.

    ``split_rotary(u, cos, sin, n_head, head_dim)``: u (B, 1, N) bf16 or fp32, the input
    projection's output [q | k | v | fc1]; cos, sin fp32 (1|B, 1, 1, R). Returns (3, B, H, 1, D)
    fp32: q and k rotated as ``model.apply_rotary`` does (rounded to u's dtype), then v.

    ``merge_gelu(y, u)``: y (B, H, 1, D) fp32, the attention output. Returns (B, 1, d + F) in u's
    dtype: [y | gelu_tanh(fc1)], the output projection's input.

    ``attend_step(u, cos, sin, n_head, head_dim, k_cache, v_cache, columns, length, mask)``, or None
    where its own check (``decode-step``) refused it: split_rotary, the cache writes,
    ``attention_f32`` and merge_gelu in one call. k_cache, v_cache (B, H, L, D) a layer's cache, both
    fp32 or both bf16 (bf16 for a bf16 u only); columns int64 (B, C): the columns row b's new key and
    value go to (entries < 0: none); the attention reads columns [0, length) under mask (as
    ``attention_f32``'s). Returns merge_gelu's output.

    ``add_layer_norm(x, y, weight, bias, eps)``, or None with attend_step: the residual add and
    the next LayerNorm of a decode step in one call. x, y (..., d) of one dtype (fp32 or bf16);
    returns (x + y rounded to the dtype as ATen's add rounds it, LayerNorm of that).
    """

    split_rotary: Callable[[Tensor, Tensor, Tensor, int, int], Tensor]
    merge_gelu: Callable[[Tensor, Tensor], Tensor]
    attend_step: Callable[[Tensor, Tensor, Tensor, int, int, Tensor, Tensor, Tensor, int, Tensor], Tensor] | None = None
    add_layer_norm: Callable[[Tensor, Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]] | None = None


def decode_glue() -> DecodeGlue | None:
    """phibook's ops for a decode step's elementwise work (``DecodeGlue``), or None: the fp32 build
    serves this process (``gemv_build(torch.float32)``; ``PHIBOOK_GEMV=0`` switches them off too),
    their check passed and it loaded."""
    split = _checked_op(torch.float32, GLUE_PROBE, "split_rotary", "ATen's ops")
    merge = _checked_op(torch.float32, GLUE_PROBE, "merge_gelu", "ATen's ops") if split is not None else None
    if split is None or merge is None:
        return None
    step = _checked_op(torch.float32, STEP_PROBE, "attend_step", "the separate glue ops")
    add_ln = _checked_op(torch.float32, STEP_PROBE, "add_layer_norm", "ATen's ops") if step is not None else None
    return DecodeGlue(split, merge, step, add_ln)


class Unsupported(Exception):
    """The kernel says it cannot run here (not a wrong answer)."""


def _tolerance(x: Tensor, w: Tensor) -> Tensor:
    """Elementwise bound for a kernel fed bf16 activations that returns bf16: half a bf16 ulp of
    the largest term sum, twice, plus fp32 accumulation slack. A wrong layout is off by O(1)."""
    return (x.double().abs() @ w.double().abs().T) * 2.0**-7 + 1e-5


def _check(name: str, got: Tensor, want: Tensor, bound: Tensor | float, what: str) -> None:
    if os.environ.get(FAULT_ENV, "") == f"{name}:wrong":
        got = got + 1.0
    err = (got.double() - want.double()).abs()
    over = err > bound
    if bool(over.any()):
        raise AssertionError(f"{what}: max error {err.max().item():.3g} (allowed {float(torch.as_tensor(bound).max()):.3g})")


def _probe_int8pack() -> None:
    g = torch.Generator().manual_seed(0)
    for n, k in ((96, 64), (768, 256)):
        q = aligned_owned(torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8))
        scales = (torch.rand(n, generator=g) * 0.02 + 1e-3).bfloat16()
        w = q.double() * scales.double()[:, None]
        for rows in (1, 2, 3, 8, 16, 17, 33, 36, 63):
            x = aligned_input(torch.randn(rows, k, generator=g).bfloat16())
            got = torch.ops.aten._weight_int8pack_mm(x, q, aligned_owned(scales))
            _check("int8pack", got, x.double() @ w.T, _tolerance(x, w), f"n={n} k={k} rows={rows}")


def _probe_int4pack() -> None:
    g = torch.Generator().manual_seed(0)
    for n, k, group in ((32, 64, 32), (96, 256, 32), (256, 256, 128)):
        q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
        scale = (torch.rand(k // group, n, generator=g) * 0.02 + 1e-3).bfloat16().float()
        zero = (torch.randn(k // group, n, generator=g) * 0.01).bfloat16().float()
        sz = aligned_owned(torch.stack([scale, zero], dim=-1).bfloat16())  # (k/group, n, 2)
        packed = aligned_owned(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        w = ((q.double() - 8).view(n, k // group, group) * scale.t().double()[..., None]
             + zero.t().double()[..., None]).view(n, k)
        for rows in (1, 2, 17, 64, 255):
            x = aligned_input(torch.randn(rows, k, generator=g).bfloat16())
            got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)
            _check("int4pack", got, x.double() @ w.T, _tolerance(x, w), f"n={n} k={k} group={group} rows={rows}")


def _probe_w8a8() -> None:
    engine = w8a8_engine()
    if engine is None:
        raise Unsupported("no W8A8 engine for this CPU (fbgemm needs x86 with AVX2)")
    g = torch.Generator().manual_seed(0)
    for n, k in ((96, 64), (768, 256)):
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        scales = (torch.rand(n, generator=g) * 0.02 + 1e-3).bfloat16().float()
        bias = torch.randn(n, generator=g) * 0.1
        packed = w8a8_pack(q, scales, bias, engine[0])
        w = q.double() * scales.double()[:, None]
        for rows in (1, 2, 3, 8, 16, 17, 33, 64):
            x = torch.randn(rows, k, generator=g) + 0.5  # not centred: the zero point matters
            got = w8a8_linear(x, packed, engine[1])
            # Activations get 7 bits (reduce_range) or 8 over the call's range, so each is off
            # by at most half a step: bound the sum by that times |w|. A wrong layout is off by O(1).
            step = float(x.max().clamp_min(0) - x.min().clamp_max(0)) / (127 if engine[1] else 255)
            bound = (0.51 * step) * w.abs().sum(1) + 1e-4 * (1 + (x.double() @ w.T).abs())
            _check("w8a8", got, x.double() @ w.T + bias.double(), bound, f"n={n} k={k} rows={rows}")


def _probe_onednn(dtype: torch.dtype) -> Callable[[], None]:
    def probe() -> None:
        name = f"onednn-{DTYPE_SHORT[dtype]}"
        if not onednn_supports(dtype):
            raise Unsupported(f"oneDNN does not support {dtype} on this CPU")
        g = torch.Generator().manual_seed(0)
        for n, k in ((96, 64), (320, 128)):
            w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
            b = torch.randn(n, generator=g).to(dtype)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
            for shape in ((1, 1, k), (1, 2, k), (2, 17, k), (1, 64, k), (3, 100, k)):
                x = torch.randn(*shape, generator=g).to(dtype)
                want = x.double() @ w.double().T + b.double()
                ulp = 2.0**-7 if dtype != torch.float32 else 2.0**-20
                bound = (x.double().abs() @ w.double().abs().T + b.double().abs()) * ulp * 2 + 1e-5
                got = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
                _check(name, got, want, bound, f"{dtype} n={n} k={k} x={list(shape)}")
                got = torch.ops.mkldnn._linear_pointwise(x, packed, b, "gelu", [], "tanh")
                _check(name, got, F.gelu(want, approximate="tanh"), bound * 2 + 1e-3,
                       f"{dtype} gelu n={n} k={k} x={list(shape)}")
    return probe


def check_gemv(op: GemvOp, dtype: torch.dtype, rows: tuple[int, ...] = (1, 3, GEMV_MAX_ROWS)) -> None:
    """A GEMV build's operator against float64 at the shapes and layouts FastForward passes: widths
    from one vector to 10240, weight rows that fill no tile or stream evenly, ``rows`` input rows
    (between 1 and 16 rows: a strided view), with and without bias. Raises AssertionError naming
    the case."""
    name = GEMV_PROBES[dtype]
    g = torch.Generator().manual_seed(0)
    for n, k in ((1, 32), (7, 64), (130, 96), (64, 2048), (200, 10240)):
        w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
        b = torch.randn(n, generator=g)
        for bias in (b, torch.empty(0)):
            for m in rows:
                strided = 1 < m < GEMV_MAX_ROWS  # every other row of a wider tensor
                x = torch.randn(m, 2, k, generator=g).to(dtype)[:, 1] if strided else \
                    torch.randn(m, k, generator=g).to(dtype)
                got = op(aligned_owned(w), x, bias)
                want = x.double() @ w.double().T + (bias.double() if bias.numel() else 0)
                _check(name, got, want, gemv_bound(x, w, want, dtype),
                       f"n={n} k={k} rows={x.shape[0]} bias={bool(bias.numel())}")


def _probe_gemv(dtype: torch.dtype) -> Callable[[], None]:
    """The GEMV build serving this process's ATen level, against float64 (``check_gemv``); and
    oneDNN's linear on the same plain weights (in ``long_step_dtype``: a bf16 weight widened to
    fp32 where oneDNN lacks bf16), which takes the steps of more rows (prefill) in that mode."""
    def probe() -> None:
        name = GEMV_PROBES[dtype]
        build, why = gemv_build(dtype)
        if build is None:
            raise Unsupported(why)
        load_gemv(build)
        check_gemv(getattr(getattr(torch.ops, build.namespace), build.op), dtype)
        g = torch.Generator().manual_seed(0)
        run = long_step_dtype(dtype)
        for n, k, rows in ((96, 64, 17), (320, 128, 40)):
            w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
            b = torch.randn(n, generator=g).to(dtype)
            x = torch.randn(1, rows, k, generator=g).to(dtype)
            want = x.double() @ w.double().T + b.double()
            ulp = 2.0**-7 if dtype != torch.float32 else 2.0**-20
            bound = (x.double().abs() @ w.double().abs().T + b.double().abs()) * ulp * 2 + 1e-5
            x, w, b = x.to(run), aligned_owned(w.to(run)), b.to(run)
            got = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
            _check(name, got, want, bound, f"oneDNN plain weight n={n} k={k} rows={rows}")
            got = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "tanh")
            _check(name, got, F.gelu(want, approximate="tanh"), bound * 2 + 1e-3,
                   f"oneDNN plain weight, gelu n={n} k={k} rows={rows}")
    return probe


# torch.ops.<namespace> of one decode_f32.cpp build: attention_f32, split_rotary, merge_gelu,
# attend_step, add_layer_norm, as the source's TORCH_LIBRARY block declares them.
DecodeOps = Any


def _fp32_build_ops() -> DecodeOps:
    """The operators of the fp32 build serving this ATen level, loaded (what the attention and glue
    probes check); Unsupported where none serves it."""
    build, why = gemv_build(torch.float32)
    if build is None:
        raise Unsupported(why)
    load_gemv(build)
    return getattr(torch.ops, build.namespace)


def check_attention(ops: DecodeOps) -> None:
    """One query's attention against float64 SDPA: a cache view wider than the keys read, batch
    rows with and without a padding mask, a strided q, head sizes 16-64, fp32 and bf16 caches."""
    op = ops.attention_f32
    g = torch.Generator().manual_seed(0)
    shapes = ((1, 2, 1, 16), (1, 32, 130, 64), (3, 4, 33, 32), (2, 3, 700, 64))
    for (batch, heads, seen, dim), cache_dtype in itertools.product(shapes, (torch.float32, torch.bfloat16)):
        k_cache = torch.randn(batch, heads, seen + 9, dim, generator=g).to(cache_dtype)
        v_cache = torch.randn(batch, heads, seen + 9, dim, generator=g).to(cache_dtype)
        k, v = aligned_owned(k_cache)[:, :, :seen], aligned_owned(v_cache)[:, :, :seen]
        q = torch.randn(batch, 1, 2 * heads, dim, generator=g).transpose(1, 2)[:, :heads]  # (B, H, 1, D), strided
        masks = [torch.empty(0, dtype=torch.bool)]
        keep = torch.rand(batch, 1, 1, seen, generator=g) > 0.4
        keep[..., -1] = True  # every query sees its own key (model.causal_mask)
        masks.append(keep)
        for mask in masks:
            want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                  attn_mask=mask if mask.numel() else None)
            got = op(q, k, v, mask)
            _check(ATTENTION_PROBE, got, want, 1e-5 * (1 + want.abs()),
                   f"{DTYPE_SHORT[cache_dtype]} cache, batch={batch} heads={heads} keys={seen} dim={dim} "
                   f"mask={bool(mask.numel())}")


def check_decode_glue(ops: DecodeOps) -> None:
    """split_rotary and merge_gelu against ATen's ops (model.apply_rotary, F.gelu) in float64:
    bf16 and fp32, one and three rows, cos/sin shared and per row, u a strided view."""
    from phibook.model.model import apply_rotary

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        # rows: positions per batch row (B) or shared (1)
        for batch, heads, dim, rot, ff, rows in ((1, 2, 16, 8, 48, 1), (3, 4, 64, 32, 1024, 3),
                                                 (2, 32, 64, 32, 8192, 1)):
            d = heads * dim
            u = (torch.randn(batch, 1, 3 * d + ff + 5, generator=g) * 3).to(dtype)[..., : 3 * d + ff]  # strided rows
            angle = torch.rand(rows, 1, 1, rot // 2, generator=g) * 6.3
            cos = torch.cat([angle.cos(), angle.cos()], dim=-1)
            sin = torch.cat([angle.sin(), angle.sin()], dim=-1)
            qk = u[..., : 2 * d].view(batch, 1, 2 * heads, dim)
            want_qk = apply_rotary(qk.double(), cos.double(), sin.double()).transpose(1, 2)
            want = torch.cat([want_qk.reshape(batch, 2, heads, 1, dim).transpose(0, 1),
                              u[..., 2 * d : 3 * d].double().view(batch, 1, heads, dim).transpose(1, 2)[None]])
            got = ops.split_rotary(u, cos, sin, heads, dim)
            ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-18  # one rounding to the dtype, and fp32's
            _check(GLUE_PROBE, got, want, ulp * (1 + want.abs()), f"split_rotary {dtype} batch={batch} heads={heads}")
            y = torch.randn(batch, heads, 1, dim, generator=g)
            want = torch.cat([y.double().transpose(1, 2).reshape(batch, 1, d),
                              F.gelu(u[..., 3 * d :].double(), approximate="tanh")], dim=-1)
            got = ops.merge_gelu(y, u)
            if got.dtype != dtype or got.shape != want.shape:
                raise AssertionError(f"merge_gelu gave {got.dtype} {tuple(got.shape)}, not {dtype} {tuple(want.shape)}")
            _check(GLUE_PROBE, got, want, ulp * (1 + want.abs()), f"merge_gelu {dtype} batch={batch} heads={heads}")


def check_decode_step(ops: DecodeOps) -> None:
    """attend_step against the ops it joins (split_rotary, the writes, attention_f32, merge_gelu;
    each checked against float64 by its own probe): fp32 and bf16 models over fp32 and bf16 caches,
    one and three rows, a mask or none, rows writing one column, two or none. add_layer_norm's sum
    against ATen's add (exactly) and its LayerNorm against float64."""
    g = torch.Generator().manual_seed(0)
    for dtype, cache_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                               (torch.bfloat16, torch.bfloat16)):
        for batch, heads, dim, rot, ff, seen in ((1, 2, 16, 8, 48, 5), (3, 4, 64, 32, 1024, 37)):
            d, width = heads * dim, seen + 7
            u = (torch.randn(batch, 1, 3 * d + ff + 5, generator=g) * 3).to(dtype)[..., : 3 * d + ff]
            angle = torch.rand(batch, 1, 1, rot // 2, generator=g) * 6.3
            cos = torch.cat([angle.cos(), angle.cos()], dim=-1)
            sin = torch.cat([angle.sin(), angle.sin()], dim=-1)
            k_cache = aligned_owned(torch.randn(batch, heads, width, dim, generator=g).to(dtype).to(cache_dtype))
            v_cache = aligned_owned(torch.randn(batch, heads, width, dim, generator=g).to(dtype).to(cache_dtype))
            columns = torch.full((batch, 2), -1, dtype=torch.long)
            columns[:, 0] = seen - 1
            columns[0, 1] = 1  # a row writing two columns; the others one, the scratch column
            if batch > 1:
                columns[-1, 0] = -1  # and a row writing none
            keep = torch.rand(batch, 1, 1, seen, generator=g) > 0.4
            keep[..., -1] = True
            for mask in (torch.empty(0, dtype=torch.bool), keep):
                k_got, v_got = k_cache.clone(), v_cache.clone()
                got = ops.attend_step(u, cos, sin, heads, dim, k_got, v_got, columns, seen, mask)
                q, k, v = ops.split_rotary(u, cos, sin, heads, dim).unbind(0)
                k_want, v_want = k_cache.clone(), v_cache.clone()
                for row in range(batch):
                    for col in columns[row].tolist():
                        if col >= 0:
                            k_want[row, :, col] = k[row, :, 0].to(cache_dtype)
                            v_want[row, :, col] = v[row, :, 0].to(cache_dtype)
                what = f"{DTYPE_SHORT[dtype]} model, {DTYPE_SHORT[cache_dtype]} cache, batch={batch} heads={heads}"
                if not (torch.equal(k_got, k_want) and torch.equal(v_got, v_want)):
                    raise AssertionError(f"attend_step wrote other cache columns or values than split_rotary's ({what})")
                want = ops.merge_gelu(ops.attention_f32(q, k_want[:, :, :seen], v_want[:, :, :seen], mask), u)
                if got.dtype != want.dtype or got.shape != want.shape:
                    raise AssertionError(f"attend_step gave {got.dtype} {tuple(got.shape)}, not {want.dtype} "
                                         f"{tuple(want.shape)} ({what})")
                ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-18  # a rounding apart at most
                _check(STEP_PROBE, got, want, ulp * (1 + want.double().abs()), f"attend_step {what}")
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((1, 1, 64), (3, 1, 2048)):
            x = (torch.randn(shape, generator=g) * 4 + 1).to(dtype)
            y = torch.randn(shape, generator=g).to(dtype)
            w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)
            b = torch.randn(shape[-1], generator=g).to(dtype)
            got_s, got_h = ops.add_layer_norm(x, y, w, b, 1e-5)
            want_s = (x.float() + y.float()).to(dtype)
            if not torch.equal(got_s, want_s):
                raise AssertionError(f"add_layer_norm's sum is not ATen's add ({DTYPE_SHORT[dtype]}, {shape})")
            want_h = F.layer_norm(want_s.double(), shape[-1:], w.double(), b.double(), 1e-5)
            ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-18
            _check(STEP_PROBE, got_h, want_h, ulp * (1 + want_h.abs()), f"add_layer_norm {DTYPE_SHORT[dtype]} {shape}")


def _probe_inductor() -> None:
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 32, generator=g), torch.randn(48, generator=g)

    def step(x: Tensor, cache: Tensor, slot: Tensor) -> Tensor:
        h = F.gelu(F.linear(F.layer_norm(x, (32,)), w, b), approximate="tanh")
        cache.index_copy_(0, slot, h[:1, :16])
        return h.sum(-1, keepdim=True) + cache.sum(0)

    compiled = torch.compile(step, dynamic=False)
    for i in range(3):
        x = torch.randn(2, 32, generator=g)
        c1, c2 = torch.zeros(4, 16), torch.zeros(4, 16)
        slot = torch.tensor([i])
        want, got = step(x, c1, slot), compiled(x, c2, slot)
        _check("inductor", got, want, 1e-4 * (1 + want.abs()), f"compiled step {i}")
        _check("inductor", c2, c1, 1e-5, f"compiled cache write {i}")


DTYPE_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
KERNELS: dict[str, Callable[[], None]] = {
    "int8pack": _probe_int8pack,
    "int4pack": _probe_int4pack,
    "w8a8": _probe_w8a8,
    "onednn-fp32": _probe_onednn(torch.float32),
    "onednn-bf16": _probe_onednn(torch.bfloat16),
    "onednn-fp16": _probe_onednn(torch.float16),
    "inductor": _probe_inductor,
    "gemv-bf16": _probe_gemv(torch.bfloat16),
    "gemv-fp32": _probe_gemv(torch.float32),
    ATTENTION_PROBE: lambda: check_attention(_fp32_build_ops()),
    GLUE_PROBE: lambda: check_decode_glue(_fp32_build_ops()),
    STEP_PROBE: lambda: check_decode_step(_fp32_build_ops()),
}


def run_probe(name: str) -> dict:
    """Run one probe in this process; {"ok": bool, "why": str}. Crashes are the caller's to catch."""
    fault = os.environ.get(FAULT_ENV, "")
    if fault == f"{name}:crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    try:
        KERNELS[name]()
    except AssertionError as exc:
        return {"ok": False, "why": f"wrong result ({exc})"}
    except Unsupported as exc:
        return {"ok": False, "why": f"not supported ({exc})"}
    except (RuntimeError, NotImplementedError, AttributeError, TypeError) as exc:
        return {"ok": False, "why": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    return {"ok": True, "why": "matches the reference on every probe"}


# --------------------------------------------------------------------------- verdicts (caller side)


def cache_dir() -> Path:
    if os.environ.get("PHIBOOK_CACHE_DIR"):
        return Path(os.environ["PHIBOOK_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "phibook"


def _cpu_flags_digest() -> str:
    from phibook.cpu_features import cpu_flags, read_cpuinfo

    flags = cpu_flags(read_cpuinfo()) or set()
    return hashlib.sha1(" ".join(sorted(flags)).encode()).hexdigest()[:12]


@functools.cache
def kernel_sources_digest() -> str:
    """A digest of phibook's kernel sources (csrc/): a changed kernel is checked again, never
    trusted on the verdict its previous source earned."""
    digest = hashlib.sha1()
    for path in sorted([*CSRC.glob("*.cpp"), *CSRC.glob("*.h")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def verdict_key(name: str) -> str:
    """What a verdict depends on: the kernel and its source, torch's build, the CPU and the ISA
    caps in force."""
    capability = torch.backends.cpu.get_cpu_capability()
    onednn_cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "-"
    return (f"{name}|torch {torch.__version__}|src {kernel_sources_digest()}|cpu {_cpu_flags_digest()}|aten {capability}"
            f"|onednn {onednn_cap}")


_lock = threading.Lock()
_verdicts: dict[str, bool] = {}


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, key: str, entry: dict) -> None:
    """Merge one verdict into the cache file (temp file + rename; a lost race only re-probes)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data[key] = entry
        io.write_json(path, data, indent=1, sort_keys=True)  # a random temp name: safe across threads
    except OSError:
        pass  # a read-only home: the verdict still holds for this process


def probe_in_child(name: str, timeout_s: float | None = None) -> tuple[bool | None, str]:
    """(verdict, why) from a child process; verdict None when the probe ran out of time."""
    timeout_s = timeout_s or PROBE_TIMEOUT_S.get(name, DEFAULT_PROBE_TIMEOUT_S)
    cmd = [sys.executable, "-m", "phibook.inference.kernels", "--probe", name]
    # The child imports this very phibook, however the parent found it (installed, a checkout on
    # sys.path): a child that cannot import it would refuse a good kernel.
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL,
                              env=env)
    except subprocess.TimeoutExpired:
        return None, f"its probe took over {timeout_s:.0f} s (not cached: probed again next run)"
    except OSError as exc:
        return None, f"its probe could not start ({exc})"
    if proc.returncode < 0:
        try:
            sig = signal.Signals(-proc.returncode).name
        except ValueError:
            sig = f"signal {-proc.returncode}"
        return False, f"its probe crashed ({sig})"
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            try:
                result = json.loads(line)
                return bool(result["ok"]), str(result["why"])
            except (ValueError, KeyError):
                break
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return False, f"its probe exited {proc.returncode} ({tail})"


def kernel_ok(name: str, log: Callable[[str], None] | None = None) -> bool:
    """Whether kernel ``name`` may be used on this CPU (see the module doc). The first call per
    process reads the cache or probes in a child; later calls are a dictionary lookup."""
    verdict = _verdicts.get(name)
    if verdict is not None:
        return verdict
    if name not in KERNELS:
        raise KeyError(f"unknown kernel {name!r}; known: {', '.join(KERNELS)}")
    with _lock:
        if name in _verdicts:
            return _verdicts[name]
        key = verdict_key(name)
        path = cache_dir() / CACHE_FILE
        entry = _read_cache(path).get(key)
        if isinstance(entry, dict) and isinstance(entry.get("ok"), bool):
            ok, why = entry["ok"], str(entry.get("why", ""))
        else:
            t0 = time.perf_counter()
            ok, why = probe_in_child(name)
            if ok is not None:
                _write_cache(path, key, {"ok": ok, "why": why, "probe_s": round(time.perf_counter() - t0, 2),
                                         "checked": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            ok = bool(ok)
        if not ok:
            (log or _stderr)(f"kernel check: {name} refused on this CPU ({why}); using the plain path instead")
        _verdicts[name] = ok
        return ok


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def forget_verdicts() -> None:
    """Drop this process's remembered verdicts (the file cache stays): for tests."""
    with _lock:
        _verdicts.clear()


def cached_verdicts() -> dict[str, dict]:
    """The cache file's verdicts, by key."""
    return _read_cache(cache_dir() / CACHE_FILE)


def check_emulated(log: Callable[[str], None] = print) -> int:
    """Every emulated AVX-512 build (``emulated_builds``) against the probes' references, one line
    each; 0 when all match, 1 on a wrong result, 2 when they cannot be built here."""
    try:
        builds = emulated_builds()
    except Unsupported as exc:
        log(f"emulated AVX-512 builds: not run ({exc})")
        return 2
    failed = 0
    for build in builds:
        try:
            load_gemv(build)
            ops = getattr(torch.ops, build.namespace)
            check_gemv(getattr(ops, build.op), build.dtype, rows=(1, 2, 3, 4, 5, 8, 15, GEMV_MAX_ROWS))
            checks = ["gemv"]
            if build.source.name == "decode_f32.cpp" and build.dtype == torch.float32:
                check_attention(ops)
                check_decode_glue(ops)
                check_decode_step(ops)
                checks += [ATTENTION_PROBE, GLUE_PROBE, STEP_PROBE]
        except Unsupported as exc:
            log(f"{build.label} (emulated): not run ({exc})")
            return 2
        except AssertionError as exc:
            log(f"{build.label} (emulated): WRONG ({exc})")
            failed += 1
            continue
        log(f"{build.label} (emulated): ok ({', '.join(checks)})")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Check a native kernel against a plain reference on this CPU.")
    ap.add_argument("--probe", choices=sorted(KERNELS), help="run one probe in this process and print its verdict")
    ap.add_argument("--all", action="store_true", help="check every kernel (each in a child) and print the verdicts")
    ap.add_argument("--emulated", action="store_true",
                    help="build the AVX-512 kernels for AVX2 with their intrinsics emulated (SIMDe) and check them "
                         "against the probes' references: their logic, on a CPU without AVX-512 (exit 1 on a miss)")
    args = ap.parse_args(argv)
    if args.probe:
        print(json.dumps(run_probe(args.probe)), flush=True)
        return 0
    if args.emulated:
        return check_emulated()
    for name in KERNELS:
        ok = kernel_ok(name, log=lambda _m: None)
        entry = cached_verdicts().get(verdict_key(name), {})
        print(f"{name:12s} {'ok' if ok else 'REFUSED':8s} {entry.get('why', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
