"""Log-likelihood scoring on a PhiModel: each shared token prefix runs once.

A request is (context, continuation) in token ids; its score is the sum of log p(continuation
token) and whether every continuation token is the argmax (lm-evaluation-harness's semantics;
the split of text into tokens is phibook.eval.runner.encode_pair).

Why prefixes, not contexts: the choices of a question share their context (ARC, HellaSwag,
PIQA...), and WinoGrande's two sentences share everything up to the blank. Requests are sorted
by token sequence and neighbours are merged into a group while sharing their common prefix costs
fewer token-passes than running them apart. A group's prefix runs once; its K/V is copied to one row per member, and each member's tail (the
rest of its sequence) runs after it. The LM head (51k rows of phi-1.5, as costly per token as
several layers) runs once per batch, over the final hidden states of the scored positions only,
gathered from both passes (hidden_at: the model's forward with return_hidden=True): a small head
call per pass would read its 150 MB of weights for a handful of rows.

Batches hold up to batch_size rows (lm-eval's meaning of --batch-size). A batch of one-member
groups skips the cache: one right-padded forward (causal attention makes the padding harmless).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from phibook.errors import PhibookError
from phibook.inference.pages import huge_page_zeros
from phibook.model.model import KVCache, PhiModel, attention_dtype


@dataclass
class TokenPair:
    """One scoring request in token ids: P(continuation | context)."""

    context: list[int]
    continuation: list[int]


def token_scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), target is the argmax) per row of logits (N, V), in float32.

    log p = logit - logsumexp(logits): no (N, V) log-softmax tensor is built.
    """
    logits = logits.float()
    picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    return picked - torch.logsumexp(logits, dim=-1), logits.argmax(-1) == targets


def hidden_at(
    model: PhiModel,
    rows: torch.Tensor,
    idx: torch.Tensor,
    positions: torch.Tensor | None = None,
    cache: KVCache | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The final hidden states (after ln_f) at ``rows`` (flat indices into B*T), (N, d_model).

    The forward runs with ``return_hidden=True``, which skips the LM head: positions that score
    nothing (context tokens, padding) need no logits, and with a 51k vocabulary the head costs
    as much as several Transformer layers per position (the (B, T, vocab) tensor would be 3 GB
    for 16 x 1000 tokens of phi-1.5). The caller runs ``model.lm_head`` once over the rows it kept.
    """
    out = model(idx, positions, cache, attention_mask, return_hidden=True)
    return out.reshape(-1, out.shape[-1]).index_select(0, rows)


@dataclass
class _Row:
    """One request after truncation: seq = context + continuation; seq[n_ctx:] is scored."""

    index: int
    seq: list[int]
    n_ctx: int

    @property
    def shareable(self) -> list[int]:
        return self.seq[: self.n_ctx]


@dataclass
class _Group:
    prefix: list[int]
    rows: list[_Row]

    @property
    def cost(self) -> int:
        """Token-passes: the prefix once, then every member's tail."""
        return len(self.prefix) + sum(len(r.seq) - 1 - len(self.prefix) for r in self.rows)


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def group_by_prefix(rows: list[_Row]) -> list[_Group]:
    """Neighbours in sorted order share one prefix while that saves token-passes.

    Adding a row to a group of m members with prefix P cuts the prefix to c = common(P, row):
    the group then costs (m - 1) * (|P| - c) more for its old members and saves c for the new
    one, so it joins when c > (m - 1) * (|P| - c) (always, for identical contexts).
    """
    groups: list[_Group] = []
    for row in sorted(rows, key=lambda r: r.shareable):
        share = row.shareable
        if groups:
            g = groups[-1]
            c = _common(g.prefix, share)
            if c > 0 and c > (len(g.rows) - 1) * (len(g.prefix) - c):
                g.prefix = g.prefix[:c]
                g.rows.append(row)
                continue
        groups.append(_Group(list(share), [row]))
    return groups


# A tail chunk takes rows at least this fraction of its longest: less padding, more (smaller) passes.
TAIL_FILL = 0.5


class LoglikelihoodScorer:
    """Scores TokenPairs on a PhiModel, batched, each shared prefix run once."""

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
        rows = []
        for i, pair in enumerate(pairs):
            ctx, cont = self._fit(pair)
            rows.append(_Row(i, ctx + cont, len(ctx)))
        # Longest first: the biggest batch runs first, so running out of memory shows at once.
        groups = sorted(group_by_prefix(rows), key=lambda g: -max(len(r.seq) for r in g.rows))
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        bar = tqdm(total=len(pairs), desc=desc, disable=not self.progress, file=sys.stderr, unit="req")
        for batch in self._pack(groups):
            for index, value in self._run_batch(batch):
                out[index] = value
            bar.update(sum(len(g.rows) for g in batch))
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
        if not ctx:
            raise PhibookError("a log-likelihood request has an empty context (encode_pair puts EOS there)")
        keep = self.max_len + 1 - len(cont)
        if len(ctx) > keep:
            self.n_truncated += 1
            ctx = ctx[-keep:]
        return list(ctx), list(cont)

    def _pack(self, groups: list[_Group]) -> Iterator[list[_Group]]:
        """Batches of whole groups, up to batch_size rows (a bigger group is split, prefix and all)."""
        batch: list[_Group] = []
        n = 0
        for g in groups:
            for start in range(0, len(g.rows), self.batch_size):
                part = _Group(g.prefix, g.rows[start : start + self.batch_size])
                if batch and n + len(part.rows) > self.batch_size:
                    yield batch
                    batch, n = [], 0
                batch.append(part)
                n += len(part.rows)
        if batch:
            yield batch

    def _run_batch(self, batch: list[_Group]) -> list[tuple[int, tuple[float, bool]]]:
        if all(len(g.rows) == 1 for g in batch):
            return self._run_flat([g.rows[0] for g in batch])
        return self._run_shared(batch)

    def _run_flat(self, rows: list[_Row]) -> list[tuple[int, tuple[float, bool]]]:
        """No prefix is shared: one right-padded forward of each seq[:-1], no cache."""
        dev = self.device
        width = max(len(r.seq) - 1 for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        at: list[int] = []
        targets: list[int] = []
        for i, r in enumerate(rows):
            ids[i, : len(r.seq) - 1] = torch.tensor(r.seq[:-1])
            # positions n_ctx - 1 .. len(seq) - 2 predict seq[n_ctx:]
            at.extend(range(i * width + r.n_ctx - 1, i * width + len(r.seq) - 1))
            targets.extend(r.seq[r.n_ctx :])
        logits = self.model.lm_head(hidden_at(self.model, torch.tensor(at, device=dev), ids.to(dev)))
        return self._collect(logits, targets, rows)

    def _collect(self, logits: torch.Tensor, targets: list[int], rows: list[_Row]):
        """Per-row (index, (sum log p, all greedy)) from packed logits: row i owns the next n_i rows."""
        logp, greedy = token_scores(logits, torch.tensor(targets, device=logits.device))
        logp, greedy = logp.tolist(), greedy.tolist()
        out, at = [], 0
        for r in rows:
            n = len(r.seq) - r.n_ctx
            out.append((r.index, (float(sum(logp[at : at + n])), all(greedy[at : at + n]))))
            at += n
        return out

    def _run_shared(self, batch: list[_Group]) -> list[tuple[int, tuple[float, bool]]]:
        """Prefixes run once, their K/V copied to one row per member, then the tails; one LM head call.

        Prefixes are RIGHT-padded: under plain causal attention a real token never sees the padding
        after it, so the prefix pass needs no mask and takes SDPA's fused causal path (an explicit
        (B, L, L) mask would force the slow math path on long BoolQ/MMLU contexts). The padding's
        cache slots are masked out in the tail pass, whose mask is only (T, L + T).

        Row r scores seq positions n_ctx - 1 .. len(seq) - 2. With its group's prefix of p tokens,
        position p - 1 (when it is n_ctx - 1) comes from the prefix pass, the rest from its tail
        seq[p:-1] at tail position j - p.
        """
        dev = self.device
        G = len(batch)
        p_lens = [len(g.prefix) for g in batch]
        L = max(p_lens)
        padded = any(n != L for n in p_lens)
        hidden: list[torch.Tensor] = []
        # hidden-state row of each group's last prefix position, where a member scores from it
        from_prefix = [g for g, grp in enumerate(batch) if any(r.n_ctx == p_lens[g] for r in grp.rows)]
        first_row = {g: i for i, g in enumerate(from_prefix)}
        # attention_dtype's, not the forward's cache_dtype: scoring is all prefill, whose SDPA would
        # widen a bf16 cache on every call.
        cache = KVCache(self.cfg, G, L, dtype=attention_dtype(self.dtype, dev), device=dev, allocate=huge_page_zeros)
        p_ids = torch.zeros(G, L, dtype=torch.long)
        p_mask = torch.zeros(G, L, dtype=torch.long)
        for g, grp in enumerate(batch):
            p_ids[g, : p_lens[g]] = torch.tensor(grp.prefix, dtype=torch.long)
            p_mask[g, : p_lens[g]] = 1
        last = torch.tensor([g * L + p_lens[g] - 1 for g in from_prefix], dtype=torch.long, device=dev)
        hidden.append(hidden_at(self.model, last, p_ids.to(dev), None, cache))
        p_mask = p_mask.to(dev)

        # where each row's scored hidden states will be, in the order of its targets
        at: dict[int, list[int]] = {}
        n_hidden = len(from_prefix)
        for g, grp in enumerate(batch):
            for r in grp.rows:
                if r.n_ctx == p_lens[g]:
                    at[id(r)] = [first_row[g]]
                else:
                    at[id(r)] = []
        # Tails in chunks of similar length: rows sorted longest first, a chunk ends where a row is
        # under half the chunk's longest, so right padding wastes at most half of a chunk.
        def tail_len(gr: tuple[int, _Row]) -> int:
            return len(gr[1].seq) - 1 - p_lens[gr[0]]

        todo = sorted(((g, r) for g, grp in enumerate(batch) for r in grp.rows if tail_len((g, r)) > 0),
                      key=lambda gr: -tail_len(gr))
        while todo:
            T = tail_len(todo[0])
            chunk = [gr for gr in todo if tail_len(gr) >= TAIL_FILL * T]
            todo = todo[len(chunk) :]
            for i, picked in enumerate(self._tails(cache, p_mask if padded else None, p_lens, chunk, T, hidden)):
                at[id(chunk[i][1])].extend(range(n_hidden, n_hidden + picked))
                n_hidden += picked

        rows = [r for grp in batch for r in grp.rows]
        logits = self.model.lm_head(torch.cat(hidden))
        targets = [t for r in rows for t in r.seq[r.n_ctx :]]
        order = torch.tensor([i for r in rows for i in at[id(r)]], dtype=torch.long, device=logits.device)
        return self._collect(logits.index_select(0, order), targets, rows)

    def _tails(self, cache: KVCache, p_mask, p_lens: list[int], chunk, T: int, hidden: list[torch.Tensor]):
        """Run each row's tail seq[p:-1] after its group's cached prefix; append the hidden states
        of its scored positions to `hidden`; return how many each row added."""
        dev = self.device
        R, L = len(chunk), cache.k.shape[3]
        g_of_row = torch.tensor([g for g, _ in chunk], device=dev)
        big = KVCache(self.cfg, R, L + T, dtype=cache.k.dtype, device=dev, allocate=huge_page_zeros)
        big.k[:, :, :, :L] = cache.k[:, g_of_row]
        big.v[:, :, :, :L] = cache.v[:, g_of_row]
        big.pos = L
        ids = torch.zeros(R, T, dtype=torch.long)
        at: list[int] = []
        counts = []
        for i, (g, r) in enumerate(chunk):
            p = p_lens[g]
            tail = r.seq[p:-1]
            ids[i, : len(tail)] = torch.tensor(tail, dtype=torch.long)
            # seq position j >= p is tail position j - p; the first scored one is max(n_ctx - 1, p)
            first = max(r.n_ctx - 1, p) - p
            at.extend(range(i * T + first, i * T + len(tail)))
            counts.append(len(tail) - first)
        starts = torch.tensor(p_lens, device=dev)[g_of_row]
        pos = (starts.unsqueeze(1) + torch.arange(T, device=dev)).clamp(max=self.max_len - 1)
        # Tails are right-padded (causal: harmless); the prefixes' padding slots are masked.
        mask = None
        if p_mask is not None:
            mask = torch.cat([p_mask[g_of_row], torch.ones(R, T, dtype=torch.long, device=dev)], dim=1)
        hidden.append(hidden_at(self.model, torch.tensor(at, dtype=torch.long, device=dev), ids.to(dev), pos, big,
                                attention_mask=mask))
        return counts
