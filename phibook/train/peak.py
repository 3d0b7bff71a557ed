"""Peak FLOP/s for MFU: the CPU's from what it is (never a timing taken while it is busy), a
GPU's from a table, and the training FLOPs per token they are divided into.

The peak FLOP/s that MFU divides by, and the demo's bf16-or-fp32 choice, are read from
the CPU's features (``/proc/cpuinfo`` flags, the core count, the clock), never timed: a
timing taken while other processes share the machine comes out too low (MFU then reads
above 100%) and flips from run to run.

    peak = cores x flops per cycle per core x max clock

* flops per cycle per core, fp32: vector lanes x 2 (an FMA is a multiply and an add) x
  FMA units. AVX-512 (``avx512f``) has 16 fp32 lanes, AVX2/AVX 8, SSE 4. Two FMA units
  per core are assumed for AVX2/AVX-512 cores (Intel Haswell and later server cores,
  AMD Zen 2 and later, which is what training machines have; cores with one unit make the
  bound twice their real peak, so MFU reads low there, never high). Without FMA (AVX
  only, SSE) one multiply and one add issue per cycle: lanes x 2.
* bf16: AMX (``amx_bf16``) tiles do 1024 bf16 FLOPs per cycle per core; AVX512-BF16
  (``avx512_bf16``: VDPBF16PS, two bf16 products per fp32 lane) twice the AVX-512 fp32
  rate. Without either, bf16 is converted and multiplied in fp32, so its bound is fp32's.
* fp16: AMX-FP16 1024, AVX512-FP16 (32 lanes) 128, else fp32's bound (emulated).
* cores: the logical CPUs this process may run on (``os.sched_getaffinity``), at most
  the threads torch computes with; SMT siblings count as cores, which only raises the bound.
* clock: ``cpuinfo_max_freq`` (sysfs, the turbo ceiling), else the highest ``cpu MHz``
  in /proc/cpuinfo (a virtual machine's nominal clock), else 5 GHz, above any shipping
  server CPU's all-core clock.
* no /proc/cpuinfo flags at all (not Linux): AVX-512-class 64 fp32 FLOPs per cycle, so
  the bound stays an upper bound wherever the vector width is unknown.

Each of these is an upper bound, so a measured MFU cannot exceed 100% unless the clock
reading is below the real one (a VM reporting its base clock while the host turbos); the
trainer clamps at 100% and warns if that ever happens.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# The CPU's features are read in the base layer (inference chooses its dtype from them too).
from phibook.cpu_features import bf16_native, cpu_flags, precision_choice, read_cpuinfo  # noqa: F401

if TYPE_CHECKING:
    from phibook.model.config import PhiConfig
    from phibook.train.config import TrainConfig

MAX_FREQ = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
DEFAULT_CLOCK_HZ = 5.0e9
AMX_FLOPS_PER_CYCLE = 1024


@dataclass(frozen=True)
class CpuPeak:
    flops: float  # FLOP/s of all ``cores`` together at ``dtype``
    dtype: str  # fp32 | bf16 | fp16
    cores: int
    clock_hz: float
    clock_source: str
    flops_per_cycle: int  # per core
    isa: str  # which units the count assumes, in words

    def describe(self) -> str:
        return (f"{self.flops / 1e9:,.1f} GFLOP/s {self.dtype} = {self.cores} core(s) x {self.flops_per_cycle} "
                f"FLOPs/cycle ({self.isa}) x {self.clock_hz / 1e9:.2f} GHz ({self.clock_source})")


def flops_per_cycle(flags: set[str] | None, dtype: str = "fp32") -> tuple[int, str]:
    """(FLOPs per cycle per core at ``dtype``, what that assumes); see the module doc."""
    if flags is None:
        return 64, "CPU features unknown: AVX-512-class 16 lanes x 2 FMA units assumed"
    if dtype == "bf16":
        if "amx_bf16" in flags:
            return AMX_FLOPS_PER_CYCLE, "AMX-BF16 tiles"
        if "avx512_bf16" in flags:
            return 128, "AVX512-BF16, 32 bf16 pairs x 2 FMA units"
    if dtype == "fp16":
        if "amx_fp16" in flags:
            return AMX_FLOPS_PER_CYCLE, "AMX-FP16 tiles"
        if "avx512_fp16" in flags:
            return 128, "AVX512-FP16, 32 lanes x 2 FMA units"
    emulated = f"; {dtype} emulated through fp32" if dtype != "fp32" else ""
    if "avx512f" in flags:
        return 64, "AVX-512 FMA, 16 lanes x 2 units" + emulated
    if ("avx2" in flags or "avx" in flags) and "fma" in flags:
        return 32, "AVX2 FMA, 8 lanes x 2 units" + emulated
    if "avx" in flags:
        return 16, "AVX, 8 lanes x (1 mul + 1 add)" + emulated
    if "asimd" in flags:  # Arm NEON: 4 fp32 lanes, 2 FMA pipes on server cores (SVE widths vary)
        width = "SVE up to 512-bit" if "sve" in flags else "NEON"
        return (64 if "sve" in flags else 16), f"{width} FMA x 2 units" + emulated
    return 8, "SSE, 4 lanes x (1 mul + 1 add)" + emulated


def cpu_clock_hz(cpuinfo: str, max_freq_khz: str | None = None) -> tuple[float, str]:
    """(Hz, where it came from): sysfs max frequency, else the highest cpuinfo ``cpu MHz``, else 5 GHz."""
    if max_freq_khz is None:
        try:
            max_freq_khz = MAX_FREQ.read_text()
        except OSError:
            max_freq_khz = ""
    try:
        khz = float(max_freq_khz.strip())
        if khz > 0:
            return khz * 1e3, "cpuinfo_max_freq"
    except ValueError:
        pass
    mhz = []
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "cpu MHz":
            try:
                mhz.append(float(value))
            except ValueError:
                continue
    if mhz and max(mhz) > 0:
        return max(mhz) * 1e6, "/proc/cpuinfo cpu MHz"
    return DEFAULT_CLOCK_HZ, "unknown; 5 GHz assumed"


def usable_cores(threads: int | None = None) -> int:
    """Logical CPUs this process may run on, at most ``threads`` (torch's compute threads)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    if threads:
        cores = min(cores, threads)
    return max(1, cores)


def cpu_peak(dtype: str = "fp32", cpuinfo: str | None = None, cores: int | None = None,
             max_freq_khz: str | None = None) -> CpuPeak:
    """The theoretical peak of this CPU (or of the given cpuinfo text) at ``dtype``."""
    text = read_cpuinfo() if cpuinfo is None else cpuinfo
    per_cycle, isa = flops_per_cycle(cpu_flags(text), dtype)
    clock, source = cpu_clock_hz(text, max_freq_khz)
    n = cores if cores else usable_cores()
    return CpuPeak(n * per_cycle * clock, dtype, n, clock, source, per_cycle, isa)


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def busy_note(cores: int | None = None, load: float | None = None) -> str | None:
    """"the machine is busy (load N on C cores)" when the 1-minute load average is above the
    core count (other processes are taking the CPU), else None."""
    load = load_average() if load is None else load
    cores = cores or (os.cpu_count() or 1)
    if load is not None and load > cores:
        return f"the machine is busy (load {load:.1f} on {cores} cores)"
    return None


# --------------------------------------------------------------------------- MFU


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
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    peak = cpu_peak(names.get(dtype, "fp32"), cores=_cpu_cores())
    return peak.flops, peak.describe()


def _cpu_cores() -> int:
    import torch

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
