"""Helpers the inference benchmarks share: one set of random weights, two systems.

Our PhiModel is built on the meta device, materialized in the target dtype and
given the training init; transformers' PhiForCausalLM then takes the SAME
tensors (``load_state_dict(assign=True)``: q/k/v are row views of our fused
qkv, so the two models share memory instead of holding two copies).
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Reads of weights a decode step can sustain on this kind of machine (issue 2):
# the bandwidth floor is weight bytes per token / this.
BANDWIDTH_GBS = 65.0


def build_ours(preset: str, dtype: torch.dtype, seed: int = 0):
    from phibook.model.config import PhiConfig
    from phibook.model.model import PhiModel

    cfg = PhiConfig.from_name(preset)
    with torch.device("meta"):
        model = PhiModel(cfg)
    model = model.to(dtype).to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(seed))
    # init_weights zeroes biases and sets LayerNorms to 1; give them values so every tensor matters.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln" in name or name.startswith("ln_f"):
                p.add_(torch.randn(p.shape, generator=g).to(dtype) * 0.02)
    return model.eval()


def hf_sharing(model, dtype: torch.dtype):
    """transformers.PhiForCausalLM on the same tensors as our model (no copy)."""
    import transformers

    from phibook.weights.hf import phi_to_hf, phi_to_hf_config

    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    hf_cfg = transformers.PhiConfig(**phi_to_hf_config(model.config, torch_dtype=name))
    with torch.device("meta"):
        hf = transformers.PhiForCausalLM(hf_cfg)
    hf.load_state_dict(phi_to_hf(model.state_dict(), model.config), assign=True, strict=True)
    # Rotary inv_freq is a non-persistent buffer built on meta: rebuild it on the CPU.
    rotary = hf.model.rotary_emb
    inv_freq, scaling = rotary.compute_default_rope_parameters(rotary.config, torch.device("cpu"))
    rotary.inv_freq = inv_freq
    rotary.original_inv_freq = inv_freq.clone()
    rotary.attention_scaling = scaling
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def weight_bytes_per_token(cfg, dtype: torch.dtype) -> int:
    """Bytes a decode step must read: every weight except the embedding table (one row of it)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return (cfg.num_params() - cfg.vocab_size * cfg.d_model) * elem


def machine() -> str:
    cpu = "unknown CPU"
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"model name\s*:\s*(.*)", text)
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    # Every SIMD level the machine has, not only the AVX-512 ones (an AVX2-only CPU printed "()").
    cpu += f" ({cpu_flags()})"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.python_version()}"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M %Z")


def cpu_flags() -> str:
    """The SIMD features a reader compares machines by (the full flag list is long)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "?"
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    have = set(m.group(1).split()) if m else set()
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
    return " ".join(f for f in wanted if f in have) or "none of " + " ".join(wanted)


def memory_bandwidth_gbs(mb: int = 256, repeats: int = 5) -> float:
    """Copy bandwidth (read + write) of a ``mb`` MB buffer, best of ``repeats``, in GB/s."""
    import numpy as np

    src = np.ones(mb << 17, dtype=np.float64)  # mb MiB
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


def read_bandwidth_gbs(mb: int = 512, threads: int | None = None, repeats: int = 5) -> float:
    """Read bandwidth (STREAM-like, read only) of a ``mb`` MB fp32 buffer summed by torch on
    ``threads`` threads, best of ``repeats``, in GB/s. Decode reads weights and writes almost
    nothing, so this, not copy bandwidth, sets its floor."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        buf = torch.ones(mb << 18, dtype=torch.float32)  # mb MiB
        buf.sum()  # fault the pages in before timing
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            buf.sum()
            best = min(best, time.perf_counter() - t)
        return buf.numel() * 4 / best / 1e9
    finally:
        torch.set_num_threads(old)


def bench_tokenizer(vocab_rows: int, shared: Path | None = None):
    """A real byte-level BPE for a random-weight model: codegen-mono (phi-1.5's) from ../shared
    when it fits ``vocab_rows``, else <|endoftext|>, the 256 byte symbols and one merge ("Ġ t"; a
    GGUF vocabulary needs at least one)."""
    from phibook.model.tokenizer import EOS_TOKEN, Tokenizer

    shared = shared or Path(__file__).resolve().parents[2] / "shared"
    codegen = shared / "tokenizer" / "codegen-mono"
    if (codegen / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(codegen)
        if tok.vocab_size <= vocab_rows:
            return tok
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    vocab = {EOS_TOKEN: 0}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab.setdefault(ch, len(vocab))
    vocab["Ġt"] = len(vocab)
    backend = RustTokenizer(models.BPE(vocab, [("Ġ", "t")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    return Tokenizer(backend)


def gguf_bytes_per_token(path: Path) -> int:
    """Bytes a llama.cpp decode step reads from a GGUF: every tensor but the embedding table,
    of which it reads one row."""
    import gguf

    total = 0
    for t in gguf.GGUFReader(path).tensors:
        if t.name == "token_embd.weight":
            total += int(t.n_bytes) // int(t.shape[-1])  # shape is (n_embd, n_vocab): one of n_vocab rows
        else:
            total += int(t.n_bytes)
    return total


def module_bytes_per_token(module) -> int:
    """Bytes of every parameter and buffer of ``module`` a decode step reads: all but the rotary
    tables and the embedding (one row of it). Counts each storage once (views share one)."""
    seen: set[int] = set()
    total = 0
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if "rope_" in name or not isinstance(t, torch.Tensor):
            continue
        try:
            key, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without one storage
            key, nbytes = id(t), t.numel() * t.element_size()
        if key in seen:
            continue
        seen.add(key)
        total += nbytes // t.shape[0] if name.startswith("embed.") else nbytes
    return total


def run_between_bandwidth_probes(title: str, table: Callable[[], list[str]], threads: int) -> None:
    """Run ``table()`` (a markdown table's lines) between two read-bandwidth probes and print it under
    ``title``, with the CPU flags, both bandwidth figures, the load before, the machine and the command."""
    load = load_average()
    before = read_bandwidth_gbs(threads=threads)
    lines = table()
    after = read_bandwidth_gbs(threads=threads)
    print(title)
    print(f"CPU flags: {cpu_flags()}; read bandwidth before / after: {before:.1f} / {after:.1f} GB/s; load before: {load}")
    print("\n".join(lines))
    print(f"machine: {machine()}; {now()}; git {git_rev()}; command: python {' '.join(sys.argv)}")
