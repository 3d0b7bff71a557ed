"""A faster inference forward for PhiModel: prepacked oneDNN weights, two matmuls per block.

Decoding one token at batch 1 is a matrix-vector product per weight matrix, so
its speed is how fast the weights stream from memory. torch's default kernel
for ``F.linear`` with one row reads weights at well under the machine's
bandwidth (worst in bf16); oneDNN's inner-product kernel on a weight reordered
once into its blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, the
same packing inductor's ``freezing`` does) reads them much faster.

``FastForward`` also fuses each parallel phi block into two matmuls: because
attention and the MLP read the same LayerNorm output,

    [q k v | fc1] = ln(x) @ [W_qkv ; W_fc1]^T              (one weight, 14336 x 2048)
    x + out(y) + fc2(g) = x + [y | g] @ [W_out | W_fc2]^T   (one weight, 2048 x 10240)

with g = gelu(fc1). Fewer, larger matmuls stream better and cut per-op
overhead (24 blocks x a dozen small ops is the rest of a decode step).

The call signature and semantics are PhiModel.forward's (positions, the same
``KVCache``, the same padding mask, ``last_only``): both satisfy
phibook.model.model.DecoderForward, so ``Generator(fast=True)`` swaps it in
for prefill and decode alike. Weights are copies: the model stays usable
unless ``release_model=True`` frees its block and head weights as they are
packed (peak memory = model + one block, not two models).

Steps of up to 16 rows (decode at batch 1 to 16) run through phibook's own GEMV on plain
row-major weights in huge pages wherever a build of it serves the dtype on this CPU
(``gemv_op``; phibook.inference.kernels' ``gemv-bf16``: AVX512-BF16's dot products, else an
AVX-512F and an AVX2+FMA build that widen the bf16 weights as read, and ``gemv-fp32``: the same
two builds): at few rows it streams the weights faster than oneDNN's packed inner product;
longer prefills use oneDNN's linear on the same plain weights, or for a bf16 model where oneDNN
lacks bf16 (AVX2), oneDNN's fp32 linear on them widened a chunk at a time (``WidenedLinear``). Decode steps
(one query) run attention through phibook's own kernel where the fp32 build serves
(``attention-fp32``): ATen's flash attention read a cold cache at half the speed. It reads an fp32
cache or, for a bf16 model, a bf16 one (``FastForward.cache_dtype``): the same values in half the bytes.
There the elementwise work around it (rotary, the fp32 widening for the cache, GELU, [y | g])
runs as two ops of the same build too (``decode-glue``), not some 20 ATen dispatches a layer.
Where the cache says where a step writes (``decode_slots``: KVCache and the server's SlotCache)
and the ``decode-step`` check passed, a one-token step is one loop of native calls per block
(``_FusedBlock.step_out``: GEMV, ``attend_step``, GEMV; then ``add_layer_norm``, the residual add
with the next LayerNorm): after a GEMV has streamed its weight through the CPU caches, each
separate op pays a cold start, so fewer of them between the GEMVs is time saved. Quantized
blocks take the glue and the one loop too; their output projection stays two quantized linears.

Where oneDNN cannot take the dtype or device (CUDA, fp16 without AVX512-FP16,
``pack=False``), or its prepacked linear failed its check on this CPU
(phibook.inference.kernels), the same fused weights run through plain ``F.linear``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from phibook.inference.kernels import (
    ATTENTION_HEAD_MULTIPLE,
    DTYPE_SHORT,
    GEMV_COLS_MULTIPLE,
    GEMV_MAX_ROWS,
    AttentionOp,
    DecodeGlue,
    GemvOp,
    attention_kernel,
    decode_glue,
    gemv_kernel,
    kernel_ok,
    long_step_dtype,
    onednn_supports,
)
from phibook.inference.pages import dontneed, drop_file_pages, file_page_range, huge_page_copy, malloc_trim
from phibook.model.model import KVCache, PhiModel, apply_rotary, attend, attention_dtype, causal_mask


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether oneDNN prepacked linears run for this dtype on this device, and passed their
    check on this CPU (phibook.inference.kernels: probed once, in a child process)."""
    return device.type == "cpu" and onednn_supports(dtype) and kernel_ok(f"onednn-{DTYPE_SHORT[dtype]}")


def gemv_op(dtype: torch.dtype, device: torch.device) -> GemvOp | None:
    """phibook's own matrix-vector kernel for steps of 1-16 rows of this dtype, or None: a bf16 or
    fp32 model at ATen's AVX512 or AVX2 level (bf16 by AVX512-BF16's dot products where the CPU has
    them, else widened to fp32 as read), the build loaded and checked (phibook.inference.kernels,
    "gemv-bf16" / "gemv-fp32"). Asked only where the flags allow it, so other CPUs never build or
    probe it."""
    return gemv_kernel(dtype) if device.type == "cpu" else None


_NO_MASK = torch.empty(0, dtype=torch.bool)  # attention_f32's "no mask", made once, not per layer and step
OWN_ATTENTION_CACHE = (torch.float32, torch.bfloat16)  # the KV cache dtypes attention_f32 reads
GLUE_DTYPES = (torch.float32, torch.bfloat16)  # the model dtypes split_rotary and merge_gelu read


class WidenedLinear:
    """oneDNN's fp32 linear over a bf16 weight, widened a chunk of rows at a time into one scratch
    buffer: the longer steps (prefill) of a bf16 model whose oneDNN lacks bf16 (AVX2), where
    ATen's bf16 matmul ran at a fifth of this speed (docs/performance.md). bf16 to fp32 is exact,
    so this is the fp32 product of the same numbers, rounded to bf16 once. One per FastForward,
    shared by its linears (one forward at a time, as every FastForward runs)."""

    def __init__(self, chunk_values: int = 4 << 20, min_rows: int = 2048) -> None:
        # A chunk is chunk_values fp32 values of weight rows (16 MiB: phi-1.5's input projection in
        # 2048-row chunks, widened while the CPU's caches still hold them) or min_rows rows, which
        # ever is more: oneDNN ran a 96-token prefill 12% slower in chunks of 409 rows of 10240 than
        # in whole 2048-row ones (BENCHMARKS.md, ninth session). The scratch is the largest chunk.
        self.chunk_values = chunk_values
        self.min_rows = min_rows
        self.scratch: Tensor | None = None  # allocated by the first long step

    def __call__(self, x: Tensor, weight: Tensor, bias_fp32: Tensor, gelu: bool) -> Tensor:
        out_features, in_features = weight.shape
        step = max(1, self.min_rows, self.chunk_values // in_features)  # weight rows a chunk
        if self.scratch is None or self.scratch.numel() < step * in_features:
            self.scratch = torch.empty(step * in_features, dtype=torch.float32)
        x32 = x.reshape(-1, in_features).float()
        y = torch.empty(x32.shape[0], out_features, dtype=weight.dtype)
        for r0 in range(0, out_features, step):
            r1 = min(out_features, r0 + step)
            w32 = self.scratch[: (r1 - r0) * in_features].view(r1 - r0, in_features)
            w32.copy_(weight[r0:r1])
            b32 = bias_fp32[r0:r1] if bias_fp32.numel() else None
            y[:, r0:r1] = torch.ops.mkldnn._linear_pointwise(x32, w32, b32, "gelu" if gelu else "none", [],
                                                             "tanh" if gelu else "")
        return y.view(*x.shape[:-1], out_features)


class _Linear:
    """y = x @ W^T + b, optionally followed by tanh-GELU, on a packed or plain weight.

    With ``gemv`` (see gemv_op) the weight stays plain and row-major, in huge pages: up to
    GEMV_MAX_ROWS rows of input (decode steps at batch 1 to 16) go through phibook's GEMV, which
    streams the weight faster than oneDNN's packed inner product does at few rows; more rows
    (prefill) go through oneDNN's linear on the plain weight, as fast as on a packed one there
    (the gemv probe checks that call too), or, given ``widened`` (a bf16 weight where oneDNN lacks
    bf16), oneDNN's fp32 linear on it widened a chunk at a time.
    """

    def __init__(self, weight: Tensor, bias: Tensor, pack: bool, gemv: GemvOp | None = None,
                 widened: WidenedLinear | None = None) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias.detach().contiguous()
        self.gemv = gemv if self.in_features % GEMV_COLS_MULTIPLE == 0 else None
        self.widened = widened if self.gemv is not None else None
        self.packed = pack and self.gemv is None
        if self.gemv is not None:
            self.weight = huge_page_copy(weight.detach())
            self.bias_fp32 = self.bias.float()
        elif pack:
            # batch_size 1 is only a hint for the reorder: the packed weight serves any row count.
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
        else:
            self.weight = weight.detach().contiguous()

    def __call__(self, x: Tensor, gelu: bool = False) -> Tensor:
        if self.gemv is not None and x.numel() <= GEMV_MAX_ROWS * self.in_features:
            y = self.gemv(self.weight, x.reshape(-1, self.in_features), self.bias_fp32)
            y = y.view(*x.shape[:-1], self.out_features)
            return F.gelu(y, approximate="tanh") if gelu else y
        if self.widened is not None:
            return self.widened(x, self.weight, self.bias_fp32, gelu)
        if self.packed or self.gemv is not None:  # oneDNN's linear takes a packed or a plain weight
            if gelu:
                return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "gelu", [], "tanh")
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        y = F.linear(x, self.weight, self.bias)
        return F.gelu(y, approximate="tanh") if gelu else y


class _FusedBlock:
    """One phi block's weights, fused into an input and an output projection.

    For a quantized block (phibook.inference.quant) the input projection stacks the int8/int4
    rows of qkv and fc1 (exact: every row keeps its own scales) and the output projection stays
    two quantized matmuls, out(y) + fc2(g): stacking along the input dimension would need one
    scale per row for both, i.e. re-quantizing.
    """

    def __init__(self, block: torch.nn.Module, pack: bool, gemv: GemvOp | None = None,
                 attention: AttentionOp | None = None, glue: DecodeGlue | None = None,
                 widened: WidenedLinear | None = None) -> None:
        from phibook.inference.quant import QuantLinear, cat_rows

        attn, mlp = block.attn, block.mlp
        self.ln_weight = block.ln.weight.detach().clone()
        self.ln_bias = block.ln.bias.detach().clone()
        self.eps = block.ln.eps
        self.d = attn.out.in_features
        self.n_head, self.head_dim, self.layer = attn.n_head, attn.head_dim, attn.layer
        self.attention = attention if self.head_dim % ATTENTION_HEAD_MULTIPLE == 0 else None
        self.quantized = isinstance(attn.qkv, QuantLinear)
        # The decode step's elementwise work in two ops (kernels.DecodeGlue), where our attention
        # runs too; an fp16 block keeps ATen's ops (the glue reads fp32 and bf16). A quantized block's
        # activations are the model's dtype (its LayerNorm's), whatever its weights hold.
        self.glue = glue if self.attention is not None and block.ln.weight.dtype in GLUE_DTYPES else None
        if self.quantized:
            fused = cat_rows(attn.qkv, mlp.fc1)
            self.proj_in = fused if fused is not None else _Stacked(attn.qkv, mlp.fc1)
            self.out, self.fc2 = attn.out, mlp.fc2
            return
        w_in = torch.cat([attn.qkv.weight, mlp.fc1.weight], dim=0)
        b_in = torch.cat([attn.qkv.bias, mlp.fc1.bias], dim=0)
        self.proj_in = _Linear(w_in, b_in, pack, gemv, widened)
        del w_in, b_in  # the packed copy is all we keep
        w_out = torch.cat([attn.out.weight, mlp.fc2.weight], dim=1)
        self.proj_out = _Linear(w_out, attn.out.bias + mlp.fc2.bias, pack, gemv, widened)

    def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, mask: Tensor | None) -> Tensor:
        B, T, d = x.shape
        h = F.layer_norm(x, (d,), self.ln_weight, self.ln_bias, self.eps)
        u = self.proj_in(h)  # (B, T, 3d + d_ff)
        if T == 1 and self.glue is not None and cache is not None and cache.k.dtype in OWN_ATTENTION_CACHE \
                and cache.k.device.type == "cpu":  # a decode step over a cache our attention reads
            q, k, v = self.glue.split_rotary(u, cos, sin, self.n_head, self.head_dim).unbind(0)
            k, v = cache.update(self.layer, k, v)
            y = self.attention(q, k, v, mask if mask is not None else _NO_MASK)
            return x + self._project_out(self.glue.merge_gelu(y, u))
        qk = apply_rotary(u[..., : 2 * d].view(B, T, 2 * self.n_head, self.head_dim), cos, sin)
        q, k = qk.transpose(1, 2).split(self.n_head, dim=1)  # (B, H, T, D) each
        v = u[..., 2 * d : 3 * d].view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        if T == 1 and self.attention is not None and k.dtype in OWN_ATTENTION_CACHE and k.device.type == "cpu":
            y = self.attention(q.float(), k, v, mask if mask is not None else _NO_MASK)  # a decode step
        else:
            y = attend(q, k, v, mask, is_causal=mask is None and T > 1)
        g = F.gelu(u[..., 3 * d :], approximate="tanh")
        y = y.transpose(1, 2).reshape(B, T, d).to(x.dtype)
        if self.quantized:
            return x + self.out(y) + self.fc2(g)
        return x + self.proj_out(torch.cat([y, g], dim=-1))

    def step_out(self, h: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, mask: Tensor) -> Tensor:
        """A decode step's block output before the residual add, from h = ln(x): the two GEMVs and
        ``attend_step`` between them, which writes k and v where ``cache.decode_slots`` says."""
        u = self.proj_in(h)
        k_all, v_all, columns, length = cache.decode_slots(self.layer)
        return self._project_out(self.glue.attend_step(u, cos, sin, self.n_head, self.head_dim, k_all, v_all,
                                                       columns, length, mask))

    def _project_out(self, merged: Tensor) -> Tensor:
        """The output projection of [y | gelu(fc1)] (the glue's merged output): one linear, or a
        quantized block's two, out(y) + fc2(g)."""
        if self.quantized:
            return self.out(merged[..., : self.d]) + self.fc2(merged[..., self.d :])
        return self.proj_out(merged)


class _Stacked:
    """[a(x) | b(x)] for two quantized linears that cannot share one weight."""

    def __init__(self, a: torch.nn.Module, b: torch.nn.Module) -> None:
        self.a, self.b = a, b

    def __call__(self, x: Tensor) -> Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=-1)


class FastForward:
    """PhiModel.forward over packed, fused weights (see the module docstring)."""

    def __init__(self, model: PhiModel, pack: bool | None = None, release_model: bool = False,
                 gemv: bool | None = None, own_attention: bool | None = None, step_loop: bool | None = None) -> None:
        from phibook.inference.quant import QuantLinear, quant_mode_of

        self.config = model.config
        self.quant_mode = quant_mode_of(model)
        self.dtype = model.embed.weight.dtype
        self.device = model.embed.weight.device
        # oneDNN for the steps of more rows: in the model's dtype, or (a bf16 model where oneDNN
        # lacks bf16, unless told pack=False) in fp32 on the weights widened a chunk at a time.
        packable = can_pack(self.dtype, self.device)
        long_dtype = long_step_dtype(self.dtype) if self.device.type == "cpu" else self.dtype
        onednn = pack is not False and (packable if long_dtype == self.dtype else can_pack(long_dtype, self.device))
        unpackable = pack is True and not packable
        pack = packable if pack is None else bool(pack) and packable
        self.packed = pack
        # phibook's GEMV for steps of 1-16 rows (gemv_op): by default wherever a build serves the
        # dtype and its check passed; only where oneDNN runs too (longer prefills), never forced on.
        op = gemv_op(self.dtype, self.device) if onednn and (gemv is None or gemv) else None
        self.gemv = op is not None
        widened = WidenedLinear() if op is not None and long_dtype != self.dtype else None
        self.widened = widened is not None
        if unpackable:
            instead = "phibook's GEMV and oneDNN's fp32 linear on widened weights" if widened else "plain F.linear"
            warnings.warn(f"oneDNN prepacking is not available for {self.dtype} on {self.device}; using {instead}",
                          stacklevel=2)
        # phibook's one-query attention for decode steps (kernels.attention_kernel; ATen's SDPA
        # for prefill and where it is refused): by default wherever the fp32 build serves.
        attention = attention_kernel() if self.device.type == "cpu" and own_attention is not False else None
        self.own_attention = attention is not None
        # With it, the elementwise work around a decode step's attention (kernels.decode_glue).
        glue = decode_glue() if attention is not None else None
        # Shared with the model, never copied: a decode step reads one row of it, so
        # when it is a view of a memory-mapped checkpoint almost none of it is resident.
        self.embed = model.embed.weight.detach()
        # A lookup maps the rows' pages (and the kernel's fault-around neighbours,
        # 64 KiB each) into the process; a long prompt of scattered ids would make
        # most of the 0.2 GiB table resident. When it is a file mapping we own
        # (release_model), hand those pages back after each lookup.
        self._embed_pages = file_page_range(self.embed) if release_model else None
        self.rope_cos, self.rope_sin = model.rope_cos, model.rope_sin
        self.blocks: list[_FusedBlock] = []
        with torch.no_grad():
            for block in model.blocks:
                self.blocks.append(_FusedBlock(block, pack, op, attention, glue, widened))
                if release_model:
                    _release(block)
            self.ln_f = (model.ln_f.weight.detach().clone(), model.ln_f.bias.detach().clone(), model.ln_f.eps)
            if isinstance(model.lm_head, QuantLinear):
                self.lm_head = model.lm_head  # shared, not copied: quantized weights are already compact
            else:
                self.lm_head = _Linear(model.lm_head.weight, model.lm_head.bias, pack, op, widened)
                if release_model:
                    _release(model.lm_head)
        # A decode step's blocks as one loop of step_out and add_layer_norm (the residual add and the
        # next LayerNorm in one op), where every block has the glue and its one-call ops passed;
        # step_loop=False keeps the block-by-block step (what a benchmark compares it with).
        step_glue = glue if glue is not None and glue.attend_step is not None and glue.add_layer_norm is not None \
            and step_loop is not False else None
        self._step_glue = step_glue if all(block.glue is step_glue for block in self.blocks) else None
        self.own_glue = glue is not None and all(block.glue is glue for block in self.blocks)
        self.own_step = self._step_glue is not None
        self._next_ln = [(b.ln_weight, b.ln_bias, b.eps) for b in self.blocks[1:]] + [self.ln_f]
        self.released = release_model
        if release_model:
            malloc_trim()  # the concatenation temporaries: give glibc's freed heap back

    @property
    def cache_dtype(self) -> torch.dtype:
        """The KV cache dtype this forward reads best: a bf16 model's own dtype where our attention
        runs (its keys and values are bf16 values: the same floats in half the bytes, widened as
        read), else ``attention_dtype``'s (fp32 on CPU for bf16 and fp16)."""
        if self.own_attention and self.dtype == torch.bfloat16:
            return torch.bfloat16
        return attention_dtype(self.dtype, self.device)

    @classmethod
    def from_path(cls, path, dtype: torch.dtype | str = torch.float32, pack: bool | None = None):
        """Load a checkpoint or HF directory and pack it, never holding two copies of the weights.

        Returns (FastForward, LoadedModel); the LoadedModel's model has its
        block and head weights freed (its embedding and config remain).
        """
        from phibook.weights.checkpoint import load_model

        loaded = load_model(path, dtype=dtype)
        return cls(loaded.model, pack=pack, release_model=True), loaded

    @torch.inference_mode()
    def __call__(
        self,
        idx: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: Tensor | None = None,
        *,
        last_only: bool = False,
    ) -> Tensor:
        """Logits (B, T, vocab) as PhiModel.forward; (B, 1, vocab) for the last position
        only with ``last_only`` (what prefill needs: the head is 51200 x 2048 per position)."""
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
        # (B|1, T, 1, R): heads are dim 2 here; fp32, as apply_rotary's products are
        cos = self.rope_cos[positions].unsqueeze(2).float()
        sin = self.rope_sin[positions].unsqueeze(2).float()
        mask = causal_mask(T, start, attention_mask, idx.device)
        x = F.embedding(idx, self.embed)
        if self._embed_pages is not None:
            dontneed(self._embed_pages)
        if T == 1 and self._steps_in_one_loop(cache):
            h = self._decode_step(x, cos, sin, cache, mask if mask is not None else _NO_MASK)
            cache.pos += 1
            return self.lm_head(h)
        for block in self.blocks:
            x = block(x, cos, sin, cache, mask)
        if cache is not None:
            cache.pos += T
        if last_only:
            x = x[:, -1:]
        w, b, eps = self.ln_f
        return self.lm_head(F.layer_norm(x, (x.shape[-1],), w, b, eps))

    def _steps_in_one_loop(self, cache: KVCache | None) -> bool:
        """Whether a one-token call over ``cache`` runs as _decode_step: the one-call ops passed, and
        the cache says where a step writes (``decode_slots``) in a dtype attend_step stores exactly."""
        if self._step_glue is None or cache is None or not hasattr(cache, "decode_slots"):
            return False
        k, v = cache.k, cache.v
        return k.device.type == "cpu" and k.dtype == v.dtype and k.dtype in (torch.float32, self.dtype)

    def _decode_step(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, mask: Tensor) -> Tensor:
        """The blocks of a one-token step, returning the final LayerNorm's output. Each block is
        three native calls and the residual add rides with the next LayerNorm: right after a GEMV
        has streamed its weight through the CPU caches, every separate op starts cold."""
        first = self.blocks[0]
        h = F.layer_norm(x, (x.shape[-1],), first.ln_weight, first.ln_bias, first.eps)
        add_layer_norm = self._step_glue.add_layer_norm
        for block, (w, b, eps) in zip(self.blocks, self._next_ln):
            x, h = add_layer_norm(x, block.step_out(h, cos, sin, cache, mask), w, b, eps)
        return h


def _release(module: torch.nn.Module) -> None:
    """Swap a module's parameters for empty tensors so their memory goes back now.

    Weights loaded from safetensors are views of one memory-mapped file, which
    stays mapped until its last tensor dies; the pages they touched would stay
    resident (and count in RSS) meanwhile, so drop those pages explicitly.
    """
    from phibook.inference.quant import QuantLinear

    for name, p in list(module.named_parameters(recurse=True)):
        drop_file_pages(p)
        owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
        setattr(owner, name.rpartition(".")[2], torch.nn.Parameter(p.new_empty(0), requires_grad=False))
    # Quantized linears hold buffers: unhook them from the model. Those FastForward still uses
    # (out, fc2, the head) stay alive through its own references; stacked ones (qkv, fc1) are freed.
    for name, sub in list(module.named_modules()):
        if isinstance(sub, QuantLinear) and name:
            owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            setattr(owner, name.rpartition(".")[2], torch.nn.Identity())
