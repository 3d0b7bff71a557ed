"""The task interface every benchmark implements, and the registry `phibook eval` looks names up in.

A task turns its documents into requests of three kinds; the runner answers them in
batches and hands each document's answers back to `process_results`:

- `LoglikelihoodRequest(context, continuation)` -> `(sum logprob of the continuation tokens, is_greedy)`
- `RollingLoglikelihoodRequest(text)` -> `(sum logprob over the whole text, n_tokens)`, scored in
  windows of the model's context length
- `GenerationRequest(prompt, params)` -> the generated text (a `str`)

Semantics follow lm-evaluation-harness (context/continuation split, target delimiter, metrics),
so numbers are comparable with published ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from phibook.errors import PhibookError


@dataclass
class LoglikelihoodRequest:
    context: str
    continuation: str


@dataclass
class RollingLoglikelihoodRequest:
    text: str


@dataclass
class GenerationRequest:
    prompt: str
    params: Any  # phibook.inference.generate.SamplingParams (kept untyped so this module imports without torch)


Request = LoglikelihoodRequest | RollingLoglikelihoodRequest | GenerationRequest
OutputType = Literal["loglikelihood", "rolling", "generate"]


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and the standard error of the mean (sample stddev / sqrt(n)), as lm-eval reports it."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


class Task:
    """One benchmark. Subclass it, set the class attributes, implement the three methods.

    `metrics` maps each metric name to "higher is better". `prompt_settings` is recorded
    verbatim in the results JSON (few-shot count, template, delimiter), so say there what a
    reader needs to reproduce the number.
    """

    name: ClassVar[str] = ""
    output_type: ClassVar[OutputType] = "loglikelihood"
    metrics: ClassVar[dict[str, bool]] = {"acc": True}
    prompt_settings: ClassVar[dict[str, Any]] = {}
    # True for tasks that run model-written code (in phibook.sandbox): `phibook eval` checks
    # the jail before it loads the model, and records how programs ran.
    runs_code: ClassVar[bool] = False
    # Set by `phibook eval --unsafe-no-sandbox` on the tasks that run code: no jail for them.
    unsafe_sandbox: bool = False

    def load_docs(self, data_dir: Path | None, limit: int | None) -> list[dict]:
        """Read the evaluated split from `data_dir/<task folder>`; first `limit` docs when given."""
        raise NotImplementedError

    def requests(self, doc: dict) -> list[Request]:
        """The requests for one document; their answers come back to `process_results` in order."""
        raise NotImplementedError

    def process_results(self, doc: dict, results: list) -> dict[str, float]:
        """Per-document metric values from the answers to `requests(doc)`."""
        raise NotImplementedError

    def aggregate(self, per_doc: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
        """metric -> (value, stderr). Default: mean and standard error over documents."""
        out: dict[str, tuple[float, float]] = {}
        for metric in self.metrics:
            values = [d[metric] for d in per_doc if metric in d]
            out[metric] = mean_and_stderr(values)
        return out


TASKS: dict[str, type[Task]] = {}


def register(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: `@register("arc_easy") class ArcEasy(Task): ...` (sets `cls.name`)."""

    def wrap(cls: type[Task]) -> type[Task]:
        if name in TASKS and TASKS[name] is not cls:
            raise ValueError(f"task {name!r} registered twice ({TASKS[name].__qualname__} and {cls.__qualname__})")
        cls.name = name
        TASKS[name] = cls
        return cls

    return wrap


# The modules that define task families (their @register decorators run on import). An
# explicit tuple, not a sweep of the folder: a new family adds its module here, nothing else in
# eval/ is imported by accident, and tests/test_layout.py checks each entry is an eval module.
TASK_MODULES = ("phibook.eval.multiple_choice", "phibook.eval.generative", "phibook.eval.toxigen")


def load_task_modules() -> None:
    """Import TASK_MODULES so every task family is registered (by name: they import this module)."""
    import importlib

    for name in TASK_MODULES:
        importlib.import_module(name)


def get_task(name: str, **options: Any) -> Task:
    """An instance of the registered task `name` (constructor `options`, e.g. samples= for code
    tasks); PhibookError listing the known names otherwise."""
    load_task_modules()
    if name not in TASKS:
        known = ", ".join(sorted(TASKS)) or "(none registered)"
        raise PhibookError(f"unknown task {name!r}; known tasks: {known}")
    return TASKS[name](**options)


def task_names() -> list[str]:
    load_task_modules()
    return sorted(TASKS)
