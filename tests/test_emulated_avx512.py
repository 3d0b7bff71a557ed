"""The AVX-512 kernels checked on every x86 CPU, AVX-512 or not.

decode_f32.cpp's AVX-512F branch serves fp32 (and bf16 without AVX512-BF16) decode on AVX-512
CPUs, and gemv_bf16.cpp serves bf16 decode on AVX512-BF16 ones; a machine without those flags
never runs either, so a slip in their tiles, tails or reductions would first show on a user's
machine (as a refused probe: lost speed). Here they are built for AVX2 + FMA with their AVX-512
intrinsics emulated by SIMDe (kernels.emulated_builds, csrc/emulated_avx512.h) and held to the
same float64 references as the probes on a real AVX-512 CPU. The emulation checks logic, not
speed, and never serves a model.

Needs SIMDe's headers (Debian: libsimde-dev, which .ci/run installs), a C++ compiler and ninja;
skips with the reason where one is missing.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch.utils import cpp_extension

from phibook.inference import kernels as K

DECODE_FP32 = "fp32 decode_f32.cpp AVX512"
BUILDS = ["bf16 gemv_bf16.cpp AVX512", "bf16 decode_f32.cpp AVX512", DECODE_FP32,
          "bf16 gemv_bf16.cpp AVX512 streams4"]


@pytest.fixture(scope="module")
def emulated() -> dict[str, K.GemvBuild]:
    try:
        builds = K.emulated_builds()  # refuses without SIMDe's headers or AVX2 + FMA
    except K.Unsupported as exc:
        pytest.skip(f"the emulated AVX-512 builds cannot run here: {exc}")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None or not cpp_extension.is_ninja_available():
        pytest.skip(f"no C++ compiler ({compiler}) or no ninja: the kernels cannot be built here")
    for build in builds:
        K.load_gemv(build)  # with a compiler and ninja, a build that fails is a failure, not a skip
    return {b.label: b for b in builds}


def _ops(build: K.GemvBuild):
    return getattr(torch.ops, build.namespace)


def test_the_emulated_builds_are_the_avx512_ones_and_never_serve(emulated) -> None:
    assert set(emulated) == set(BUILDS)
    # the AVX-512 branch of decode_f32.cpp (16 lanes), not the AVX2 one the compiler targets (8)
    assert _ops(emulated[DECODE_FP32]).lanes() == 16
    assert "-DPHIBOOK_GEMV_STREAMS=4" in emulated["bf16 gemv_bf16.cpp AVX512 streams4"].cflags
    real = {b.namespace for b in (*K.GEMV_BUILDS, *K.GEMV_CANDIDATES)}
    assert all(b.namespace not in real and b.namespace.endswith("_emulated") for b in emulated.values())
    for dtype in (torch.float32, torch.bfloat16):
        build, _why = K.gemv_build(dtype)
        assert build is None or not build.emulated
        if build is not None and build.source.name == "decode_f32.cpp" and build.level == "AVX2":
            K.load_gemv(build)
            assert _ops(build).lanes() == 8  # the op tells the branches apart


def test_emulated_builds_match_the_probes_references(emulated) -> None:
    """Each GEMV at every input-row count a tile or its tail takes (1-5, 8, 15, 16), at widths and
    weight rows that fill no tile or stream evenly; the fp32 build's attention, decode glue and
    decode step (kernels.check_emulated, what ``python -m phibook.inference.kernels --emulated``
    prints)."""
    lines: list[str] = []
    rc = K.check_emulated(log=lines.append)
    assert rc == 0, "\n".join(lines)
    assert len(lines) == len(BUILDS) and all(line.endswith(")") and ": ok (" in line for line in lines), lines
    assert any("decode-step" in line for line in lines)
