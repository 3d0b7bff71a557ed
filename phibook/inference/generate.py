"""Text generation: batched, left-padded prefill, KV-cache decode, per-row sampling.

One ``Generator.run`` call is one batch. Every row carries its own
``SamplingParams`` (temperature, top-k, top-p, repetition penalty, seed, stop
strings, token budget), so a server can batch unrelated requests together.

The flow of a batch:

1. Encode each prompt (an empty prompt starts from the EOS token), left-pad to
   the longest, and run one prefill forward with an attention mask and per-row
   rotary positions, writing a preallocated ``KVCache``.
2. Decode one token per step for every row. Rows that finish keep their slot in
   the batch (shapes stay fixed) but are no longer sampled into their output or
   reported; the loop ends when all rows are done.
3. Text is released per row as soon as it is final: bytes of a half-decoded
   UTF-8 character, and any tail that could be the start of a stop string, are
   held back until the next tokens settle them.

Context rule: a prompt longer than the model's context (or one that fills it
while tokens are still wanted) is a PhibookError naming the prompt index and
lengths, or, with ``truncate="left"``, is cut from the left to its last
``prompt_keep(context, max_new_tokens)`` tokens (eval's rule). ``max_new_tokens``
beyond the context is clamped: the row ends with finish_reason "length" when
prompt + output reach the context.

Sampling and the per-token text/finish rules are phibook.inference.sampling's, shared
with the serve engine; the forward is any phibook.model.model.DecoderForward.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from phibook.errors import PhibookError
from phibook.inference.pages import huge_page_zeros
from phibook.inference.sampling import (  # noqa: F401 (SamplingParams, Completion, the filter: re-exported)
    Completion,
    RowDecoder,
    RowSampling,
    SamplingParams,
    build_sampling,
    mask_eos,
    next_tokens,
    top_k_top_p_filter,
)
from phibook.model.model import DecoderForward, KVCache, PhiModel

if TYPE_CHECKING:
    from phibook.inference.fast_decode import FastForward
    from phibook.model.tokenizer import Tokenizer


# --------------------------------------------------------------------------- batch


def prompt_keep(context: int, max_new_tokens: int) -> int:
    """How many prompt tokens a too-long prompt keeps (its last ones) under ``truncate="left"``.

    lm-evaluation-harness keeps the last (context - max_new_tokens) tokens, so the whole token
    budget fits. When the budget is more than half the context (a toy model with HumanEval's
    512 new tokens) that would leave little or nothing, so the prompt keeps at least half.
    """
    return max(context - max_new_tokens, context // 2, 1)



class _Batch:
    """Tensors of one running batch; every tensor op happens in inference mode here."""

    def __init__(self, gen: Generator, prompt_ids: list[list[int]], budgets: list[int], sampling: RowSampling,
                 decoders: list[RowDecoder]):
        self.model, self.device, self.dtype, self.cache_dtype = gen.model, gen.device, gen.dtype, gen.cache_dtype
        self.forward = gen.forward  # the model itself, or the fast path (phibook.inference.fast_decode)
        self.n_real = gen.n_real_vocab
        self.sampling = sampling
        self.decoders = decoders  # one per row: which rows may not pick EOS yet (min_tokens)
        lengths = [len(p) for p in prompt_ids]
        B, S = len(prompt_ids), max(lengths)
        # The last sampled token is never fed back, hence max budget - 1 slots.
        total = S + max(max(budgets) - 1, 0)
        self.static = gen.static_step
        if self.static is not None:
            from phibook.inference.compiled import bucket_length

            total = bucket_length(total, gen.context)  # fixed shapes: one compiled graph per bucket
        self.keep: Tensor | None = None
        self.pad_to = S
        self.cache_len = total
        self.prompt_ids, self.lengths = prompt_ids, lengths
        self.B = B
        self.chunk = gen.prefill_chunk
        self.cache: KVCache | None = None
        self.mask: Tensor | None = None
        self.positions: Tensor | None = None
        self.seen: Tensor | None = None

    @torch.inference_mode()
    def prefill(self) -> Tensor:
        B, S, dev = self.B, self.pad_to, self.device
        idx = torch.full((B, S), 0, dtype=torch.long, device=dev)
        self.mask = torch.ones((B, self.cache_len), dtype=torch.long, device=dev)
        for i, ids in enumerate(self.prompt_ids):
            idx[i, S - len(ids) :] = torch.tensor(ids, dtype=torch.long, device=dev)
            self.mask[i, : S - len(ids)] = 0
        prompt_mask = self.mask[:, :S]
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        self.positions = positions[:, -1:].clone()  # (B, 1): position of the last token fed
        self.cache = KVCache(self.model.config, B, self.cache_len, dtype=self.cache_dtype, device=dev,
                             allocate=huge_page_zeros)
        if self.sampling.penalty is not None:
            self.seen = torch.zeros((B, self.model.config.vocab_size), dtype=torch.bool, device=dev)
            # Padding slots point at the row's last (real) token, so only real ids are marked.
            self.seen.scatter_(1, torch.where(prompt_mask.bool(), idx, idx[:, -1:]), True)
        if self.static is not None:
            self.keep = self.mask.bool()  # the static step masks padding and unwritten slots itself
        # Without padding the model's own causal path (no explicit mask) is
        # exact and faster; with padding the mask hides the pad slots.
        if all(n == S for n in self.lengths):
            self.mask = None
        # Decode steps: the static step is the same call on its own fixed-shape mask (padding and
        # unwritten slots), chosen here once rather than per token.
        self.step_forward, self.step_mask = (self.static, self.keep) if self.static is not None else (
            self.forward, self.mask)
        # Chunks bound the (B, chunk, vocab) logits and the attention scores of
        # a long prompt; only the last position's logits are used.
        for start in range(0, S, self.chunk):
            end = min(S, start + self.chunk)
            logits = self.forward(
                idx[:, start:end], positions=positions[:, start:end], cache=self.cache, attention_mask=self.mask,
                last_only=True,
            )
        return self._pick(logits[:, -1])

    @torch.inference_mode()
    def step(self, tokens: Tensor) -> Tensor:
        assert self.cache is not None and self.positions is not None
        # A finished row keeps riding along; clamp so its positions stay inside
        # the rotary table (active rows never get there: budgets are clamped).
        self.positions = (self.positions + 1).clamp(max=self.model.config.max_seq_len - 1)
        logits = self.step_forward(tokens.unsqueeze(1), positions=self.positions, cache=self.cache,
                                   attention_mask=self.step_mask, last_only=True)
        return self._pick(logits[:, -1])

    def _pick(self, logits: Tensor) -> Tensor:
        logits = logits.float()
        # Rows past the tokenizer's vocabulary are padding: never produce them.
        logits[:, self.n_real :] = -math.inf
        mask_eos(logits, self.decoders)  # rows short of their min_tokens
        tokens = next_tokens(logits, self.seen, self.sampling)
        if self.seen is not None:
            self.seen.scatter_(1, tokens.unsqueeze(1), True)
        return tokens


# --------------------------------------------------------------------------- generator


@dataclass
class RunStats:
    """Wall times of one batch: prefill (prompt forward + first token) and decode steps after it."""

    rows: int
    prompt_tokens: int  # real prompt tokens over all rows (padding not counted)
    prefill_seconds: float | None = None
    decode_steps: int = 0  # one step = one new token per active row
    decode_seconds: float = 0.0

    def lines(self, load_seconds: float | None = None) -> list[str]:
        """llama.cpp-style timing lines."""
        out = []
        if load_seconds is not None:
            out.append(f"load time = {load_seconds * 1e3:10.2f} ms")
        if self.prefill_seconds is not None:
            ms = self.prefill_seconds * 1e3
            out.append(f"prefill   = {ms:10.2f} ms / {self.prompt_tokens:5d} tokens "
                       f"({ms / max(self.prompt_tokens, 1):8.2f} ms per token, "
                       f"{self.prompt_tokens / max(self.prefill_seconds, 1e-9):8.2f} tokens per second)")
        if self.decode_steps:
            ms = self.decode_seconds * 1e3
            rows = f", batch {self.rows}" if self.rows > 1 else ""
            out.append(f"decode    = {ms:10.2f} ms / {self.decode_steps:5d} tokens{rows} "
                       f"({ms / self.decode_steps:8.2f} ms per token, "
                       f"{self.decode_steps / max(self.decode_seconds, 1e-9):8.2f} tokens per second)")
        return out


class Generator:
    """Runs a PhiModel and its tokenizer over batches of prompts."""

    def __init__(
        self,
        model: PhiModel,
        tokenizer: Tokenizer,
        device: torch.device | str | None = None,
        fast: bool | FastForward = False,
        compile: bool = False,
        truncate: str = "error",
    ) -> None:
        """fast=True runs prefill and decode through phibook.inference.fast_decode.FastForward
        (prepacked, fused weights: a second copy of them unless a FastForward built
        with release_model=True is passed instead of True).
        compile=True runs each decode step through phibook.inference.compiled.StaticStep
        (torch.compile over a fixed-size cache) on the model's own modules; prefill stays on
        ``fast`` or the model.
        truncate: what a prompt that leaves no room to generate gets: "error" (a PhibookError) or
        "left" (its first tokens cut, keeping ``prompt_keep(context, max_new_tokens)``; counted
        in ``n_truncated``), as lm-eval's generate_until does."""
        if truncate not in ("error", "left"):
            raise PhibookError(f"truncate must be 'error' or 'left', got {truncate!r}")
        self.truncate = truncate
        self.n_truncated = 0  # prompts cut from the left (truncate="left")
        self.model = model.eval()
        self.static_step = None
        if compile:
            from phibook.inference.compiled import StaticStep

            self.static_step = StaticStep(model, compile=True)
        self.forward: DecoderForward = model
        self.dtype: torch.dtype = next(model.parameters()).dtype  # the activations'
        if fast is True:
            from phibook.inference.fast_decode import FastForward

            fast = FastForward(model)
        if fast:
            # The model's weights may be freed (release_model): the dtype is the fast path's.
            self.forward, self.dtype = fast, fast.dtype
        # The KV cache's: what the decode step reads best (DecoderForward.cache_dtype).
        self.cache_dtype: torch.dtype = (self.static_step or self.forward).cache_dtype
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if tokenizer.vocab_size > model.config.vocab_size:
            raise PhibookError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model has only "
                f"{model.config.vocab_size} embedding rows"
            )
        self.n_real_vocab = tokenizer.vocab_size
        self.context = model.config.max_seq_len
        self.load_seconds: float | None = None
        self.quant: str | None = getattr(model, "quant_mode", None)
        # Timings of the last batch (see RunStats), for `phibook generate --stats`.
        self.last_stats: RunStats | None = None
        # Prompts are prefilled this many tokens at a time (memory bound for long prompts).
        self.prefill_chunk = 512

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str | None = torch.float32,
        fast: bool = False,
        quant: str | None = None,
        save_quant: bool = True,
        log: Callable[[str], None] | None = None,
        compile: bool = False,
    ) -> Generator:
        """Load a phibook checkpoint or HF directory (see phibook.weights.checkpoint.load_model).

        dtype: a torch.dtype, a name (fp32, bf16, ...) or "auto" (bf16 only where the CPU has
        AVX512-BF16 or AMX, else fp32; see phibook.inference.load.choose_dtype).
        quant: None, "int8", "w8a8", "int4" or "int4-g128": quantized linears
        (phibook.inference.quant), read from quant-<mode>.safetensors beside the checkpoint when
        it matches, else quantized now and saved there when ``save_quant``.
        fast=True packs the weights for phibook.inference.fast_decode and frees the
        model's own copies as it goes (one copy in memory, not two).
        log: where the one-line dtype/quantization notes go (default: stderr when dtype is
        "auto" or quant is set).
        compile=True: a compiled fixed-shape decode step (phibook.inference.compiled); it needs
        the model's own weights, so it replaces ``fast`` (which frees them).
        """
        from phibook.inference.load import load_inference_model, stderr_log

        loaded = load_inference_model(path, device=device, dtype=dtype, quant=quant, save_quant=save_quant,
                                      log=log or stderr_log)
        if loaded.tokenizer is None:
            raise PhibookError(f"{path}: no tokenizer.json found beside the model; generation needs one")
        if fast and not compile:
            from phibook.inference.fast_decode import FastForward

            gen = cls(loaded.model, loaded.tokenizer, device=device, fast=FastForward(loaded.model, release_model=True))
        else:
            gen = cls(loaded.model, loaded.tokenizer, device=device, compile=compile)
        gen.load_seconds = loaded.load_seconds
        gen.quant = quant
        return gen

    # ------------------------------------------------------------------ public

    def run(
        self,
        prompts: list[str],
        params: SamplingParams | list[SamplingParams],
        on_delta: Callable[[int, str], None] | None = None,
    ) -> list[Completion]:
        """Generate a continuation for every prompt, as one batch.

        on_delta(i, text) receives each new final piece of row i's text, in
        order; the pieces of a row concatenate to its Completion.text.
        """
        events = self._events(prompts, params)
        while True:
            try:
                i, delta = next(events)
            except StopIteration as done:
                return done.value
            if on_delta is not None:
                on_delta(i, delta)

    def generate(self, prompts: list[str], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """``run`` without a callback."""
        return self.run(prompts, params)

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[str]:
        """Yield the text of one prompt's continuation piece by piece."""
        for _, delta in self._events([prompt], params):
            yield delta

    # ------------------------------------------------------------------ core

    def _encode(self, prompts: list[str], params: list[SamplingParams]) -> tuple[list[list[int]], list[int]]:
        """Token ids per prompt and each row's token budget after clamping to the context."""
        ids, budgets = [], []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            if not isinstance(prompt, str):
                raise PhibookError(f"prompt {i}: expected a string, got {type(prompt).__name__}")
            row = self.tokenizer.encode(prompt) if prompt else []
            if not row:
                row = [self.tokenizer.eos_id]
            if self.truncate == "left":
                keep = prompt_keep(self.context, p.max_new_tokens)
                if len(row) > keep:
                    row = row[-keep:]
                    self.n_truncated += 1
            room = self.context - len(row)
            if room < 0 or (room == 0 and p.max_new_tokens > 0):
                raise PhibookError(
                    f"prompt {i} is {len(row)} tokens long; the model's context is {self.context} tokens"
                    + ("" if room < 0 else ", which leaves no room to generate")
                )
            ids.append(row)
            budgets.append(min(p.max_new_tokens, room))
        return ids, budgets

    def _events(
        self, prompts: list[str], params: SamplingParams | list[SamplingParams]
    ) -> Iterator[tuple[int, str]]:
        """Yield (row, text delta) pairs; return the completions."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise PhibookError(f"got {len(prompts)} prompts but {len(params)} sampling parameter sets")
        if not prompts:
            return []
        for p in params:
            p.validate()
        prompt_ids, budgets = self._encode(prompts, params)
        rows = [RowDecoder(self.tokenizer, p, b) for p, b in zip(params, budgets)]
        batch = _Batch(self, prompt_ids, budgets, build_sampling(params, self.n_real_vocab, self.device), rows)
        active = [i for i in range(len(prompts)) if rows[i].finish is None]
        stats = RunStats(rows=len(prompts), prompt_tokens=sum(len(r) for r in prompt_ids))
        self.last_stats = stats
        t_start = time.perf_counter()
        if active:
            tokens = batch.prefill()
        while active:
            picked = tokens.tolist()  # the one host sync per step: text needs the ids
            now = time.perf_counter()
            if stats.prefill_seconds is None:
                stats.prefill_seconds = now - t_start
                t_decode = now
            else:
                stats.decode_steps += 1
                stats.decode_seconds = now - t_decode
            still = []
            for i in active:
                delta, tail = rows[i].push(picked[i])
                if delta:
                    yield i, delta
                if tail:
                    yield i, tail
                if rows[i].finish is None:
                    still.append(i)
            active = still
            if active:
                tokens = batch.step(tokens)

        return [row.completion(len(ids)) for row, ids in zip(rows, prompt_ids)]
