"""End to end: a phibook checkpoint exported to GGUF runs in llama.cpp (through llama-cpp-python)
with the same tokens, greedy continuation and logits as phibook.

Marked ``llamacpp``: it needs ``pip install -e .[llamacpp]`` (which compiles llama.cpp) and is
skipped with that reason when llama_cpp cannot be imported.

Per format the logits of every position of prompt + 16 greedy tokens (teacher-forced through
llama.cpp's KV cache, one token at a time) are compared with phibook's fp32 forward. Measured on
the 2-layer, width-128 model below (docs/checkpoints.md keeps the table): see TOLERANCE. The KV
cache is kept f32 and flash attention off in llama.cpp so that only the weight format differs.

Even "f32" llama.cpp is not fp32 end to end: its CPU GELU looks the result up in a table indexed
by the input rounded to fp16 (ggml-cpu/vec.h, GGML_GELU_FP16). So the f32 file is also compared
with phibook running that same GELU: most positions then agree to about 1e-6 (the export itself
loses nothing), and the rest by about 1e-4 where a pre-activation sits on an fp16 rounding
boundary and summation order flips the table entry (F32_SAME_GELU bounds both).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.llamacpp

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install -e .[llamacpp]; it compiles llama.cpp)"
)
pytest.importorskip("gguf", reason="the gguf package (phibook[test]) is needed to write GGUF files")

from phibook.model.tokenizer import Tokenizer  # noqa: E402
from phibook.weights.checkpoint import load_model, save_checkpoint  # noqa: E402
from phibook.weights.gguf import export_gguf  # noqa: E402
from tests.conftest import _TINY_TEXT  # noqa: E402
from tests.test_gguf import _random_checkpoint  # noqa: E402

PROMPT = "def fibonacci(n):\n    \"\"\"Return the first n Fibonacci numbers as a list.\"\"\"\n"
NEW_TOKENS = 16
TRAIN_STEPS = 100
# Max |logit difference| allowed against phibook fp32, per GGUF type (measured values are in
# docs/checkpoints.md; these leave about 3-5x headroom). Logits here have a std of about 1.
TOLERANCE = {"f32": 5e-3, "bf16": 1e-1, "q8_0": 2.5e-1}
# f32 file vs phibook with llama.cpp's fp16-table GELU: (median over positions, max).
F32_SAME_GELU = (2e-5, 6e-4)
GGML_TYPE_F32 = 0


def _ggml_gelu(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's CPU GELU: tanh GELU of fp16(x), stored as fp16; exact outside [-10, 10]."""
    y = F.gelu(x.to(torch.float16).float(), approximate="tanh").to(torch.float16).float()
    return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))


def _with_ggml_gelu(model):
    for block in model.blocks:
        block.mlp.forward = lambda x, m=block.mlp: m.fc2(_ggml_gelu(m.fc1(x)))
    return model


def _train(ckpt: Path, tok: Tokenizer, steps: int = TRAIN_STEPS) -> Path:
    """A few hundred AdamW steps on the tiny corpus: the model memorizes it, so greedy decoding
    has clear winners (a random model's top-2 logits are often closer than q8_0's error)."""
    loaded = load_model(ckpt)
    model = loaded.model.train()
    data = torch.tensor(tok.encode(_TINY_TEXT * 4))
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 65, (8,), generator=g)
        batch = torch.stack([data[i : i + 65] for i in starts])
        loss = model(batch[:, :-1], targets=batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_checkpoint(ckpt, model.eval(), tok)


@pytest.fixture(scope="module")
def setup(tiny_checkpoint: Path, tmp_path_factory):
    root = tmp_path_factory.mktemp("llamacpp")
    tok = Tokenizer.from_file(tiny_checkpoint)
    ckpt = _random_checkpoint(root / "ckpt", tok, seed=11, rope_base=10000.0, ln_eps=1e-5)
    ckpt = _train(ckpt, tok)
    model = load_model(ckpt).model
    prompt = tok.encode(PROMPT)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        ref = model(torch.tensor([ids]))[0].numpy()  # logits at every position, one pass
        ref_ggml = _with_ggml_gelu(load_model(ckpt).model)(torch.tensor([ids]))[0].numpy()
    files = {fmt: export_gguf(ckpt, root / f"m-{fmt}.gguf", fmt) for fmt in TOLERANCE}
    return {"tok": tok, "prompt": prompt, "ids": ids, "ref": ref, "ref_ggml": ref_ggml, "files": files}


def _llama(path: Path):
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=128, n_batch=128, n_threads=2, logits_all=True, verbose=False,
        type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, seed=0,
    )


def test_tokenizer_matches(setup) -> None:
    llm = _llama(setup["files"]["f32"])
    tok = setup["tok"]
    texts = [PROMPT, "Alice asks Bob: what's 3 + 33 = ?\n\tTabs  and   spaces.", "ünïcödé 😀 text"]
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False) == tok.encode(text), text
        assert llm.detokenize(tok.encode(text)).decode() == text
    # <|endoftext|> is a control token: one id when specials are parsed, like phibook's encode.
    text = "end.<|endoftext|>Next"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text)
    assert llm.token_eos() == tok.eos_id
    assert llm.n_vocab() == setup["ref"].shape[-1]
    llm.close()


@pytest.mark.parametrize("fmt", list(TOLERANCE))
def test_logits_and_greedy_tokens_match(fmt: str, setup) -> None:
    llm = _llama(setup["files"][fmt])
    prompt, ids, ref = setup["prompt"], setup["ids"], setup["ref"]
    tol = TOLERANCE[fmt]

    # Teacher-forced: the prompt in one batch, then one token at a time through the KV cache,
    # as in decoding; logits of every position against phibook's.
    llm.eval(prompt)
    for t in ids[len(prompt):]:
        llm.eval([t])
    got = np.array(llm.scores[: len(ids)], dtype=np.float32)
    diff = np.abs(got - ref)
    first_token = float(diff[len(prompt) - 1].max())
    same_gelu = np.abs(got - setup["ref_ggml"]).max(axis=1)
    print(f"\n{fmt}: max|dlogit| first token {first_token:.2e}, all {len(ids)} positions {diff.max():.2e}; "
          f"vs phibook with llama.cpp's GELU: median {np.median(same_gelu):.1e}, max {same_gelu.max():.1e}; "
          f"logit std {ref.std():.2f}")
    assert first_token <= tol and diff.max() <= tol, (fmt, first_token, float(diff.max()))
    if fmt == "f32":
        assert np.median(same_gelu) <= F32_SAME_GELU[0] and same_gelu.max() <= F32_SAME_GELU[1], same_gelu

    # Greedy decoding by llama.cpp's own sampler (temperature 0).
    llm.reset()
    greedy = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        greedy.append(int(token))
        if len(greedy) == NEW_TOKENS:
            break
    llm.close()
    want = ids[len(prompt):]
    assert len(greedy) == NEW_TOKENS
    agree = next((i for i, (a, b) in enumerate(zip(greedy, want)) if a != b), NEW_TOKENS)
    print(f"{fmt}: {agree}/{NEW_TOKENS} greedy tokens equal to phibook's before the first difference")
    # Every step must agree unless phibook's own top-2 margin there is within the tolerance
    # (a near tie that the format's rounding may legitimately flip); after that, stop comparing.
    if agree < NEW_TOKENS:
        top2 = np.sort(ref[len(prompt) - 1 + agree])[-2:]
        assert top2[1] - top2[0] <= 2 * tol, f"{fmt}: step {agree} token {greedy[agree]} != phibook's {want[agree]}"


def test_codegen_mono_tokenizer_matches(codegen_tokenizer_dir: Path, tmp_path: Path) -> None:
    """phi-1.5's own tokenizer through the GGUF: same ids in llama.cpp, including codegen-mono's
    added whitespace-run tokens (USER_DEFINED) on indented code."""
    tok = Tokenizer.from_file(codegen_tokenizer_dir)
    ckpt = _random_checkpoint(tmp_path / "ckpt", tok, seed=1, n_layer=1, d_model=64, n_head=1,
                              vocab_size=51200)
    llm = llama_cpp.Llama(model_path=str(export_gguf(ckpt, tmp_path / "m.gguf", "q8_0")), vocab_only=True,
                          verbose=False)
    code = (_TINY_TEXT.split("def is_prime")[1]).replace("    ", "        ")  # deeper indents too
    for text in [code, "x = {'a': 1}\n\n\n\t\tclass   Foo:  # comment   \n", "Ünïcode — “quotes” 😀"]:
        assert llm.tokenize(text.encode(), add_bos=False) == tok.encode(text), text
        assert llm.detokenize(tok.encode(text)).decode() == text
    assert llm.n_vocab() == 51200 and llm.token_eos() == 50256
    llm.close()
