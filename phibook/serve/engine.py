"""Continuous batching: a pool of KV-cache slots, scheduled one decode step at a time.

Order: ``SlotCache`` -> ``Job`` / ``TokenLogprob`` -> ``ServeStats`` -> ``Engine``.

One worker thread owns the model: the caller of ``Engine.run`` (``phibook serve`` runs it in the
thread that loaded the model) or the thread ``Engine.start`` makes. Each iteration of its loop:

1. admits waiting jobs into free slots (lowest slot first), and drops rows whose
   client went away or whose deadline passed, freeing their slots at once;
2. reads at most ``prefill_chunk`` prompt tokens, oldest rows first: a chunk of one
   long prompt, or several short prompts whole (one forward per prompt);
3. runs ONE decode step for every row that has read its prompt, samples a token per
   row with that row's own parameters and RNG, and releases the row's new text.

So a new request joins the running batch at the decode step after its prefill ends,
a finished row leaves at the step it finishes, and a long prompt delays the other
rows by one chunk per step, never by its whole length.

The cache: ``SlotCache`` has the ``KVCache`` interface that ``PhiModel.forward`` (and
the fast path) call (``update(layer, k, v)`` and ``pos``), but every slot keeps its
own length. Slot s holds its history at columns [0, lengths[s]). For a decode step
over slots [0, hi) the model is called with ``pos = m`` and a padding mask, where m is
one past the longest history in that range. The model's mask lets every query see
column m (phibook.model.model.causal_mask: every query sees its own key), so each row's new key is
written twice: at its own next column (kept for later steps) and at scratch column m
(what this step attends to), while the mask hides the own-column copy and every
column past the row's history. Columns past m are never read, so a scratch write
never clobbers history. The cache therefore has up to context + 1 columns; it starts
smaller and doubles when a row needs more (``SlotCache.reserve``).

Per-row sampling and each token's text and finish reason (EOS, stop strings, length, the
held-back tail, min_tokens' EOS mask) are phibook.inference.sampling's (``build_sampling``,
``next_tokens``, ``mask_eos``, ``RowDecoder``), the same that ``Generator`` uses, so a row
decodes exactly as ``Generator.run`` would decode it alone.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from phibook.errors import PhibookError
from phibook.inference.generate import Generator
from phibook.inference.pages import huge_page_zeros
from phibook.inference.sampling import (
    RowDecoder,
    RowSampling,
    SamplingParams,
    build_sampling,
    mask_eos,
    next_tokens,
    stack_sampling,
)
from phibook.model.config import PhiConfig

log = logging.getLogger("phibook.serve.engine")


# --------------------------------------------------------------------------- cache


class SlotCache:
    """Keys/values (n_layer, slots, n_head, context + 1, head_dim) with a length per slot.

    Bound to one forward at a time: ``bind_prefill`` (one slot, a run of prompt
    tokens) or ``bind_decode`` (one new token for each of slots [0, hi)).
    """

    def __init__(self, cfg: PhiConfig, slots: int, dtype: torch.dtype, device: torch.device | str,
                 initial: int = 128) -> None:
        self.max_len = cfg.max_seq_len + 1  # + the scratch column (module docstring)
        # Columns grow on demand (doubling, up to max_len): phi-1.5's full cache is 0.8 GB per slot
        # in fp32, more than short requests ever touch.
        shape = (cfg.n_layer, slots, cfg.n_head, min(initial, self.max_len), cfg.head_dim)
        # In huge pages on the CPU: a decode step's attention reads every cached column
        # (phibook.inference.pages.huge_page_zeros).
        self.k = huge_page_zeros(shape, dtype, device)
        self.v = huge_page_zeros(shape, dtype, device)
        self.lengths = [0] * slots
        self.pos = 0  # read by the model as the call's start column; advanced by it (ignored here)
        self._mode = ""
        self._slot = 0
        self._hi = 0
        self._m = 0
        self._rows: Tensor | None = None  # decoding slots (index into [0, hi))
        self._cols: Tensor | None = None  # their own next columns
        self._columns: Tensor | None = None  # decode_slots' columns for the bound call
        self._layers: tuple[tuple[Tensor, ...], tuple[Tensor, ...]] | None = None  # and its rows' layer views

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def columns(self) -> int:
        return self.k.shape[3]

    def reserve(self, columns: int) -> None:
        """Make room for ``columns`` columns (doubling), copying what is cached."""
        if columns <= self.columns:
            return
        assert columns <= self.max_len, f"{columns} cache columns needed, the context allows {self.max_len}"
        n = self.columns
        while n < columns:
            n *= 2
        n = min(n, self.max_len)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = huge_page_zeros((*old.shape[:3], n, old.shape[4]), old.dtype, old.device)
            new[:, :, :, : old.shape[3]] = old
            setattr(self, name, new)

    def bind_prefill(self, slot: int, tokens: int) -> None:
        self._mode, self._slot = "prefill", slot
        self.pos = self.lengths[slot]
        self.reserve(self.pos + tokens)
        self._columns = self._layers = None

    def bind_decode(self, slots: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
        """Set up a decode step for ``slots`` (each writes its next column); return the
        (hi, 1) rotary positions and the (hi, m + 1) padding mask for the call."""
        hi = max(slots) + 1
        m = max(self.lengths[:hi]) + 1
        assert m < self.max_len, "a row's history reached the cache end (budgets are clamped to the context)"
        self.reserve(m + 1)
        cols = [self.lengths[s] for s in slots]
        self._mode, self._hi, self._m = "decode", hi, m
        self._rows = torch.tensor(slots, device=device)
        self._cols = torch.tensor(cols, device=device)
        self.pos = m
        # Every row of [0, hi) writes the scratch column m; a decoding slot its own column too.
        self._columns = torch.full((hi, 2), -1, dtype=torch.long, device=device)
        self._columns[:, 0] = m
        self._columns[self._rows, 1] = self._cols
        self._layers = None
        positions = torch.zeros((hi, 1), dtype=torch.long, device=device)
        positions[self._rows, 0] = self._cols
        keep = torch.zeros((hi, m + 1), dtype=torch.long, device=device)
        for s, n in zip(slots, cols):
            keep[s, :n] = 1
        keep[:, m] = 1
        return positions, keep

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)  # exact either way for a bf16 model (fp32 or bf16 cache)
        if self._mode == "prefill":
            s, start = self._slot, self.pos
            end = start + k.shape[2]
            self.k[layer, s, :, start:end] = k[0]
            self.v[layer, s, :, start:end] = v[0]
            return self.k[layer, s : s + 1, :, :end], self.v[layer, s : s + 1, :, :end]
        hi, m = self._hi, self._m
        self.k[layer, :hi, :, m] = k[:, :, 0]
        self.v[layer, :hi, :, m] = v[:, :, 0]
        self.k[layer, self._rows, :, self._cols] = k[self._rows, :, 0]
        self.v[layer, self._rows, :, self._cols] = v[self._rows, :, 0]
        return self.k[layer, :hi, :, : m + 1], self.v[layer, :hi, :, : m + 1]

    def decode_slots(self, layer: int) -> tuple[Tensor, Tensor, Tensor, int]:
        """For a one-token call, where ``update`` would write (the contract is KVCache.decode_slots'):
        the layer's keys and values for the call's rows, the columns each row's new key and value
        go to (-1: none), and how many columns the call's attention reads."""
        rows = slice(self._slot, self._slot + 1) if self._mode == "prefill" else slice(0, self._hi)
        if self._layers is None:  # once per bound call, not per layer
            self._layers = (self.k[:, rows].unbind(0), self.v[:, rows].unbind(0))
        if self._mode == "prefill":
            if self._columns is None:
                self._columns = torch.full((1, 1), self.pos, dtype=torch.long, device=self.k.device)
            return self._layers[0][layer], self._layers[1][layer], self._columns, self.pos + 1
        return self._layers[0][layer], self._layers[1][layer], self._columns, self._m + 1


# --------------------------------------------------------------------------- jobs


@dataclass
class TokenLogprob:
    """One token's log-probability under the model (full vocabulary, float32), and the top alternatives."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Job:
    """One sequence to generate. ``post(kind, payload)`` is called from the worker thread with
    ("delta", (text, n_tokens)) | ("done", Completion) | ("error", exception); it must be thread-safe.
    n_tokens counts the ``token_logprobs`` entries that the text so far covers."""

    prompt_ids: list[int]
    params: SamplingParams
    post: Callable[[str, Any], None]
    logprobs: int | None = None  # None: none; N >= 0: each sampled token's logprob and its top N
    prompt_logprobs: bool = False  # also score the prompt's tokens (echo with logprobs)
    deadline: float = math.inf  # time.monotonic() past which the job is dropped
    cancelled: bool = False  # set by the server when its client went away
    # written by the worker
    token_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_entries: list[TokenLogprob | None] | None = None
    submitted: float = field(default_factory=time.monotonic)
    first_token: float | None = None


class QueueFull(Exception):
    """No room in the waiting queue: the server answers 503 with Retry-After."""


class JobTimeout(Exception):
    """A job ran past its deadline."""


class Stopped(Exception):
    """The engine stopped before the job finished."""


# --------------------------------------------------------------------------- stats

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return out


@dataclass
class ServeStats:
    """Counters shared by the engine (worker thread) and the routes (event loop); plain ints under the GIL."""

    requests: int = 0  # generation requests accepted (after validation)
    jobs: int = 0  # sequences admitted into a slot
    finished_jobs: int = 0
    failed_jobs: int = 0
    cancelled_jobs: int = 0  # client went away: dropped from the queue or from its slot
    timed_out_jobs: int = 0
    rejected_requests: int = 0  # answered 4xx
    queue_full_requests: int = 0  # answered 503
    disconnected_jobs: int = 0  # the server noticed a client leave before its answer ended
    iterations: int = 0
    decode_steps: int = 0
    prefill_chunks: int = 0
    max_running_seen: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    ttft: Histogram = field(default_factory=Histogram)
    latency: Histogram = field(default_factory=Histogram)

    def to_dict(self) -> dict[str, Any]:
        skip = {"ttft", "latency"}
        return {k: v for k, v in vars(self).items() if k not in skip}


# --------------------------------------------------------------------------- engine


class _Row:
    """A job in a slot: prompt progress, output, text state, sampling state."""

    serials = itertools.count()

    def __init__(self, job: Job, slot: int, sampling: RowSampling, decoder: RowDecoder) -> None:
        self.serial = next(_Row.serials)  # admission order; a key that, unlike id(), is never reused
        self.job, self.slot = job, slot
        self.sampling, self.decoder = sampling, decoder
        self.read = 0  # prompt tokens prefilled
        self.last: int | None = None  # the token to feed at the next decode step

    @property
    def decoding(self) -> bool:
        return self.last is not None


class Engine:
    """Owns the model in one worker thread; see the module docstring for the loop."""

    def __init__(
        self,
        generator: Generator,
        max_slots: int = 8,
        max_queue: int = 64,
        prefill_chunk: int = 256,
        stats: ServeStats | None = None,
        step_hook: Callable[[Engine], None] | None = None,
    ) -> None:
        if max_slots < 1:
            raise PhibookError(f"max_slots (--max-batch-size) must be >= 1, got {max_slots}")
        if max_queue < 0:
            raise PhibookError(f"max_queue (--max-queue) must be >= 0, got {max_queue}")
        if prefill_chunk < 1:
            raise PhibookError(f"prefill_chunk (--prefill-chunk) must be >= 1, got {prefill_chunk}")
        self.gen = generator
        self.tokenizer = generator.tokenizer
        self.cfg: PhiConfig = generator.model.config
        self.device = generator.device
        self.max_slots, self.max_queue, self.prefill_chunk = max_slots, max_queue, prefill_chunk
        self.stats = stats or ServeStats()
        self.step_hook = step_hook  # tests: called at the top of every iteration, in the worker
        self.n_real = generator.n_real_vocab
        # The generator's forward (model or fast path): a phibook.model.model.DecoderForward.
        self.forward = generator.forward
        self.waiting: deque[Job] = deque()
        self.rows: list[_Row | None] = [None] * max_slots
        self.cond = threading.Condition()
        self.stopping = False
        self._looping = False  # the worker loop was started (start) or entered (run)
        self._finished = threading.Event()  # ... and has returned
        self.cache: SlotCache | None = None
        self.seen: Tensor | None = None  # (slots, vocab) bool: tokens present per row (repetition penalty)
        self._sampling_key: tuple = ()
        self._sampling: RowSampling | None = None
        self._tokens_window: deque[tuple[float, int]] = deque()

    # ------------------------------------------------------------------ event-loop side

    def start(self) -> None:
        """Run the worker loop (``run``) in a new thread."""
        with self.cond:
            self._looping = True
        threading.Thread(target=self.run, name="phibook-engine", daemon=True).start()

    def run(self) -> None:
        """Run the worker loop in the calling thread until ``stop``.

        Best called from the thread that loaded the model (``phibook serve`` does): torch's
        OpenMP runtime keeps a pool of helper threads for each thread that has run parallel
        work, and once the pools hold more threads than the CPU has cores, idle helpers sleep
        between ops instead of spinning, so every op of a decode step pays a wake-up
        (docs/serve.md has the measurement).
        """
        with self.cond:
            self._looping = True
        try:
            # Allocated (and first touched) by the thread that will use it.
            self.cache = SlotCache(self.cfg, self.max_slots, dtype=self.gen.cache_dtype,
                                   device=self.device)
            self._loop()
        finally:
            self._finished.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the worker loop and wait for it (up to ``timeout`` s); jobs still queued or running
        get a Stopped error."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
            looping = self._looping
        if looping:
            self._finished.wait(timeout)

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs (all or none); QueueFull when the waiting queue has no room for them."""
        with self.cond:
            if self.stopping:
                raise Stopped("the server is shutting down")
            # Jobs waiting now take the free slots at the next iteration; past those, --max-queue more may wait.
            free = sum(r is None for r in self.rows)
            if len(self.waiting) + len(jobs) > self.max_queue + free:
                raise QueueFull(f"{len(self.waiting)} sequences are waiting for a slot (--max-queue "
                                f"{self.max_queue}, --max-batch-size {self.max_slots})")
            self.waiting.extend(jobs)
            self.cond.notify_all()

    def wake(self) -> None:
        """Have the worker look at its jobs now (a client went away)."""
        with self.cond:
            self.cond.notify_all()

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.rows)

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last ``window`` seconds."""
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._tokens_window) if now - t <= window]
        return sum(n for _, n in recent) / window

    # ------------------------------------------------------------------ worker thread

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.waiting and self.running == 0:
                    self.cond.wait()
                if self.stopping:
                    break
            try:
                self._iteration()
            except Exception:  # a bug here must not kill the worker: fail what is running
                log.exception("engine iteration failed")
                for row in [r for r in self.rows if r is not None]:
                    self._fail(row, RuntimeError("internal error in the batching engine"))
        for row in [r for r in self.rows if r is not None]:
            self._end(row, error=Stopped("the server shut down before this request finished"))
        with self.cond:
            waiting, self.waiting = list(self.waiting), deque()
        for job in waiting:
            job.post("error", Stopped("the server shut down before this request started"))

    @torch.inference_mode()
    def _iteration(self) -> None:
        self.stats.iterations += 1
        self._admit()
        self._drop_gone()
        if self.step_hook is not None:
            self.step_hook(self)
            # Jobs that arrived while the hook held the worker join this step, as they would
            # have if the step had started a moment later.
            self._admit()
            self._drop_gone()
        # Prompt tokens to read this iteration: the oldest prompts first, one chunk of one prompt
        # or the whole of several short ones, --prefill-chunk tokens in all.
        budget = self.prefill_chunk
        for row in sorted((r for r in self.rows if r is not None and not r.decoding), key=lambda r: r.serial):
            if budget <= 0:
                break
            n = max(1, min(budget, len(row.job.prompt_ids) - row.read))
            budget -= n
            try:
                self._prefill_chunk(row, n)
            except Exception as exc:
                log.warning("prefill failed: %s: %s", type(exc).__name__, exc)
                self._fail(row, exc)
        decoding = [r for r in self.rows if r is not None and r.decoding]
        if decoding:
            try:
                self._decode(decoding)
            except Exception as exc:
                log.warning("decode step of %d rows failed: %s: %s", len(decoding), type(exc).__name__, exc)
                for row in decoding:
                    if self.rows[row.slot] is row:
                        self._fail(row, exc)

    def _admit(self) -> None:
        with self.cond:
            while self.waiting and None in self.rows:
                job = self.waiting.popleft()
                if job.cancelled:
                    self.stats.cancelled_jobs += 1
                    continue
                slot = self.rows.index(None)
                self.rows[slot] = self._new_row(job, slot)
        self.stats.max_running_seen = max(self.stats.max_running_seen, self.running)

    def _new_row(self, job: Job, slot: int) -> _Row:
        room = self.cfg.max_seq_len - len(job.prompt_ids)
        budget = max(0, min(job.params.max_new_tokens, room))
        sampling = build_sampling([job.params], self.n_real, self.device)
        row = _Row(job, slot, sampling, RowDecoder(self.tokenizer, job.params, budget))
        assert self.cache is not None
        self.cache.lengths[slot] = 0
        if job.prompt_logprobs:
            job.prompt_entries = [None]
        if sampling.penalty is not None:
            if self.seen is None:
                self.seen = torch.zeros((self.max_slots, self.cfg.vocab_size), dtype=torch.bool, device=self.device)
            self.seen[slot] = False
            self.seen[slot, torch.tensor(job.prompt_ids, device=self.device)] = True
        self.stats.jobs += 1
        self.stats.prompt_tokens += len(job.prompt_ids)
        return row

    def _drop_gone(self) -> None:
        """Free the slots of rows whose client left or whose deadline passed; drop such queued jobs."""
        now = time.monotonic()
        for row in [r for r in self.rows if r is not None]:
            if row.job.cancelled:
                self.stats.cancelled_jobs += 1
                self._end(row, error=None)
            elif now > row.job.deadline:
                self.stats.timed_out_jobs += 1
                self._end(row, error=JobTimeout("the request ran past the server's --request-timeout"))
        with self.cond:
            keep: deque[Job] = deque()
            for job in self.waiting:
                if job.cancelled:
                    self.stats.cancelled_jobs += 1
                elif now > job.deadline:
                    self.stats.timed_out_jobs += 1
                    job.post("error", JobTimeout("the request waited past the server's --request-timeout"))
                else:
                    keep.append(job)
            self.waiting = keep

    # -- prefill

    def _prefill_chunk(self, row: _Row, limit: int) -> None:
        """Read up to ``limit`` more prompt tokens of ``row``; at the prompt's end, sample its first token."""
        job, cache = row.job, self.cache
        assert cache is not None
        ids = job.prompt_ids
        if row.decoder.budget == 0 and not job.prompt_logprobs:
            self._end(row)  # its decoder already says "length"
            return
        start, end = row.read, min(len(ids), row.read + limit)
        idx = torch.tensor([ids[start:end]], dtype=torch.long, device=self.device)
        positions = torch.arange(start, end, device=self.device)
        cache.bind_prefill(row.slot, end - start)
        if job.prompt_logprobs:
            logits = self.forward(idx, positions=positions, cache=cache)[0]  # (T, V): every position scored
            targets = ids[start + 1 : end + 1]
            if targets:
                job.prompt_entries.extend(self._entries(logits[: len(targets)], targets, job.logprobs or 0))
        else:
            logits = self.forward(idx, positions=positions, cache=cache, last_only=True)[0]  # (1, V)
        cache.lengths[row.slot] = end
        row.read = end
        self.stats.prefill_chunks += 1
        if end < len(ids):
            return
        if row.decoder.budget == 0:
            self._end(row)
            return
        # The prompt is read: its last position gives the first token, sampled now.
        self._accept([row], logits[-1:].float())

    # -- decode

    def _decode(self, rows: list[_Row]) -> None:
        cache = self.cache
        assert cache is not None
        slots = [r.slot for r in rows]
        positions, keep = cache.bind_decode(slots, self.device)
        hi = positions.shape[0]
        tokens = torch.zeros((hi, 1), dtype=torch.long, device=self.device)
        tokens[torch.tensor(slots, device=self.device), 0] = torch.tensor([r.last for r in rows], device=self.device)
        logits = self.forward(tokens, positions=positions, cache=cache, attention_mask=keep, last_only=True)[:, -1]
        for s in slots:
            cache.lengths[s] += 1
        self.stats.decode_steps += 1
        self._accept(rows, logits[torch.tensor(slots, device=self.device)].float())

    def _sampling_for(self, rows: list[_Row]) -> RowSampling:
        """The rows' sampling settings stacked in row order (rebuilt only when the rows change)."""
        key = tuple(r.serial for r in rows)
        if key != self._sampling_key or self._sampling is None:
            self._sampling = stack_sampling([r.sampling for r in rows], self.device)
            self._sampling_key = key
        return self._sampling

    def _accept(self, rows: list[_Row], logits: Tensor) -> None:
        """Sample one token per row from logits (len(rows), V), then update text, logprobs, finishes."""
        want = [i for i, r in enumerate(rows) if r.job.logprobs is not None]
        raw = logits[want] if want else None  # logprobs are of the model's own distribution
        logits[:, self.n_real :] = -math.inf  # padding rows of the vocabulary: never sampled
        mask_eos(logits, [r.decoder for r in rows])  # per row: those short of their min_tokens
        sampling = self._sampling_for(rows)
        seen = None
        if sampling.penalty is not None and self.seen is not None:
            seen = self.seen[torch.tensor([r.slot for r in rows], device=self.device)]
        picked = next_tokens(logits, seen, sampling)
        if self.seen is not None:
            self.seen[torch.tensor([r.slot for r in rows], device=self.device), picked] = True
        tokens = picked.tolist()  # the one host sync per step
        if raw is not None:
            entries = self._entries(raw, [tokens[i] for i in want], max(r.job.logprobs or 0 for r in rows))
            for i, entry in zip(want, entries):
                n = rows[i].job.logprobs or 0
                rows[i].job.token_logprobs.append(TokenLogprob(entry.token, entry.logprob, entry.top[:n]))
        now = time.monotonic()
        self._tokens_window.append((now, len(rows)))
        while self._tokens_window and now - self._tokens_window[0][0] > 60:
            self._tokens_window.popleft()
        self.stats.generation_tokens += len(rows)
        for row, t in zip(rows, tokens):
            self._push(row, t, now)

    def _entries(self, logits: Tensor, targets: list[int], top: int) -> list[TokenLogprob]:
        """Logprob of each target under each row of logits (N, V), as ``phibook eval`` computes it:
        logit - logsumexp over the whole (padded) vocabulary, in float32, plus the top ``top``."""
        logits = logits.float()
        logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        picked = logp.gather(1, torch.tensor(targets, device=logp.device).unsqueeze(1)).squeeze(1).tolist()
        if top > 0:
            values, ids = logp.topk(min(top, logp.shape[-1]), dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        else:
            tops = [[] for _ in targets]
        return [TokenLogprob(t, p, tp) for t, p, tp in zip(targets, picked, tops)]

    def _push(self, row: _Row, t: int, now: float) -> None:
        job = row.job
        if job.first_token is None:
            job.first_token = now
            self.stats.ttft.observe(now - job.submitted)
        n_lp = len(job.token_logprobs)
        delta, tail = row.decoder.push(t)
        if delta:
            job.post("delta", (delta, n_lp))
        if tail:
            job.post("delta", (tail, n_lp))
        if row.decoder.finish is None:
            row.last = t
            return
        self._end(row)

    # -- leaving

    def _end(self, row: _Row, error: BaseException | None = None) -> None:
        """Free the row's slot at once; post its completion (or ``error``; None for a cancel)."""
        if self.rows[row.slot] is row:
            self.rows[row.slot] = None
            assert self.cache is not None
            self.cache.lengths[row.slot] = 0
        job = row.job
        if job.cancelled and error is None:
            return
        if error is not None:
            job.post("error", error)
            return
        self.stats.finished_jobs += 1
        self.stats.latency.observe(time.monotonic() - job.submitted)
        job.post("done", row.decoder.completion(len(job.prompt_ids)))

    def _fail(self, row: _Row, exc: BaseException) -> None:
        self.stats.failed_jobs += 1
        self._end(row, error=exc)
