"""Cross entropy through the LM head without materializing the fp32 logits.

The training loss is ``cross_entropy(h @ W.T + b, targets)`` with a vocabulary
of up to 51,200 rows. Done the usual way, a micro-batch of 8 x 256 tokens makes
105M logits in bf16, an fp32 copy of them, the fp32 log-softmax kept for
backward, then in backward a zero-filled NLL gradient, the log-softmax
gradient and its bf16 cast: about 2 GB of fresh tensors per micro-batch.

``linear_cross_entropy`` computes the loss AND its gradients in the forward
pass, a chunk of rows at a time (the approach of Liger-Kernel's fused linear
cross entropy): for each chunk the logits are made by one matmul, turned into
fp32 log-probabilities by one fused log-softmax (the loss is read off at the
targets), then in place into ``softmax - onehot``, which is stored in the
compute dtype and multiplied by the weight for the input gradient. The weight
gradient is one matmul over all rows at the end, so its precision is that of
the usual autocast path (bf16 products, fp32 result for an fp32 master
weight). Backward only scales the stored gradients by ``grad_output``. What
is alive at once: one chunk of fp32 logits and the bf16 logit gradient.

Numerics: the loss is computed in fp32 from logits in the compute dtype (as
``logits.float()`` in the usual path); loss and gradients match
``F.cross_entropy`` to rounding (tests/test_fused_ce.py). fp16 training keeps
the plain loss (phibook/train/trainer.py says why).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rows per chunk. Each chunk's two matmuls read the whole LM-head weight again
# (26 MB in bf16 at 51,200 x 256), so small chunks trade logits memory for
# weight traffic: on a 2-core CPU, 128-row chunks made the loss ~1.9x slower
# than 2048-row ones (docs/performance-training.md). 2048 rows of fp32 logits
# are 420 MB at a 51,200 vocabulary, the same as one 8 x 256 micro-batch.
CHUNK_ROWS = {"cpu": 2048, "cuda": 2048}


def _compute_dtype(h: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype autocast would run the LM head matmul in (the weight's own dtype without autocast)."""
    device = h.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, dtype, chunk_rows, want_grad, reduction_sum):
        shape = h.shape
        h2 = h.reshape(-1, shape[-1]).to(dtype)
        t = targets.reshape(-1)
        n, vocab = h2.shape[0], weight.shape[0]
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        losses = torch.empty(n, dtype=torch.float32, device=h.device)
        grad_logits = torch.empty(n, vocab, dtype=dtype, device=h.device) if want_grad else None
        grad_h = torch.empty_like(h2) if want_grad else None
        # d(loss)/d(logits) of the mean loss carries 1/n; the sum carries 1.
        scale = 1.0 if reduction_sum else 1.0 / n
        for start in range(0, n, chunk_rows):
            end = min(n, start + chunk_rows)
            hc = h2[start:end]
            logits = torch.addmm(b, hc, w.t()) if b is not None else hc @ w.t()
            lf = logits.float() if logits.dtype != torch.float32 else logits
            # One fused kernel for the row maxima, log-sum-exp and the shift (fewer
            # passes over the chunk than logsumexp + sub + exp).
            logp = torch.log_softmax(lf, dim=-1)
            tc = t[start:end]
            rows = torch.arange(end - start, device=h.device)
            losses[start:end] = logp[rows, tc].neg()
            if want_grad:
                # softmax - onehot, written in place over the chunk's log-probabilities;
                # the 1/n of the mean is applied to the small results, not to the chunk.
                p = logp.exp_()
                p[rows, tc] -= 1.0
                g = grad_logits[start:end]
                g.copy_(p)
                torch.mm(g, w, out=grad_h[start:end])
        loss = losses.sum() if reduction_sum else losses.mean()
        if want_grad:
            grad_w = grad_logits.t() @ h2
            # Sum in the compute dtype (fp32 accumulation inside the kernel), as addmm's
            # backward does under autocast; sum(dtype=float32) would copy all the logits.
            grad_b = grad_logits.sum(0) if bias is not None else None
            ctx.save_for_backward(grad_h.reshape(shape), grad_w, grad_b)
        ctx.has_bias = bias is not None
        ctx.scale = scale
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        # The stored gradients are of the summed loss: scale them by 1/n (mean) times
        # the incoming scalar (1/accum, or the fp16 loss scale), in fp32, on the way
        # to each input's dtype (one pass over each).
        factor = grad_out.float() * ctx.scale
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        return (
            (grad_h.float() * factor).to(h_dtype),
            (grad_w.float() * factor).to(w_dtype),
            (grad_b.float() * factor).to(b_dtype) if ctx.has_bias else None,
            None, None, None, None, None,
        )


def linear_cross_entropy(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    *,
    reduction: str = "mean",
    chunk_rows: int | None = None,
) -> Tensor:
    """``F.cross_entropy(F.linear(h, weight, bias).float().flatten(0, -2), targets.flatten(), reduction=...)``
    without the full logits: an fp32 scalar. h is (..., d), targets (...) of class ids.

    Under autocast the matmuls run in the autocast dtype, as ``F.linear`` would.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    dtype = _compute_dtype(h, weight)
    chunk_rows = chunk_rows or CHUNK_ROWS.get(h.device.type, 2048)
    want_grad = torch.is_grad_enabled() and (
        h.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(
            h, weight, bias, targets, dtype, chunk_rows, want_grad, reduction == "sum"
        )
