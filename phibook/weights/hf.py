"""Hugging Face import: explicit name maps, q/k/v split and fuse, config translation.

This module knows the foreign layouts and nothing of phibook's own files:
phibook.weights.checkpoint reads HF directories through it, and
phibook.weights.export writes them with it (both sit above it).

Three foreign layouts hold phi weights:

- ``hf``: ``transformers.PhiForCausalLM`` (model_type "phi"), separate q/k/v.
- ``mixformer``: the first microsoft/phi-1_5 release (model_type
  "mixformer-sequential"): one ``layers`` list holding the embedding at index 0,
  the blocks at 1..n_layer and the LM head (with the final LayerNorm) at
  n_layer+1; q, k and v fused as ``mixer.Wqkv`` rows in that order.
- ``msft``: the late-2023 release (model_type "phi-msft"): ``transformer.embd``,
  ``transformer.h.N``, ``lm_head.ln`` / ``lm_head.linear``; also fused Wqkv.

Each layout is a dict from our key templates to theirs; a tuple on the right
means "these tensors are concatenated along dim 0 into ours" (q, k, v). The
templates are formatted with ``i`` (our block index), ``j`` (i + 1, the
mixformer block index) and ``last`` (n_layer + 1, the mixformer head index).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from phibook.errors import PhibookError
from phibook.model.config import PhiConfig

# Our names (see phibook/model/model.py) -> theirs. {p} is "weight" or "bias".
LAYOUTS: dict[str, dict[str, str | tuple[str, ...]]] = {
    "hf": {
        "embed.weight": "model.embed_tokens.weight",
        "blocks.{i}.ln.{p}": "model.layers.{i}.input_layernorm.{p}",
        "blocks.{i}.attn.qkv.{p}": (
            "model.layers.{i}.self_attn.q_proj.{p}",
            "model.layers.{i}.self_attn.k_proj.{p}",
            "model.layers.{i}.self_attn.v_proj.{p}",
        ),
        "blocks.{i}.attn.out.{p}": "model.layers.{i}.self_attn.dense.{p}",
        "blocks.{i}.mlp.fc1.{p}": "model.layers.{i}.mlp.fc1.{p}",
        "blocks.{i}.mlp.fc2.{p}": "model.layers.{i}.mlp.fc2.{p}",
        "ln_f.{p}": "model.final_layernorm.{p}",
        "lm_head.{p}": "lm_head.{p}",
    },
    "mixformer": {
        "embed.weight": "layers.0.wte.weight",
        "blocks.{i}.ln.{p}": "layers.{j}.ln.{p}",
        "blocks.{i}.attn.qkv.{p}": "layers.{j}.mixer.Wqkv.{p}",
        "blocks.{i}.attn.out.{p}": "layers.{j}.mixer.out_proj.{p}",
        "blocks.{i}.mlp.fc1.{p}": "layers.{j}.mlp.fc1.{p}",
        "blocks.{i}.mlp.fc2.{p}": "layers.{j}.mlp.fc2.{p}",
        "ln_f.{p}": "layers.{last}.ln.{p}",
        "lm_head.{p}": "layers.{last}.linear.{p}",
    },
    "msft": {
        "embed.weight": "transformer.embd.wte.weight",
        "blocks.{i}.ln.{p}": "transformer.h.{i}.ln.{p}",
        "blocks.{i}.attn.qkv.{p}": "transformer.h.{i}.mixer.Wqkv.{p}",
        "blocks.{i}.attn.out.{p}": "transformer.h.{i}.mixer.out_proj.{p}",
        "blocks.{i}.mlp.fc1.{p}": "transformer.h.{i}.mlp.fc1.{p}",
        "blocks.{i}.mlp.fc2.{p}": "transformer.h.{i}.mlp.fc2.{p}",
        "ln_f.{p}": "lm_head.ln.{p}",
        "lm_head.{p}": "lm_head.linear.{p}",
    },
}

# A key that tells the layouts apart (checked in this order).
LAYOUT_MARKERS = {
    "hf": "model.embed_tokens.weight",
    "mixformer": "layers.0.wte.weight",
    "msft": "transformer.embd.wte.weight",
}

# Derived buffers some exporters saved; they carry no weights, so we drop them.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")

HF_MODEL_TYPES = {"phi"}
LEGACY_MODEL_TYPES = {"phi-msft", "mixformer-sequential"}


# --------------------------------------------------------------------------- configs


def _require(data: dict[str, Any], key: str, source: str) -> Any:
    if data.get(key) is None:
        raise PhibookError(f"{source}: missing config key {key!r}")
    return data[key]


def hf_config_to_phi(data: dict[str, Any], source: str = "config.json") -> PhiConfig:
    """Translate a HF ``config.json`` (model_type phi, phi-msft or mixformer-sequential) to PhiConfig."""
    model_type = data.get("model_type")
    if model_type in HF_MODEL_TYPES:
        d_model = int(_require(data, "hidden_size", source))
        n_head = int(_require(data, "num_attention_heads", source))
        kv_heads = data.get("num_key_value_heads") or n_head
        if int(kv_heads) != n_head:
            raise PhibookError(
                f"{source}: num_key_value_heads={kv_heads} != num_attention_heads={n_head}; "
                "grouped-query attention is not part of phi-1.5"
            )
        if data.get("qk_layernorm"):
            raise PhibookError(f"{source}: qk_layernorm=true is not supported (phi-1.5 has none)")
        # transformers 5 nests rope settings under rope_parameters; 4.x kept them top-level.
        rope = dict(data.get("rope_parameters") or {})
        rope_type = rope.get("rope_type") or (data.get("rope_scaling") or {}).get("rope_type") or "default"
        if rope_type != "default" or data.get("rope_scaling"):
            raise PhibookError(f"{source}: rope scaling {rope_type!r} is not supported, only plain RoPE")
        factor = rope.get("partial_rotary_factor", data.get("partial_rotary_factor", 0.5))
        theta = rope.get("rope_theta", data.get("rope_theta", 10000.0))
        head_dim = d_model // n_head
        act = data.get("hidden_act", "gelu_new")
        kwargs = dict(
            n_layer=int(_require(data, "num_hidden_layers", source)),
            d_model=d_model,
            n_head=n_head,
            vocab_size=int(_require(data, "vocab_size", source)),
            max_seq_len=int(data.get("max_position_embeddings") or 2048),
            rotary_dim=int(head_dim * float(factor)),
            rope_base=float(theta),
            d_ff=int(data.get("intermediate_size") or 4 * d_model),
            ln_eps=float(data.get("layer_norm_eps", 1e-5)),
            init_std=float(data.get("initializer_range", 0.02)),
        )
    elif model_type in LEGACY_MODEL_TYPES:
        n_head = int(_require(data, "n_head", source))
        if data.get("n_head_kv") not in (None, n_head):
            raise PhibookError(f"{source}: n_head_kv={data['n_head_kv']} != n_head={n_head} is not supported")
        d_model = int(_require(data, "n_embd", source))
        act = data.get("activation_function", "gelu_new")
        kwargs = dict(
            n_layer=int(_require(data, "n_layer", source)),
            d_model=d_model,
            n_head=n_head,
            vocab_size=int(_require(data, "vocab_size", source)),
            max_seq_len=int(data.get("n_positions") or 2048),
            rotary_dim=int(data.get("rotary_dim") or 32),
            rope_base=10000.0,
            d_ff=int(data.get("n_inner") or 4 * d_model),
            ln_eps=float(data.get("layer_norm_epsilon", 1e-5)),
            init_std=float(data.get("initializer_range", 0.02)),
        )
    else:
        raise PhibookError(
            f"{source}: unsupported model_type {model_type!r}; phibook loads phibook checkpoints and "
            f"HF phi models (model_type {', '.join(sorted(HF_MODEL_TYPES | LEGACY_MODEL_TYPES))})"
        )
    # Our MLP is the tanh GELU ("gelu_new" / "gelu_pytorch_tanh"); an exact-erf model would drift.
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise PhibookError(f"{source}: activation {act!r} is not supported; phi uses gelu_new")
    return PhiConfig(**kwargs)


def phi_to_hf_config(
    cfg: PhiConfig,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    torch_dtype: str = "float32",
) -> dict[str, Any]:
    """The ``config.json`` that makes transformers build ``PhiForCausalLM`` with our shapes."""
    factor = cfg.rotary_dim / cfg.head_dim
    return {
        "architectures": ["PhiForCausalLM"],
        "model_type": "phi",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head,
        "hidden_act": "gelu_new",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "layer_norm_eps": cfg.ln_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attention_dropout": 0.0,
        "qk_layernorm": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        # Both spellings: transformers 5 reads rope_parameters, 4.x the top-level keys.
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base, "partial_rotary_factor": factor},
        "rope_theta": cfg.rope_base,
        "partial_rotary_factor": factor,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }


# --------------------------------------------------------------------------- state dicts


def detect_layout(keys) -> str | None:
    """Which foreign layout a set of tensor names is in (None if none matches)."""
    keys = set(keys)
    for layout, marker in LAYOUT_MARKERS.items():
        if marker in keys:
            return layout
    return None


def name_map(cfg: PhiConfig, layout: str) -> dict[str, tuple[str, ...]]:
    """Every one of our tensor names -> the foreign name(s) it is built from."""
    out: dict[str, tuple[str, ...]] = {}
    for ours, theirs in LAYOUTS[layout].items():
        parts = theirs if isinstance(theirs, tuple) else (theirs,)
        blocks = range(cfg.n_layer) if "{i}" in ours else [0]
        params = ("weight", "bias") if "{p}" in ours else ("",)
        for i in blocks:
            for p in params:
                fmt = dict(i=i, j=i + 1, last=cfg.n_layer + 1, p=p)
                out[ours.format(**fmt)] = tuple(t.format(**fmt) for t in parts)
    return out


def _few(names) -> str:
    names = sorted(names)
    more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
    return ", ".join(names[:5]) + more


def foreign_to_phi(state: dict[str, Tensor], cfg: PhiConfig, layout: str, source: str) -> dict[str, Tensor]:
    """Rename (and fuse q/k/v) a foreign state dict into ours. Consumes ``state`` to keep memory flat."""
    mapping = name_map(cfg, layout)
    wanted = {name for parts in mapping.values() for name in parts}
    missing = sorted(wanted - state.keys())
    if missing:
        raise PhibookError(f"{source}: {len(missing)} tensor(s) missing from the weights: {_few(missing)}")
    extra = [k for k in state if k not in wanted and not k.endswith(IGNORED_SUFFIXES)]
    if extra:
        raise PhibookError(
            f"{source}: {len(extra)} unexpected tensor(s) for a {cfg.n_layer}-layer {layout} model: {_few(extra)}"
        )
    out: dict[str, Tensor] = {}
    for ours, parts in mapping.items():
        tensors = [state.pop(name) for name in parts]
        if len(tensors) > 1:
            _check_parts_equal(ours, parts, tensors, source)
            out[ours] = torch.cat(tensors, dim=0)
        else:
            out[ours] = tensors[0]
    return out


def _check_parts_equal(ours: str, parts: tuple[str, ...], tensors: list[Tensor], source: str) -> None:
    shapes = [tuple(t.shape) for t in tensors]
    if len(set(shapes)) != 1:
        detail = ", ".join(f"{n} {list(s)}" for n, s in zip(parts, shapes))
        raise PhibookError(f"{source}: q/k/v tensors for {ours} differ in shape: {detail}")


def phi_to_hf(state: dict[str, Tensor], cfg: PhiConfig) -> dict[str, Tensor]:
    """Our state dict -> ``PhiForCausalLM`` names, splitting the fused qkv into q, k, v."""
    out: dict[str, Tensor] = {}
    for ours, parts in name_map(cfg, "hf").items():
        tensor = state[ours]
        if len(parts) == 1:
            out[parts[0]] = tensor.contiguous()
        else:
            for name, piece in zip(parts, tensor.chunk(len(parts), dim=0)):
                out[name] = piece.contiguous()
    return out
