"""Export a model as a GGUF file that llama.cpp (and Ollama, llama-cpp-python) runs as a ``phi2`` model.

llama.cpp's ``phi2`` architecture is exactly phi-1.5's block: one LayerNorm
feeding attention and the MLP in parallel, a fused q/k/v projection with bias
(rows q, k, v, as in our ``attn.qkv``), NeoX-style ("rotate half") rotary on
the first ``rope.dimension_count`` channels of each head, tanh GELU, a final
LayerNorm and an untied LM head with bias. So the export is a rename plus
metadata; no tensor is permuted.

Formats: ``f32`` (lossless), ``bf16`` and ``q8_0`` (blocks of 32 int8 values
with one f16 scale, ggml's own layout, written by the ``gguf`` package's
reference quantizer). Only 2-D weight matrices change type; LayerNorm weights
and every bias stay f32, as llama.cpp's own converter does.

The tokenizer goes in as llama.cpp's GPT-2 BPE (``tokenizer.ggml.model`` =
"gpt2", pre-tokenizer "gpt-2"): the byte-level token strings, the merges and a
type per id, padded with unused ``[PAD<id>]`` entries up to the embedding's row
count (llama.cpp requires one token per row). A tokenizer llama.cpp would
split differently (a normalizer, another pre-tokenizer, a non-BPE model) is
refused with a PhibookError naming the feature, rather than exported to give
silently different ids.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from phibook import io
from phibook.errors import PhibookError

if TYPE_CHECKING:
    from phibook.model.config import PhiConfig
    from phibook.model.model import PhiModel
    from phibook.model.tokenizer import Tokenizer

GGUF_TYPES = ("f32", "bf16", "q8_0")
ARCH = "phi2"
# The GGUF pre-tokenizer name llama.cpp maps to the GPT-2 split regex (what a
# HF ByteLevel pre-tokenizer with use_regex=true applies).
PRE_TOKENIZER = "gpt-2"
# Rows of a q8_0 matrix are cut into blocks of this many values.
Q8_BLOCK = 32


def _gguf():
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - gguf is a test/extra dependency
        raise PhibookError(
            "GGUF export needs the 'gguf' package (a phibook dependency: pip install gguf==0.19.0)"
        ) from exc
    return gguf


def tensor_names(cfg: PhiConfig) -> dict[str, str]:
    """Our state-dict names -> GGUF tensor names of llama.cpp's phi2 architecture."""
    gguf = _gguf()
    T, names = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    per_block = {
        "ln": T.ATTN_NORM,
        "attn.qkv": T.ATTN_QKV,
        "attn.out": T.ATTN_OUT,
        "mlp.fc1": T.FFN_UP,
        "mlp.fc2": T.FFN_DOWN,
    }
    out = {"embed.weight": names[T.TOKEN_EMBD] + ".weight"}
    for i in range(cfg.n_layer):
        for ours, theirs in per_block.items():
            for p in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{p}"] = f"{names[theirs].format(bid=i)}.{p}"
    for p in ("weight", "bias"):
        out[f"ln_f.{p}"] = f"{names[T.OUTPUT_NORM]}.{p}"
        out[f"lm_head.{p}"] = f"{names[T.OUTPUT]}.{p}"
    return out


# --------------------------------------------------------------------------- tokenizer


def gguf_vocab(tok: Tokenizer, n_rows: int) -> dict[str, Any]:
    """llama.cpp's view of ``tok``: tokens, token types, merges, pre-tokenizer, special ids.

    Raises PhibookError for a tokenizer llama.cpp's GPT-2 BPE would not
    reproduce id for id.
    """
    gguf = _gguf()
    where = f"tokenizer {tok.path or '(in memory)'}"
    data = json.loads(tok.backend.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise PhibookError(f"{where}: model type {model.get('type')!r}; GGUF export supports byte-level BPE only")
    for key, neutral in (("byte_fallback", False), ("continuing_subword_prefix", ""), ("end_of_word_suffix", "")):
        if model.get(key) not in (None, neutral):
            raise PhibookError(
                f"{where}: BPE option {key}={model[key]!r} is not supported by llama.cpp's GPT-2 tokenizer"
            )
    if data.get("normalizer") is not None:
        kind = data["normalizer"].get("type", "?")
        raise PhibookError(
            f"{where}: has a {kind} normalizer, which llama.cpp's GPT-2 BPE does not apply; "
            "its ids would differ from phibook's"
        )
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        desc = pre.get("type") if pre.get("type") != "ByteLevel" else (
            "ByteLevel with add_prefix_space=true" if pre.get("add_prefix_space") else "ByteLevel without regex")
        raise PhibookError(
            f"{where}: pre-tokenizer {desc!r} is not supported; llama.cpp's GPT-2 BPE needs "
            "ByteLevel(add_prefix_space=false, use_regex=true) as codegen-mono and phibook's trained tokenizers use"
        )

    tokens: list[str | None] = [None] * n_rows
    types = [int(gguf.TokenType.UNUSED)] * n_rows
    for text, idx in model.get("vocab", {}).items():
        _place(tokens, types, idx, text, int(gguf.TokenType.NORMAL), where, n_rows)
    for added in data.get("added_tokens", []):
        # Special added tokens (<|endoftext|>) are CONTROL: llama.cpp only matches them
        # when asked to parse specials. Others (codegen-mono's whitespace runs) are
        # USER_DEFINED and matched in plain text, as the HF tokenizer does.
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        _place(tokens, types, added["id"], added["content"], int(kind), where, n_rows, replace=True)
    # Rows past the tokenizer (vocabulary padding) get unique never-produced names.
    names = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        # llama.cpp refuses a gpt2 vocabulary without tokenizer.ggml.merges, and GGUF cannot
        # hold an empty array (the gguf writer refuses one).
        raise PhibookError(f"{where}: has no BPE merges (bytes only); llama.cpp's GPT-2 BPE needs at least one")
    eos = tok.eos_id
    return {"tokens": names, "types": types, "merges": merges, "pre": PRE_TOKENIZER, "bos_id": eos, "eos_id": eos}


def _place(tokens, types, idx, text, kind, where, n_rows, replace=False) -> None:
    idx = int(idx)
    if not 0 <= idx < n_rows:
        raise PhibookError(f"{where}: token {text!r} has id {idx}, past the model's {n_rows} embedding rows")
    if tokens[idx] is not None and not (replace and tokens[idx] == text):
        raise PhibookError(f"{where}: id {idx} names two tokens ({tokens[idx]!r} and {text!r})")
    tokens[idx], types[idx] = text, kind


# --------------------------------------------------------------------------- tensors


def _ggml_type(name: str, shape: tuple[int, ...], fmt: str):
    """The ggml type a tensor is stored as: only matrices are converted; 1-D stays f32."""
    Q = _gguf().GGMLQuantizationType
    if fmt == "f32" or len(shape) < 2:
        return Q.F32
    if fmt == "bf16":
        return Q.BF16
    # q8_0 blocks run along a row; a row not a multiple of 32 cannot be packed.
    # Keep that tensor f32 (lossless) and say so, as llama.cpp's converter falls back too.
    if shape[-1] % Q8_BLOCK:
        print(f"phibook export: {name} rows of {shape[-1]} are not a multiple of {Q8_BLOCK}; kept f32",
              file=sys.stderr)
        return Q.F32
    return Q.Q8_0


def _encode(t: torch.Tensor, qtype) -> np.ndarray:
    """The bytes of ``t`` in ggml type ``qtype`` (f32 as float32, others as raw uint8 rows)."""
    gguf = _gguf()
    arr = t.detach().to(torch.float32).contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return arr
    return gguf.quants.quantize(arr, qtype)


def export_gguf(
    checkpoint: str | os.PathLike,
    out_path: str | os.PathLike,
    fmt: str = "f32",
    name: str | None = None,
) -> Path:
    """Write ``checkpoint`` (anything ``load_model`` accepts) as a GGUF file at ``out_path``.

    ``fmt`` is one of ``GGUF_TYPES``. The file is written to a temporary name beside it (``phibook.io.temp_path``)
    and renamed into place, so an interrupted export leaves no partial GGUF.
    """
    from phibook.weights.checkpoint import load_model

    _check_type(fmt)
    loaded = load_model(checkpoint, dtype=None)
    if loaded.tokenizer is None:
        raise PhibookError(
            f"{loaded.path}: no tokenizer.json; a GGUF file must carry the tokenizer for llama.cpp to run it"
        )
    return write_gguf(loaded.model, loaded.tokenizer, out_path, fmt, name=name or loaded.path.name,
                      source=str(loaded.path))


def write_gguf(
    model: PhiModel,
    tokenizer: Tokenizer,
    out_path: str | os.PathLike,
    fmt: str = "f32",
    name: str = "phibook",
    source: str = "model",
) -> Path:
    """Write an in-memory ``model`` and ``tokenizer`` as a GGUF file (atomically, see export_gguf).

    Tensors are converted and written one at a time, so peak memory is the
    model plus one converted tensor (what lets bench/ export a phi-1.5 it built).
    """
    _check_type(fmt)
    gguf = _gguf()
    cfg = model.config
    tokenizer.check_fits(cfg.vocab_size)
    vocab = gguf_vocab(tokenizer, cfg.vocab_size)
    state = getattr(model, "_orig_mod", model).state_dict()
    names = tensor_names(cfg)
    missing = sorted(set(state) - set(names))
    if missing:  # a model feature with no phi2 tensor to carry it
        raise PhibookError(f"{source}: tensors with no llama.cpp phi2 counterpart: {', '.join(missing[:5])}")

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = io.temp_path(out)
    writer = gguf.GGUFWriter(str(tmp), ARCH)
    try:
        _write_metadata(writer, cfg, vocab, fmt, name)
        plan = []
        for ours, theirs in names.items():
            t = state[ours]
            qtype = _ggml_type(theirs, tuple(t.shape), fmt)
            elems = t.numel()
            if qtype == gguf.GGMLQuantizationType.F32:
                nbytes = 4 * elems
            else:
                block, size = gguf.GGML_QUANT_SIZES[qtype]
                nbytes = elems // block * size
            writer.add_tensor_info(theirs, tuple(t.shape), np.dtype(np.float32), nbytes, raw_dtype=qtype)
            plan.append((ours, qtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for ours, qtype in plan:
            writer.write_tensor_data(_encode(state[ours], qtype))
        writer.close()
        io.commit(tmp, out)
    except BaseException as exc:
        writer.close()
        if tmp.exists():
            tmp.unlink()
        if isinstance(exc, OSError):  # disk full, no permission: one line, not a traceback
            raise PhibookError(f"cannot write GGUF file {out}: {exc}") from exc
        raise
    return out


def _check_type(fmt: str) -> None:
    if fmt not in GGUF_TYPES:
        raise PhibookError(f"unknown GGUF type {fmt!r}; choose one of {', '.join(GGUF_TYPES)}")


def _write_metadata(writer, cfg: PhiConfig, vocab: dict[str, Any], fmt: str, name: str) -> None:
    gguf = _gguf()
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[fmt]
    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_head)
    writer.add_layer_norm_eps(cfg.ln_eps)
    writer.add_rope_dimension_count(cfg.rotary_dim)
    writer.add_rope_freq_base(cfg.rope_base)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    writer.add_bos_token_id(vocab["bos_id"])
    writer.add_eos_token_id(vocab["eos_id"])
    writer.add_unk_token_id(vocab["eos_id"])  # as the HF export's tokenizer_config (bos = eos = unk)
    # phi was trained without a BOS prefix; llama.cpp must not add one.
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
