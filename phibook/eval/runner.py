"""Answer tasks' requests in batches: log-likelihoods (shared-context KV reuse), rolling windows, generation.

Log-likelihood semantics are lm-evaluation-harness's (HFLM, causal):
- trailing spaces of the context move to the front of the continuation;
- whole = encode(context + continuation), context_enc = encode(context), and the scored
  tokens are whole[len(context_enc):] (so a merge across the boundary counts as continuation);
- an empty context is replaced by the EOS token;
- a pair longer than the model's context (max_len + 1 tokens) loses tokens from the LEFT of
  the context; a continuation that alone exceeds max_len is an error.

Speed: the choices of one question share their context, so the context runs ONCE per batch
row group and its KV cache is copied to one row per choice; only the continuations run again.
Groups are sorted longest first and packed up to --batch-size continuation rows. The LM head
runs only at scored positions (see logits_at).

Generation prompts that leave no room for max_new_tokens are cut from the left (prompt_keep),
as lm-eval's generate_until does, instead of being refused.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm import tqdm

from phibook.errors import PhibookError
from phibook.eval.task import GenerationRequest, LoglikelihoodRequest, RollingLoglikelihoodRequest
from phibook.model.model import KVCache, PhiModel


@dataclass
class TokenPair:
    """One scoring request in token ids: P(continuation | context)."""

    context: list[int]
    continuation: list[int]


def encode_pair(tokenizer, context: str, continuation: str) -> TokenPair:
    """Split exactly as the harness does (see module docstring)."""
    if not context:
        return TokenPair([tokenizer.eos_id], tokenizer.encode(continuation))
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return TokenPair(ctx, whole[len(ctx) :])


def rolling_windows(tokens: list[int], prefix_id: int, max_len: int) -> list[TokenPair]:
    """lm-eval's get_rolling_token_windows(context_len=1) + make_disjoint_window.

    The first window predicts up to max_len tokens after the prefix (EOS) token; each later
    window predicts the next max_len tokens conditioned on the tokens before them.
    """
    if not tokens:
        return []
    windows = []
    first = min(max_len, len(tokens))
    windows.append(([prefix_id] + tokens[: first - 1], tokens[:first]))
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        windows.append((tokens[max(end - max_len - 1, 0) : end - 1], tokens[end - n : end]))
        done += n
    # make_disjoint: the context keeps only what precedes the first predicted token.
    return [TokenPair(ctx[: len(ctx) - (len(pred) - 1)], pred) for ctx, pred in windows]


@contextmanager
def logits_at(model: PhiModel, positions: torch.Tensor) -> Iterator[None]:
    """Within the block, the model's LM head runs only at `positions` (flat indices into B*T).

    The forward then returns logits of shape (1, len(positions), vocab). Positions that score
    nothing (context tokens, padding) need no logits; with a 51k vocabulary the LM head costs as
    much as several Transformer layers per position, and the (B, T, vocab) tensor would be 3 GB for
    16 x 1000 tokens of phi-1.5. A forward hook on ln_f selects the rows, so the model is untouched.
    """

    def pick(module, args, out):
        return out.reshape(-1, out.shape[-1]).index_select(0, positions).unsqueeze(0)

    handle = model.ln_f.register_forward_hook(pick)
    try:
        yield
    finally:
        handle.remove()


def token_scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), target is the argmax) per row of logits (N, V), in float32.

    log p = logit - logsumexp(logits): no (N, V) log-softmax tensor is built.
    """
    logits = logits.float()
    picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    return picked - torch.logsumexp(logits, dim=-1), logits.argmax(-1) == targets


class LoglikelihoodScorer:
    """Scores TokenPairs on a PhiModel; batched, with the context of a group encoded once."""

    def __init__(self, model: PhiModel, batch_size: int = 16, progress: bool = True) -> None:
        if batch_size < 1:
            raise PhibookError(f"--batch-size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.cfg = model.config
        self.max_len = model.config.max_seq_len
        self.batch_size = batch_size
        self.progress = progress
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.n_truncated = 0

    # ------------------------------------------------------------------ public

    @torch.no_grad()
    def score(self, pairs: Sequence[TokenPair], desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, whether every continuation token is the argmax) per pair."""
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, pair in enumerate(pairs):
            ctx, cont = self._fit(pair)
            groups.setdefault(tuple(ctx), []).append((i, cont))
        # Longest first: the biggest batch runs first, so running out of memory shows at once.
        order = sorted(groups.items(), key=lambda kv: -(len(kv[0]) + max(len(c) for _, c in kv[1])))
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        bar = tqdm(total=len(pairs), desc=desc, disable=not self.progress, file=sys.stderr, unit="req")
        for batch in self._pack(order):
            for index, value in self._run_batch(batch):
                out[index] = value
            bar.update(sum(len(rows) for _, rows in batch))
        bar.close()
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ internals

    def _fit(self, pair: TokenPair) -> tuple[list[int], list[int]]:
        """Left-truncate the context so context + continuation fits max_len + 1 tokens (harness rule)."""
        ctx, cont = pair.context, pair.continuation
        if not cont:
            raise PhibookError("a log-likelihood request has an empty continuation (nothing to score)")
        if len(cont) > self.max_len:
            raise PhibookError(
                f"a continuation of {len(cont)} tokens exceeds the model's context of {self.max_len} tokens"
            )
        keep = self.max_len + 1 - len(cont)
        if len(ctx) > keep:
            self.n_truncated += 1
            ctx = ctx[-keep:]
        return ctx, cont

    def _pack(self, order):
        """Batches of whole groups, up to batch_size continuation rows (a bigger group is split)."""
        batch, rows = [], 0
        for ctx, items in order:
            for start in range(0, len(items), self.batch_size):
                chunk = items[start : start + self.batch_size]
                if batch and rows + len(chunk) > self.batch_size:
                    yield batch
                    batch, rows = [], 0
                batch.append((ctx, chunk))
                rows += len(chunk)
        if batch:
            yield batch

    def _run_batch(self, batch):
        if all(len(items) == 1 for _, items in batch):
            return self._run_flat(batch)
        return self._run_shared(batch)

    def _run_flat(self, batch):
        """No context is shared (WinoGrande, rolling windows): one right-padded forward, no cache.

        Right padding needs no mask under causal attention, and a second pass would only add cost.
        """
        dev = self.device
        seqs = [list(ctx) + cont[:-1] for ctx, ((_, cont),) in batch]
        width = max(map(len, seqs))
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        at, targets = [], []
        for r, (seq, (ctx, ((_, cont),))) in enumerate(zip(seqs, batch, strict=True)):
            ids[r, : len(seq)] = torch.tensor(seq)
            # row r's scored positions: its last context token up to the one before its last target
            at.extend(range(r * width + len(ctx) - 1, r * width + len(ctx) - 1 + len(cont)))
            targets.extend(cont)
        with logits_at(self.model, torch.tensor(at, device=dev)):
            logits = self.model(ids.to(dev))[0]
        return self._collect(logits, targets, [(index, len(cont)) for _, ((index, cont),) in batch])

    def _collect(self, logits: torch.Tensor, targets: list[int], rows: list[tuple[int, int]]):
        """Per-row (index, (sum log p, all greedy)) from packed logits: row i owns the next n_i rows."""
        logp, greedy = token_scores(logits, torch.tensor(targets, device=logits.device))
        logp, greedy = logp.tolist(), greedy.tolist()
        out, at = [], 0
        for index, n in rows:
            out.append((index, (float(sum(logp[at : at + n])), all(greedy[at : at + n]))))
            at += n
        return out

    def _run_shared(self, batch):
        """Contexts run once, their K/V copied to one row per continuation.

        Contexts are RIGHT-padded: under plain causal attention a real token never sees the padding
        after it, so the context pass needs no mask and takes SDPA's fused causal path (an explicit
        (B, L, L) mask would force the slow math path on long BoolQ/MMLU contexts). The padding's
        cache slots are masked out in the continuation pass, whose mask is only (T, L + T).
        """
        dev = self.device
        G = len(batch)
        ctx_lens = [len(ctx) for ctx, _ in batch]
        L = max(ctx_lens)
        padded = any(n != L for n in ctx_lens)
        ctx_ids = torch.zeros(G, L, dtype=torch.long)
        ctx_mask = torch.zeros(G, L, dtype=torch.long)
        for g, (ctx, _) in enumerate(batch):
            ctx_ids[g, : len(ctx)] = torch.tensor(ctx)
            ctx_mask[g, : len(ctx)] = 1
        ctx_ids, ctx_mask = ctx_ids.to(dev), ctx_mask.to(dev)

        rows = [(g, index, cont) for g, (_, items) in enumerate(batch) for index, cont in items]
        cache = KVCache(self.cfg, G, L, dtype=self.dtype, device=dev)
        last = torch.arange(G, device=dev) * L + torch.tensor(ctx_lens, device=dev) - 1
        with logits_at(self.model, last):
            first = self.model(ctx_ids, None, cache)[0].float()
        # (G, V): each context's last position predicts its continuations' first token
        first_logp = first - torch.logsumexp(first, dim=-1, keepdim=True)
        first_top = first.argmax(-1)
        g_of_row = torch.tensor([g for g, _, _ in rows], device=dev)
        firsts = torch.tensor([cont[0] for _, _, cont in rows], device=dev)
        totals = first_logp[g_of_row, firsts].tolist()
        greedy = (first_top[g_of_row] == firsts).tolist()

        # The rest of each continuation (tokens 2..n), in chunks of similar length: rows sorted
        # longest first, a chunk ends where a row is under half the chunk's longest, so right
        # padding wastes at most half of a chunk; one-token continuations need no second pass.
        todo = sorted((r for r, (_, _, cont) in enumerate(rows) if len(cont) > 1), key=lambda r: -len(rows[r][2]))
        while todo:
            T = len(rows[todo[0]][2]) - 1
            chunk = [r for r in todo if 2 * (len(rows[r][2]) - 1) >= T]
            todo = todo[len(chunk) :]
            for r, (logp, ok) in zip(chunk, self._continue(cache, ctx_mask if padded else None, ctx_lens,
                                                           [rows[r] for r in chunk], T), strict=True):
                totals[r] += logp
                greedy[r] = greedy[r] and ok
        return [(index, (float(totals[r]), bool(greedy[r]))) for r, (_, index, _) in enumerate(rows)]

    def _continue(self, cache: KVCache, ctx_mask, ctx_lens: list[int], rows, T: int) -> list[tuple[float, bool]]:
        """Score tokens 2..n of each row's continuation after its group's cached context.

        rows: (group, index, cont) with len(cont) - 1 <= T. Returns (sum log p, all greedy) per row.
        """
        dev = self.device
        R, L = len(rows), cache.k.shape[3]
        g_of_row = torch.tensor([g for g, _, _ in rows], device=dev)
        # Copy each group's context K/V to one row per continuation.
        big = KVCache(self.cfg, R, L + T, dtype=self.dtype, device=dev)
        big.k[:, :, :, :L] = cache.k[:, g_of_row]
        big.v[:, :, :, :L] = cache.v[:, g_of_row]
        big.pos = L
        cont_ids = torch.zeros(R, T, dtype=torch.long)
        at, targets = [], []
        for r, (_, _, cont) in enumerate(rows):
            cont_ids[r, : len(cont) - 1] = torch.tensor(cont[:-1])
            at.extend(range(r * T, r * T + len(cont) - 1))  # the positions predicting cont[1:]
            targets.extend(cont[1:])
        lens = torch.tensor(ctx_lens, device=dev)[g_of_row]
        cont_pos = (lens.unsqueeze(1) + torch.arange(T, device=dev)).clamp(max=self.max_len - 1)
        # Continuations are right-padded (causal: harmless); the contexts' padding slots are masked.
        mask = None
        if ctx_mask is not None:
            mask = torch.cat([ctx_mask[g_of_row], torch.ones(R, T, dtype=torch.long, device=dev)], dim=1)
        with logits_at(self.model, torch.tensor(at, device=dev)):
            logits = self.model(cont_ids.to(dev), cont_pos, big, attention_mask=mask)[0]
        return [value for _, value in self._collect(logits, targets, [(r, len(c) - 1) for r, (_, _, c) in
                                                                      enumerate(rows)])]


def prompt_keep(context: int, max_new_tokens: int) -> int:
    """How many prompt tokens a generation request keeps (its last ones) when it is too long.

    lm-evaluation-harness keeps the last (context - max_new_tokens) tokens, so the whole token
    budget fits. When the budget is more than half the context (a toy model with HumanEval's
    512 new tokens) that would leave little or nothing, so the prompt keeps at least half.
    """
    return max(context - max_new_tokens, context // 2, 1)


def _truncating_generator(model: PhiModel, tokenizer):
    """A phibook.inference.generate.Generator whose prompts are left-truncated to fit instead of refused.

    Overrides Generator._encode (token ids + per-row budget); counts the prompts it cut in
    `.n_truncated`. The task still builds programs and scores from its original prompt.
    """
    from phibook.inference.generate import Generator

    class TruncatingGenerator(Generator):
        n_truncated = 0

        def _encode(self, prompts, params):
            ids, budgets = [], []
            for prompt, p in zip(prompts, params, strict=True):
                row = (self.tokenizer.encode(prompt) if prompt else []) or [self.tokenizer.eos_id]
                keep = prompt_keep(self.context, p.max_new_tokens)
                if len(row) > keep:
                    row = row[-keep:]
                    self.n_truncated += 1
                ids.append(row)
                budgets.append(min(p.max_new_tokens, self.context - len(row)))
            return ids, budgets

    return TruncatingGenerator(model, tokenizer)


class Runner:
    """Dispatches a task's requests to the right engine; all answers in the order asked."""

    def __init__(self, model: PhiModel, tokenizer, batch_size: int = 16, progress: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.scorer = LoglikelihoodScorer(model, batch_size, progress)
        self._generator = None

    @property
    def n_truncated(self) -> int:
        """Requests cut from the left so far: log-likelihood contexts and generation prompts."""
        return self.scorer.n_truncated + (self._generator.n_truncated if self._generator is not None else 0)

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest], desc: str = "loglikelihood"):
        pairs = [encode_pair(self.tokenizer, r.context, r.continuation) for r in requests]
        return self.scorer.score(pairs, desc)

    def loglikelihood_rolling(self, requests: Sequence[RollingLoglikelihoodRequest], desc: str = "rolling"):
        """(sum log-prob over the whole text, number of tokens) per request."""
        pairs, owner, n_tokens = [], [], []
        for i, req in enumerate(requests):
            tokens = self.tokenizer.encode(req.text)
            n_tokens.append(len(tokens))
            for pair in rolling_windows(tokens, self.tokenizer.eos_id, self.scorer.max_len):
                pairs.append(pair)
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self.scorer.score(pairs, desc), strict=True):
            totals[i] += ll
        return list(zip(totals, n_tokens, strict=True))

    def generate(self, requests: Sequence[GenerationRequest], desc: str = "generate") -> list[str]:
        """Generated text per request, in batches of batch_size, longest prompts first."""
        if self._generator is None:
            self._generator = _truncating_generator(self.model, self.tokenizer)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].prompt))
        out: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc=desc, disable=not self.progress, file=sys.stderr, unit="req")
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            completions = self._generator.run([requests[i].prompt for i in idx], [requests[i].params for i in idx])
            for i, c in zip(idx, completions, strict=True):
                out[i] = c.text
            bar.update(len(idx))
        bar.close()
        return out

    def answer(self, requests: Sequence, desc: str) -> list:
        """Answers for a mixed list of requests, grouped by kind for batching."""
        out: list = [None] * len(requests)
        kinds = {
            LoglikelihoodRequest: self.loglikelihood,
            RollingLoglikelihoodRequest: self.loglikelihood_rolling,
            GenerationRequest: self.generate,
        }
        for kind, fn in kinds.items():
            idx = [i for i, r in enumerate(requests) if isinstance(r, kind)]
            if idx:
                for i, value in zip(idx, fn([requests[i] for i in idx], desc=desc), strict=True):
                    out[i] = value
        unknown = [type(r).__name__ for r in requests if not isinstance(r, tuple(kinds))]
        if unknown:
            raise TypeError(f"unknown request type(s): {sorted(set(unknown))}")
        return out


def naive_loglikelihood(model: PhiModel, pair: TokenPair) -> tuple[float, bool]:
    """Reference: one unbatched full forward of context + continuation (harness truncation)."""
    max_len = model.config.max_seq_len
    seq = (pair.context + pair.continuation)[-(max_len + 1) :]
    idx = torch.tensor([seq[:-1]], device=next(model.parameters()).device)
    with torch.no_grad():
        logp = model(idx).float().log_softmax(-1)[0, -len(pair.continuation) :]
    target = torch.tensor(pair.continuation, device=idx.device)
    return float(logp.gather(1, target.unsqueeze(1)).sum()), bool((logp.argmax(-1) == target).all())



def run_task(runner: Runner, task, data_dir, limit: int | None, log_samples: bool = False) -> dict:
    """Load a task's docs, answer all its requests in one batched pass, and aggregate.

    Returns {"metrics": {name: (value, stderr)}, "n": docs, "truncated": requests whose prompt or
    context was cut from the left to fit the model, "samples": [...] (only with log_samples)}.
    """
    docs = task.load_docs(data_dir, limit)
    if not docs:
        raise PhibookError(f"{task.name}: no documents loaded (empty data file?)")
    per_doc_requests = [task.requests(doc) for doc in docs]
    flat = [req for reqs in per_doc_requests for req in reqs]
    truncated_before = runner.n_truncated
    answers = runner.answer(flat, desc=task.name)
    truncated = runner.n_truncated - truncated_before
    per_doc, samples, at = [], [], 0
    for i, (doc, reqs) in enumerate(zip(docs, per_doc_requests, strict=True)):
        results = answers[at : at + len(reqs)]
        at += len(reqs)
        values = task.process_results(doc, results)
        per_doc.append(values)
        if log_samples:
            samples.append(
                {
                    "doc_index": i,
                    # few-shot examples repeat in every MMLU doc; the prompt below already shows them.
                    "doc": {k: v for k, v in doc.items() if k not in ("fewshot", "_line")},
                    "requests": [_request_record(q) for q in reqs],
                    "results": [list(a) if isinstance(a, tuple) else a for a in results],
                    "metrics": values,
                }
            )
    return {"metrics": task.aggregate(per_doc), "n": len(docs), "truncated": truncated,
            "n_requests": len(flat), "samples": samples}


def _request_record(req) -> dict:
    if isinstance(req, LoglikelihoodRequest):
        return {"context": req.context, "continuation": req.continuation}
    if isinstance(req, RollingLoglikelihoodRequest):
        return {"text": req.text}
    params = req.params
    return {"prompt": req.prompt, "params": getattr(params, "__dict__", repr(params))}
