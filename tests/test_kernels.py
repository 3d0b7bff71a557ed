"""Native kernels only after a check on this CPU (phibook.inference.kernels), in aligned memory,
and int4 weights that do not depend on the kernel's private packed layout.

The kernels really run here: the faults are forced through the probe's test hook
(PHIBOOK_KERNEL_PROBE_FAULT: the probe child dies of SIGSEGV, or sees a wrong result), the
way a broken kernel on another CPU would fail its probe.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phibook.inference import kernels as K
from phibook.inference import quant as Q

ENV = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def fresh_verdicts(tmp_path: Path, monkeypatch):
    """A cache of the test's own, and no remembered verdicts before or after it."""
    monkeypatch.setenv("PHIBOOK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(K.FAULT_ENV, raising=False)
    K.forget_verdicts()
    yield tmp_path / "cache"
    K.forget_verdicts()


def test_aligned_owned_copies_what_a_kernel_cannot_take() -> None:
    base = torch.arange(64 * 9, dtype=torch.int8)
    off = base[8:].view(8, 71)[:, :64]  # not contiguous, 8 bytes in
    fixed = K.aligned_owned(off)
    assert torch.equal(fixed, off) and K.is_aligned_owned(fixed)
    view = base[8 : 8 + 64 * 8].view(8, 64)  # contiguous, but a view 8 bytes into another storage
    assert not K.is_aligned_owned(view) and K.is_aligned_owned(K.aligned_owned(view))
    owned = torch.empty(16, 64, dtype=torch.int8)
    assert K.aligned_owned(owned).data_ptr() == owned.data_ptr()  # already fine: no copy


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_reloaded_quantized_weights_are_aligned_and_owned(tiny_checkpoint: Path, tmp_path: Path, mode: str) -> None:
    """What a saved file gives back is copied into aligned storage of its own (the int8 kernel
    crashed on AVX-512 on a weight safetensors handed back 8 bytes off a 64-byte boundary)."""
    from phibook.inference.load import load_inference_model

    ckpt = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    load_inference_model(ckpt, dtype="fp32", quant=mode, log=None)  # quantizes and saves
    notes: list[str] = []
    model = load_inference_model(ckpt, dtype="fp32", quant=mode, log=notes.append).model
    assert not any("quantized to" in n for n in notes)  # from the file
    checked = 0
    for module in model.modules():
        if isinstance(module, Q.QuantLinear):
            for name, t in module.named_buffers():
                if t is not None:
                    assert K.is_aligned_owned(t), f"{name}: data_ptr % 64 = {t.data_ptr() % 64}"
                    checked += 1
    assert checked >= 10


def test_int4_file_written_under_one_instruction_set_loads_under_another(tiny_checkpoint: Path,
                                                                        tmp_path: Path) -> None:
    """quant-int4.safetensors written by a process on ATen's portable (default) kernels, read
    here on this CPU's own level: the same weights, and the kernel on them agrees with them.
    (The kernel's packed layout differs between levels; the saved file no longer holds it.)"""
    from phibook.inference.load import load_inference_model

    ckpt = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    code = ("import sys; from phibook.inference.load import load_inference_model; "
            "load_inference_model(sys.argv[1], dtype='fp32', quant='int4', log=None)")
    proc = subprocess.run([sys.executable, "-c", code, str(ckpt)], capture_output=True, text=True, timeout=300,
                          env={**ENV, "ATEN_CPU_CAPABILITY": "default"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads((ckpt / "quant-int4.json").read_text())["int4_layout"] == Q.INT4_LAYOUT
    notes: list[str] = []
    saved = load_inference_model(ckpt, dtype="fp32", quant="int4", log=notes.append).model
    assert not any("quantized to" in n for n in notes)  # read, not re-made
    a, b = saved.blocks[0].mlp.fc1, Q.Int4Linear.from_linear(_fp32_linear(ckpt, "blocks.0.mlp.fc1"))
    assert torch.equal(a.weight_int4, b.weight_int4) and torch.equal(a.dequantize(), b.dequantize())
    x = torch.randn(3, a.in_features, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        exact = torch.nn.functional.linear(x.double(), a.dequantize().double(), a.bias.double())
        assert (a(x) - exact).abs().max().item() <= 0.02 * exact.abs().max().item()


def _fp32_linear(ckpt: Path, name: str) -> torch.nn.Linear:
    from phibook.weights.checkpoint import load_model

    return load_model(ckpt, dtype=torch.float32).model.get_submodule(name)


def test_a_kernel_whose_probe_crashes_is_refused_and_the_plain_path_is_exact(fresh_verdicts: Path,
                                                                           monkeypatch) -> None:
    monkeypatch.setenv(K.FAULT_ENV, "int8pack:crash")
    lines: list[str] = []
    assert K.kernel_ok("int8pack", log=lines.append) is False
    assert lines == ["kernel check: int8pack refused on this CPU (its probe crashed (SIGSEGV)); "
                     "using the plain path instead"]
    assert K.kernel_ok("int8pack", log=lines.append) is False and len(lines) == 1  # said once
    # Cached: with the fault gone, a new process state still reads the refusal, probing nothing.
    monkeypatch.delenv(K.FAULT_ENV)
    K.forget_verdicts()
    assert K.kernel_ok("int8pack", log=lines.append) is False
    entry = json.loads((fresh_verdicts / K.CACHE_FILE).read_text())[K.verdict_key("int8pack")]
    assert entry["ok"] is False and "SIGSEGV" in entry["why"]
    # The refused kernel's callers take the dequantize path: exact in fp32, for one row too.
    q = Q.Int8Linear.from_linear(torch.nn.Linear(256, 96))
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        exact = torch.nn.functional.linear(x.double(), q.dequantize().double(), q.bias.double()).float()
        assert (q(x) - exact).abs().max().item() <= 1e-5


def test_a_kernel_with_a_wrong_answer_is_refused(fresh_verdicts: Path, monkeypatch) -> None:
    monkeypatch.setenv(K.FAULT_ENV, "int4pack:wrong")
    lines: list[str] = []
    assert K.kernel_ok("int4pack", log=lines.append) is False
    assert "int4pack refused" in lines[0] and "wrong result" in lines[0] and "max error" in lines[0]
    q = Q.Int4Linear.from_linear(torch.nn.Linear(128, 64))
    assert q._packed_k is None  # no kernel form is even made
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        exact = torch.nn.functional.linear(x.double(), q.dequantize().double(), q.bias.double()).float()
        assert (q(x) - exact).abs().max().item() <= 1e-5


def test_w8a8_refused_kernel_falls_back_to_the_int8_path(fresh_verdicts: Path, monkeypatch) -> None:
    monkeypatch.setenv(K.FAULT_ENV, "w8a8:crash")
    linear = torch.nn.Linear(128, 64)
    q, ref = Q.Int8Linear.from_linear(linear, w8a8=True), Q.Int8Linear.from_linear(linear)
    assert q._w8a8 is None
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(q(x), ref(x))


def test_refused_onednn_and_inductor_fall_back(fresh_verdicts: Path, monkeypatch) -> None:
    from phibook.inference.compiled import StaticStep
    from phibook.inference.fast_decode import FastForward, can_pack
    from phibook.model.config import PhiConfig
    from phibook.model.model import PhiModel

    monkeypatch.setenv(K.FAULT_ENV, "onednn-fp32:crash")
    assert can_pack(torch.float32, torch.device("cpu")) is False
    model = PhiModel(PhiConfig(n_layer=2, d_model=64, n_head=2, rotary_dim=16, vocab_size=128, max_seq_len=32))
    model.init_weights(torch.Generator().manual_seed(0))
    fast = FastForward(model)
    assert fast.packed is False
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert (fast(ids) - model(ids)).abs().max().item() <= 1e-4
    monkeypatch.setenv(K.FAULT_ENV, "inductor:crash")
    assert StaticStep(model, compile=True).compiled is False  # eager, no compile attempted


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_refused_gemv_leaves_decode_to_onednn(fresh_verdicts: Path, monkeypatch, dtype: torch.dtype) -> None:
    from phibook.inference.fast_decode import FastForward
    from phibook.model.config import PhiConfig
    from phibook.model.model import PhiModel

    monkeypatch.setenv(K.FAULT_ENV, f"{K.GEMV_PROBES[dtype]}:crash")
    model = PhiModel(PhiConfig(n_layer=2, d_model=64, n_head=2, rotary_dim=16, vocab_size=128, max_seq_len=32))
    model.init_weights(torch.Generator().manual_seed(0))
    ref = model.double()
    ref.reset_rope()
    low = copy.deepcopy(model).to(dtype)
    low.reset_rope()
    fast = FastForward(low)
    assert fast.gemv is False and not fast.blocks[0].proj_in.gemv and fast.blocks[0].proj_in.packed == fast.packed
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert (fast(ids).double() - ref(ids)).abs().max().item() <= (0.05 if dtype == torch.bfloat16 else 1e-4)


def _decode_step_error(make_fast) -> tuple[float, object]:
    """Max logit error of one decode step (after a 9-token prefill) of ``make_fast(model)`` against
    a small fp32 PhiModel, and the FastForward for its caller's asserts."""
    from phibook.model.config import PhiConfig
    from phibook.model.model import KVCache, PhiModel

    model = PhiModel(PhiConfig(n_layer=2, d_model=64, n_head=2, rotary_dim=16, vocab_size=128, max_seq_len=32))
    model.init_weights(torch.Generator().manual_seed(0))
    fast = make_fast(model)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        cache, ref_cache = KVCache(model.config, 1, 16), KVCache(model.config, 1, 16)
        fast(ids, cache=cache), model(ids, cache=ref_cache)
        step = torch.tensor([[3]])
        return (fast(step, cache=cache) - model(step, cache=ref_cache)).abs().max().item(), fast


def test_refused_attention_leaves_decode_to_sdpa(fresh_verdicts: Path, monkeypatch) -> None:
    from phibook.inference.fast_decode import FastForward

    monkeypatch.setenv(K.FAULT_ENV, f"{K.ATTENTION_PROBE}:crash")
    error, fast = _decode_step_error(FastForward)
    assert fast.own_attention is False and fast.blocks[0].attention is None
    assert error <= 1e-4


@pytest.mark.parametrize("fault", ["crash", "wrong"])
def test_refused_decode_glue_leaves_the_step_to_aten(fresh_verdicts: Path, monkeypatch, fault: str) -> None:
    """A decode-glue probe that crashes or answers wrong: FastForward keeps our attention and runs
    the elementwise work through ATen's ops, with the model's logits."""
    from phibook.inference.fast_decode import FastForward

    if K.attention_kernel() is None:
        pytest.skip("phibook's fp32 decode kernels do not run here (see gemv_build)")
    monkeypatch.setenv(K.FAULT_ENV, f"{K.GLUE_PROBE}:{fault}")
    assert K.decode_glue() is None
    error, fast = _decode_step_error(FastForward)
    assert fast.own_attention and fast.own_glue is False and fast.blocks[0].glue is None
    assert error <= 1e-4


@pytest.mark.parametrize("fault", ["crash", "wrong"])
def test_refused_decode_step_leaves_the_step_to_the_glue_ops(fresh_verdicts: Path, monkeypatch, fault: str) -> None:
    """A decode-step probe that crashes or answers wrong: FastForward keeps the glue ops and runs a
    step block by block (split_rotary, the cache's update, attention_f32, merge_gelu), with the
    model's logits."""
    from phibook.inference.fast_decode import FastForward

    if K.attention_kernel() is None or not K.kernel_ok(K.GLUE_PROBE):
        pytest.skip("phibook's decode glue does not run here (see gemv_build and the decode-glue verdict)")
    monkeypatch.setenv(K.FAULT_ENV, f"{K.STEP_PROBE}:{fault}")  # asked first after this
    glue = K.decode_glue()
    assert glue is not None and glue.attend_step is None and glue.add_layer_norm is None
    error, fast = _decode_step_error(FastForward)
    assert fast.own_glue and not fast.own_step
    assert error <= 1e-4


def test_a_changed_kernel_source_is_checked_again(fresh_verdicts: Path, tmp_path: Path, monkeypatch) -> None:
    """A verdict holds for the kernel sources it was earned on: after an upgrade that changes a
    kernel, the cached refusal (or approval) of the old source is not read; the probe runs again."""
    monkeypatch.setenv(K.FAULT_ENV, "int8pack:crash")
    assert K.kernel_ok("int8pack") is False  # refused and cached under this source
    monkeypatch.delenv(K.FAULT_ENV)
    K.forget_verdicts()
    assert K.kernel_ok("int8pack") is False  # same source: the cached refusal stands
    sources = tmp_path / "csrc"
    shutil.copytree(K.CSRC, sources)
    monkeypatch.setattr(K, "CSRC", sources)
    K.kernel_sources_digest.cache_clear()
    try:
        assert K.verdict_key("int8pack") in K.cached_verdicts()  # a copy of the same bytes: the same key
        kernel = sources / "decode_f32.cpp"
        kernel.write_text(kernel.read_text() + "\n// changed\n")
        K.kernel_sources_digest.cache_clear()
        K.forget_verdicts()
        assert K.verdict_key("int8pack") not in K.cached_verdicts()
        assert K.kernel_ok("int8pack") is True  # probed again, without the fault
    finally:
        K.kernel_sources_digest.cache_clear()


def test_every_kernel_passes_its_probe_or_is_refused_cleanly(fresh_verdicts: Path) -> None:
    """Each probe runs in a child and ends in a verdict (never a crash of this process); the ones
    phibook relies on by default pass on any x86 CPU PyTorch supports."""
    for name in ("int8pack", "int4pack", "onednn-fp32"):
        assert K.kernel_ok(name), K.cached_verdicts().get(K.verdict_key(name))
    assert K.probe_in_child("onednn-fp16")[0] in (True, False)
    assert K.probe_in_child("gemv-bf16")[0] in (True, False)  # refused without AVX512-BF16, never a crash
    assert K.probe_in_child("gemv-fp32")[0] in (True, False)  # refused at ATen's DEFAULT level
    assert K.probe_in_child(K.ATTENTION_PROBE)[0] in (True, False)
    assert K.probe_in_child(K.GLUE_PROBE)[0] in (True, False)
    assert K.probe_in_child(K.STEP_PROBE)[0] in (True, False)
    keys = K.cached_verdicts()
    assert K.verdict_key("int8pack") in keys and f"aten {torch.backends.cpu.get_cpu_capability()}" in \
        K.verdict_key("int8pack")


def test_cli_runs_with_a_refused_kernel(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """`phibook generate --quant int8` with the int8 kernel's probe crashing: one line says so,
    the run completes on the plain path."""
    ckpt = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    env = {**ENV, "PHIBOOK_CACHE_DIR": str(tmp_path / "cache"), K.FAULT_ENV: "int8pack:crash"}
    proc = subprocess.run([sys.executable, "-m", "phibook.cli", "generate", "--model", str(ckpt), "--dtype", "fp32",
                           "--quant", "int8", "--max-new-tokens", "6", "Alice and Bob"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    refusals = [line for line in proc.stderr.splitlines() if line.startswith("kernel check:")]
    assert refusals == ["kernel check: int8pack refused on this CPU (its probe crashed (SIGSEGV)); "
                        "using the plain path instead"]
    assert proc.stdout.strip()
