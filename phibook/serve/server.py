"""An OpenAI-compatible HTTP server over one ``Generator``, with continuous batching.

Order: errors -> request schemas -> prompt building -> logprob formatting -> ``_Service``
-> ``create_app`` (routes, /health, /metrics) -> ``run_server``.

Concurrency model: the routes (asyncio, event loop) validate a request, turn each of its
prompts into ``engine.Job``s and hand them to the ``Engine`` (phibook/serve/engine.py),
whose one worker thread owns the model and schedules every running sequence one decode
step at a time over a pool of KV-cache slots. Events (text pieces, the completion, an
error) come back through ``loop.call_soon_threadsafe`` onto the request's own asyncio
queue, so a streaming request sends SSE chunks while the others keep decoding.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from phibook.errors import PhibookError
from phibook.inference.generate import Completion, Generator, SamplingParams
from phibook.inference.templates import BOT_NAME, USER_NAME, get_template
from phibook.serve.engine import Engine, Job, JobTimeout, QueueFull, ServeStats, Stopped, TokenLogprob

log = logging.getLogger("phibook.serve.server")

# The report's chat format (section 5): "Alice: ...\nBob:". A turn ends when the
# model starts the next speaker's line: the chat template's stops (as `phibook chat`).
CHAT_STOPS = get_template("chat").stops()
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_N = 16  # choices per request (each takes a slot)
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI: 5 for completions, 20 for chat)
RETRY_AFTER_S = 1  # the Retry-After of a 503 when the queue is full
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there


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
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


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
    # vLLM's extensions, sent by benchmark clients (vLLM's benchmark_serving and others). Strict:
    # "yes" or 1 for ignore_eos, "5" or true for min_tokens are 400s, not guesses.
    ignore_eos: bool = Field(False, strict=True, description="extension (vLLM): EOS does not end the completion")
    min_tokens: int = Field(0, ge=0, strict=True,
                            description="extension (vLLM): the first min_tokens tokens never end the completion")
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
    # Text, a list of texts, token ids, or a list of token-id lists (as lm-eval's local-completions sends).
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
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
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


def _reject_unsupported(req: _SamplingFields) -> None:
    """400 for OpenAI parameters this server cannot honour, instead of silently ignoring them."""
    if not 1 <= req.n <= MAX_N:
        raise APIError(400, f"n={req.n} is out of range: this server returns 1 to {MAX_N} choices per request",
                       param="n", code="invalid_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) != 0:
            raise APIError(400, f"{name} is not supported; use repetition_penalty (an extension) instead",
                           param=name, code="unsupported_parameter")
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias", code="unsupported_parameter")
    if isinstance(req, ChatRequest) and req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs", code="invalid_value")
    if getattr(req, "best_of", None) not in (None, 1):
        raise APIError(400, "best_of is not supported; only best_of=1", param="best_of",
                       code="unsupported_value")
    if getattr(req, "suffix", None):
        raise APIError(400, "suffix (insertion) is not supported", param="suffix", code="unsupported_parameter")


def _max_tokens(req: _SamplingFields) -> int | None:
    """The completion budget the request asked for (chat: max_completion_tokens before max_tokens)."""
    if isinstance(req, ChatRequest) and req.max_completion_tokens is not None:
        return req.max_completion_tokens
    return req.max_tokens


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


# --------------------------------------------------------------------------- app



def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _usage(completions: list[Completion]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in completions)
    out = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out}


def _sse(obj: dict[str, Any] | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def _engine_error(exc: BaseException) -> APIError:
    """What a failure reported by the engine becomes on the wire."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, JobTimeout):
        return APIError(504, str(exc), type="timeout_error", code="timeout")
    if isinstance(exc, Stopped):
        return APIError(503, str(exc), type="server_error", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, PhibookError):
        return APIError(400, str(exc))
    return APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error")


# --------------------------------------------------------------------------- logprobs


class _Tokens:
    """Token ids -> the strings that logprobs show (ids past the tokenizer are vocabulary padding)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.n = tokenizer.vocab_size
        self.cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        if token not in self.cache:
            self.cache[token] = self.tokenizer.decode([token]) if token < self.n else f"<|pad_{token}|>"
        return self.cache[token]


def legacy_logprobs(
    name: _Tokens, ids: list[int], entries: list[TokenLogprob | None], offset: int
) -> dict[str, Any]:
    """OpenAI's legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset.
    An entry of None (the prompt's first token, which nothing predicts) gives null values."""
    tokens, lps, tops, offsets = [], [], [], []
    for token, entry in zip(ids, entries):
        text = name(token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        lps.append(None if entry is None else entry.logprob)
        if entry is None:
            tops.append(None)
        else:
            top: dict[str, float] = {}
            for t, lp in entry.top:
                top.setdefault(name(t), lp)  # tokens that print alike: keep the likelier
            tops.append(top)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(name: _Tokens, entries: list[TokenLogprob]) -> dict[str, Any]:
    """Chat completions' logprobs: {"content": [{token, logprob, bytes, top_logprobs}]}."""

    def one(token: int, lp: float) -> dict[str, Any]:
        text = name(token)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries]}


# --------------------------------------------------------------------------- service


class _Service:
    """What the routes share: the generator's facts, the engine and the counters."""

    def __init__(self, generator: Generator, model_name: str, max_batch_size: int, max_queue: int,
                 prefill_chunk: int, request_timeout: float, step_hook: Callable | None,
                 engine_thread: bool) -> None:
        self.generator = generator
        self.model_name = model_name
        self.created = int(time.time())
        self.stats = ServeStats()
        self.engine = Engine(generator, max_slots=max_batch_size, max_queue=max_queue,
                             prefill_chunk=prefill_chunk, stats=self.stats, step_hook=step_hook)
        self.request_timeout = request_timeout
        self.context = int(generator.context)
        self.names = _Tokens(generator.tokenizer)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.engine_thread = engine_thread  # create_app's: the app's startup starts the engine's thread

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")

    def encode(self, prompt: str | list[int], param: str) -> list[int]:
        """Token ids of one prompt, as Generator encodes it (an empty prompt starts from EOS)."""
        if isinstance(prompt, list):
            n = self.generator.n_real_vocab
            bad = [t for t in prompt if not 0 <= t < n]
            if bad:
                raise APIError(400, f"{param}: token id {bad[0]} is outside the vocabulary (0..{n - 1})",
                               param=param, code="invalid_value")
            return list(prompt) or [self.generator.tokenizer.eos_id]
        return (self.generator.tokenizer.encode(prompt) if prompt else []) or [self.generator.tokenizer.eos_id]

    def budget(self, n_prompt: int, param: str, max_tokens: int | None, default: int | None,
               allow_zero: bool = False) -> int:
        """max_new_tokens for one prompt, or a 400 naming the lengths when it cannot fit."""
        least = 0 if allow_zero else 1
        if max_tokens is not None and max_tokens < least:
            raise APIError(400, f"max_tokens must be at least {least}, got {max_tokens}"
                                + ("" if allow_zero else " (0 is allowed only with echo=true)"),
                           param="max_tokens", code="invalid_value")
        room = self.context - n_prompt
        if room < least:
            raise APIError(400, f"the prompt is {n_prompt} tokens, but this model's maximum context length is "
                                f"{self.context} tokens" + ("" if allow_zero else
                                " (room is needed for at least 1 new token)") + f"; shorten the {param}",
                           param=param, code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the {param}, "
                                f"{max_tokens} for the completion). Reduce the {param} or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        if max_tokens is not None:
            return max_tokens
        return room if default is None else min(default, room)

    def params(self, req: _SamplingFields, max_new: int, stops: list[str], choice: int) -> SamplingParams:
        # n > 1: choice j draws from seed + j, so the choices differ but the request is reproducible.
        seed = None if req.seed is None else (req.seed + choice) % 2**63
        if req.min_tokens > max_new:
            asked = _max_tokens(req)
            limit = (f"max_tokens={asked}" if asked is not None else
                     f"the {max_new} tokens this request may generate (max_tokens was not given)")
            raise APIError(400, f"min_tokens={req.min_tokens} must not exceed {limit}", param="min_tokens",
                           code="invalid_value")
        params = SamplingParams(max_new_tokens=max_new, temperature=req.temperature, top_k=req.top_k,
                                top_p=req.top_p, repetition_penalty=req.repetition_penalty, seed=seed,
                                stop=stops, stop_at_eos=not req.ignore_eos, min_tokens=req.min_tokens)
        try:
            params.validate()
        except PhibookError as exc:
            raise APIError(400, str(exc)) from exc
        return params

    def launch(self, prompt_ids: list[list[int]], params: list[SamplingParams], logprobs: int | None = None,
               prompt_logprobs: bool = False) -> tuple[asyncio.Queue, list[Job]]:
        """Queue one job per prompt; their events land on the returned queue as (index, kind, payload)."""
        assert self.loop is not None, "the app's lifespan did not run"
        sink: asyncio.Queue = asyncio.Queue()
        loop = self.loop
        deadline = time.monotonic() + self.request_timeout

        def poster(i: int) -> Callable[[str, Any], None]:
            return lambda kind, payload: loop.call_soon_threadsafe(sink.put_nowait, (i, kind, payload))

        jobs = [Job(ids, p, poster(i), logprobs=logprobs, prompt_logprobs=prompt_logprobs, deadline=deadline)
                for i, (ids, p) in enumerate(zip(prompt_ids, params))]
        try:
            self.engine.submit(jobs)
        except QueueFull as exc:
            self.stats.queue_full_requests += 1
            raise APIError(503, f"the server is busy: {exc}; retry after {RETRY_AFTER_S} s", type="server_error",
                           code="server_busy", headers={"Retry-After": str(RETRY_AFTER_S)}) from exc
        except Stopped as exc:
            raise _engine_error(exc) from exc
        self.stats.requests += 1
        return sink, jobs

    def cancel(self, jobs: list[Job]) -> None:
        for job in jobs:
            job.cancelled = True
        self.engine.wake()


class _ClientGone(Exception):
    """A non-streaming request's client disconnected while it waited."""


async def _collect(service: _Service, sink: asyncio.Queue, jobs: list[Job], request: Request) -> list[Completion]:
    """Wait for every job's completion; cancel them all (freeing their slots) if the client leaves."""
    done: dict[int, Completion] = {}
    try:
        while len(done) < len(jobs):
            index, kind, payload = await _next_event(service, sink, jobs, request)
            if kind == "error":
                raise _engine_error(payload)
            if kind == "done":
                done[index] = payload
    except BaseException:
        service.cancel(jobs)
        raise
    return [done[i] for i in range(len(jobs))]


async def _next_event(service: _Service, sink: asyncio.Queue, jobs: list[Job], request: Request) -> tuple:
    """The next event; _ClientGone if the client hung up meanwhile (checked every DISCONNECT_POLL_S)."""
    while True:
        try:
            return await asyncio.wait_for(sink.get(), DISCONNECT_POLL_S)
        except TimeoutError:
            if await request.is_disconnected():
                service.stats.disconnected_jobs += sum(not job.cancelled for job in jobs)
                raise _ClientGone from None


async def _first_event(service: _Service, sink: asyncio.Queue, jobs: list[Job], request: Request) -> tuple:
    """Wait for the first event so that an early failure still gets a proper HTTP status
    (and a stream whose client left while it waited for a slot never takes one)."""
    try:
        event = await _next_event(service, sink, jobs, request)
        if event[1] == "error":
            raise _engine_error(event[2])
    except BaseException:
        service.cancel(jobs)
        raise
    return event


async def _stream(
    service: _Service, first: tuple, sink: asyncio.Queue, jobs: list[Job],
    make_chunks: Callable[[tuple], list[dict]], finish: Callable[[], list[dict]],
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
                yield _sse(_engine_error(payload).body())
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
        # Stream over, or the client went away (Starlette then closes this generator): the
        # engine drops the jobs at its next iteration, freeing their slots.
        if not ended and remaining:
            service.stats.disconnected_jobs += remaining
        service.cancel(jobs)


def _sse_response(prologue: list[str], body: AsyncIterator[str]) -> StreamingResponse:
    async def gen() -> AsyncIterator[str]:
        for line in prologue:
            yield line
        async for line in body:
            yield line

    return StreamingResponse(gen(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# --------------------------------------------------------------------------- app


def create_app(
    generator: Generator,
    model_name: str,
    max_batch_size: int = 8,
    max_queue: int = 64,
    prefill_chunk: int = 256,
    request_timeout: float = 600.0,
    step_hook: Callable | None = None,
    engine_thread: bool = True,
) -> FastAPI:
    """The FastAPI app serving ``generator`` as model ``model_name`` (OpenAI API shapes).

    max_batch_size: KV-cache slots (sequences decoded together); max_queue: sequences that may
    wait for a slot before requests get 503; prefill_chunk: prompt tokens read per iteration;
    request_timeout: seconds from arrival after which a request is dropped (504);
    step_hook: tests only, called by the engine's worker at the top of every iteration;
    engine_thread: True, the app's startup starts the engine's worker thread (``Engine.start``);
    False, whoever serves the app runs ``app.state.service.engine.run()`` in a thread of its
    choosing, as ``run_server`` does.
    """
    if request_timeout <= 0 or not math.isfinite(request_timeout):
        raise PhibookError(f"request_timeout (--request-timeout) must be a positive number, got {request_timeout}")
    service = _Service(generator, model_name, max_batch_size, max_queue, prefill_chunk, request_timeout, step_hook,
                       engine_thread)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        service.loop = asyncio.get_running_loop()
        if service.engine_thread:
            service.engine.start()
        try:
            yield
        finally:
            # uvicorn runs this after its graceful drain: anything still here is failed with 503.
            await asyncio.to_thread(service.engine.stop)

    app = FastAPI(title="phibook", description="OpenAI-compatible phi-1.5 server", lifespan=lifespan)
    app.state.service = service
    stats = service.stats

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        if exc.status < 500:
            stats.rejected_requests += 1
        return exc.response()

    @app.exception_handler(_ClientGone)
    async def _gone(_: Request, exc: _ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        stats.rejected_requests += 1
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
        return {"status": "ok", "model": model_name, "queued": service.engine.queued,
                "running": service.engine.running, "max_batch_size": max_batch_size, "max_queue": max_queue,
                "stats": stats.to_dict()}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(_prometheus(service), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": model_name, "object": "model", "created": service.created, "owned_by": "phibook",
             "max_model_len": service.context}]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        service.check_model(name)
        return {"id": model_name, "object": "model", "created": service.created, "owned_by": "phibook",
                "max_model_len": service.context}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        service.check_model(req.model)
        _reject_unsupported(req)
        prompts = _prompt_list(req.prompt)
        stops = _stop_list(req.stop)
        want_prompt = req.echo and req.logprobs is not None
        ids, params, texts = [], [], []
        for i, prompt in enumerate(prompts):
            where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            row = service.encode(prompt, where)
            budget = service.budget(len(row), where, req.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS,
                                    allow_zero=req.echo)
            text = prompt if isinstance(prompt, str) else service.generator.tokenizer.decode(prompt)
            for j in range(req.n):
                ids.append(row)
                texts.append(text)
                params.append(service.params(req, budget, stops, j))
        sink, jobs = service.launch(ids, params, logprobs=req.logprobs, prompt_logprobs=want_prompt)
        rid, created = _new_id("cmpl"), int(time.time())

        def lp_block(i: int, start: int, end: int | None, with_prompt: bool) -> dict[str, Any] | None:
            """logprobs for job i: the prompt's (with_prompt) and its sampled tokens [start:end]."""
            if req.logprobs is None:
                return None
            job = jobs[i]
            entries = job.token_logprobs[start:end]
            token_ids = [e.token for e in entries]
            listed: list[TokenLogprob | None] = list(entries)
            # Offsets count from the prompt's start: a stream's later chunks continue after the earlier ones.
            offset = len(texts[i]) + sum(len(service.names(e.token)) for e in job.token_logprobs[:start])
            if with_prompt:
                token_ids = job.prompt_ids + token_ids
                listed = list(job.prompt_entries or [None] * len(job.prompt_ids)) + listed
                offset = 0
            return legacy_logprobs(service.names, token_ids, listed, offset)

        def choice(i: int, text: str, finish: str | None, logprobs: dict | None = None) -> dict[str, Any]:
            return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}

        if not req.stream:
            results = await _collect(service, sink, jobs, request)
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [choice(i, (texts[i] if req.echo else "") + c.text, c.finish_reason,
                                       lp_block(i, 0, None, want_prompt))
                                for i, c in enumerate(results)],
                    "usage": _usage(results)}

        def chunk(choices: list[dict[str, Any]], usage: dict | None = None) -> dict[str, Any]:
            out = {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                   "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        finished: list[Completion] = []
        sent = [0] * len(jobs)  # logprob entries already sent, per job
        echoed = [not req.echo] * len(jobs)

        def on_event(event: tuple) -> list[dict]:
            index, kind, payload = event
            out = []
            if not echoed[index]:
                # A choice's first chunk is its prompt. Its first event means its prompt has been
                # read, so the prompt's logprobs are final by now.
                echoed[index] = True
                out.append(chunk([choice(index, texts[index], None, lp_block(index, 0, 0, want_prompt))]))
            if kind == "delta":
                text, n_tok = payload
                lp = lp_block(index, sent[index], n_tok, False)
                sent[index] = n_tok
                return out + [chunk([choice(index, text, None, lp)])]
            finished.append(payload)
            lp = lp_block(index, sent[index], None, False)
            return out + [chunk([choice(index, "", payload.finish_reason, lp)])]

        def finish() -> list[dict]:
            if (req.stream_options or {}).get("include_usage"):
                return [chunk([], _usage(finished))]
            return []

        first = await _first_event(service, sink, jobs, request)
        return _sse_response([], _stream(service, first, sink, jobs, on_event, finish))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        service.check_model(req.model)
        _reject_unsupported(req)
        prompt = render_chat(req.messages)
        stops = _stop_list(req.stop)
        stops = stops + [s for s in CHAT_STOPS if s not in stops]
        max_tokens = _max_tokens(req)
        row = service.encode(prompt, "messages")
        budget = service.budget(len(row), "messages", max_tokens, None)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        sink, jobs = service.launch([row] * req.n, [service.params(req, budget, stops, j) for j in range(req.n)],
                                    logprobs=logprobs)
        rid, created = _new_id("chatcmpl"), int(time.time())

        def lp_block(i: int, start: int, end: int | None) -> dict[str, Any] | None:
            return None if logprobs is None else chat_logprobs(service.names, jobs[i].token_logprobs[start:end])

        if not req.stream:
            results = await _collect(service, sink, jobs, request)
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": c.text.lstrip()},
                                 "logprobs": lp_block(i, 0, None), "finish_reason": c.finish_reason}
                                for i, c in enumerate(results)],
                    "usage": _usage(results)}

        def chunk(index: int | None, delta: dict[str, Any] | None, finish: str | None, usage: dict | None = None,
                  lp: dict | None = None) -> dict:
            choices = [] if delta is None else [
                {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]
            out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                   "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        # The prompt ends with "Bob:", so the reply starts with a space; the non-stream
        # answer is lstripped, and the stream drops the same leading whitespace.
        started = [False] * len(jobs)
        sent = [0] * len(jobs)
        results: list[Completion] = []

        def on_event(event: tuple) -> list[dict]:
            index, kind, payload = event
            if kind == "done":
                results.append(payload)
                lp = lp_block(index, sent[index], None)
                return [chunk(index, {}, payload.finish_reason, lp=lp)]
            text, n_tok = payload
            piece = text if started[index] else text.lstrip()
            if not piece:
                return []
            started[index] = True
            lp = lp_block(index, sent[index], n_tok)
            sent[index] = n_tok
            return [chunk(index, {"content": piece}, None, lp=lp)]

        def finish() -> list[dict]:
            if (req.stream_options or {}).get("include_usage"):
                return [chunk(None, None, None, _usage(results))]
            return []

        first = await _first_event(service, sink, jobs, request)
        prologue = [_sse(chunk(i, {"role": "assistant", "content": ""}, None)) for i in range(len(jobs))]
        return _sse_response(prologue, _stream(service, first, sink, jobs, on_event, finish))

    return app


def _prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The prompts of a completions request: one text, texts, one token-id list, or token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must be a string, a non-empty list of strings, or token ids", param="prompt")
    if isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


def _prometheus(service: _Service) -> str:
    """/metrics in Prometheus' text format (names after vLLM's and TGI's)."""
    s, e = service.stats, service.engine
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, value: float | None = None) -> None:
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
        if value is not None:
            lines.append(f"{name} {value}")

    metric("phibook_queue_length", "gauge", "Sequences waiting for a KV-cache slot.", e.queued)
    metric("phibook_running_rows", "gauge", "Sequences holding a KV-cache slot (prefilling or decoding).", e.running)
    metric("phibook_slots", "gauge", "KV-cache slots (--max-batch-size).", e.max_slots)
    metric("phibook_requests_total", "counter", "Generation requests accepted.", s.requests)
    metric("phibook_rejected_requests_total", "counter", "Requests answered with a 4xx error.", s.rejected_requests)
    metric("phibook_queue_full_total", "counter", "Requests answered 503 because the queue was full.",
           s.queue_full_requests)
    metric("phibook_finished_sequences_total", "counter", "Sequences that ran to a stop or their length.",
           s.finished_jobs)
    metric("phibook_cancelled_sequences_total", "counter", "Sequences dropped because their client left.",
           s.cancelled_jobs)
    metric("phibook_timed_out_sequences_total", "counter", "Sequences dropped at --request-timeout.",
           s.timed_out_jobs)
    metric("phibook_failed_sequences_total", "counter", "Sequences that failed with an error.", s.failed_jobs)
    metric("phibook_prompt_tokens_total", "counter", "Prompt tokens read (prefilled).", s.prompt_tokens)
    metric("phibook_generation_tokens_total", "counter", "Tokens generated.", s.generation_tokens)
    metric("phibook_generation_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
           round(e.tokens_per_second(), 3))
    metric("phibook_decode_steps_total", "counter", "Decode steps (one token for every decoding row).",
           s.decode_steps)
    metric("phibook_prefill_chunks_total", "counter", "Prefill chunks run.", s.prefill_chunks)
    metric("phibook_time_to_first_token_seconds", "histogram", "From arrival to the first generated token.")
    lines.extend(s.ttft.lines("phibook_time_to_first_token_seconds"))
    metric("phibook_request_latency_seconds", "histogram", "From arrival to the last token, per sequence.")
    lines.extend(s.latency.lines("phibook_request_latency_seconds"))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- runner


def run_server(app: FastAPI, sock: Any, log_level: str = "info", drain_timeout: float = 30.0) -> None:
    """Serve ``app`` (made with ``engine_thread=False``) on an already-bound socket until
    SIGINT/SIGTERM, its engine running in the calling thread.

    uvicorn runs in a second thread, which never runs the model. ``phibook serve`` calls this
    from the thread that loaded the model, so one thread runs every parallel op and torch keeps
    one pool of OpenMP helpers (``Engine.run`` says why that matters). On either signal uvicorn
    stops accepting connections and lets the requests in flight finish (up to ``drain_timeout``
    seconds); then the engine stops, anything left is answered 503, and this returns.
    """
    import uvicorn

    service: _Service = app.state.service
    if service.engine_thread:
        raise PhibookError("run_server runs the app's engine itself: make the app with create_app(engine_thread=False)")
    if threading.current_thread() is not threading.main_thread():
        raise PhibookError("run_server runs the engine in the calling thread and takes SIGINT/SIGTERM, "
                           "so it must be called from the main thread")
    config = uvicorn.Config(app, log_level=log_level, access_log=log_level == "debug",
                            timeout_graceful_shutdown=drain_timeout)
    server = uvicorn.Server(config)
    engine = service.engine

    def serve() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            engine.stop(timeout=0)  # the lifespan's shutdown has stopped it, unless startup failed

    previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    http = threading.Thread(target=serve, name="phibook-http", daemon=True)
    http.start()
    try:
        engine.run()
    finally:
        engine.stop(timeout=0)
        server.should_exit = True  # the engine is gone (normally because uvicorn's shutdown stopped it)
        http.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise PhibookError("the HTTP server stopped before it started serving (its log above says why)")
