"""GGUF export (phibook export --format gguf), read back with the gguf package's own reader.

Every check here goes through ``gguf.GGUFReader`` (the reader llama.cpp ships):
architecture and hyperparameters, tensor names, shapes and types, the
tokenizer, and the dequantized weights against the checkpoint (f32 exact, bf16
equal to round-to-nearest-even, q8_0 within half a quantization step per block).
The llama.cpp round trip itself is tests/test_gguf_llamacpp.py (-m llamacpp).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package (phibook[test]) is needed to read GGUF files")

from phibook.cli import main  # noqa: E402
from phibook.errors import PhibookError  # noqa: E402
from phibook.model.config import PhiConfig  # noqa: E402
from phibook.model.model import PhiModel  # noqa: E402
from phibook.model.tokenizer import Tokenizer  # noqa: E402
from phibook.weights.checkpoint import load_model, save_checkpoint  # noqa: E402
from phibook.weights.gguf import export_gguf, gguf_vocab  # noqa: E402

Q = gguf.GGMLQuantizationType
EXTRA_ROWS = 64  # embedding rows past the tokenizer, as phi-1.5 pads 50,295 to 51,200


def _random_checkpoint(directory: Path, tok: Tokenizer, seed: int, **cfg_kw) -> Path:
    """A checkpoint whose every tensor (biases and LayerNorms included) is random, so a
    misplaced or dropped tensor shows up in the comparison."""
    kw = dict(n_layer=2, d_model=128, n_head=2, vocab_size=tok.vocab_size + EXTRA_ROWS, max_seq_len=256,
              rotary_dim=32, rope_base=5000.0, ln_eps=1e-6)
    cfg = PhiConfig(**{**kw, **cfg_kw})
    model = PhiModel(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return save_checkpoint(directory, model, tok)


@pytest.fixture(scope="module")
def random_ckpt(tiny_checkpoint: Path, tmp_path_factory) -> Path:
    tok = Tokenizer.from_file(tiny_checkpoint)
    return _random_checkpoint(tmp_path_factory.mktemp("gguf_src") / "ckpt", tok, seed=3)


@pytest.fixture(scope="module")
def exported(random_ckpt: Path, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf_out")
    return {fmt: export_gguf(random_ckpt, out / f"tiny-{fmt}.gguf", fmt) for fmt in ("f32", "bf16", "q8_0")}


def _field(reader, key):
    field = reader.get_field(key)
    assert field is not None, f"missing GGUF key {key}"
    return field.contents()


def _expected_names(n_layer: int) -> dict[str, str]:
    names = {"embed.weight": "token_embd.weight"}
    for p in ("weight", "bias"):
        names[f"ln_f.{p}"] = f"output_norm.{p}"
        names[f"lm_head.{p}"] = f"output.{p}"
        for i in range(n_layer):
            names[f"blocks.{i}.ln.{p}"] = f"blk.{i}.attn_norm.{p}"
            names[f"blocks.{i}.attn.qkv.{p}"] = f"blk.{i}.attn_qkv.{p}"
            names[f"blocks.{i}.attn.out.{p}"] = f"blk.{i}.attn_output.{p}"
            names[f"blocks.{i}.mlp.fc1.{p}"] = f"blk.{i}.ffn_up.{p}"
            names[f"blocks.{i}.mlp.fc2.{p}"] = f"blk.{i}.ffn_down.{p}"
    return names


@pytest.mark.parametrize("fmt", ["f32", "bf16", "q8_0"])
def test_gguf_hyperparameters_and_tensors(fmt: str, exported, random_ckpt: Path) -> None:
    loaded = load_model(random_ckpt)
    cfg, state = loaded.config, loaded.model.state_dict()
    reader = gguf.GGUFReader(exported[fmt])
    assert _field(reader, "general.architecture") == "phi2"
    want_ftype = {"f32": gguf.LlamaFileType.ALL_F32, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[fmt]
    assert _field(reader, "general.file_type") == want_ftype
    hp = {
        "phi2.context_length": 256, "phi2.embedding_length": 128, "phi2.feed_forward_length": 512,
        "phi2.block_count": 2, "phi2.attention.head_count": 2, "phi2.attention.head_count_kv": 2,
        "phi2.rope.dimension_count": 32,
    }
    for key, value in hp.items():
        assert _field(reader, key) == value, key
    assert _field(reader, "phi2.attention.layer_norm_epsilon") == pytest.approx(1e-6, rel=1e-6)
    assert _field(reader, "phi2.rope.freq_base") == 5000.0

    tensors = {t.name: t for t in reader.tensors}
    names = _expected_names(cfg.n_layer)
    assert set(tensors) == set(names.values())
    matrix_type = {"f32": Q.F32, "bf16": Q.BF16, "q8_0": Q.Q8_0}[fmt]
    for ours, theirs in names.items():
        t, w = tensors[theirs], state[ours].float()
        # GGUF lists dimensions innermost first (ggml's ne), the reverse of torch's shape.
        assert list(t.shape) == list(reversed(w.shape)), theirs
        assert t.tensor_type == (matrix_type if w.dim() == 2 else Q.F32), theirs
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape).copy())
        if t.tensor_type == Q.F32:
            assert torch.equal(got, w), theirs
        elif t.tensor_type == Q.BF16:
            # Exactly torch's round-to-nearest-even bf16 of the fp32 weight.
            assert torch.equal(got, w.to(torch.bfloat16).float()), theirs
        else:
            # q8_0: per block of 32, step d = max|w| / 127 (stored as f16); rounding errs by at most d/2,
            # plus the f16 rounding of d times |q| <= 127 (relative 2^-11): bound 0.6 d.
            blocks = w.reshape(-1, 32)
            d = blocks.abs().amax(dim=1, keepdim=True) / 127
            err = (got.reshape(-1, 32) - blocks).abs()
            assert bool((err <= 0.6 * d + 1e-12).all()), theirs
            assert float(err.max()) > 0  # really quantized


def test_gguf_tokenizer(exported, random_ckpt: Path) -> None:
    tok = Tokenizer.from_file(random_ckpt)
    n_rows = tok.vocab_size + EXTRA_ROWS
    reader = gguf.GGUFReader(exported["q8_0"])
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == n_rows  # llama.cpp needs one token per embedding row
    for i in range(tok.vocab_size):
        assert tokens[i] == tok.id_to_token(i)
    assert tokens[tok.vocab_size:] == [f"[PAD{i}]" for i in range(tok.vocab_size, n_rows)]
    eos = tok.eos_id
    assert types[eos] == gguf.TokenType.CONTROL
    assert all(types[i] == gguf.TokenType.NORMAL for i in range(tok.vocab_size) if i != eos)
    assert all(types[i] == gguf.TokenType.UNUSED for i in range(tok.vocab_size, n_rows))
    data = json.loads(tok.backend.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    assert _field(reader, "tokenizer.ggml.merges") == merges and len(merges) > 100
    assert _field(reader, "tokenizer.ggml.bos_token_id") == eos
    assert _field(reader, "tokenizer.ggml.eos_token_id") == eos
    assert _field(reader, "tokenizer.ggml.unknown_token_id") == eos
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False


def test_codegen_mono_vocab(codegen_tokenizer_dir: Path) -> None:
    """phi-1.5's real tokenizer: 50,257 BPE tokens, <|endoftext|> at 50256, 38 whitespace-run added
    tokens, padded to 51,200 rows."""
    tok = Tokenizer.from_file(codegen_tokenizer_dir)
    vocab = gguf_vocab(tok, 51200)
    T = gguf.TokenType
    assert len(vocab["tokens"]) == 51200 and vocab["eos_id"] == 50256
    assert vocab["types"][50256] == T.CONTROL and vocab["tokens"][50256] == "<|endoftext|>"
    assert vocab["tokens"][50257].strip() == "" and vocab["types"][50257] == T.USER_DEFINED
    assert vocab["types"].count(T.USER_DEFINED) == 38
    assert vocab["tokens"][50295] == "[PAD50295]" and vocab["types"][50295] == T.UNUSED
    assert vocab["tokens"][1212] == tok.id_to_token(1212) and len(vocab["merges"]) == 50000


def test_q8_0_falls_back_to_f32_for_rows_not_multiple_of_32(tiny_checkpoint: Path, tmp_path: Path) -> None:
    tok = Tokenizer.from_file(tiny_checkpoint)
    src = _random_checkpoint(tmp_path / "ckpt", tok, seed=5, d_ff=200)
    reader = gguf.GGUFReader(export_gguf(src, tmp_path / "m.gguf", "q8_0"))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_up.weight"] == Q.Q8_0  # rows of d_model=128
    assert types["blk.0.ffn_down.weight"] == Q.F32  # rows of d_ff=200
    assert _field(reader, "phi2.feed_forward_length") == 200


def test_hf_directory_exports_same_tensors(random_ckpt: Path, exported, tmp_path: Path) -> None:
    """Any model load_model reads can be exported: an HF directory gives the same GGUF tensors."""
    from phibook.weights.export import export_hf

    hf_dir = export_hf(random_ckpt, tmp_path / "hf")
    a = gguf.GGUFReader(export_gguf(hf_dir, tmp_path / "from-hf.gguf", "f32"))
    b = gguf.GGUFReader(exported["f32"])
    tb = {t.name: t for t in b.tensors}
    for t in a.tensors:
        assert np.array_equal(t.data, tb[t.name].data), t.name


def test_cli_export_gguf(random_ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.gguf"
    assert main(["export", str(random_ckpt), str(out), "--format", "gguf", "--gguf-type", "bf16"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert _field(gguf.GGUFReader(out), "general.file_type") == gguf.LlamaFileType.MOSTLY_BF16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temp file left
    # Existing file: refused without --force, replaced with it; a non-GGUF file is never replaced.
    assert main(["export", str(random_ckpt), str(out), "--format", "gguf"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(random_ckpt), str(out), "--format", "gguf", "--force"]) == 0
    assert _field(gguf.GGUFReader(out), "general.file_type") == gguf.LlamaFileType.ALL_F32
    other = tmp_path / "notes.txt"
    other.write_text("keep me")
    assert main(["export", str(random_ckpt), str(other), "--format", "gguf", "--force"]) == 2
    assert "not a GGUF file" in capsys.readouterr().err and other.read_text() == "keep me"


@pytest.mark.parametrize(
    "argv, choices",
    [
        (["--format", "ggml"], ["hf", "gguf"]),
        (["--format", "gguf", "--gguf-type", "q4_k"], ["f32", "bf16", "q8_0"]),
    ],
)
def test_cli_bad_format_lists_choices(argv, choices, random_ckpt: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["export", str(random_ckpt), str(tmp_path / "m.gguf"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    # argparse's wording ("invalid choice: 'ggml' (choose from ...)"); quoting varies across Pythons.
    line = next(x for x in err.splitlines() if "invalid choice" in x)
    assert argv[-1] in line and all(c in line.split("choose from", 1)[1] for c in choices)
    assert not any(tmp_path.iterdir())


def test_cli_option_mixups(random_ckpt: Path, tmp_path: Path, capsys) -> None:
    assert main(["export", str(random_ckpt), str(tmp_path / "hf"), "--gguf-type", "q8_0"]) == 2
    assert "--gguf-type only applies to --format gguf" in capsys.readouterr().err
    assert main(["export", str(random_ckpt), str(tmp_path / "m.gguf"), "--format", "gguf", "--dtype", "bfloat16"]) == 2
    assert "use --gguf-type" in capsys.readouterr().err
    assert main(["export", str(random_ckpt), str(tmp_path), "--format", "gguf"]) == 2
    assert "is a directory" in capsys.readouterr().err


def _with_tokenizer_edit(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    path = dst / "tokenizer.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.__setitem__("normalizer", {"type": "NFC"}), "has a NFC normalizer"),
        (lambda d: d["pre_tokenizer"].__setitem__("add_prefix_space", True), "add_prefix_space=true"),
        (lambda d: d.__setitem__("pre_tokenizer", {"type": "Whitespace"}), "pre-tokenizer 'Whitespace'"),
        (lambda d: d["model"].__setitem__("merges", []), "has no BPE merges"),
    ],
    ids=["normalizer", "prefix-space", "whitespace-pre", "no-merges"],
)
def test_cli_refuses_model_llamacpp_cannot_take(edit, message, random_ckpt: Path, tmp_path: Path, capsys) -> None:
    src = _with_tokenizer_edit(random_ckpt, tmp_path / "ckpt", edit)
    out = tmp_path / "m.gguf"
    assert main(["export", str(src), str(out), "--format", "gguf"]) == 2
    err = capsys.readouterr().err
    assert "phibook export: error:" in err and message in err and "Traceback" not in err
    assert not out.exists()


def test_cli_refuses_checkpoint_without_tokenizer(random_ckpt: Path, tmp_path: Path, capsys) -> None:
    src = shutil.copytree(random_ckpt, tmp_path / "ckpt")
    (src / "tokenizer.json").unlink()
    assert main(["export", str(src), str(tmp_path / "m.gguf"), "--format", "gguf"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err


def test_failed_export_leaves_old_file(random_ckpt: Path, exported, tmp_path: Path, monkeypatch) -> None:
    import phibook.weights.gguf as gguf_mod

    out = tmp_path / "m.gguf"
    shutil.copyfile(exported["q8_0"], out)
    before = out.read_bytes()
    calls = {"n": 0}
    real = gguf_mod._encode

    def failing(t, qtype):
        calls["n"] += 1
        if calls["n"] == 5:  # part-way through the tensor data
            raise PhibookError("disk full (simulated)")
        return real(t, qtype)

    monkeypatch.setattr(gguf_mod, "_encode", failing)
    with pytest.raises(PhibookError, match="disk full"):
        export_gguf(random_ckpt, out, "f32")
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_unknown_type_in_api(random_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(PhibookError, match="choose one of f32, bf16, q8_0"):
        export_gguf(random_ckpt, tmp_path / "m.gguf", "q4_0")
