"""The chunked LM-head cross entropy (phibook/model/fused_ce.py) against F.cross_entropy on full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from phibook.model.config import PhiConfig
from phibook.model.fused_ce import linear_cross_entropy
from phibook.model.model import PhiModel


def _inputs(seed: int = 0, b: int = 3, t: int = 37, d: int = 64, v: int = 1000):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, t, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.1
    bias = torch.randn(v, generator=g) * 0.1
    y = torch.randint(0, v, (b, t), generator=g)
    return h, w, bias, y


def _grads(fn, h, w, bias, y, scale: float):
    h, w, bias = (x.clone().requires_grad_() for x in (h, w, bias))
    loss = fn(h, w, bias, y)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad, bias.grad


def _reference(reduction: str = "mean"):
    def fn(h, w, bias, y):
        return F.cross_entropy(F.linear(h, w, bias).float().flatten(0, -2), y.flatten(), reduction=reduction)

    return fn


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_rows", [7, 64, 1000])
def test_fp32_matches_cross_entropy(reduction: str, chunk_rows: int) -> None:
    h, w, bias, y = _inputs()
    ref = _grads(_reference(reduction), h, w, bias, y, scale=0.37)
    ours = _grads(
        lambda *a: linear_cross_entropy(*a, reduction=reduction, chunk_rows=chunk_rows), h, w, bias, y, scale=0.37
    )
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-6, atol=1e-5)
    for a, b in zip(ours[1:], ref[1:]):
        assert a.dtype == b.dtype == torch.float32
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()  # fp32 rounding, relative to the largest entry


def test_bf16_autocast_matches_autocast_reference() -> None:
    """Under autocast the matmuls run in bf16 as F.linear's would; loss and grads agree to bf16 rounding."""
    h, w, bias, y = _inputs(seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _grads(_reference(), h, w, bias, y, scale=1.0)
        ours = _grads(lambda *a: linear_cross_entropy(*a, chunk_rows=16), h, w, bias, y, scale=1.0)
    assert ours[0].dtype == torch.float32
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-3, atol=1e-3)
    for a, b in zip(ours[1:], ref[1:]):
        assert a.dtype == b.dtype == torch.float32  # gradients land in the fp32 master weights' dtype
        assert (a - b).abs().max() <= 2e-2 * b.abs().max()


def test_no_grad_gives_the_same_loss_and_keeps_nothing() -> None:
    h, w, bias, y = _inputs(seed=2)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, bias, y, chunk_rows=10)
        ref = _reference()(h, w, bias, y)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)


def test_without_bias() -> None:
    h, w, _, y = _inputs(seed=3)
    ref = F.cross_entropy(F.linear(h, w).flatten(0, -2), y.flatten())
    torch.testing.assert_close(linear_cross_entropy(h, w, None, y), ref, rtol=1e-6, atol=1e-5)


def test_model_forward_with_targets_is_the_loss_of_its_logits() -> None:
    """PhiModel(idx, targets=y) returns the mean cross entropy of PhiModel(idx), with the same gradients."""
    cfg = PhiConfig(n_layer=2, d_model=64, n_head=2, vocab_size=320, max_seq_len=64)
    model = PhiModel(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 320, (2, 33), generator=g)
    x, y = idx[:, :-1], idx[:, 1:]

    loss = model(x, targets=y)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    ref = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for name, p in model.named_parameters():
        assert (fused[name] - p.grad).abs().max() <= 1e-5 * p.grad.abs().max(), name
