"""An OpenAI-compatible HTTP server over one ``Generator``, with request batching.

Order: errors -> request schemas -> prompt building -> ``BatchScheduler`` ->
``create_app`` (routes) -> ``run_server``.

Concurrency model: one worker thread owns the model (torch runs there and only
there). Every prompt of every request becomes a ``Job`` on an asyncio queue. The
scheduler task waits for the first job, lets a short window pass so that
concurrent requests can join, takes everything waiting (up to
``max_batch_size``) and runs it as ONE ``Generator.run`` call in the worker
thread. Text pieces come back through ``loop.call_soon_threadsafe`` onto each
request's own asyncio queue, so streaming requests send SSE chunks while the
batch is still decoding. Requests that arrive during a batch wait for the next.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from phibook.errors import PhibookError
from phibook.inference.generate import Completion, Generator, SamplingParams
from phibook.inference.templates import BOT_NAME, USER_NAME, get_template

log = logging.getLogger("phibook.serve.server")

# The report's chat format (section 5): "Alice: ...\nBob:". A turn ends when the
# model starts the next speaker's line: the chat template's stops (as `phibook chat`).
CHAT_STOPS = get_template("chat").stops()
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_SEQUENCES = 4  # OpenAI's limit


# --------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error that becomes an OpenAI-style JSON body: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _field_path(loc: tuple) -> str | None:
    """"prompt" from ("body", "prompt", "list[str]", 0): drop the body marker and pydantic's union tags."""
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))]
    return ".".join(parts) or None


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _validation_error(exc: RequestValidationError) -> APIError:
    """pydantic/JSON errors -> 400 (OpenAI never answers 422), naming the field at fault."""
    errors = exc.errors() or [{"msg": "invalid request", "loc": ()}]
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", first.get("msg"))
        return APIError(400, f"malformed JSON body: {detail}", code="invalid_json")
    param = _field_path(first.get("loc", ()))
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unsupported_parameter")
    if first.get("type") == "missing" and param is None:
        return APIError(400, "request body is missing; send a JSON object", code="invalid_json")
    # A union field (prompt: str | list[str]) fails once per alternative: say them all.
    same = [e["msg"] for e in errors if _field_path(e.get("loc", ())) == param]
    msg = "; or ".join(dict.fromkeys(same))
    return APIError(400, f"{param or 'request body'}: {msg}", param=param)


# --------------------------------------------------------------------------- request schemas


class _Strict(BaseModel):
    # OpenAI rejects arguments it does not know; so do we, naming the argument.
    model_config = ConfigDict(extra="forbid")


class _SamplingFields(_Strict):
    """Fields shared by both endpoints. Defaults are OpenAI's (temperature 1, top_p 1)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="extension: 0 disables")
    repetition_penalty: float = Field(1.0, gt=0.0, description="extension: 1 disables")
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name", "refusal": harmless, dropped
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


def _reject_unsupported(req: _SamplingFields) -> None:
    """400 for OpenAI parameters this server cannot honour, instead of silently ignoring them."""
    if req.n != 1:
        raise APIError(400, f"n={req.n} is not supported; only n=1 (send the request again for more samples)",
                       param="n", code="unsupported_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) != 0:
            raise APIError(400, f"{name} is not supported; use repetition_penalty (an extension) instead",
                           param=name, code="unsupported_parameter")
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias", code="unsupported_parameter")
    if getattr(req, "logprobs", None) or getattr(req, "top_logprobs", None):
        raise APIError(400, "logprobs are not supported by this server", param="logprobs",
                       code="unsupported_parameter")
    if getattr(req, "best_of", None) not in (None, 1):
        raise APIError(400, "best_of is not supported; only best_of=1", param="best_of",
                       code="unsupported_value")
    if getattr(req, "suffix", None):
        raise APIError(400, "suffix (insertion) is not supported", param="suffix", code="unsupported_parameter")


def _stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise APIError(400, f"stop: at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}", param="stop")
    if any(s == "" for s in stops):
        raise APIError(400, "stop: sequences must be non-empty strings", param="stop")
    return stops


# --------------------------------------------------------------------------- prompt building


def _message_text(msg: ChatMessage, i: int) -> str:
    if msg.content is None:
        return ""
    if isinstance(msg.content, str):
        return msg.content
    parts = []
    for part in msg.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"messages[{i}].content: only text parts are supported, got {part.get('type')!r}",
                           param=f"messages.{i}.content")
        parts.append(part["text"])
    return "".join(parts)


def render_chat(messages: list[ChatMessage]) -> str:
    """The report's chat format: system text as leading lines, then "Alice: ..." / "Bob: ..."
    turns, ending with "Bob:" so the model writes the assistant's next turn."""
    if not messages:
        raise APIError(400, "messages must contain at least one message", param="messages")
    lines = []
    for i, msg in enumerate(messages):
        text = _message_text(msg, i).strip()
        if msg.role in ("system", "developer"):
            if text:
                lines.append(text)
        elif msg.role == "user":
            lines.append(f"{USER_NAME}: {text}")
        else:
            lines.append(f"{BOT_NAME}: {text}")
    lines.append(f"{BOT_NAME}:")
    return "\n".join(lines)


# --------------------------------------------------------------------------- batching


@dataclass
class Job:
    """One prompt of one request. Events land on the request's ``sink`` as
    (index, "delta", str) | (index, "done", Completion) | (index, "error", APIError)."""

    prompt: str
    params: SamplingParams
    index: int
    sink: asyncio.Queue
    cancelled: bool = False  # set when the client went away; skipped if still queued
    emitted: bool = False  # worker-thread only: some text already went out


@dataclass
class ServerStats:
    requests: int = 0  # generation requests accepted (after validation)
    jobs: int = 0  # prompts run (a list prompt counts each)
    batches: int = 0
    max_batch_size_seen: int = 0
    batch_sizes: Counter = field(default_factory=Counter)
    failed_jobs: int = 0
    rejected_requests: int = 0  # answered 4xx
    disconnected_jobs: int = 0  # streams whose client left before the end
    abandoned_batches: int = 0  # batches stopped early because nobody was waiting

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "jobs": self.jobs,
            "batches": self.batches,
            "max_batch_size_seen": self.max_batch_size_seen,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "failed_jobs": self.failed_jobs,
            "rejected_requests": self.rejected_requests,
            "disconnected_jobs": self.disconnected_jobs,
            "abandoned_batches": self.abandoned_batches,
        }


class _BatchAbandoned(Exception):
    """Raised inside on_delta to stop a batch early (shutdown, or every client disconnected)."""


class BatchScheduler:
    """Groups waiting jobs into batches and runs them, one batch at a time, on one worker thread."""

    def __init__(self, generator: Generator, max_batch_size: int, batch_window_ms: float, stats: ServerStats):
        if max_batch_size < 1:
            raise PhibookError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.window_s = max(0.0, batch_window_ms) / 1000.0
        self.stats = stats
        self.queue: asyncio.Queue[Job] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.task: asyncio.Task | None = None
        self.stopping = False  # set at shutdown: the running batch aborts at its next text piece

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="phibook-generate")
        self.task = asyncio.create_task(self._schedule(), name="phibook-batch-scheduler")

    async def stop(self) -> None:
        self.stopping = True
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, jobs: list[Job]) -> None:
        assert self.queue is not None, "scheduler not started (the app's lifespan did not run)"
        for job in jobs:
            self.queue.put_nowait(job)

    async def _schedule(self) -> None:
        assert self.queue is not None and self.loop is not None
        while True:
            batch = [await self.queue.get()]
            # A short window lets requests sent at the same moment join this batch.
            if self.window_s and len(batch) < self.max_batch_size:
                await asyncio.sleep(self.window_s)
            while len(batch) < self.max_batch_size and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            batch = [job for job in batch if not job.cancelled]
            if not batch:
                continue
            self.stats.batches += 1
            self.stats.jobs += len(batch)
            self.stats.batch_sizes[len(batch)] += 1
            self.stats.max_batch_size_seen = max(self.stats.max_batch_size_seen, len(batch))
            log.info("batch %d: %d prompt(s), %d still queued", self.stats.batches, len(batch), self.queue.qsize())
            try:
                await self.loop.run_in_executor(self.executor, self._run_batch, batch)
            except Exception as exc:  # the worker catches everything; this is a last resort
                log.exception("batch failed outside the worker")
                for job in batch:
                    self._post(job, "error", APIError(500, f"generation failed: {exc}", type="server_error"))

    # -- worker thread only below

    def _post(self, job: Job, kind: str, payload: Any) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(job.sink.put_nowait, (job.index, kind, payload))

    def _run_batch(self, batch: list[Job]) -> None:
        def on_delta(i: int, piece: str) -> None:
            # Raising here unwinds Generator.run: the way to stop a batch nobody waits for.
            if self.stopping or all(job.cancelled for job in batch):
                raise _BatchAbandoned
            if piece:
                batch[i].emitted = True
                self._post(batch[i], "delta", piece)

        try:
            completions = self.generator.run(
                [job.prompt for job in batch], [job.params for job in batch], on_delta=on_delta
            )
        except _BatchAbandoned:
            self.stats.abandoned_batches += 1
            log.info("batch of %d abandoned (%s)", len(batch),
                     "server stopping" if self.stopping else "every client went away")
            for job in batch:
                self._post(job, "error", APIError(503, "the server is shutting down", type="server_error"))
            return
        except Exception as exc:
            log.warning("batch of %d failed: %s: %s", len(batch), type(exc).__name__, exc)
            self._recover(batch, exc)
            return
        for job, completion in zip(batch, completions):
            self._post(job, "done", completion)

    def _recover(self, batch: list[Job], exc: Exception) -> None:
        """Fail only the request at fault: rerun each job of a failed batch alone.
        A job that already streamed text cannot be rerun without repeating it, so it fails."""
        if len(batch) == 1:
            job = batch[0]
            self.stats.failed_jobs += 1
            if isinstance(exc, PhibookError):
                err = APIError(400, str(exc))
            else:
                err = APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error")
            self._post(job, "error", err)
            return
        for job in batch:
            if job.cancelled:
                continue
            if job.emitted:
                self.stats.failed_jobs += 1
                self._post(job, "error", APIError(
                    500, f"generation failed mid-stream in a shared batch: {type(exc).__name__}: {exc}",
                    type="server_error"))
            else:
                self._run_batch([job])


# --------------------------------------------------------------------------- app


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _usage(completions: list[Completion]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in completions)
    out = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out}


def _sse(obj: dict[str, Any] | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


class _Service:
    """What the routes share: the generator's facts, the scheduler and the counters."""

    def __init__(self, generator: Generator, model_name: str, max_batch_size: int, batch_window_ms: float):
        self.generator = generator
        self.model_name = model_name
        self.created = int(time.time())
        self.stats = ServerStats()
        self.scheduler = BatchScheduler(generator, max_batch_size, batch_window_ms, self.stats)
        self.context = int(generator.context)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")

    def count_tokens(self, text: str) -> int:
        # As Generator counts: an empty prompt starts from the EOS token.
        return max(1, len(self.generator.tokenizer.encode(text))) if text else 1

    def budget(self, prompt: str, param: str, max_tokens: int | None, default: int | None) -> int:
        """max_new_tokens for one prompt, or a 400 naming the lengths when it cannot fit."""
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens",
                           code="invalid_value")
        n_prompt = self.count_tokens(prompt)
        room = self.context - n_prompt
        if room < 1:
            raise APIError(400, f"the prompt is {n_prompt} tokens, but this model's maximum context length is "
                                f"{self.context} tokens (room is needed for at least 1 new token); "
                                f"shorten the {param}", param=param, code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the {param}, "
                                f"{max_tokens} for the completion). Reduce the {param} or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        if max_tokens is not None:
            return max_tokens
        return room if default is None else min(default, room)

    def params(self, req: _SamplingFields, max_new: int, stops: list[str]) -> SamplingParams:
        params = SamplingParams(
            max_new_tokens=max_new,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            repetition_penalty=req.repetition_penalty,
            seed=req.seed,
            stop=stops,
            stop_at_eos=True,
        )
        try:
            params.validate()
        except PhibookError as exc:
            raise APIError(400, str(exc)) from exc
        return params

    def launch(self, prompts: list[str], params: list[SamplingParams]) -> tuple[asyncio.Queue, list[Job]]:
        sink: asyncio.Queue = asyncio.Queue()
        jobs = [Job(p, sp, i, sink) for i, (p, sp) in enumerate(zip(prompts, params))]
        self.stats.requests += 1
        self.scheduler.submit(jobs)
        return sink, jobs


async def _collect(sink: asyncio.Queue, n: int) -> list[Completion]:
    done: dict[int, Completion] = {}
    while len(done) < n:
        index, kind, payload = await sink.get()
        if kind == "error":
            raise payload
        if kind == "done":
            done[index] = payload
    return [done[i] for i in range(n)]


async def _stream(
    first: tuple, sink: asyncio.Queue, jobs: list[Job], make_chunks: Callable[[tuple], list[dict]],
    finish: Callable[[], list[dict]], stats: ServerStats,
) -> AsyncIterator[str]:
    """SSE body: chunks for each event until every job is done, then ``finish()`` and [DONE].
    An error after the response began can only be reported inside the stream."""
    remaining = len(jobs)
    ended = False
    event: tuple | None = first
    try:
        while remaining:
            if event is None:
                event = await sink.get()
            kind, payload = event[1], event[2]
            if kind == "error":
                yield _sse(payload.body())
                break
            if kind == "done":
                remaining -= 1
            for chunk in make_chunks(event):
                yield _sse(chunk)
            event = None
        else:
            for chunk in finish():
                yield _sse(chunk)
        yield _sse("[DONE]")
        ended = True
    finally:
        # Stream over, or the client went away (Starlette then closes this generator):
        # its jobs need not run any more, and a batch of only such jobs stops early.
        if not ended and remaining:
            stats.disconnected_jobs += remaining
        for job in jobs:
            job.cancelled = True


async def _first_event(sink: asyncio.Queue, jobs: list[Job]) -> tuple:
    """Wait for the first event so that an early failure still gets a proper HTTP status."""
    try:
        event = await sink.get()
        if event[1] == "error":
            raise event[2]
    except BaseException:
        for job in jobs:
            job.cancelled = True
        raise
    return event


def create_app(
    generator: Generator,
    model_name: str,
    max_batch_size: int = 8,
    batch_window_ms: float = 5.0,
) -> FastAPI:
    """The FastAPI app serving ``generator`` as model ``model_name`` (OpenAI API shapes)."""
    service = _Service(generator, model_name, max_batch_size, batch_window_ms)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await service.scheduler.start()
        try:
            yield
        finally:
            await service.scheduler.stop()

    app = FastAPI(title="phibook", description="OpenAI-compatible phi-1.5 server", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        if exc.status < 500:
            service.stats.rejected_requests += 1
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        service.stats.rejected_requests += 1
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        queued = service.scheduler.queue.qsize() if service.scheduler.queue else 0
        return {"status": "ok", "model": model_name, "queued": queued,
                "max_batch_size": max_batch_size, "stats": service.stats.to_dict()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": model_name, "object": "model", "created": service.created, "owned_by": "phibook"}]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        service.check_model(name)
        return {"id": model_name, "object": "model", "created": service.created, "owned_by": "phibook"}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        service.check_model(req.model)
        _reject_unsupported(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise APIError(400, "prompt must be a string or a non-empty list of strings", param="prompt")
        stops = _stop_list(req.stop)
        params = []
        for i, prompt in enumerate(prompts):
            where = "prompt" if isinstance(req.prompt, str) else f"prompt[{i}]"
            budget = service.budget(prompt, where, req.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS)
            params.append(service.params(req, budget, stops))
        sink, jobs = service.launch(prompts, params)
        rid, created = _new_id("cmpl"), int(time.time())

        def choice(i: int, text: str, finish: str | None) -> dict[str, Any]:
            return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}

        if not req.stream:
            try:
                results = await _collect(sink, len(jobs))
            except BaseException:
                for job in jobs:
                    job.cancelled = True
                raise
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [choice(i, (prompts[i] if req.echo else "") + c.text, c.finish_reason)
                                for i, c in enumerate(results)],
                    "usage": _usage(results)}

        def chunk(choices: list[dict[str, Any]], usage: dict | None = None) -> dict[str, Any]:
            out = {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                   "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        finished: list[Completion] = []

        def on_event(event: tuple) -> list[dict]:
            index, kind, payload = event
            if kind == "delta":
                return [chunk([choice(index, payload, None)])]
            finished.append(payload)
            return [chunk([choice(index, "", payload.finish_reason)])]

        def finish() -> list[dict]:
            if (req.stream_options or {}).get("include_usage"):
                return [chunk([], _usage(finished))]
            return []

        first = await _first_event(sink, jobs)
        prologue = [_sse(chunk([choice(i, p, None)])) for i, p in enumerate(prompts)] if req.echo else []
        return _sse_response(prologue, _stream(first, sink, jobs, on_event, finish, service.stats))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        service.check_model(req.model)
        _reject_unsupported(req)
        prompt = render_chat(req.messages)
        stops = _stop_list(req.stop)
        stops = stops + [s for s in CHAT_STOPS if s not in stops]
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        budget = service.budget(prompt, "messages", max_tokens, None)
        sink, jobs = service.launch([prompt], [service.params(req, budget, stops)])
        rid, created = _new_id("chatcmpl"), int(time.time())

        if not req.stream:
            try:
                (result,) = await _collect(sink, 1)
            except BaseException:
                jobs[0].cancelled = True
                raise
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text.lstrip()},
                                 "logprobs": None, "finish_reason": result.finish_reason}],
                    "usage": _usage([result])}

        def chunk(delta: dict[str, Any] | None, finish: str | None, usage: dict | None = None) -> dict:
            choices = [] if delta is None else [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                   "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        # The prompt ends with "Bob:", so the reply starts with a space; the non-stream
        # answer is lstripped, and the stream drops the same leading whitespace.
        state = {"started": False, "result": None}

        def on_event(event: tuple) -> list[dict]:
            _, kind, payload = event
            if kind == "done":
                state["result"] = payload
                return [chunk({}, payload.finish_reason)]
            piece = payload if state["started"] else payload.lstrip()
            if not piece:
                return []
            state["started"] = True
            return [chunk({"content": piece}, None)]

        def finish() -> list[dict]:
            if (req.stream_options or {}).get("include_usage") and state["result"] is not None:
                return [chunk(None, None, _usage([state["result"]]))]
            return []

        first = await _first_event(sink, jobs)
        prologue = [_sse(chunk({"role": "assistant", "content": ""}, None))]
        return _sse_response(prologue, _stream(first, sink, jobs, on_event, finish, service.stats))

    return app


def _sse_response(prologue: list[str], body: AsyncIterator[str]) -> StreamingResponse:
    async def gen() -> AsyncIterator[str]:
        for line in prologue:
            yield line
        async for line in body:
            yield line

    return StreamingResponse(gen(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# --------------------------------------------------------------------------- runner


def run_server(app: FastAPI, sock: Any, log_level: str = "info") -> None:
    """Serve ``app`` on an already-bound socket until interrupted (Ctrl-C stops it cleanly)."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=log_level == "debug", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
