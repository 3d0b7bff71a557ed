"""Answer tasks' requests in batches: log-likelihoods (shared-context KV reuse), rolling windows, generation.

Log-likelihood semantics are lm-evaluation-harness's (HFLM, causal):
- trailing spaces of the context move to the front of the continuation;
- whole = encode(context + continuation), context_enc = encode(context), and the scored
  tokens are whole[len(context_enc):] (so a merge across the boundary counts as continuation);
- an empty context is replaced by the EOS token;
- a pair longer than the model's context (max_len + 1 tokens) loses tokens from the LEFT of
  the context; a continuation that alone exceeds max_len is an error.

Speed: requests that share a token prefix (the choices of one question; WinoGrande's sentences up
to the blank) run that prefix once; see phibook.eval.scoring.

Generation prompts that leave no room for max_new_tokens are cut from the left (prompt_keep),
as lm-eval's generate_until does, instead of being refused.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tqdm import tqdm

from phibook.errors import PhibookError
from phibook.eval.scoring import LoglikelihoodScorer, TokenPair, token_scores  # noqa: F401 (re-exported)
from phibook.eval.task import GenerationRequest, LoglikelihoodRequest, RollingLoglikelihoodRequest
from phibook.inference.generate import prompt_keep  # noqa: F401 (re-exported: commands/eval.py, tests)
from phibook.model.model import PhiModel


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
            from phibook.inference.generate import Generator

            # Too-long prompts are cut from the left, not refused; the task still builds programs
            # and scores from its original prompt.
            self._generator = Generator(self.model, self.tokenizer, truncate="left")
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
