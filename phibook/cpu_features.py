"""What this CPU has, from /proc/cpuinfo's flags: the one place that reads them.

The trainer's peak (phibook.train.peak), the demo's precision and inference's dtype
(phibook.inference.load) are all chosen from these features, never from a timing taken at
start-up (a timing on a shared machine flips from run to run).
"""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def read_cpuinfo() -> str:
    try:
        return CPUINFO.read_text(errors="replace")
    except OSError:
        return ""


def cpu_flags(cpuinfo: str) -> set[str] | None:
    """The first processor's feature flags (x86 ``flags``, Arm ``Features``); None when absent."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def bf16_native(flags: set[str] | None) -> bool:
    """Whether bf16 matmuls run on bf16 units (AVX512-BF16 or AMX) rather than being emulated."""
    return bool(flags) and bool({"avx512_bf16", "amx_bf16"} & flags)


def precision_choice(cpuinfo: str | None = None) -> tuple[str, str]:
    """(bf16 | fp32, why) for training on this CPU, from its features: no timing."""
    flags = cpu_flags(read_cpuinfo() if cpuinfo is None else cpuinfo)
    if flags is not None and "amx_bf16" in flags:
        return "bf16", "this CPU has AMX-BF16"
    if flags is not None and "avx512_bf16" in flags:
        return "bf16", "this CPU has AVX512-BF16"
    if flags is None:
        return "fp32", "this CPU's features are unknown, so bf16 may be emulated"
    return "fp32", "this CPU has no AVX512-BF16/AMX, so bf16 would be emulated"
