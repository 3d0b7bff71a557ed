"""Parity with transformers.PhiForCausalLM: logits, greedy decoding, export, and every import layout.

The reference is the real ``transformers`` implementation with random weights
(nothing is downloaded). Weights travel through phibook.weights.hf, the same code
``load_model`` and ``phibook export`` use.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from phibook.model.config import PhiConfig
from phibook.model.model import KVCache, PhiModel
from phibook.weights.checkpoint import load_model
from phibook.weights.export import export_hf
from phibook.weights.hf import foreign_to_phi, phi_to_hf_config

transformers = pytest.importorskip("transformers")

TOL = 1e-4
SMALL = dict(n_layer=2, d_model=256, n_head=4, vocab_size=576, max_seq_len=128)


def _hf_model(cfg: PhiConfig, seed: int = 0):
    """A random PhiForCausalLM whose every tensor (biases and LayerNorms too) is non-trivial."""
    hf_cfg = transformers.PhiConfig(**phi_to_hf_config(cfg))
    torch.manual_seed(seed)
    model = transformers.PhiForCausalLM(hf_cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "layernorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    return model


def _ours_from_hf(hf, cfg: PhiConfig) -> PhiModel:
    """Our model holding the HF weights, built on meta and assigned (the load_model path)."""
    with torch.device("meta"):
        ours = PhiModel(cfg)
    state = foreign_to_phi(dict(hf.state_dict()), cfg, "hf", "test")
    ours.load_state_dict(state, assign=True, strict=True)
    ours.reset_rope()
    return ours.eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _tokens(cfg: PhiConfig, shape=(2, 24), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(rotary_dim=16, rope_base=500.0, d_ff=320, ln_eps=1e-6)],
    ids=["phi-shape", "odd-rope-and-mlp"],
)
def test_logits_match_transformers(overrides) -> None:
    cfg = PhiConfig(**{**SMALL, **overrides})
    hf = _hf_model(cfg)
    ours = _ours_from_hf(hf, cfg)
    idx = _tokens(cfg)
    with torch.no_grad():
        diff = _max_diff(ours(idx), hf(idx).logits)
    assert diff <= TOL, f"max |logit diff| {diff:.2e} > {TOL}"


def _greedy(model: PhiModel, prompt: torch.Tensor, n: int) -> list[int]:
    """Greedy decode with our KVCache: one prefill, then one token per forward."""
    cache = KVCache(model.config, batch=1, max_len=prompt.shape[1] + n)
    out: list[int] = []
    logits = model(prompt, cache=cache)
    for _ in range(n):
        token = int(logits[0, -1].argmax())
        out.append(token)
        logits = model(torch.tensor([[token]]), cache=cache)
    return out


def test_greedy_32_tokens_match_hf_generate() -> None:
    cfg = PhiConfig(**SMALL)
    hf = _hf_model(cfg, seed=3)
    ours = _ours_from_hf(hf, cfg)
    for seed in (4, 5):
        prompt = _tokens(cfg, (1, 10), seed=seed)
        with torch.no_grad():
            mine = _greedy(ours, prompt, 32)
            ref = hf.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                max_new_tokens=32,
                min_new_tokens=32,
                use_cache=True,
                pad_token_id=0,
            )
        assert mine == ref[0, prompt.shape[1] :].tolist()
        assert len(set(mine)) > 1  # a constant continuation would prove little


def test_export_then_transformers_loads_same_logits(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = export_hf(tiny_checkpoint, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["model_type"] == "phi"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "PhiForCausalLM"
    ours = load_model(tiny_checkpoint)
    text = "def is_prime(n: int) -> bool:\n    if n < 2:\n\t\treturn   False"
    ids = ours.tokenizer.encode(text)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.encode(text) == ids
    assert hf_tok.decode(ids) == text
    idx = torch.tensor([ids])
    with torch.no_grad():
        assert _max_diff(ours.model(idx), hf(idx).logits) <= TOL
    # And back: the exported HF directory loads in phibook to the same tensors.
    again = load_model(out)
    assert again.source == "hf" and again.tokenizer.encode(text) == ids
    with torch.no_grad():
        assert torch.equal(again.model(idx), ours.model(idx))


def test_export_cli_writes_hf_dir(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-hf"
    proc = subprocess.run(
        [sys.executable, "-m", "phibook.cli", "export", str(tiny_checkpoint), str(out), "--dtype", "bfloat16"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    assert not any(p.name.startswith("cli-hf.") for p in tmp_path.iterdir())  # no temp leftovers


# --------------------------------------------------------------------------- imports


def _write_bin(state: dict[str, torch.Tensor], directory: Path, shards: int) -> None:
    """pytorch_model.bin, or pytorch_model-0000k-of-0000n.bin + index.json (the HF layout)."""
    state = {k: v.contiguous().clone() for k, v in state.items()}
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return
    names = list(state)
    weight_map = {}
    for k in range(shards):
        file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[k::shards]}
        torch.save(part, directory / file)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("form", ["safetensors", "safetensors-sharded", "bin", "bin-sharded"])
def test_load_hf_directory_forms(form: str, tmp_path: Path) -> None:
    cfg = PhiConfig(**SMALL)
    hf = _hf_model(cfg, seed=7)
    directory = tmp_path / form
    if form.startswith("safetensors"):
        hf.save_pretrained(directory, max_shard_size="1MB" if form.endswith("sharded") else "50GB")
    else:
        directory.mkdir()
        hf.config.save_pretrained(directory)
        _write_bin(hf.state_dict(), directory, shards=3 if form.endswith("sharded") else 1)
    index = {"safetensors-sharded": "model.safetensors.index.json", "bin-sharded": "pytorch_model.bin.index.json"}
    if form in index:  # make sure the case really is sharded
        assert (directory / index[form]).is_file()
        assert len(set(json.loads((directory / index[form]).read_text())["weight_map"].values())) > 1
    loaded = load_model(directory)
    assert loaded.source == "hf" and loaded.config == cfg and loaded.tokenizer is None
    idx = _tokens(cfg)
    with torch.no_grad():
        assert _max_diff(loaded.model(idx), hf(idx).logits) <= TOL


def _legacy_state(hf, cfg: PhiConfig, layout: str) -> dict[str, torch.Tensor]:
    """Rename an HF state dict to a pre-2024 release layout by hand (independent of phibook.weights.hf)."""
    sd = hf.state_dict()
    L = cfg.n_layer
    if layout == "mixformer":
        # One list: embedding at 0, blocks at 1..L, head (final LayerNorm + linear) at L+1.
        emb, ln_f, lm = "layers.0.wte.weight", f"layers.{L + 1}.ln.", f"layers.{L + 1}.linear."
        block_prefix = [f"layers.{i + 1}." for i in range(L)]
    else:
        emb, ln_f, lm = "transformer.embd.wte.weight", "lm_head.ln.", "lm_head.linear."
        block_prefix = [f"transformer.h.{i}." for i in range(L)]
    out = {emb: sd["model.embed_tokens.weight"]}
    for i, pre in enumerate(block_prefix):
        src = f"model.layers.{i}."
        for p in ("weight", "bias"):
            out[pre + f"ln.{p}"] = sd[src + f"input_layernorm.{p}"]
            out[pre + f"mixer.Wqkv.{p}"] = torch.cat(
                [sd[src + f"self_attn.{x}_proj.{p}"] for x in "qkv"], dim=0
            )
            out[pre + f"mixer.out_proj.{p}"] = sd[src + f"self_attn.dense.{p}"]
            out[pre + f"mlp.fc1.{p}"] = sd[src + f"mlp.fc1.{p}"]
            out[pre + f"mlp.fc2.{p}"] = sd[src + f"mlp.fc2.{p}"]
        # Old exports also stored the rotary buffer; loaders must skip it.
        out[pre + "mixer.rotary_emb.inv_freq"] = torch.ones(cfg.rotary_dim // 2)
    for p in ("weight", "bias"):
        out[ln_f + p] = sd[f"model.final_layernorm.{p}"]
        out[lm + p] = sd[f"lm_head.{p}"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def _legacy_config(cfg: PhiConfig, model_type: str) -> dict:
    """The config.json keys of the 2023 microsoft/phi-1_5 releases."""
    return {
        "model_type": model_type,
        "architectures": ["MixFormerSequentialForCausalLM" if model_type == "mixformer-sequential" else "PhiForCausalLM"],
        "activation_function": "gelu_new",
        "n_embd": cfg.d_model,
        "n_head": cfg.n_head,
        "n_head_kv": None,
        "n_inner": None,
        "n_layer": cfg.n_layer,
        "n_positions": cfg.max_seq_len,
        "rotary_dim": cfg.rotary_dim,
        "layer_norm_epsilon": cfg.ln_eps,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


@pytest.mark.parametrize(
    "model_type,layout,weights",
    [
        ("mixformer-sequential", "mixformer", "safetensors"),
        ("mixformer-sequential", "mixformer", "bin"),
        ("phi-msft", "msft", "safetensors"),
    ],
)
def test_load_pre_2024_release_layouts(model_type: str, layout: str, weights: str, tmp_path: Path) -> None:
    cfg = PhiConfig(**SMALL)
    hf = _hf_model(cfg, seed=11)
    directory = tmp_path / model_type
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(_legacy_config(cfg, model_type)))
    state = _legacy_state(hf, cfg, layout)
    if weights == "safetensors":
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        _write_bin(state, directory, shards=1)
    loaded = load_model(directory)
    assert loaded.config == cfg
    idx = _tokens(cfg)
    with torch.no_grad():
        assert _max_diff(loaded.model(idx), hf(idx).logits) <= TOL


def test_codegen_vocab_padding_round_trip(codegen_tokenizer_dir: Path, tmp_path: Path) -> None:
    """The real tokenizer has 50,295 tokens; phi-1.5 has 51,200 embedding rows. Both ways must work."""
    cfg = PhiConfig(n_layer=1, d_model=64, n_head=1, vocab_size=51200, max_seq_len=64)
    hf = _hf_model(cfg, seed=13)
    src = tmp_path / "hf-src"
    hf.save_pretrained(src)
    shutil.copy(codegen_tokenizer_dir / "tokenizer.json", src / "tokenizer.json")
    loaded = load_model(src)
    assert loaded.tokenizer.vocab_size == 50295 and loaded.config.vocab_size == 51200
    text = "def add(a, b):\n    # sum\n        return a  +  b\n"
    idx = torch.tensor([loaded.tokenizer.encode(text)])
    with torch.no_grad():
        logits = loaded.model(idx)
        assert logits.shape[-1] == 51200
        assert _max_diff(logits, hf(idx).logits) <= TOL
    out = export_hf(src, tmp_path / "hf-out")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.encode(text) == idx[0].tolist()
    assert hf_tok.eos_token_id == 50256
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert back.config.eos_token_id == 50256 and back.config.vocab_size == 51200
    with torch.no_grad():
        assert _max_diff(back(idx).logits, logits) <= TOL


# --------------------------------------------------------------------------- full size


@pytest.mark.slow
@pytest.mark.ci
def test_full_phi_1_5_config_forward_parity() -> None:
    """The full 24 x 2048, 51,200-row config: one 8-token forward. About 7 GB of RAM."""
    cfg = PhiConfig.from_name("phi-1.5")
    hf = transformers.PhiForCausalLM(transformers.PhiConfig(**phi_to_hf_config(cfg))).eval()
    # Shares every tensor with hf except the fused qkv, so only ~1.2 GB more than hf itself.
    ours = _ours_from_hf(hf, cfg)
    idx = _tokens(cfg, (1, 8))
    with torch.no_grad():
        diff = _max_diff(ours(idx), hf(idx).logits)
    assert diff <= TOL, f"max |logit diff| {diff:.2e} > {TOL}"
