"""The fast inference path (phibook.inference.fast_decode) against PhiModel and the reference Generator.

Small configs on the CPU; exactness, never speed (timings live in bench/).
"""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

from phibook.cpu_features import cpu_flags, read_cpuinfo
from phibook.inference import kernels as K
from phibook.inference.fast_decode import FastForward, can_pack
from phibook.inference.generate import Generator, SamplingParams
from phibook.inference.pages import huge_page_zeros
from phibook.model.config import PhiConfig
from phibook.model.model import KVCache, PhiModel

PACKS = [True, False]  # oneDNN prepacked weights, and the plain F.linear fallback


def _model(dtype: torch.dtype = torch.float32, seed: int = 0) -> PhiModel:
    cfg = PhiConfig(n_layer=3, d_model=128, n_head=2, vocab_size=320, max_seq_len=128, init_std=0.1)
    model = PhiModel(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial biases and LayerNorms, so a misplaced one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln" in name or name.startswith("ln_f"):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.to(dtype).eval()


def _step_logits(forward, model: PhiModel, prompt: torch.Tensor, mask: torch.Tensor | None, steps: int):
    """Prefill then greedy-decode ``steps`` tokens; every step's last-position logits (fp32)."""
    B, S = prompt.shape
    cfg = model.config
    cache = KVCache(cfg, B, S + steps, dtype=model.embed.weight.dtype)
    full_mask = None
    if mask is not None:
        full_mask = torch.cat([mask, torch.ones(B, steps, dtype=mask.dtype)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
    else:
        positions = torch.arange(S).expand(B, S)
    out = []
    with torch.inference_mode():
        logits = forward(prompt, positions=positions, cache=cache, attention_mask=full_mask)[:, -1].float()
        pos = positions[:, -1:]
        for _ in range(steps):
            out.append(logits)
            token = logits.argmax(-1, keepdim=True)
            pos = pos + 1
            logits = forward(token, positions=pos, cache=cache, attention_mask=full_mask)[:, -1].float()
    return out


@pytest.mark.parametrize("pack", PACKS)
def test_logits_match_model_every_step_batch1(pack: bool) -> None:
    model = _model()
    fast = FastForward(model, pack=pack)
    assert fast.packed == (pack and can_pack(torch.float32, torch.device("cpu")))
    prompt = torch.randint(0, 320, (1, 17), generator=torch.Generator().manual_seed(3))
    ref = _step_logits(model, model, prompt, None, 40)
    got = _step_logits(fast, model, prompt, None, 40)
    assert len(got) == 40
    for i, (a, b) in enumerate(zip(ref, got)):
        assert (a - b).abs().max().item() <= 1e-4, f"step {i}"
        assert a.argmax().item() == b.argmax().item(), f"step {i}"


@pytest.mark.parametrize("pack", PACKS)
def test_logits_match_model_left_padded_batch(pack: bool) -> None:
    model = _model()
    fast = FastForward(model, pack=pack)
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, 320, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :5] = 0  # row 1 is 7 tokens, row 2 is 1 token, both left-padded
    mask[2, :11] = 0
    ref = _step_logits(model, model, prompt, mask, 33)
    got = _step_logits(fast, model, prompt, mask, 33)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert (a - b).abs().max().item() <= 1e-4, f"step {i}"


@pytest.mark.parametrize("pack", PACKS)
def test_last_only_is_the_last_row_of_the_full_logits(pack: bool) -> None:
    model = _model()
    fast = FastForward(model, pack=pack)
    prompt = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(5))
    full = fast(prompt)
    last = fast(prompt, last_only=True)
    assert last.shape == (2, 1, 320)
    if fast.packed and not fast.gemv:  # oneDNN's packed kernel gives each row the same bits whatever the row count
        assert torch.equal(full[:, -1:], last)
    else:  # MKL (or phibook's GEMV at 16 rows or fewer) sums in another order than at 18 rows
        assert (full[:, -1:] - last).abs().max().item() <= 1e-5


def _generator(tiny_checkpoint, fast: bool) -> Generator:
    return Generator.from_path(tiny_checkpoint, fast=fast)


def test_generator_fast_greedy_equals_reference(tiny_checkpoint) -> None:
    ref, fast = _generator(tiny_checkpoint, False), _generator(tiny_checkpoint, True)
    # from_path(fast=True) packed the weights and freed the model's copies.
    assert fast.model.blocks[0].attn.qkv.weight.numel() == 0
    params = SamplingParams(max_new_tokens=40, stop_at_eos=False)
    prompts = ["The students counted the apples", "def fibonacci(n):\n    "]
    for batch in (prompts[:1], prompts):
        a = ref.generate(batch, params)
        b = fast.generate(batch, params)
        for x, y in zip(a, b):
            assert x.completion_tokens == 40
            assert x.token_ids == y.token_ids
            assert x.text == y.text


def test_generator_fast_sampling_equals_reference(tiny_checkpoint) -> None:
    ref, fast = _generator(tiny_checkpoint, False), _generator(tiny_checkpoint, True)
    params = SamplingParams(max_new_tokens=32, temperature=0.9, top_k=50, top_p=0.95, seed=7, stop_at_eos=False)
    assert ref.generate(["Alice says"], params)[0].token_ids == fast.generate(["Alice says"], params)[0].token_ids


def test_release_model_frees_weights_and_keeps_results() -> None:
    model = _model()
    keep = copy.deepcopy(model)
    before = FastForward(keep)
    fast = FastForward(model, release_model=True)
    assert fast.released
    assert all(p.numel() == 0 for n, p in model.named_parameters() if n.startswith(("blocks.", "lm_head.")))
    prompt = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(6))
    assert torch.equal(before(prompt), fast(prompt))


def test_falls_back_to_plain_linear_without_onednn() -> None:
    model = _model()
    prompt = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(8))
    with torch.backends.mkldnn.flags(enabled=False):
        assert not can_pack(torch.float32, torch.device("cpu"))
        auto = FastForward(model)  # pack=None picks what works
        assert not auto.packed
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            forced = FastForward(model, pack=True)
        assert not forced.packed
        assert any("prepacking is not available" in str(w.message) for w in caught)
        with torch.inference_mode():
            ref = model(prompt)
        assert (auto(prompt) - ref).abs().max().item() <= 1e-4
        assert (forced(prompt) - ref).abs().max().item() <= 1e-4


def test_bf16_is_as_close_to_fp32_as_the_model_in_bf16() -> None:
    fp32 = _model()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    bf16.reset_rope()
    fast = FastForward(bf16)
    prompt = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        ref = fp32(prompt)
        model_err = (bf16(prompt).float() - ref).abs().max().item()
        fast_err = (fast(prompt).float() - ref).abs().max().item()
    # The fast path accumulates each fused matmul in fp32, so it is no worse than bf16 eager.
    assert fast_err <= max(1.5 * model_err, 0.05), (fast_err, model_err)


def test_context_overflow_is_refused() -> None:
    model = _model()
    fast = FastForward(model)
    with pytest.raises(ValueError, match="past the model's context"):
        fast(torch.zeros(1, 1, dtype=torch.long), positions=torch.tensor([128]))


def test_gpu_bench_imports_on_cpu_and_its_static_step_is_exact() -> None:
    """bench/bench_decode_gpu.py loads without CUDA, and its fixed-shape step (full cache + mask) decodes
    the same greedy tokens as PhiModel with its KVCache (run eagerly here)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        from bench_decode_gpu import StaticDecoder
    finally:
        sys.path.pop(0)
    model = _model()
    prompt = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(10))
    _, tokens = StaticDecoder(model, 9 + 33, compile_mode=None).decode(prompt, 33)
    ref = [int(t.argmax()) for t in _step_logits(model, model, prompt, None, 33)]
    assert tokens == ref



# --------------------------------------------------------------------------- phibook's GEMV (bf16, fp32)

GEMV_DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")]


def _gemv_or_skip(dtype: torch.dtype) -> K.GemvOp:
    build, why = K.gemv_build(dtype)
    if build is None:
        pytest.skip(f"phibook's {dtype} GEMV does not run here: {why}")
    op = K.gemv_kernel(dtype)
    if op is None:
        pytest.skip(f"the {K.GEMV_PROBES[dtype]} kernel was refused on this CPU (its reason is on stderr)")
    return op


@pytest.mark.parametrize("dtype", GEMV_DTYPES)
def test_gemv_matches_a_double_reference(dtype: torch.dtype) -> None:
    """The build this process's ATen level picks (CI's lower-level pass runs fp32's AVX2 build)."""
    gemv = _gemv_or_skip(dtype)
    rel = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-20
    g = torch.Generator().manual_seed(11)
    for n, k in ((1, 32), (5, 64), (67, 2048), (300, 640)):  # row counts off the threads' grain
        w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
        for m in (1, 2, 3, 7, K.GEMV_MAX_ROWS):
            x = torch.randn(m, k, generator=g).to(dtype)
            for bias in (torch.randn(n, generator=g), torch.empty(0)):
                got = gemv(w, x, bias)
                assert got.dtype == dtype and got.shape == (m, n)
                want = x.double() @ w.double().T + (bias.double() if bias.numel() else 0)
                terms = x.double().abs() @ w.double().abs().T
                bound = want.abs() * rel + terms * (1e-5 if dtype == torch.bfloat16 else k * 2.0**-23) + 1e-6
                assert bool(((got.double() - want).abs() <= bound).all()), (n, k, m)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        gemv(torch.zeros(4, 48, dtype=dtype), torch.zeros(1, 48, dtype=dtype), torch.empty(0))
    with pytest.raises(RuntimeError, match="1 to 16 rows"):
        gemv(torch.zeros(4, 64, dtype=dtype), torch.zeros(17, 64, dtype=dtype), torch.empty(0))


@pytest.mark.parametrize("dtype", GEMV_DTYPES)
@torch.inference_mode()
def test_fast_path_decodes_through_the_gemv_as_closely_as_through_onednn(dtype: torch.dtype) -> None:
    """Steps of up to 16 rows go through the GEMV (longer prefills through oneDNN's linear on the
    same plain weights, or for bf16 where oneDNN lacks it, oneDNN's fp32 linear on them widened);
    teacher-forced, each step's logits are as close to the same weights run in float64 as the
    library path gets (oneDNN packed where it takes the dtype, else ATen's F.linear)."""
    _gemv_or_skip(dtype)
    model = _model(dtype)
    model.reset_rope()
    exact = copy.deepcopy(model).double()
    exact.reset_rope()
    fast, onednn = FastForward(model), FastForward(model, gemv=False)
    assert fast.gemv and fast.blocks[0].proj_in.gemv and fast.lm_head.gemv and not onednn.gemv
    assert onednn.blocks[0].proj_in.packed == K.onednn_supports(dtype) and not fast.blocks[0].proj_in.packed
    assert fast.widened == (K.long_step_dtype(dtype) != dtype) and not onednn.widened
    assert (fast.blocks[0].proj_in.widened is not None) == fast.widened
    if fast.widened:  # asked to pack what oneDNN cannot: said, and the GEMV still runs
        with pytest.warns(UserWarning, match="prepacking is not available.*widened weights"):
            forced = FastForward(model, pack=True)
        assert forced.gemv and forced.widened and not forced.packed
    prompt = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(12))
    forced = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(13))
    errors = {}
    for name, f in (("gemv", fast), ("onednn", onednn), ("exact", exact)):
        cache = KVCache(model.config, 1, 32, dtype=torch.float64 if name == "exact" else torch.float32)
        steps = [f(prompt, cache=cache)[:, -1].double()]
        steps += [f(forced[:, i : i + 1], cache=cache)[:, -1].double() for i in range(forced.shape[1])]
        errors[name] = torch.stack(steps)
    gemv_err = (errors["gemv"] - errors["exact"]).abs().max().item()
    onednn_err = (errors["onednn"] - errors["exact"]).abs().max().item()
    floor = 0.02 if dtype == torch.bfloat16 else 1e-4
    assert gemv_err <= max(1.5 * onednn_err, floor), (gemv_err, onednn_err)
    # Two rows in one step (a serving batch) through the GEMV; 40 tokens (a prefill) past its 16
    # rows, through oneDNN's linear on the plain weight.
    tol = {"atol": 0.05, "rtol": 0.02} if dtype == torch.bfloat16 else {"atol": 1e-4, "rtol": 1e-4}
    for ids in (torch.cat([prompt, prompt.flip(1)]), torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(14))):
        torch.testing.assert_close(fast(ids).float(), onednn(ids).float(), **tol)


def test_widened_linear_is_the_fp32_product_of_the_bf16_weights_whatever_the_chunks() -> None:
    """A bf16 model's long steps where oneDNN lacks bf16: the weight widened to fp32 a chunk of rows
    at a time. Chunks of one row, of a count that does not divide the rows, of the whole weight,
    smaller than one row, of min_rows rows, and the default; with and without bias and GELU; 2-D
    and 3-D inputs: each within one bf16 rounding of the float64 product of the same bf16 numbers."""
    if not K.onednn_supports(torch.float32):
        pytest.skip("oneDNN's fp32 linear does not run here")
    from phibook.inference.fast_decode import WidenedLinear

    g = torch.Generator().manual_seed(31)
    w = (torch.randn(70, 96, generator=g) / 96**0.5).to(torch.bfloat16)
    bias = torch.randn(70, generator=g)
    for chunk_values, min_rows in ((96, 1), (7 * 96 + 5, 1), (70 * 96, 1), (10, 1), (10, 16), (4 << 20, 2048)):
        widened = WidenedLinear(chunk_values, min_rows)
        for x in (torch.randn(33, 96, generator=g).to(torch.bfloat16),
                  torch.randn(2, 20, 96, generator=g).to(torch.bfloat16)):
            for b, gelu in ((bias, False), (torch.empty(0), False), (bias, True)):
                got = widened(x, w, b, gelu)
                want = x.double() @ w.double().T + (b.double() if b.numel() else 0)
                if gelu:
                    want = F.gelu(want, approximate="tanh")
                assert got.dtype == torch.bfloat16 and got.shape == (*x.shape[:-1], 70)
                bound = want.abs() * 2.0**-8 + (x.double().abs() @ w.double().abs().T) * 1e-5 + 1e-6
                assert bool(((got.double() - want).abs() <= bound).all()), (chunk_values, min_rows, x.shape, gelu)


def _attention_or_skip() -> K.AttentionOp:
    build, why = K.gemv_build(torch.float32)
    if build is None:
        pytest.skip(f"phibook's fp32 decode kernels do not run here: {why}")
    op = K.attention_kernel()
    if op is None:
        pytest.skip("the attention-fp32 kernel was refused on this CPU (its reason is on stderr)")
    return op


def test_attention_kernel_matches_float64_sdpa() -> None:
    """One query per (row, head) over a cache view wider than the keys read, with and without a
    padding mask shared by the rows or one per row, a strided q, an fp32 and a bf16 cache (read
    as the same floats widened: equal to the fp32 call on them); the build this ATen level picks."""
    attention = _attention_or_skip()
    g = torch.Generator().manual_seed(21)
    shapes = ((1, 1, 1, 16), (2, 4, 17, 64), (3, 2, 300, 32), (1, 32, 1025, 64))
    for (batch, heads, seen, dim), cache_dtype in itertools.product(shapes, (torch.float32, torch.bfloat16)):
        k = torch.randn(batch, heads, seen + 5, dim, generator=g).to(cache_dtype)[:, :, :seen]
        v = torch.randn(batch, heads, seen + 5, dim, generator=g).to(cache_dtype)[:, :, :seen]
        q = torch.randn(batch, 1, heads * 2, dim, generator=g).transpose(1, 2)[:, heads:]
        shared = torch.rand(1, 1, 1, seen, generator=g) > 0.5
        per_row = torch.rand(batch, 1, 1, seen, generator=g) > 0.5
        for mask in (None, shared, per_row):
            if mask is not None:
                mask[..., -1] = True
            flat = mask if mask is not None else torch.empty(0, dtype=torch.bool)
            want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
            got = attention(q, k, v, flat)
            assert got.shape == (batch, heads, 1, dim) and got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
            if cache_dtype == torch.bfloat16:
                assert torch.equal(got, attention(q, k.float(), v.float(), flat))
    q, k = torch.zeros(1, 1, 1, 24), torch.zeros(1, 1, 3, 24)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        attention(q, k, k, torch.empty(0, dtype=torch.bool))
    q, k = torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 3, 16)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        attention(q, k, k, torch.ones(1, 1, 1, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="both fp32 or both bf16"):
        attention(q, k.bfloat16(), k, torch.empty(0, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="both fp32 or both bf16"):
        attention(q, k.half(), k.half(), torch.empty(0, dtype=torch.bool))


@pytest.mark.parametrize("dtype", GEMV_DTYPES)
def test_decode_glue_matches_atens_ops(dtype: torch.dtype) -> None:
    """split_rotary and merge_gelu against the ops they replace (model.apply_rotary, the fp32
    widening, F.gelu, the concatenation), run in the same dtype: one rounding apart at most; rows
    with their own positions or one shared; u a strided view. The build this ATen level picks."""
    from phibook.model.model import apply_rotary

    _attention_or_skip()
    glue = K.decode_glue()
    if glue is None:
        pytest.skip("the decode-glue kernels were refused on this CPU (the reason is on stderr)")
    g = torch.Generator().manual_seed(31)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-20
    for batch, heads, dim, rot, ff, rows in ((1, 2, 32, 16, 96, 1), (3, 4, 64, 32, 1024, 3), (2, 32, 64, 32, 8192, 1)):
        d = heads * dim
        u = (torch.randn(batch, 1, 3 * d + ff + 7, generator=g) * 4).to(dtype)[..., : 3 * d + ff]
        angle = torch.rand(rows, 1, 1, rot // 2, generator=g) * 100
        cos = torch.cat([angle.cos(), angle.cos()], dim=-1)
        sin = torch.cat([angle.sin(), angle.sin()], dim=-1)
        q, k, v = glue.split_rotary(u, cos, sin, heads, dim).unbind(0)
        qk = apply_rotary(u[..., : 2 * d].view(batch, 1, 2 * heads, dim), cos, sin).transpose(1, 2).float()
        want_v = u[..., 2 * d : 3 * d].view(batch, 1, heads, dim).transpose(1, 2).float()
        for got, want in ((q, qk[:, :heads]), (k, qk[:, heads:]), (v, want_v)):
            assert got.dtype == torch.float32 and got.shape == (batch, heads, 1, dim)
            torch.testing.assert_close(got, want, atol=ulp * 4, rtol=ulp)
        y = torch.randn(batch, heads, 1, dim, generator=g)
        merged = glue.merge_gelu(y, u)
        want = torch.cat([y.transpose(1, 2).reshape(batch, 1, d).to(dtype),
                          F.gelu(u[..., 3 * d :], approximate="tanh")], dim=-1)
        assert merged.dtype == dtype and merged.shape == (batch, 1, d + ff)
        torch.testing.assert_close(merged.float(), want.float(), atol=ulp * 4, rtol=ulp)
    u = torch.zeros(1, 1, 3 * 64 + 8)
    with pytest.raises(RuntimeError, match="fewer than q, k and v"):
        glue.split_rotary(u, torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 16), 2, 64)
    with pytest.raises(RuntimeError, match="rotary width must be even"):
        glue.split_rotary(u, torch.zeros(1, 1, 1, 15), torch.zeros(1, 1, 1, 15), 1, 64)
    with pytest.raises(RuntimeError, match="u must be fp32 or bf16"):
        glue.merge_gelu(torch.zeros(1, 1, 1, 64), u.half())


def _step_glue_or_skip() -> K.DecodeGlue:
    _attention_or_skip()
    glue = K.decode_glue()
    if glue is None or glue.attend_step is None:
        pytest.skip("the decode-glue or decode-step kernels were refused on this CPU (the reason is on stderr)")
    return glue


@pytest.mark.parametrize("dtype", GEMV_DTYPES)
def test_attend_step_is_the_ops_it_joins(dtype: torch.dtype) -> None:
    """attend_step writes each row's new key and value at exactly the columns listed for it (none
    for -1, two for a row listing two), leaves every other cache value alone, and returns what
    split_rotary, those writes, attention_f32 and merge_gelu give (a rounding apart at most), over
    fp32 caches and, for a bf16 model, bf16 ones; it refuses what it cannot store exactly."""
    glue = _step_glue_or_skip()
    attention = K.attention_kernel()
    g = torch.Generator().manual_seed(41)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-20
    heads, dim, rot, ff, seen, width = 4, 64, 32, 512, 21, 30
    d = heads * dim
    for cache_dtype in dict.fromkeys((torch.float32, dtype)):  # fp32, and bf16 for a bf16 model
        u = (torch.randn(3, 1, 3 * d + ff, generator=g) * 3).to(dtype)
        angle = torch.rand(3, 1, 1, rot // 2, generator=g) * 100
        cos = torch.cat([angle.cos(), angle.cos()], dim=-1)
        sin = torch.cat([angle.sin(), angle.sin()], dim=-1)
        k_cache = torch.randn(3, heads, width, dim, generator=g).to(dtype).to(cache_dtype)
        v_cache = torch.randn(3, heads, width, dim, generator=g).to(dtype).to(cache_dtype)
        columns = torch.tensor([[seen - 1, 4], [seen - 1, -1], [-1, -1]])
        mask = torch.rand(3, 1, 1, seen, generator=g) > 0.3
        mask[..., -1] = True
        k_got, v_got = k_cache.clone(), v_cache.clone()
        got = glue.attend_step(u, cos, sin, heads, dim, k_got, v_got, columns, seen, mask)
        q, k, v = glue.split_rotary(u, cos, sin, heads, dim).unbind(0)
        k_want, v_want = k_cache.clone(), v_cache.clone()
        for row, col in ((0, seen - 1), (0, 4), (1, seen - 1)):
            k_want[row, :, col], v_want[row, :, col] = k[row, :, 0], v[row, :, 0]
        assert torch.equal(k_got, k_want) and torch.equal(v_got, v_want)
        want = glue.merge_gelu(attention(q, k_want[:, :, :seen], v_want[:, :, :seen], mask), u)
        assert got.dtype == dtype and got.shape == (3, 1, d + ff)
        torch.testing.assert_close(got.float(), want.float(), atol=ulp * 4, rtol=ulp)
    u32 = torch.zeros(1, 1, 3 * d + ff)
    cos, sin, none = torch.zeros(1, 1, 1, rot), torch.zeros(1, 1, 1, rot), torch.empty(0, dtype=torch.bool)
    small = torch.zeros(1, heads, 8, dim)
    with pytest.raises(RuntimeError, match="both bf16 for a bf16 u"):
        glue.attend_step(u32, cos, sin, heads, dim, small.bfloat16(), small.bfloat16(), torch.tensor([[0]]), 1, none)
    with pytest.raises(RuntimeError, match="past the cache"):
        glue.attend_step(u32, cos, sin, heads, dim, small, small.clone(), torch.tensor([[8]]), 1, none)
    with pytest.raises(RuntimeError, match="length must be in"):
        glue.attend_step(u32, cos, sin, heads, dim, small, small.clone(), torch.tensor([[0]]), 9, none)


@pytest.mark.parametrize("dtype", GEMV_DTYPES)
def test_add_layer_norm_is_atens_add_then_layer_norm(dtype: torch.dtype) -> None:
    """The sum exactly as ATen's add rounds it; the LayerNorm within a rounding of float64's."""
    glue = _step_glue_or_skip()
    g = torch.Generator().manual_seed(43)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-20
    for shape in ((1, 1, 128), (5, 1, 2048)):
        x = (torch.randn(shape, generator=g) * 8 + 2).to(dtype)
        y = torch.randn(shape, generator=g).to(dtype)
        w, b = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype), torch.randn(shape[-1], generator=g).to(dtype)
        s, h = glue.add_layer_norm(x, y, w, b, 1e-5)
        assert torch.equal(s, x + y) and h.dtype == dtype and h.shape == shape
        want = F.layer_norm((x + y).double(), shape[-1:], w.double(), b.double(), 1e-5)
        torch.testing.assert_close(h.double(), want, atol=ulp * 4, rtol=ulp)
    with pytest.raises(RuntimeError, match="y must be contiguous, of x's shape"):
        glue.add_layer_norm(x, y[:2], w, b, 1e-5)


@torch.inference_mode()
def test_an_fp16_model_decodes_with_atens_glue() -> None:
    """The glue ops read fp32 and bf16: an fp16 model's decode steps keep ATen's elementwise ops
    (and our attention where it runs) and give the eager model's logits."""
    model = _model(torch.float16)
    fast = FastForward(model)
    assert not fast.own_glue and not fast.own_step and all(block.glue is None for block in fast.blocks)
    caches = [KVCache(model.config, 1, 16, dtype=fast.cache_dtype) for _ in range(2)]
    tokens = torch.tensor([[5, 17, 3, 9]])
    for step in range(4):
        ours = fast(tokens, cache=caches[0])[:, -1].float()
        want = model(tokens, cache=caches[1])[:, -1].float()
        assert (ours - want).abs().max().item() <= 0.05, f"step {step}"
        tokens = want.argmax(-1, keepdim=True)


class _CountingCache(KVCache):
    """A KVCache that counts the ``decode_slots`` calls it answers (and changes none)."""

    slot_calls = 0

    def decode_slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        self.slot_calls += 1
        return super().decode_slots(layer)


class _UpdateOnlyCache:
    """A KV cache with ``update`` and no ``decode_slots``: FastForward steps it block by block."""

    def __init__(self, cache: KVCache) -> None:
        self.inner = cache

    k = property(lambda self: self.inner.k)
    v = property(lambda self: self.inner.v)
    batch = property(lambda self: self.inner.batch)
    pos = property(lambda self: self.inner.pos, lambda self, value: setattr(self.inner, "pos", value))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.update(layer, k, v)


@pytest.mark.parametrize("dtype", GEMV_DTYPES)
@torch.inference_mode()
def test_one_loop_decode_steps_match_block_by_block_ones(dtype: torch.dtype) -> None:
    """A left-padded batch decoded as one loop of native calls (attend_step, add_layer_norm) and,
    on a cache without ``decode_slots``, block by block (the glue ops, the cache's update, ATen's
    add and LayerNorm): the same logits within the LayerNorm's rounding, the same greedy tokens,
    and caches that agree, step after step."""
    _step_glue_or_skip()
    model = _model(dtype)
    _one_loop_against_block_by_block(model, FastForward(model), 1e-4 if dtype == torch.float32 else 0.05)


@pytest.mark.parametrize("mode", ["int8", "w8a8", "int4"])
@torch.inference_mode()
def test_a_quantized_model_decodes_in_the_one_loop(mode: str) -> None:
    """A quantized model's blocks take the glue and the one loop too: its output projection is two
    quantized linears, out(y) + fc2(gelu), fed the two halves of attend_step's merged output."""
    from phibook.inference import quant as Q

    _step_glue_or_skip()
    model = Q.quantize_(_model(), mode)
    fast = FastForward(model)
    assert fast.quant_mode == mode and fast.own_glue and fast.own_step and fast.blocks[0].quantized
    _one_loop_against_block_by_block(model, fast, 1e-4)


def _one_loop_against_block_by_block(model: PhiModel, fast: FastForward, tol: float) -> None:
    """12 calls of a left-padded batch, on a cache with decode_slots and on one without: logits
    within tol and the same greedy tokens every step, the one loop counted, caches that agree."""
    assert fast.own_step
    prompt = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(23))
    mask = torch.ones(2, 10 + 12, dtype=torch.long)
    mask[1, :3] = 0
    one_loop = _CountingCache(model.config, 2, 32, dtype=fast.cache_dtype)
    block_by_block = _UpdateOnlyCache(KVCache(model.config, 2, 32, dtype=fast.cache_dtype))
    tokens = prompt
    for step in range(12):
        width = one_loop.pos + tokens.shape[1]
        a = fast(tokens, cache=one_loop, attention_mask=mask[:, :width])[:, -1].float()
        b = fast(tokens, cache=block_by_block, attention_mask=mask[:, :width])[:, -1].float()
        assert (a - b).abs().max().item() <= tol, f"step {step}"
        assert torch.equal(a.argmax(-1), b.argmax(-1)), f"step {step}"
        tokens = a.argmax(-1, keepdim=True)
    assert one_loop.pos == block_by_block.pos == 10 + 11  # the prompt, then 11 one-token steps
    assert one_loop.slot_calls == 11 * model.config.n_layer  # every step after the prompt took the one loop
    torch.testing.assert_close(one_loop.k.float(), block_by_block.k.float(), atol=tol, rtol=0)
    torch.testing.assert_close(one_loop.v.float(), block_by_block.v.float(), atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", GEMV_DTYPES)
@torch.inference_mode()
def test_decode_steps_through_own_attention_match_sdpa(dtype: torch.dtype) -> None:
    """A left-padded batch decoded through phibook's attention and through ATen's SDPA (the same
    fast path otherwise) gives the same logits within fp32 rounding, step after step."""
    _attention_or_skip()
    model = _model(dtype)
    ours, theirs = FastForward(model), FastForward(model, own_attention=False)
    assert ours.own_attention and ours.blocks[0].attention is not None and not theirs.own_attention
    assert ours.own_glue == (K.decode_glue() is not None) and not theirs.own_glue
    prompt = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(22))
    mask = torch.ones(2, 10 + 12, dtype=torch.long)
    mask[1, :4] = 0
    caches = [KVCache(model.config, 2, 32, dtype=torch.float32) for _ in range(2)]
    tokens = prompt
    for step in range(12):
        width = caches[0].pos + tokens.shape[1]
        a = ours(tokens, cache=caches[0], attention_mask=mask[:, :width])[:, -1].float()
        b = theirs(tokens, cache=caches[1], attention_mask=mask[:, :width])[:, -1].float()
        tol = 1e-4 if dtype == torch.float32 else 0.05
        assert (a - b).abs().max().item() <= tol, f"step {step}"
        tokens = a.argmax(-1, keepdim=True)


@torch.inference_mode()
def test_a_bf16_model_decodes_on_a_bf16_cache_as_on_an_fp32_one() -> None:
    """Where our attention runs, a bf16 model's FastForward asks for a bf16 cache: its keys and
    values are bf16 values, so that cache holds the fp32 cache's numbers exactly in half the bytes,
    and a left-padded batch decodes on it to the same logits, step after step. The plain model
    keeps the fp32 cache its SDPA reads (a bf16 one would be widened every step)."""
    _attention_or_skip()
    model = _model(torch.bfloat16)
    fast = FastForward(model)
    assert fast.cache_dtype == torch.bfloat16 and model.cache_dtype == torch.float32
    assert FastForward(model, own_attention=False).cache_dtype == torch.float32
    assert FastForward(_model()).cache_dtype == torch.float32
    prompt = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(23))
    mask = torch.ones(2, 10 + 12, dtype=torch.long)
    mask[1, :4] = 0
    wide, narrow = (KVCache(model.config, 2, 32, dtype=dt) for dt in (torch.float32, torch.bfloat16))
    tokens = fast(prompt, cache=wide, attention_mask=mask[:, :10])[:, -1:].argmax(-1)
    narrow.k.copy_(wide.k)
    narrow.v.copy_(wide.v)
    narrow.pos = wide.pos
    assert torch.equal(narrow.k.float(), wide.k) and torch.equal(narrow.v.float(), wide.v)  # exactly bf16 values
    for step in range(12):
        width = wide.pos + 1
        a = fast(tokens, cache=wide, attention_mask=mask[:, :width])
        b = fast(tokens, cache=narrow, attention_mask=mask[:, :width])
        assert torch.equal(a, b), f"step {step}"
        tokens = a[:, -1].float().argmax(-1, keepdim=True)
    assert torch.equal(narrow.k.float(), wide.k) and torch.equal(narrow.v.float(), wide.v)
    assert narrow.k.nbytes * 2 == wide.k.nbytes


def test_the_generator_allocates_the_cache_its_forward_reads(tiny_checkpoint) -> None:
    """Generator(fast=True) on a bf16 model decodes on FastForward.cache_dtype's cache (bf16 where
    our attention runs) and picks the greedy tokens a hand loop over an fp32 cache picks."""
    _attention_or_skip()
    gen = Generator.from_path(tiny_checkpoint, device="cpu", dtype=torch.bfloat16, fast=True)
    assert gen.cache_dtype == gen.forward.cache_dtype == torch.bfloat16
    seen: list[torch.dtype] = []
    forward = gen.forward

    def spy(idx, positions=None, cache=None, attention_mask=None, *, last_only=False):
        seen.append(cache.k.dtype)  # only reads the call
        return forward(idx, positions, cache, attention_mask, last_only=last_only)

    gen.forward = spy
    prompt = "Once upon a time"
    ids = gen.tokenizer.encode(prompt)
    got = gen.run([prompt], SamplingParams(max_new_tokens=8, stop_at_eos=False))[0].token_ids
    assert seen and set(seen) == {torch.bfloat16}
    cache = KVCache(forward.config, 1, len(ids) + 8, dtype=torch.float32)
    want: list[int] = []
    with torch.inference_mode():
        logits = forward(torch.tensor([ids]), cache=cache)[:, -1]
        for _ in range(8):
            want.append(int(logits[0, : gen.tokenizer.vocab_size].float().argmax()))
            logits = forward(torch.tensor([[want[-1]]]), cache=cache)[:, -1]
    assert got == want


def test_kv_caches_live_in_huge_pages() -> None:
    """Zeros on a 2 MiB boundary (huge pages where the kernel allows them), used by the Generator's
    cache; on another device the allocator is plain torch.zeros."""
    t = huge_page_zeros((3, 1000, 7), torch.float32)
    assert t.is_contiguous() and t.shape == (3, 1000, 7) and not t.any()
    assert t.data_ptr() % (2 << 20) == 0
    cache = KVCache(_model().config, 1, 8, allocate=huge_page_zeros)
    assert cache.k.data_ptr() % (2 << 20) == 0 and cache.v.data_ptr() % (2 << 20) == 0 and not cache.k.any()
    assert huge_page_zeros((2,), torch.float32, device="meta").device.type == "meta"


def test_gemv_follows_the_switch_the_flags_and_the_aten_level(monkeypatch) -> None:
    monkeypatch.setenv(K.GEMV_ENV, "0")
    for dtype in (torch.bfloat16, torch.float32):
        assert K.gemv_build(dtype) == (None, f"{K.GEMV_ENV}=0")
        assert FastForward(_model(dtype)).gemv is False
    monkeypatch.delenv(K.GEMV_ENV)
    level = torch.backends.cpu.get_cpu_capability()
    flags = cpu_flags(read_cpuinfo()) or set()
    builds = {dtype: K.gemv_build(dtype) for dtype in (torch.bfloat16, torch.float32)}
    for dtype, (build, why) in builds.items():
        if level == "DEFAULT":  # CI's run at the lowest ATen level
            assert build is None and "DEFAULT" in why
            assert FastForward(_model(dtype)).gemv is False
        elif build is not None:  # the build for this level, never another level's
            assert build.level == level and build.namespace.endswith(level.lower())
    bf16, fp32 = builds[torch.bfloat16][0], builds[torch.float32][0]
    if bf16 is not None:  # bf16's dot products only where the CPU has them, else the weights widened
        native = level == "AVX512" and "avx512_bf16" in flags
        assert bf16.source.name == ("gemv_bf16.cpp" if native else "decode_f32.cpp")
        if not native and fp32 is not None:  # one library serves both dtypes
            assert (bf16.namespace, bf16.cflags) == (fp32.namespace, fp32.cflags) and bf16.op != fp32.op
    assert K.gemv_build(torch.float16) == (None, f"no GEMV of phibook's for {torch.float16}")
    assert K.gemv_kernel(torch.float16) is None  # asked where oneDNN packs fp16 (AVX512-FP16): no build, no error
