"""Sampling: per-row parameters, their batched tensors, stop strings, and each token's verdict.

Order: ``SamplingParams`` / ``Completion`` -> ``RowSampling`` (+ ``build_sampling``,
``stack_sampling``, ``next_tokens``) -> ``StopText`` -> ``RowDecoder``.

Both ``Generator`` (phibook/inference/generate.py: one batch at a time) and the serve engine
(phibook/serve/engine.py: rows joining and leaving a running batch) sample and finish rows with
these, so a row decodes the same whichever runs it:

* ``build_sampling`` turns the rows' ``SamplingParams`` into tensors once (a batch, or one row
  that the engine stacks with ``stack_sampling``); ``next_tokens`` picks one token per row from
  the logits, each sampled row with its own RNG.
* ``RowDecoder`` takes each picked token and decides what text becomes final and whether the
  row ends: "stop" (EOS, or a stop string, which is cut from the text) or "length" (the token
  budget). ``StopText`` holds back a tail that could be the start of a stop string, and the
  bytes of a half-decoded UTF-8 character, until the next tokens settle them.
* ``min_tokens`` (vLLM's rule): the first min_tokens tokens never end a row. Before each pick,
  ``mask_eos`` sets the EOS logit of every row whose ``RowDecoder.ban_eos`` says so to -inf
  (the model samples something else), and stop strings that end within those tokens' text
  are not matched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from phibook.errors import PhibookError

if TYPE_CHECKING:
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
    stop_at_eos: bool = True  # False: EOS is sampled and decoded like any other token (vLLM's ignore_eos)
    min_tokens: int = 0  # the first min_tokens tokens never end the row: EOS is masked, stop strings wait

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
        if not isinstance(self.stop_at_eos, bool):
            raise bad("stop_at_eos", "must be True or False")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0")
        if self.min_tokens > self.max_new_tokens:
            raise bad("min_tokens", f"must not exceed max_new_tokens={self.max_new_tokens}")
        return self


@dataclass
class Completion:
    text: str  # the continuation, without the stop string or EOS
    token_ids: list[int]  # every sampled token, including the one that ended the row
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (stop string or EOS) | "length"


# --------------------------------------------------------------------------- sampling


@dataclass
class RowSampling:
    """The rows' sampling settings as tensors, built once per batch (or per admitted row)."""

    temperature: Tensor  # (B, 1)
    top_k: Tensor  # (B, 1) long, vocab size where off
    top_p: Tensor  # (B, 1)
    penalty: Tensor | None  # (B, 1), None when no row uses one
    any_sampled: bool
    any_filtered: bool  # some sampled row uses top-k or top-p
    generators: list[torch.Generator | None]


def build_sampling(params: list[SamplingParams], n_vocab: int, device: torch.device) -> RowSampling:
    """Tensors for ``params`` (one per row); each sampled row gets its own seeded RNG."""
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
    return RowSampling(
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


def stack_sampling(parts: list[RowSampling], device: torch.device) -> RowSampling:
    """Rows' settings built apart (the serve engine admits rows one by one) as one batch, in order.

    The RNGs are the rows' own objects, not copies, so each row's stream continues.
    """
    any_penalty = any(p.penalty is not None for p in parts)
    one = torch.ones((1, 1), device=device)  # a penalty of 1 is off for rows that set none
    return RowSampling(
        temperature=torch.cat([p.temperature for p in parts]),
        top_k=torch.cat([p.top_k for p in parts]),
        top_p=torch.cat([p.top_p for p in parts]),
        penalty=torch.cat([p.penalty if p.penalty is not None else one for p in parts]) if any_penalty else None,
        any_sampled=any(p.any_sampled for p in parts),
        any_filtered=any(p.any_filtered for p in parts),
        generators=[g for p in parts for g in p.generators],
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


def next_tokens(logits: Tensor, seen: Tensor | None, s: RowSampling) -> Tensor:
    """Pick one token per row from logits (B, V) already masked to the real vocab.

    seen (B, V) bool: tokens already present per row (prompt or output), for the repetition
    penalty; None when no row uses one.
    """
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


def mask_eos(logits: Tensor, decoders: Sequence[RowDecoder]) -> None:
    """Set the EOS logit to -inf, in place, in each row of logits (B, V) whose decoder bans EOS
    now (``RowDecoder.ban_eos``: min_tokens not reached yet); the other rows are untouched."""
    banned = [i for i, d in enumerate(decoders) if d.ban_eos]
    if banned:
        rows = torch.tensor(banned, device=logits.device)
        eos = torch.tensor([decoders[i].eos for i in banned], device=logits.device)
        logits[rows, eos] = -math.inf


# --------------------------------------------------------------------------- text


class StopText:
    """One row's decoded text, with stop-string search and safe release."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]) -> None:
        from phibook.model.tokenizer import StreamDecoder

        self.decoder = StreamDecoder(tokenizer)
        self.stops = stops
        self.text = ""
        self.sent = 0  # characters already released

    def push(self, token_id: int, match: bool = True) -> tuple[str, bool]:
        """Add one token; return (newly final text, hit a stop string).

        match=False: stop strings that end in this token's text are not looked for (min_tokens);
        a possible start of one is still held back, since a later token may complete it.
        """
        return self._extend(self.decoder.push(token_id), match)

    def finish(self, match: bool = True) -> str:
        """End of row: flush the decoder and release everything left."""
        delta, stopped = self._extend(self.decoder.flush(), match)
        if stopped:
            return delta
        delta += self.text[self.sent :]
        self.sent = len(self.text)
        return delta

    def _extend(self, piece: str, match: bool) -> tuple[str, bool]:
        if not piece:
            return "", False
        old = len(self.text)
        self.text += piece
        if self.stops and match:
            # A new match must end inside the new piece, so it starts at most
            # len(stop) - 1 characters before it. (Per stop: a shorter stop wholly before the
            # piece was passed over on purpose, by min_tokens, and must stay so.)
            found = (self.text.find(s, max(0, old - len(s) + 1)) for s in self.stops)
            hits = [i for i in found if i >= 0]
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


class RowDecoder:
    """One row's tokens in, final text and finish reason out: the one place these rules live.

    ``push(token)`` returns (delta, tail): ``delta`` is the text the token made final, ``tail``
    the rest released because the row just ended (held-back text, a flushed half character);
    either may be empty, and they are kept apart so streams see the same pieces as before.
    ``finish`` becomes "stop" on EOS (when ``stop_at_eos``) or a stop string (cut from the
    text, nothing after it released) and "length" when the token budget is spent.

    ``stop_at_eos`` False (vLLM's ``ignore_eos``): EOS is text like any other token (the
    tokenizer's ``<|endoftext|>``), so the row runs to its budget or a stop string.
    ``min_tokens`` N (vLLM's rule): token k may end the row by EOS or a stop string only when
    k > N, i.e. N tokens come before it; ``ban_eos`` tells the sampler to mask EOS until then
    (``mask_eos``), and stop strings ending in the first N tokens' text are not matched.
    Only the budget ("length") ends a row sooner.
    """

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, budget: int) -> None:
        self.text = StopText(tokenizer, list(params.stop))
        self.eos: int = tokenizer.eos_id
        self.stop_at_eos: bool = params.stop_at_eos
        self.min_tokens: int = params.min_tokens
        self.budget = budget
        self.tokens: list[int] = []
        # A row with no budget (max_new_tokens 0, or a prompt that fills the context) never samples.
        self.finish: str | None = "length" if budget == 0 else None

    @property
    def ban_eos(self) -> bool:
        """Whether the next token must not be EOS: it would end the row before min_tokens."""
        return self.stop_at_eos and self.finish is None and len(self.tokens) < self.min_tokens

    def push(self, token: int) -> tuple[str, str]:
        self.tokens.append(token)
        may_end = len(self.tokens) > self.min_tokens
        if token == self.eos and self.stop_at_eos and may_end:
            self.finish = "stop"
            return "", self.text.finish()  # EOS adds no text and releases the held tail
        delta, stopped = self.text.push(token, match=may_end)
        if stopped:
            self.finish = "stop"
            return delta, ""  # a stop string already released all that stays
        if len(self.tokens) >= self.budget:
            self.finish = "length"
            return delta, self.text.finish(match=may_end)
        return delta, ""

    def completion(self, prompt_tokens: int) -> Completion:
        return Completion(
            text=self.text.text,
            token_ids=self.tokens,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(self.tokens),
            finish_reason=self.finish or "length",
        )
