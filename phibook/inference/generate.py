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
lengths. ``max_new_tokens`` beyond the context is clamped: the row ends with
finish_reason "length" when prompt + output reach the context.
"""

from __future__ import annotations

import functools
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from phibook.errors import PhibookError
from phibook.model.model import KVCache, PhiModel

if TYPE_CHECKING:
    from phibook.inference.fast_decode import FastForward
    from phibook.model.tokenizer import Tokenizer


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 => greedy (argmax)
    top_k: int = 0  # 0 => off
    top_p: float = 1.0  # 1 => off
    repetition_penalty: float = 1.0  # 1 => off; CTRL style, as transformers
    seed: int | None = None  # per-row RNG; None => drawn from torch's global RNG
    stop: list[str] = field(default_factory=list)  # the stop text is not included in the output
    stop_at_eos: bool = True

    def validate(self) -> SamplingParams:
        """Raise PhibookError naming the first bad field; return self so calls chain."""

        def bad(name: str, why: str) -> PhibookError:
            return PhibookError(f"sampling parameter {name}={getattr(self, name)!r}: {why}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise bad("max_new_tokens", "must be an integer >= 0")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a finite number >= 0 (0 means greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 means off)")
        if not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):
            raise bad("top_p", "must be in (0, 1] (1 means off)")
        rp = self.repetition_penalty
        if not isinstance(rp, (int, float)) or not math.isfinite(rp) or rp <= 0:
            raise bad("repetition_penalty", "must be a finite number > 0 (1 means off)")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63
        ):
            raise bad("seed", "must be an integer in [0, 2**63) or None")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a list of non-empty strings")
        return self


@dataclass
class Completion:
    text: str  # the continuation, without the stop string or EOS
    token_ids: list[int]  # every sampled token, including the one that ended the row
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (stop string or EOS) | "length"


# --------------------------------------------------------------------------- text


class _RowText:
    """One row's decoded text, with stop-string search and safe release."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]) -> None:
        from phibook.model.tokenizer import StreamDecoder

        self.decoder = StreamDecoder(tokenizer)
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)
        self.text = ""
        self.sent = 0  # characters already released

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token; return (newly final text, hit a stop string)."""
        return self._extend(self.decoder.push(token_id))

    def finish(self) -> str:
        """End of row: flush the decoder and release everything left."""
        delta, stopped = self._extend(self.decoder.flush())
        if stopped:
            return delta
        delta += self.text[self.sent :]
        self.sent = len(self.text)
        return delta

    def _extend(self, piece: str) -> tuple[str, bool]:
        if not piece:
            return "", False
        old = len(self.text)
        self.text += piece
        if self.stops:
            # A new match must end inside the new piece, so it starts at most
            # len(stop) - 1 characters before it.
            start = max(0, old - self.longest + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                delta = self.text[self.sent :]
                self.sent = len(self.text)
                return delta, True
        safe = len(self.text) - self._held()
        delta = self.text[self.sent : safe]
        self.sent = max(self.sent, safe)
        return delta, False

    def _held(self) -> int:
        """Length of the longest tail of the text that could start a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best


# --------------------------------------------------------------------------- sampling


@dataclass
class _RowSampling:
    """The batch's sampling settings as tensors, built once per batch."""

    temperature: Tensor  # (B, 1)
    top_k: Tensor  # (B, 1) long, vocab size where off
    top_p: Tensor  # (B, 1)
    penalty: Tensor | None  # (B, 1), None when no row uses one
    any_sampled: bool
    any_filtered: bool  # some sampled row uses top-k or top-p
    generators: list[torch.Generator | None]


def _build_sampling(params: list[SamplingParams], n_vocab: int, device: torch.device) -> _RowSampling:
    greedy = [p.temperature == 0 for p in params]
    generators: list[torch.Generator | None] = []
    for p, g in zip(params, greedy):
        if g:
            generators.append(None)
            continue
        gen = torch.Generator(device=device)
        # Unseeded rows draw their seed from the global RNG, so torch.manual_seed
        # still makes a whole run reproducible.
        seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, ()).item())
        gen.manual_seed(seed)
        generators.append(gen)
    sampled = [p for p, g in zip(params, greedy) if not g]
    return _RowSampling(
        temperature=torch.tensor([[p.temperature or 1.0] for p in params], device=device),
        top_k=torch.tensor([[min(p.top_k, n_vocab) or n_vocab] for p in params], device=device),
        top_p=torch.tensor([[float(p.top_p)] for p in params], device=device),
        penalty=(
            torch.tensor([[float(p.repetition_penalty)] for p in params], device=device)
            if any(p.repetition_penalty != 1.0 for p in params)
            else None
        ),
        any_sampled=bool(sampled),
        any_filtered=any(p.top_k > 0 or p.top_p < 1.0 for p in sampled),
        generators=generators,
    )


def top_k_top_p_filter(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Set to -inf every logit outside each row's top-k and nucleus (top-p) set.

    logits (B, V); top_k (B, 1) long, V meaning off; top_p (B, 1), 1.0 meaning
    off. Top-k is applied first, then top-p over the renormalized survivors
    (transformers' order). The top token always survives.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)
    drop = ranks >= top_k
    probs = sorted_logits.masked_fill(drop, -math.inf).softmax(dim=-1)
    # Nucleus: drop a token when the tokens ranked above it already hold
    # top_p of the mass: the smallest set whose mass reaches top_p remains.
    # (top_p == 1 is off: a cumsum rounded up to 1.0 must not cut the tail.)
    drop |= ((probs.cumsum(dim=-1) - probs) >= top_p) & (top_p < 1.0)
    drop[:, 0] = False
    return torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))


def _next_tokens(logits: Tensor, seen: Tensor | None, s: _RowSampling) -> Tensor:
    """Pick one token per row from logits (B, V) already masked to the real vocab."""
    if s.penalty is not None and seen is not None:
        # CTRL / transformers: shrink the logit of every token already present
        # (prompt or output) toward "less likely", whatever its sign.
        penalized = torch.where(logits > 0, logits / s.penalty, logits * s.penalty)
        logits = torch.where(seen, penalized, logits)
    greedy_pick = logits.argmax(dim=-1)
    if not s.any_sampled:
        return greedy_pick
    scaled = logits / s.temperature
    if s.any_filtered:
        scaled = top_k_top_p_filter(scaled, s.top_k, s.top_p)
    probs = scaled.softmax(dim=-1)
    picks = greedy_pick.clone()
    for i, gen in enumerate(s.generators):
        if gen is not None:  # one draw per row from its own RNG: independent of the batch
            picks[i] = torch.multinomial(probs[i], 1, generator=gen)[0]
    return picks


# --------------------------------------------------------------------------- batch


class _Batch:
    """Tensors of one running batch; every tensor op happens in inference mode here."""

    def __init__(self, gen: Generator, prompt_ids: list[list[int]], budgets: list[int], sampling: _RowSampling):
        self.model, self.device = gen.model, gen.device
        self.forward = gen.forward  # the model itself, or the fast path (phibook.inference.fast_decode)
        self.n_real = gen.n_real_vocab
        self.sampling = sampling
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
        param = next(self.forward.parameters())
        idx = torch.full((B, S), 0, dtype=torch.long, device=dev)
        self.mask = torch.ones((B, self.cache_len), dtype=torch.long, device=dev)
        for i, ids in enumerate(self.prompt_ids):
            idx[i, S - len(ids) :] = torch.tensor(ids, dtype=torch.long, device=dev)
            self.mask[i, : S - len(ids)] = 0
        prompt_mask = self.mask[:, :S]
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        self.positions = positions[:, -1:].clone()  # (B, 1): position of the last token fed
        self.cache = KVCache(self.model.config, B, self.cache_len, dtype=param.dtype, device=dev)
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
        # Chunks bound the (B, chunk, vocab) logits and the attention scores of
        # a long prompt; only the last position's logits are used.
        for start in range(0, S, self.chunk):
            end = min(S, start + self.chunk)
            logits = self.forward(
                idx[:, start:end], positions=positions[:, start:end], cache=self.cache, attention_mask=self.mask
            )
        return self._pick(logits[:, -1])

    @torch.inference_mode()
    def step(self, tokens: Tensor) -> Tensor:
        assert self.cache is not None and self.positions is not None
        # A finished row keeps riding along; clamp so its positions stay inside
        # the rotary table (active rows never get there: budgets are clamped).
        self.positions = (self.positions + 1).clamp(max=self.model.config.max_seq_len - 1)
        if self.static is not None:
            return self._pick(self.static(tokens.unsqueeze(1), self.positions, self.cache, self.keep))
        logits = self.forward(tokens.unsqueeze(1), positions=self.positions, cache=self.cache, attention_mask=self.mask)
        return self._pick(logits[:, -1])

    def _pick(self, logits: Tensor) -> Tensor:
        logits = logits.float()
        # Rows past the tokenizer's vocabulary are padding: never produce them.
        logits[:, self.n_real :] = -math.inf
        tokens = _next_tokens(logits, self.seen, self.sampling)
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
    ) -> None:
        """fast=True runs prefill and decode through phibook.inference.fast_decode.FastForward
        (prepacked, fused weights: a second copy of them unless a FastForward built
        with release_model=True is passed instead of True).
        compile=True runs each decode step through phibook.inference.compiled.StaticStep
        (torch.compile over a fixed-size cache) on the model's own modules; prefill stays on
        ``fast`` or the model."""
        self.model = model.eval()
        self.static_step = None
        if compile:
            from phibook.inference.compiled import StaticStep

            self.static_step = StaticStep(model, compile=True)
        self.forward: Callable[..., Tensor] = model
        if fast is True:
            from phibook.inference.fast_decode import FastForward

            fast = FastForward(model)
        if fast:
            # Only the last position's logits are ever used (prefill included).
            self.forward = functools.partial(fast, last_only=True)
            self.forward.parameters = fast.parameters  # type: ignore[attr-defined]
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
        quant: None, "int8", "int4" or "int4-g128": weight-only quantized linears
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

    def stream_in_thread(self, prompt: str, params: SamplingParams) -> Iterator[str]:
        """Like ``stream``, but the model runs in a worker thread (for async servers)."""
        pieces: queue.Queue = queue.Queue()
        done = object()

        def work() -> None:
            try:
                self.run([prompt], params, on_delta=lambda _i, d: pieces.put(d))
                pieces.put(done)
            except BaseException as exc:  # handed to the consumer, raised there
                pieces.put(exc)

        threading.Thread(target=work, daemon=True).start()
        while (item := pieces.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item

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
        eos = self.tokenizer.eos_id
        rows = [_RowText(self.tokenizer, list(p.stop)) for p in params]
        outputs: list[list[int]] = [[] for _ in prompts]
        finish: list[str | None] = [None] * len(prompts)
        for i, b in enumerate(budgets):
            if b == 0:
                finish[i] = "length"

        batch = _Batch(self, prompt_ids, budgets, _build_sampling(params, self.n_real_vocab, self.device))
        active = [i for i in range(len(prompts)) if finish[i] is None]
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
                t = picked[i]
                outputs[i].append(t)
                if t == eos and params[i].stop_at_eos:
                    finish[i] = "stop"
                else:
                    delta, stopped = rows[i].push(t)
                    if delta:
                        yield i, delta
                    if stopped:
                        finish[i] = "stop"
                    elif len(outputs[i]) >= budgets[i]:
                        finish[i] = "length"
                if finish[i] is None:
                    still.append(i)
                elif finish[i] == "length" or t == eos:
                    tail = rows[i].finish()
                    if tail:
                        yield i, tail
            active = still
            if active:
                tokens = batch.step(tokens)

        return [
            Completion(
                text=rows[i].text,
                token_ids=outputs[i],
                prompt_tokens=len(prompt_ids[i]),
                completion_tokens=len(outputs[i]),
                finish_reason=finish[i] or "length",
            )
            for i in range(len(prompts))
        ]
