"""A fixed-shape one-token decode step, compiled with torch.compile (inductor) or run eagerly.

The eager decode step slices the KV cache to the filled length, so its shapes change every
token and a compiled graph would recompile every step. ``StaticStep`` keeps every shape fixed:

* the KV cache has a bucketed length (prompt + budget rounded up to ``BUCKET`` slots, at most the
  context), so one compiled graph serves every step of a batch and of later batches of the same
  bucket and batch size;
* the new token's K/V are written with ``index_copy_`` at a slot given as a tensor;
* attention runs over the whole cache with a mask ``slot <= pos`` (and the batch's padding mask):
  masked slots add exactly zero to the softmax, so the result is the eager step's up to the
  order of floating-point sums.

The step calls the model's own modules (LayerNorm, the linears, quantized or not), so it works
for fp32, bf16 and ``--quant`` models alike. Prefill stays eager (one call per batch).

When it pays: the step removes per-op Python overhead (about a dozen ops x 24 blocks) and fuses
the elementwise ops around the matmuls; the matmuls themselves, which read every weight once
per token, are unchanged. So it pays where that overhead is a visible share of a step: small
models, and fast (quantized, bf16-native) large ones. Measured numbers are in
docs/performance.md; ``Generator`` uses it only when asked (``compile=True``, ``--compile``),
never decided by a timing at start-up.
"""

from __future__ import annotations

import torch
from torch import Tensor

from phibook.inference.kernels import kernel_ok
from phibook.model.model import KVCache, PhiModel, apply_rotary, attend

BUCKET = 256


def bucket_length(needed: int, context: int) -> int:
    """Cache slots for ``needed`` positions: rounded up to a multiple of BUCKET, at most the context."""
    return min(context, -(-needed // BUCKET) * BUCKET)


class StaticStep:
    """step(token, positions, cache, keep) -> logits (B, 1, vocab) for one new token per row.

    The call is phibook.model.model.DecoderForward's, restricted to what a decode step is:
    token (B, 1) long; positions (B, 1): rotary positions; cache: a KVCache of length L
    (bucketed), written at slot ``cache.pos`` (same for every row, as in the eager cache);
    attention_mask (B, L) bool, required: the cache slots a row may attend to besides the
    causal limit (its padding is False). Prefill is not its job (``Generator`` runs it eagerly).
    """

    def __init__(self, model: PhiModel, compile: bool = True) -> None:
        self.model = model
        self.config = model.config
        # inductor's generated code is a kernel like any other: used only once proven on this CPU.
        self.compiled = compile and kernel_ok("inductor")
        self._fn = torch.compile(self._step, dynamic=False, fullgraph=False) if self.compiled else self._step

    @property
    def cache_dtype(self) -> torch.dtype:
        """The model's (``PhiModel.cache_dtype``): its SDPA reads that cache as it is."""
        return self.model.cache_dtype

    def _step(self, token: Tensor, slot: Tensor, positions: Tensor, keep: Tensor, cache_k: Tensor,
              cache_v: Tensor) -> Tensor:
        m = self.model
        B = token.shape[0]
        L = cache_k.shape[3]
        cos = m.rope_cos[positions].unsqueeze(1)  # (B, 1, 1, R)
        sin = m.rope_sin[positions].unsqueeze(1)
        slots = torch.arange(L, device=token.device)
        mask = (keep & (slots <= slot)).view(B, 1, 1, L)
        x = m.embed(token)
        for i, block in enumerate(m.blocks):
            h = block.ln(x)
            a = block.attn
            q, k, v = a.qkv(h).view(B, 1, 3, a.n_head, a.head_dim).permute(2, 0, 3, 1, 4)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            cache_k[i].index_copy_(2, slot, k.to(cache_k.dtype))
            cache_v[i].index_copy_(2, slot, v.to(cache_v.dtype))
            y = attend(q, cache_k[i], cache_v[i], mask, is_causal=False)
            x = x + a.out(y.transpose(1, 2).reshape(B, 1, -1).to(x.dtype)) + block.mlp(h)
        return m.lm_head(m.ln_f(x))

    def __call__(
        self,
        idx: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: Tensor | None = None,
        *,
        last_only: bool = False,
    ) -> Tensor:
        """One step at slot ``cache.pos``; advances it like the eager forward does.

        One token per row, so ``last_only`` changes nothing. The step has no defaults for the
        rest (fixed shapes need the bucketed cache and its full mask), so they are checked.
        """
        if cache is None or positions is None or attention_mask is None or idx.shape[1] != 1:
            raise ValueError("StaticStep runs one decode step: idx (B, 1), positions, a cache and its (B, L) mask")
        slot = torch.tensor([cache.pos], device=idx.device)
        logits = self._fn(idx, slot, positions, attention_mask, cache.k, cache.v)
        cache.pos += 1
        return logits
