"""The forward contract: the causal-mask rule, and the one call that every forward answers.

PhiModel, FastForward (phibook/inference/fast_decode.py) and StaticStep
(phibook/inference/compiled.py) all satisfy phibook.model.model.DecoderForward, so generation
and serving call any of them the same way.
"""

from __future__ import annotations

import copy

import pytest
import torch

from phibook.inference.compiled import StaticStep
from phibook.inference.fast_decode import FastForward
from phibook.model.config import PhiConfig
from phibook.model.model import DecoderForward, KVCache, PhiModel, attention_dtype, causal_mask


def reference_mask(T: int, start: int, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The rule written out one (row, query, key) at a time: a key is seen when it is not in the
    future and is a real token, and every query always sees itself."""
    B = 1 if attention_mask is None else attention_mask.shape[0]
    S = start + T
    out = torch.zeros(B, 1, T, S, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            q = start + i
            for j in range(S):
                real = attention_mask is None or bool(attention_mask[b, j])
                out[b, 0, i, j] = (j <= q and real) or j == q
    return out


def test_causal_mask_from_a_fresh_start_is_left_to_sdpa() -> None:
    # No padding, start 0 (prefill) or one query (decode): SDPA's own causal path is exact.
    assert causal_mask(6, 0, None, torch.device("cpu")) is None
    assert causal_mask(1, 9, None, torch.device("cpu")) is None


def test_causal_mask_with_a_start_offset_matches_the_reference() -> None:
    got = causal_mask(3, 4, None, torch.device("cpu"))
    assert got is not None and got.shape == (1, 1, 3, 7)
    assert torch.equal(got, reference_mask(3, 4, None))
    # the first query (position 4) sees keys 0..4, the last (position 6) all seven
    assert got[0, 0, 0].tolist() == [True] * 5 + [False] * 2 and bool(got[0, 0, -1].all())


@pytest.mark.parametrize("T, start", [(5, 0), (2, 3), (1, 4)])
def test_causal_mask_with_padding_matches_the_reference(T: int, start: int) -> None:
    S = start + T
    attention_mask = torch.ones(3, S + 2, dtype=torch.long)  # longer than S: only [:S] counts
    attention_mask[1, :2] = 0  # left padding
    attention_mask[2, :S] = 0  # a row that is all padding still sees itself (no NaN rows)
    got = causal_mask(T, start, attention_mask, torch.device("cpu"))
    assert got is not None and got.shape == (3, 1, T, S)
    assert torch.equal(got, reference_mask(T, start, attention_mask[:, :S]))
    assert bool(got.any(dim=-1).all())  # every query sees at least one key


@pytest.fixture(scope="module")
def model() -> PhiModel:
    cfg = PhiConfig(n_layer=2, d_model=64, n_head=2, vocab_size=128, max_seq_len=64)
    m = PhiModel(cfg)
    m.init_weights(torch.Generator().manual_seed(0))
    return m.eval()


def test_every_forward_satisfies_the_protocol(model: PhiModel) -> None:
    forwards: list[DecoderForward] = [model, FastForward(model, pack=False), StaticStep(model, compile=False)]
    for f in forwards:
        assert isinstance(f, DecoderForward), type(f).__name__
        assert f.config is model.config
    assert not isinstance(object(), DecoderForward)


@torch.no_grad()
def test_every_forward_gives_the_same_decode_step(model: PhiModel) -> None:
    """The same call (prefill on the model, then one decode step) through each forward."""
    cfg, B, P, L = model.config, 2, 5, 16
    prompt = torch.randint(0, cfg.vocab_size, (B, P), generator=torch.Generator().manual_seed(1))
    token = torch.randint(0, cfg.vocab_size, (B, 1), generator=torch.Generator().manual_seed(2))
    positions = torch.full((B, 1), P)
    keep = torch.ones(B, L, dtype=torch.bool)  # the static step hides unwritten slots itself
    results = []
    for f in (model, FastForward(model, pack=False), StaticStep(model, compile=False)):
        cache = KVCache(cfg, B, L)
        model(prompt, cache=cache)
        mask = keep if isinstance(f, StaticStep) else None
        logits = f(token, positions=positions, cache=cache, attention_mask=mask, last_only=True)
        assert logits.shape == (B, 1, cfg.vocab_size) and cache.pos == P + 1
        results.append(logits)
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_last_only_and_return_hidden_are_rows_of_the_full_forward(model: PhiModel) -> None:
    idx = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    full = model(idx)
    torch.testing.assert_close(model(idx, last_only=True), full[:, -1:])
    hidden = model(idx, return_hidden=True)
    assert hidden.shape == (2, 7, model.config.d_model)
    torch.testing.assert_close(model.lm_head(hidden), full)


def test_attention_dtype_is_float32_for_reduced_precision_on_cpu_only() -> None:
    assert attention_dtype(torch.bfloat16, "cpu") == torch.float32
    assert attention_dtype(torch.float16, torch.device("cpu")) == torch.float32
    assert attention_dtype(torch.float32, "cpu") == torch.float32
    assert attention_dtype(torch.bfloat16, "cuda") == torch.bfloat16  # a device, not a CUDA check
    assert attention_dtype(torch.float16, "cuda:0") == torch.float16


@torch.no_grad()
def test_every_forward_runs_a_bf16_model_on_a_float32_cache(model: PhiModel) -> None:
    """A bf16 model decoding on a float32 cache (attention_dtype's rule on CPU): every forward
    takes it, returns bf16 logits, and lands as close to the same weights in fp32 as the
    bf16 cache does (closer or equal, within bf16 noise)."""
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    bf16.reset_rope()
    exact = copy.deepcopy(bf16).float()  # the same (rounded) weights, computed in fp32
    exact.reset_rope()
    cfg, B, P, L = model.config, 2, 9, 16
    prompt = torch.randint(0, cfg.vocab_size, (B, P), generator=torch.Generator().manual_seed(4))
    token = torch.randint(0, cfg.vocab_size, (B, 1), generator=torch.Generator().manual_seed(5))
    positions = torch.full((B, 1), P)
    keep = torch.ones(B, L, dtype=torch.bool)
    ref_cache = KVCache(cfg, B, L)
    exact(prompt, cache=ref_cache)
    ref = exact(token, positions=positions, cache=ref_cache)
    for f in (bf16, FastForward(bf16, pack=False), FastForward(bf16), StaticStep(bf16, compile=False)):
        errors = {}
        for cache_dtype in (torch.float32, torch.bfloat16):
            cache = KVCache(cfg, B, L, dtype=cache_dtype)
            bf16(prompt, cache=cache)
            assert cache.k.dtype == cache_dtype
            mask = keep if isinstance(f, StaticStep) else None
            logits = f(token, positions=positions, cache=cache, attention_mask=mask)
            assert logits.dtype == torch.bfloat16, type(f).__name__
            errors[cache_dtype] = (logits.float() - ref).abs().max().item()
        # Both are about 2e-3 here (logits within +-1); 0.01 leaves room for other CPUs' bf16 kernels.
        assert errors[torch.float32] <= max(1.5 * errors[torch.bfloat16], 0.01), (type(f).__name__, errors)
