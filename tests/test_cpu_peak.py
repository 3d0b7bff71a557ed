"""The CPU's peak FLOP/s and the demo's precision come from what the CPU is (its flags, cores and
clock), never from a timing taken while other processes share the machine."""

from __future__ import annotations

import pytest

from phibook.train.peak import (
    busy_note,
    cpu_clock_hz,
    cpu_flags,
    cpu_peak,
    flops_per_cycle,
    precision_choice,
)

BASE = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov sse sse2 ht syscall nx lm"
AVX2 = BASE + " ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi1 bmi2"
AVX512 = AVX2 + " avx512f avx512dq avx512cd avx512bw avx512vl"
AVX512_BF16 = AVX512 + " avx512_bf16 avx512_vnni"
AMX = AVX512_BF16 + " amx_bf16 amx_tile amx_int8 avx512_fp16"


def cpuinfo(flags: str | None, mhz: float | None = 2445.422, cpus: int = 2) -> str:
    blocks = []
    for i in range(cpus):
        lines = [f"processor\t: {i}", "vendor_id\t: GenuineIntel", "model name\t: Some CPU"]
        if mhz is not None:
            lines.append(f"cpu MHz\t\t: {mhz + i:.3f}")
        if flags is not None:
            lines.append(f"flags\t\t: {flags}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


@pytest.mark.parametrize(
    ("flags", "dtype", "per_cycle"),
    [
        (AVX2, "fp32", 32),  # 8 lanes x 2 (FMA) x 2 units
        (AVX2, "bf16", 32),  # emulated: no faster than fp32
        (AVX512, "fp32", 64),  # 16 lanes x 2 x 2
        (AVX512, "bf16", 64),
        (AVX512_BF16, "bf16", 128),  # VDPBF16PS: twice the fp32 rate
        (AVX512_BF16, "fp32", 64),
        (AMX, "bf16", 1024),  # AMX tiles
        (AMX, "fp16", 128),  # AVX512-FP16 (no amx_fp16 flag)
        (BASE, "fp32", 8),  # SSE: 4 lanes x (mul + add)
        (BASE + " avx", "fp32", 16),  # AVX without FMA
    ],
)
def test_flops_per_cycle_from_flags(flags, dtype, per_cycle):
    got, isa = flops_per_cycle(cpu_flags(cpuinfo(flags)), dtype)
    assert got == per_cycle, isa


def test_peak_is_cores_times_flops_per_cycle_times_clock():
    peak = cpu_peak("fp32", cpuinfo=cpuinfo(AVX2), cores=2, max_freq_khz="")
    # the highest "cpu MHz" of the processors, 2446.422 MHz
    assert peak.clock_hz == pytest.approx(2446.422e6)
    assert peak.flops == pytest.approx(2 * 32 * 2446.422e6)
    assert "AVX2" in peak.describe() and "cpu MHz" in peak.describe()
    # the sysfs maximum (the turbo ceiling, kHz) wins over cpuinfo's current clock
    turbo = cpu_peak("bf16", cpuinfo=cpuinfo(AMX), cores=4, max_freq_khz="3800000\n")
    assert turbo.flops == pytest.approx(4 * 1024 * 3.8e9) and turbo.clock_source == "cpuinfo_max_freq"


def test_no_flags_and_no_clock_give_a_generous_upper_bound():
    assert cpu_flags(cpuinfo(None)) is None
    peak = cpu_peak("fp32", cpuinfo=cpuinfo(None, mhz=None), cores=1, max_freq_khz="")
    # unknown vector width: AVX-512 class; unknown clock: 5 GHz, above any server's all-core clock
    assert peak.flops_per_cycle == 64 and peak.clock_hz == 5e9
    assert cpu_clock_hz("", "") == (5e9, "unknown; 5 GHz assumed")
    assert cpu_peak(cpuinfo="", cores=1, max_freq_khz="").flops == 64 * 5e9


@pytest.mark.parametrize(
    ("flags", "want"),
    [(AVX2, ("fp32", "no AVX512-BF16/AMX")), (AVX512, ("fp32", "no AVX512-BF16/AMX")),
     (AVX512_BF16, ("bf16", "AVX512-BF16")), (AMX, ("bf16", "AMX-BF16")), (None, ("fp32", "unknown"))],
)
def test_precision_from_features_not_timing(flags, want):
    precision, why = precision_choice(cpuinfo(flags))
    assert precision == want[0] and want[1] in why


def test_demo_picks_precision_from_features(monkeypatch):
    from phibook.demo import run
    from phibook.train import peak

    def no_timing(*a, **k):
        raise AssertionError("the precision must not be chosen by timing matmuls")

    monkeypatch.setattr(peak, "measure_matmul_flops", no_timing)
    assert run.pick_precision(cpuinfo(AVX2)) == ("fp32", "this CPU has no AVX512-BF16/AMX, so bf16 would be emulated")
    assert run.pick_precision(cpuinfo(AMX))[0] == "bf16"


def test_busy_note_names_the_load():
    assert busy_note(cores=2, load=5.25) == "the machine is busy (load 5.2 on 2 cores)"
    assert busy_note(cores=8, load=3.0) is None


def test_trainer_peak_on_cpu_is_derived_not_timed(monkeypatch):
    import torch

    from phibook.train import peak
    from phibook.train.config import TrainConfig
    from phibook.train.peak import usable_cores

    monkeypatch.setattr(peak, "measure_matmul_flops", lambda *a, **k: pytest.fail("timed the peak"))
    cfg = TrainConfig()
    got = peak.peak_flops(cfg, torch.device("cpu"), torch.float32)
    assert got == cpu_peak("fp32", cores=usable_cores(torch.get_num_threads())).flops
    cfg.peak_tflops = 2.0  # the override still wins
    assert peak.peak_flops(cfg, torch.device("cpu"), torch.float32) == 2e12
