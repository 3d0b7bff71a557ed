"""Teachers: whatever turns a planned document (spec + rendered prompt) into text.

One small interface, three kinds:
- ``BuiltinTeacher``: offline, no model; procedurally generated exercises with
  verified worked solutions (the default, so everything runs offline).
- ``OpenAITeacher``: any OpenAI-compatible endpoint(s) through the official
  ``openai`` client, async with retries (exponential backoff + jitter).
- ``LocalTeacher``: phibook's own inference engine on a local checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from phibook.data.synth import exercises as ex
from phibook.data.synth.prompts import DocSpec, Template, load_templates
from phibook.errors import PhibookError


@dataclass
class TeacherReply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 1
    meta: dict[str, Any] = field(default_factory=dict)


class TeacherFailure(Exception):
    """A document the teacher could not produce after its retries."""

    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


class Teacher(Protocol):
    name: str

    def fingerprint(self) -> str: ...

    def describe(self) -> dict[str, Any]: ...

    async def start(self) -> None: ...

    async def generate(self, spec: DocSpec, prompt: str) -> TeacherReply: ...

    async def close(self) -> None: ...


# --------------------------------------------------------------------------- builtin

# Which exercise kinds suit a topic's subject; intersected with the genre's kinds.
SUBJECT_KINDS = {
    "math": ["fact", "arithmetic", "word_problem", "compare", "pattern"],
    "science": ["unit_conversion", "compare", "pattern"],
    "daily": ["word_problem", "unit_conversion", "who_has", "theory_of_mind"],
    "mind": ["theory_of_mind", "who_has"],
    "coding": ["python"],
    "knowledge": ["fact", "word_problem", "theory_of_mind", "who_has", "pattern", "compare"],
}
KIND_TITLES = {
    "fact": "Addition and subtraction facts",
    "arithmetic": "Multi-step arithmetic",
    "word_problem": "Word problems",
    "unit_conversion": "Converting units",
    "theory_of_mind": "What do other people know?",
    "python": "Python functions",
    "who_has": "Reading carefully: who has what?",
    "pattern": "Repeating patterns",
    "compare": "Comparing numbers",
}
KIND_INTROS = {
    "fact": "Adding and subtracting small numbers is the base of all arithmetic. "
    "Read each fact aloud and check it by counting.",
    "arithmetic": "When an expression has several operations, we work inside parentheses first, "
    "then multiply, then add and subtract, writing down one step at a time.",
    "word_problem": "To solve a word problem, find the quantities in the story, decide which operation "
    "each sentence describes, and compute one step at a time.",
    "unit_conversion": "To convert between units, find how many of the new unit make one of the old unit, "
    "then multiply (or divide for the reverse direction).",
    "theory_of_mind": "People act on what they believe, and what they believe depends on what they have "
    "seen. Someone who did not see a change still believes the old situation.",
    "python": "A good function does one job, says what it does in its docstring, and is checked with tests.",
    "who_has": "Good readers keep track of who has what. When a question asks about one person, "
    "go back to the sentence that names that person and read what comes right after the name.",
    "pattern": "A repeating pattern uses the same few things in the same order again and again. "
    "To find what comes next, find the last thing shown and see what followed it before.",
    "compare": "To compare two numbers, compare the tens first; only when the tens are equal do the "
    "ones decide which number is larger.",
}


SHORT_KIND_ITEMS = 8


class BuiltinTeacher:
    """Offline teacher: documents assembled from verified procedural exercises.

    The topic's subject picks exercise kinds that fit (math -> arithmetic, coding
    -> Python, theory of mind -> false-belief stories, ...); the genre picks the
    layout (textbook section, exercises, story, Q&A, Python exercise).
    """

    name = "builtin"

    def __init__(self, templates: dict[str, Template] | None = None) -> None:
        self.genre_kinds = {name: t.kinds for name, t in (templates or load_templates()).items()}

    def fingerprint(self) -> str:
        return "builtin-v2"

    def describe(self) -> dict[str, Any]:
        return {"teacher": "builtin", "version": 2}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def generate(self, spec: DocSpec, prompt: str) -> TeacherReply:
        text, items = self.compose(spec)
        # The exercises ride along in meta so their answers can be re-verified
        # downstream (tests, audits) without parsing the prose.
        meta = {"kinds": sorted({e.kind for e in items}), "exercises": [e.to_meta() for e in items]}
        return TeacherReply(text, 0, max(1, len(text) // 4), meta=meta)

    @staticmethod
    def kinds_for(spec: DocSpec, genre_kinds: tuple[str, ...]) -> list[str]:
        subject = SUBJECT_KINDS.get(spec.subject_kind, SUBJECT_KINDS["math"])
        both = [k for k in genre_kinds if k in subject]
        return both or subject

    def compose(self, spec: DocSpec) -> tuple[str, list[ex.Exercise]]:
        rng = random.Random(f"builtin:{spec.seed}:{spec.index}")
        kinds = self.kinds_for(spec, self.genre_kinds.get(spec.genre, ("arithmetic",)))
        kind = rng.choice(kinds)
        # The short kinds a tiny model can learn in minutes (ex.KINDS[kind].difficulty) get more
        # examples a document: the demo's model learns them from repetition, and they are short.
        want = SHORT_KIND_ITEMS if ex.KINDS[kind].difficulty == "minutes" else 5
        items: list[ex.Exercise] = []
        for _ in range(4 * want):  # distinct questions only; small kinds (facts) can repeat
            e = ex.make_exercise(rng, kind)
            if all(e.question != o.question for o in items):
                items.append(e)
            if len(items) == want:
                break
        layout = LAYOUTS.get(spec.genre, _layout_textbook)
        shown = items[: want - 2] if spec.genre in ("story", "python") else items
        shown = shown[:2] if spec.genre == "python" else shown
        return layout(kind, shown), shown


def _qa_line(e: ex.Exercise) -> str:
    if e.kind == "python":
        return f"Question: {e.question}\nAnswer:\n" + e.worked_solution()
    explanation = " ".join(e.steps)
    return f"Question: {e.question}\nAnswer: {e.answer}. {explanation}"


def _layout_textbook(kind: str, items: list[ex.Exercise]) -> str:
    worked, practice = items[:2], items[2:]
    parts = [f"## {KIND_TITLES[kind]}", "", KIND_INTROS[kind], ""]
    for i, e in enumerate(worked, 1):
        parts += [f"### Example {i}", "", e.question, "", e.worked_solution(), ""]
    if practice:
        parts += ["### Practice", ""]
        parts += [_qa_line(e) + "\n" for e in practice]
    return "\n".join(parts).strip() + "\n"


def _layout_exercises(kind: str, items: list[ex.Exercise]) -> str:
    parts = [f"# Exercises: {KIND_TITLES[kind]}", ""]
    for i, e in enumerate(items, 1):
        parts += [f"Exercise {i}. {e.question}", "", "Solution:", e.worked_solution(), ""]
    return "\n".join(parts).strip() + "\n"


def _layout_story(kind: str, items: list[ex.Exercise]) -> str:
    parts = []
    for e in items:
        if e.kind == "theory_of_mind":
            story, _, question = e.question.rpartition(". ")
            parts += [story + ".", "", f"Question: {question}", f"Answer: {e.answer}. " + " ".join(e.steps), ""]
        else:
            parts += [_qa_line(e), ""]
    return "\n".join(parts).strip() + "\n"


def _layout_qa(kind: str, items: list[ex.Exercise]) -> str:
    return "\n\n".join(_qa_line(e) for e in items).strip() + "\n"


def _layout_python(kind: str, items: list[ex.Exercise]) -> str:
    parts = []
    for e in items:
        parts += [e.question, "", e.worked_solution(), ""]
    return "\n".join(parts).strip() + "\n"


LAYOUTS = {
    "textbook": _layout_textbook,
    "exercises": _layout_exercises,
    "story": _layout_story,
    "qa": _layout_qa,
    "python": _layout_python,
}


# --------------------------------------------------------------------------- openai


class OpenAITeacher:
    """One or more OpenAI-compatible endpoints; requests fan out round-robin.

    Retries 429, 5xx, timeouts, connection errors and malformed answers (no
    choices, empty text) with exponential backoff and full jitter; other 4xx
    answers fail the document at once. Failures never crash the job: the
    caller records them and a rerun retries those documents.
    """

    name = "openai"

    def __init__(
        self,
        base_urls: list[str],
        model: str,
        api_key: str | None = None,
        temperature: float = 0.8,
        top_p: float = 0.95,
        max_tokens: int = 1024,
        timeout_s: float = 120.0,
        max_retries: int = 5,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        api: str = "chat",
    ) -> None:
        if not base_urls:
            raise PhibookError("the openai teacher needs at least one --base-url")
        if api not in ("chat", "completions"):
            raise PhibookError(f"unknown teacher api {api!r}; use chat or completions")
        self.base_urls = list(base_urls)
        self.model = model
        self.api_key = api_key or "EMPTY"
        self.sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.api = api
        self._clients: list[Any] = []
        self._next = 0

    def fingerprint(self) -> str:
        return json.dumps({"teacher": "openai", "model": self.model, "api": self.api, **self.sampling}, sort_keys=True)

    def describe(self) -> dict[str, Any]:
        return {"teacher": "openai", "teacher_model": self.model, "api": self.api, "sampling": self.sampling}

    async def start(self) -> None:
        import openai

        # Our own retry loop owns backoff, so the client must not retry on its own.
        self._clients = [
            openai.AsyncOpenAI(base_url=url, api_key=self.api_key, timeout=self.timeout_s, max_retries=0)
            for url in self.base_urls
        ]
        for url, client in zip(self.base_urls, self._clients):
            await self._probe(url, client)

    async def _probe(self, url: str, client: Any) -> None:
        """Fail early, naming the endpoint, when it cannot be reached at all."""
        import openai

        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            try:
                await client.models.list()
                return
            except openai.APIStatusError:
                return  # it answered: reachable, even if it has no /models
            except (openai.APIConnectionError, openai.APITimeoutError) as exc:
                last = exc
                await asyncio.sleep(self._backoff(attempt))
        raise PhibookError(f"teacher endpoint {url} is unreachable after {self.max_retries + 1} attempts: {last}")

    async def close(self) -> None:
        for client in self._clients:
            await client.close()

    def _backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.backoff_max_s, self.backoff_base_s * 2**attempt))

    async def generate(self, spec: DocSpec, prompt: str) -> TeacherReply:
        import openai

        errors: list[str] = []
        for attempt in range(self.max_retries + 1):
            i = self._next % len(self._clients)
            self._next += 1
            client, url = self._clients[i], self.base_urls[i]
            try:
                text, usage = await self._call(client, prompt)
                return TeacherReply(
                    text,
                    getattr(usage, "prompt_tokens", 0) or 0,
                    getattr(usage, "completion_tokens", 0) or max(1, len(text) // 4),
                    attempts=attempt + 1,
                    meta={"endpoint": url},
                )
            except openai.APIStatusError as exc:
                errors.append(f"{url}: HTTP {exc.status_code}")
                if exc.status_code != 429 and exc.status_code < 500:
                    raise TeacherFailure(f"{url}: HTTP {exc.status_code}: {exc.message}", attempt + 1) from exc
            except (openai.APITimeoutError, openai.APIConnectionError) as exc:
                errors.append(f"{url}: {type(exc).__name__}")
            except (MalformedAnswer, openai.APIResponseValidationError, json.JSONDecodeError, ValueError) as exc:
                errors.append(f"{url}: malformed answer ({exc})")
            if attempt < self.max_retries:
                await asyncio.sleep(self._backoff(attempt))
        raise TeacherFailure("; ".join(errors[-3:]), self.max_retries + 1)

    async def _call(self, client: Any, prompt: str) -> tuple[str, Any]:
        if self.api == "chat":
            resp = await client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": prompt}], **self.sampling
            )
            if not getattr(resp, "choices", None):
                raise MalformedAnswer("no choices")
            text = resp.choices[0].message.content
        else:
            resp = await client.completions.create(model=self.model, prompt=prompt, **self.sampling)
            if not getattr(resp, "choices", None):
                raise MalformedAnswer("no choices")
            text = resp.choices[0].text
        if not text or not text.strip():
            raise MalformedAnswer("empty text")
        return text.strip() + "\n", getattr(resp, "usage", None)


class MalformedAnswer(Exception):
    pass


# --------------------------------------------------------------------------- local


class LocalTeacher:
    """phibook's own inference engine on a local checkpoint (or HF directory)."""

    name = "local"

    def __init__(self, checkpoint: str, temperature: float = 0.8, top_p: float = 0.95, max_tokens: int = 512) -> None:
        self.checkpoint = checkpoint
        self.sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
        self._generator: Any = None
        self._lock = threading.Lock()

    def fingerprint(self) -> str:
        return json.dumps({"teacher": "local", "checkpoint": str(self.checkpoint), **self.sampling}, sort_keys=True)

    def describe(self) -> dict[str, Any]:
        return {"teacher": "local", "checkpoint": str(self.checkpoint), "sampling": self.sampling}

    async def start(self) -> None:
        from phibook.inference.generate import Generator

        self._generator = Generator.from_path(self.checkpoint)

    async def close(self) -> None:
        self._generator = None

    async def generate(self, spec: DocSpec, prompt: str) -> TeacherReply:
        from phibook.inference.generate import SamplingParams

        params = SamplingParams(
            max_new_tokens=self.sampling["max_tokens"],
            temperature=self.sampling["temperature"],
            top_p=self.sampling["top_p"],
            seed=spec.seed * 1_000_003 + spec.index,
        )

        def work() -> Any:
            with self._lock:  # one model, one batch at a time
                return self._generator.generate([prompt], params)[0]

        start = time.perf_counter()
        out = await asyncio.get_running_loop().run_in_executor(None, work)
        if not out.text.strip():
            raise TeacherFailure("local model produced empty text", 1)
        return TeacherReply(
            out.text.strip() + "\n", out.prompt_tokens, out.completion_tokens,
            meta={"seconds": round(time.perf_counter() - start, 3)},
        )


def teacher_from_options(args: Any, templates: Any = None) -> Any:
    """The teacher that `phibook synth run`'s teacher options (an argparse namespace or any object with
    those attributes: teacher, base_url, teacher_model, api_key, ...) describe."""
    import os

    from phibook.errors import PhibookError

    if args.teacher == "builtin":
        return BuiltinTeacher(templates)
    if args.teacher == "openai":
        if not args.base_url:
            raise PhibookError("--teacher openai needs --base-url URL (repeat it for several endpoints)")
        return OpenAITeacher(
            args.base_url, args.teacher_model, api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
            temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
            timeout_s=args.timeout, max_retries=args.max_retries, api=args.api,
        )
    if not args.checkpoint:
        raise PhibookError("--teacher local needs --checkpoint PATH")
    return LocalTeacher(args.checkpoint, args.temperature, args.top_p, args.max_tokens)
