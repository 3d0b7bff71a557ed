"""Export a model to a Hugging Face directory that ``transformers`` loads as ``PhiForCausalLM``.

Sits above both halves of phibook.weights: it reads any model ``load_model``
accepts (phibook.weights.checkpoint) and writes it with the name maps of
phibook.weights.hf.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from phibook.io import atomic_directory, write_json
from phibook.weights.checkpoint import load_model
from phibook.weights.hf import phi_to_hf, phi_to_hf_config


def hf_tokenizer_config(eos_token: str, max_len: int) -> dict[str, Any]:
    """The smallest tokenizer_config.json that makes AutoTokenizer use our tokenizer.json as is."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eos_token,
        "eos_token": eos_token,
        "unk_token": eos_token,
        "model_max_length": max_len,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }


DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def export_hf(
    src: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype | str | None = None
) -> Path:
    """Write ``out_dir`` as an HF directory that ``AutoModelForCausalLM.from_pretrained`` loads.

    ``src`` is anything ``load_model`` accepts. The directory is built under a
    temporary name and renamed into place, so a crash leaves no half export.
    ``dtype`` None keeps the stored precision.
    """
    from safetensors.torch import save_file

    loaded = load_model(src, dtype=dtype)
    cfg, tok = loaded.config, loaded.tokenizer
    state = phi_to_hf(loaded.model.state_dict(), cfg)
    stored = next(iter(state.values())).dtype
    eos_id = tok.eos_id if tok is not None else None
    with atomic_directory(Path(out_dir)) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf_cfg = phi_to_hf_config(cfg, eos_id, eos_id, DTYPE_NAMES.get(stored, "float32"))
        write_json(tmp / "config.json", hf_cfg)
        gen = {"bos_token_id": eos_id, "eos_token_id": eos_id, "do_sample": False}
        write_json(tmp / "generation_config.json", gen)
        if tok is not None:
            tok.save(tmp)
            write_json(tmp / "tokenizer_config.json", hf_tokenizer_config(tok.eos_token, cfg.max_seq_len))
    return Path(out_dir)
