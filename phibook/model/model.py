"""The phi-1.5 Transformer (report section 2.1), in one file.

Order: rotary helpers, causal_mask -> KVCache -> Attention -> MLP -> Block -> PhiModel -> DecoderForward.
A phi block has ONE LayerNorm whose output feeds attention and the MLP in
parallel; both results are added to the residual. Rotary embeddings touch only
the first ``rotary_dim`` (32) channels of each 64-wide head, in the
"rotate half" layout that the released weights and ``transformers`` use.

``PhiModel.forward(idx, positions=None, cache=None, attention_mask=None)``
serves training (no cache: causal SDPA fast path), prefill and decode (a
preallocated ``KVCache`` passed in by the caller, so the model itself holds no
inference state between calls). What a caller needs back is asked for, not
patched in: ``last_only`` (the last position's logits) or ``return_hidden`` (the
final LayerNorm's output, the LM head not run). ``DecoderForward`` is that call
as a Protocol, which the inference fast path and the compiled step also satisfy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phibook.model.config import PhiConfig

# --------------------------------------------------------------------------- rotary


def rotary_tables(cfg: PhiConfig, length: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """cos/sin tables of shape (length, rotary_dim), duplicated across the two halves."""
    inv_freq = 1.0 / (
        cfg.rope_base ** (torch.arange(0, cfg.rotary_dim, 2, dtype=torch.float32, device=device) / cfg.rotary_dim)
    )
    t = torch.arange(length, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first cos.shape[-1] channels of x's last (head) dimension.

    Any layout works whose cos/sin broadcast against it: the model's (B, H, T, D) with cos/sin
    (B|1, 1, T, R), or fast_decode's (B, T, H, D) with (B|1, T, 1, R); the math reads only the
    last dimension, so one function serves both.
    """
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    x_rot = (x_rot.float() * cos + rotated.float() * sin).to(x.dtype)
    return torch.cat([x_rot, x_pass], dim=-1)


def attention_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype a model's attention math uses: float32 on CPU for a bf16 or fp16 model, the
    model's own dtype elsewhere. It is also the KV cache's, unless the forward reads a narrower
    one (``DecoderForward.cache_dtype``).

    ATen's CPU attention kernels run reduced precision several times slower than float32
    (docs/inference.md has the measurement), and a decode step's attention grows with the
    context while its matmuls do not. The cache may still be the model's dtype: its keys and
    values are values of that dtype (apply_rotary rounds to it), so a bf16 cache holds them
    exactly in half the bytes of a float32 one. Every forward accepts either (``attend``).
    """
    if torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return dtype


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
    """SDPA in the attention dtype of the keys' dtype (``attention_dtype``): q follows the cache,
    and keys and values cached narrower than that (a bf16 model's bf16 cache on CPU, which holds
    its values exactly) are widened first."""
    dtype = attention_dtype(k.dtype, k.device)
    return F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask, is_causal=is_causal)


def causal_mask(T: int, start: int, attention_mask: Tensor | None, device: torch.device) -> Tensor | None:
    """Boolean (B|1, 1, T, start+T) attention mask for T queries at positions start..start+T-1.

    Query i sees key j when j <= start + i and (with ``attention_mask``, (B, >= start+T), 1 for
    real tokens) key j is real. None where SDPA's own causal path is exact: no padding and
    either a fresh start (prefill) or one query (a decode step sees the whole cache).

    Every query also sees its own key, padded or not: a padded query would otherwise have an
    all-masked row, whose softmax is NaN and would leak into the cache. The serve engine's
    scratch column relies on this rule (phibook/serve/engine.py).
    """
    if attention_mask is None and (start == 0 or T == 1):
        return None
    S = start + T
    q_pos = torch.arange(start, S, device=device).unsqueeze(1)
    k_pos = torch.arange(S, device=device).unsqueeze(0)
    mask = (k_pos <= q_pos).unsqueeze(0)  # (1, T, S)
    if attention_mask is not None:
        keep = attention_mask[:, :S].bool().unsqueeze(1)  # (B, 1, S)
        mask = (mask & keep) | (k_pos == q_pos).unsqueeze(0)
    return mask.unsqueeze(1)


# --------------------------------------------------------------------------- cache


class KVCache:
    """Preallocated keys and values for every layer, with an explicit fill position.

    Shapes are (n_layer, batch, n_head, max_len, head_dim). ``pos`` counts the
    positions already written; a forward with T new tokens writes slots
    [pos, pos + T) and then advances ``pos``.
    """

    def __init__(
        self,
        cfg: PhiConfig,
        batch: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        allocate: Callable[[tuple[int, ...], torch.dtype, torch.device | str], Tensor] | None = None,
    ) -> None:
        """``allocate(shape, dtype, device)`` returns zeros (default ``torch.zeros``); inference
        passes phibook.inference.pages.huge_page_zeros, since attention reads the whole cache
        every step and 4 KiB pages make that TLB-bound."""
        shape = (cfg.n_layer, batch, cfg.n_head, max_len, cfg.head_dim)
        zeros = allocate or (lambda shape, dtype, device: torch.zeros(shape, dtype=dtype, device=device))
        self.k = zeros(shape, dtype, device)
        self.v = zeros(shape, dtype, device)
        self.max_len = max_len
        self.pos = 0
        # decode_slots' answers: each layer's views (made once), the columns (remade when pos moves)
        self._layers: tuple[tuple[Tensor, ...], tuple[Tensor, ...]] | None = None
        self._columns, self._columns_pos = torch.empty(0, dtype=torch.long), -1

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def decode_slots(self, layer: int) -> tuple[Tensor, Tensor, Tensor, int]:
        """Where a one-token step writes, for a kernel that stores its keys and values itself (what
        ``update`` does otherwise): the layer's keys and values (B, H, max_len, D), the columns
        (B, 1) int64 each row's new key and value go to, and how many columns the step's attention
        reads. Every row writes at ``pos``."""
        if self._layers is None:
            self._layers = (self.k.unbind(0), self.v.unbind(0))
        if self._columns_pos != self.pos:
            self._columns = torch.full((self.batch, 1), self.pos, dtype=torch.long, device=self.k.device)
            self._columns_pos = self.pos
        return self._layers[0][layer], self._layers[1][layer], self._columns, self.pos + 1

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, H, T, D) at the current position; return all keys/values so far."""
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reset(self) -> None:
        self.pos = 0


# --------------------------------------------------------------------------- layers


class Attention(nn.Module):
    def __init__(self, cfg: PhiConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        # q, k and v in one matmul; the HF converter splits/fuses it explicitly.
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, mask: Tensor | None
    ) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        # mask None + no cache (or a fresh cache) means plain causal attention;
        # a single decode step without padding attends to everything cached.
        is_causal = mask is None and T > 1
        y = attend(q, k, v, mask, is_causal)
        return self.out(y.transpose(1, 2).reshape(B, T, C).to(x.dtype))


class MLP(nn.Module):
    def __init__(self, cfg: PhiConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Parallel block: x + attn(ln(x)) + mlp(ln(x)), one LayerNorm shared by both."""

    def __init__(self, cfg: PhiConfig, layer: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, mask: Tensor | None
    ) -> Tensor:
        h = self.ln(x)
        return x + self.attn(h, cos, sin, cache, mask) + self.mlp(h)


class PhiModel(nn.Module):
    """Embedding -> n_layer parallel blocks -> final LayerNorm -> untied LM head with bias.

    Constructing the module allocates weights with PyTorch's default init;
    call ``init_weights()`` for the training init, or load a state dict.
    """

    def __init__(self, cfg: PhiConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size)
        cos, sin = rotary_tables(cfg, cfg.max_seq_len)
        # Not persistent: derived from the config, so never stored in checkpoints.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """The training init: N(0, 0.02) weights, zero biases, output projections
        scaled by 1/sqrt(2 * n_layer) (GPT-2's rule for residual branches)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln" in name or name.startswith("ln_f"):
                p.fill_(1.0)
            else:
                scale = 1 / math.sqrt(2 * self.config.n_layer) if name.endswith(("out.weight", "fc2.weight")) else 1.0
                p.normal_(0.0, std * scale, generator=generator)
        self.reset_rope()

    @property
    def cache_dtype(self) -> torch.dtype:
        """The KV cache dtype this forward reads best: ``attention_dtype``'s (a bf16 cache would be
        widened by every step's SDPA)."""
        return attention_dtype(self.embed.weight.dtype, self.embed.weight.device)

    def reset_rope(self) -> None:
        """Recompute the rotary tables (after building on the meta device)."""
        cos, sin = rotary_tables(self.config, self.config.max_seq_len, device=self.embed.weight.device)
        self.rope_cos, self.rope_sin = cos, sin

    def forward(
        self,
        idx: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: Tensor | None = None,
        targets: Tensor | None = None,
        *,
        last_only: bool = False,
        return_hidden: bool = False,
    ) -> Tensor:
        """Logits (B, T, vocab) for token ids ``idx`` (B, T).

        positions: (T,) or (B, T) rotary positions; default start..start+T where
            start is ``cache.pos`` (0 without a cache).
        cache: written at [cache.pos, cache.pos + T), then advanced.
        attention_mask: (B, S) with 1 for real tokens and 0 for padding, where S
            covers every position up to the end of this call (cache included).
        targets: (B, T) next-token ids for training: return the mean cross entropy
            (an fp32 scalar) instead of the logits, computed through the LM head in
            chunks without materializing them (phibook/model/fused_ce.py). It is inside
            forward so DDP/FSDP hooks see the LM head used.
        last_only: logits (B, 1, vocab) of the last position only; the LM head (51200 x 2048 for
            phi-1.5) is as costly per position as several layers, and prefill needs one row.
        return_hidden: the final LayerNorm's output (B, T, d_model), the LM head not run, for a
            caller that picks its own rows first (eval's scorer runs the head once per batch).
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=idx.device)
        if int(positions.max()) >= self.config.max_seq_len:
            raise ValueError(
                f"position {int(positions.max())} is past the model's context of {self.config.max_seq_len}"
            )
        if positions.dim() == 1:
            positions = positions.unsqueeze(0)
        cos = self.rope_cos[positions].unsqueeze(1)  # (B or 1, 1, T, R)
        sin = self.rope_sin[positions].unsqueeze(1)
        mask = causal_mask(T, start, attention_mask, idx.device)
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin, cache, mask)
        if cache is not None:
            cache.pos += T
        if targets is not None:
            from phibook.model.fused_ce import linear_cross_entropy

            return linear_cross_entropy(self.ln_f(x), self.lm_head.weight, self.lm_head.bias, targets)
        if last_only:
            x = x[:, -1:]
        h = self.ln_f(x)
        return h if return_hidden else self.lm_head(h)


# --------------------------------------------------------------------------- the forward contract


@runtime_checkable
class DecoderForward(Protocol):
    """What generation and serving call: ``PhiModel``, ``FastForward`` (phibook.inference.fast_decode)
    and ``StaticStep`` (phibook.inference.compiled) all satisfy it.

    ``forward(idx, positions, cache, attention_mask, last_only=True)`` writes the new tokens' K/V
    into ``cache`` at ``cache.pos``, advances it, and returns logits (B, T, vocab), or (B, 1,
    vocab) with ``last_only``. ``config`` is the model's PhiConfig (context, vocabulary).
    ``cache_dtype`` is the KV cache dtype it reads best; every forward accepts an fp32 cache, and
    a cache of the model's own dtype (its keys and values are that dtype's values).
    """

    config: PhiConfig
    cache_dtype: torch.dtype

    def __call__(
        self,
        idx: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: Tensor | None = None,
        *,
        last_only: bool = False,
    ) -> Tensor: ...
