"""Generative tasks of the report's Tables 3-4: SQuAD (EM/F1), GSM8K "via coding", HumanEval, MBPP.

The model writes text (one `GenerationRequest` per sample); code is run in phibook.sandbox (runner).
Prompts are fixed here and recorded in each task's `prompt_settings`:

  humaneval  the task's prompt verbatim (function signature + docstring); the program is
             prompt + completion + test + "check(entry_point)". Stops: the Codex paper's
             ["\\nclass", "\\ndef", "\\n#", "\\nif", "\\nprint"] (also human-eval's and lm-eval's
             classic list). Greedy pass@1 by default; with samples > 1 the unbiased pass@k.
  mbpp       zero-shot docstring prompt (InCoder / bigcode-evaluation-harness):
             '\"\"\"\\n{text}\\n{test_list[0]}\\n\"\"\"\\n'; the program is prompt + completion,
             tested with test_setup_code + all of test_list. Test split = task_id 11-510.
  gsm8k      "via coding", program-aided (PAL-style), zero-shot:
             'def solution():\\n    \"\"\"{question}\"\"\"\\n'; the model writes the body, we call
             solution() in the sandbox and compare its result numerically to the number after "####".
  squad      "Title: {title}\\n\\nBackground: {context}\\n\\nQuestion: {question}\\n\\nAnswer:",
             greedy until "\\n"; official SQuAD v1.1 normalisation, EM and token F1, max over golds.
"""

from __future__ import annotations

import builtins
import json
import math
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

from phibook.errors import PhibookError
from phibook.eval.loaders import field, read_jsonl
from phibook.eval.task import GenerationRequest, Task, mean_and_stderr, register

# The Codex paper's stop sequences for completing a function body (top-level code ends it).
CODE_STOPS = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
# bigcode-evaluation-harness's MBPP list: the docstring prompt has no function yet, so "\ndef"
# must not stop it; a top-level assert/print/if or a new docstring ends the solution.
MBPP_STOPS = ["\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```"]

SOURCE_HINTS = {
    "humaneval": "HumanEval.jsonl.gz from https://github.com/openai/human-eval (data/)",
    "mbpp": "mbpp.jsonl from https://github.com/google-research/google-research/tree/master/mbpp",
    "gsm8k": "test.jsonl from https://github.com/openai/grade-school-math (grade_school_math/data/)",
    "squad": "dev-v1.1.json from https://rajpurkar.github.io/SQuAD-explorer/ "
    "(https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json)",
}


# --------------------------------------------------------------------------- shared helpers


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al. 2021): 1 - C(n-c, k) / C(n, k),
    computed as a product so large n does not overflow."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def truncate_at_stops(text: str, stops: list[str]) -> str:
    """Cut at the earliest stop string (the generator already does; this keeps other routes honest)."""
    cut = len(text)
    for stop in stops:
        i = text.find(stop)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def sampling_params(*, max_new_tokens: int, stop: list[str], temperature: float = 0.0, top_p: float = 1.0,
                    seed: int | None = None) -> Any:
    from phibook.inference.generate import SamplingParams  # imports torch: only when requests are built

    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                          stop=list(stop))


def read_jsonl_any(path: Path, limit: int | None = None) -> list[dict]:
    """JSONL, gzip-compressed when the name ends in .gz; errors name the file and line."""
    return read_jsonl(path, limit)


def locate(data_dir: Path, folder: str, names: list[str], task: str) -> Path:
    """data_dir/folder/<first of names that exists>; the error says where it looked and where to get it."""
    where = Path(data_dir) / folder
    for name in names:
        if (where / name).is_file():
            return where / name
    raise PhibookError(f"{task}: {' or '.join(names)} not found in {where} (expected under --data-dir "
                       f"{data_dir}, one folder per task); get {SOURCE_HINTS[task]}")


class CodeTask(Task):
    """A task whose answers are programs checked in the sandbox; pass@k over `samples` per problem."""

    output_type = "generate"
    runs_code = True
    folder: ClassVar[str] = ""
    stops: ClassVar[list[str]] = CODE_STOPS
    max_new_tokens: ClassVar[int] = 512

    def __init__(self, samples: int = 1, temperature: float | None = None, top_p: float = 0.95,
                 ks: tuple[int, ...] = (1, 10, 100), timeout_s: float = 3.0, memory_mb: int = 512):
        if samples < 1:
            raise PhibookError(f"{self.name}: --samples must be >= 1, got {samples}")
        # Greedy when one sample; sampling (0.8 as in lm-eval/bigcode pass@k runs) when several.
        self.samples = samples
        self.temperature = (0.0 if samples == 1 else 0.8) if temperature is None else float(temperature)
        if samples > 1 and self.temperature == 0.0:
            raise PhibookError(f"{self.name}: {samples} samples at temperature 0 are {samples} copies of one "
                               "greedy answer; set --temperature > 0 for pass@k")
        self.top_p = top_p if self.temperature > 0 else 1.0
        self.ks = tuple(k for k in ks if k <= samples) or (1,)
        self.timeout_s, self.memory_mb = timeout_s, memory_mb
        self.metrics = {f"pass@{k}": True for k in self.ks}
        self.prompt_settings = dict(type(self).prompt_settings, samples=samples, temperature=self.temperature,
                                    top_p=self.top_p, max_new_tokens=self.max_new_tokens, stop=self.stops,
                                    sandbox_timeout_s=timeout_s, sandbox_memory_mb=memory_mb)

    def prompt(self, doc: dict) -> str:
        raise NotImplementedError

    def program(self, doc: dict, completion: str) -> tuple[str, str]:
        """(program, tests) for one completion."""
        raise NotImplementedError

    def entry(self, doc: dict) -> list[str]:
        """The names of the function under test: a program's name that is also a builtin's (MBPP
        asks for a ``sum``) reaches the tests only when listed here."""
        return []

    def requests(self, doc: dict) -> list[GenerationRequest]:
        prompt = self.prompt(doc)
        return [
            GenerationRequest(prompt, sampling_params(
                max_new_tokens=self.max_new_tokens, stop=self.stops, temperature=self.temperature,
                top_p=self.top_p, seed=i if self.samples > 1 else None))
            for i in range(self.samples)
        ]

    def process_results(self, doc: dict, results: list) -> dict[str, float]:
        from phibook.sandbox.runner import check_many

        entry = self.entry(doc)
        pairs = [(*self.program(doc, truncate_at_stops(str(text), self.stops)), entry) for text in results]
        outcomes = check_many(pairs, timeout_s=self.timeout_s, memory_mb=self.memory_mb, unsafe=self.unsafe_sandbox)
        n, c = len(outcomes), sum(o.passed for o in outcomes)
        return {f"pass@{k}": pass_at_k(n, c, k) for k in self.ks}

    def load_docs(self, data_dir: Path | None, limit: int | None) -> list[dict]:
        if data_dir is None:
            raise PhibookError(f"{self.name}: no benchmark folder given (phibook reads local files only; "
                               "pass --data-dir DIR or set $PHIBOOK_DATA_DIR)")
        return self.load_files(Path(data_dir), limit)

    def load_files(self, data_dir: Path, limit: int | None) -> list[dict]:
        raise NotImplementedError


# --------------------------------------------------------------------------- HumanEval


@register("humaneval")
class HumanEval(CodeTask):
    folder = "humaneval"
    prompt_settings: ClassVar[dict[str, Any]] = {
        "num_fewshot": 0, "template": "{prompt}", "program": "{prompt}{completion}\\n{test}\\ncheck({entry_point})",
    }

    def prompt(self, doc: dict) -> str:
        return doc["prompt"]

    def program(self, doc: dict, completion: str) -> tuple[str, str]:
        return doc["prompt"] + completion, doc["test"] + "\n" + f"check({doc['entry_point']})"

    def entry(self, doc: dict) -> list[str]:
        return [doc["entry_point"]]

    @staticmethod
    def _doc(row: dict, path: Path | str) -> dict:
        doc = {k: field(row, k, Path(path)) for k in ("task_id", "prompt", "entry_point", "test")}
        doc["canonical_solution"] = row.get("canonical_solution", "")
        return doc

    def load_files(self, data_dir: Path, limit: int | None) -> list[dict]:
        path = locate(data_dir, self.folder, ["HumanEval.jsonl.gz", "HumanEval.jsonl"], self.name)
        return [self._doc(row, path) for row in read_jsonl_any(path, limit)]


# --------------------------------------------------------------------------- MBPP


@register("mbpp")
class MBPP(CodeTask):
    folder = "mbpp"
    stops = MBPP_STOPS
    test_ids: ClassVar[range] = range(11, 511)  # the standard 500-problem test split
    prompt_settings: ClassVar[dict[str, Any]] = {
        "num_fewshot": 0, "template": '"""\\n{text}\\n{test_list[0]}\\n"""\\n',
        "program": "{prompt}{completion}", "tests": "{test_setup_code}\\n{test_list joined by newlines}",
        "split": "test (task_id 11-510)",
    }

    def prompt(self, doc: dict) -> str:
        return f'"""\n{doc["text"]}\n{doc["test_list"][0]}\n"""\n'

    def program(self, doc: dict, completion: str) -> tuple[str, str]:
        return self.prompt(doc) + completion, self.tests(doc)

    @staticmethod
    def tests(doc: dict) -> str:
        return "\n".join([doc["test_setup_code"], *doc["test_list"]])

    def entry(self, doc: dict) -> list[str]:
        # The prompt shows test_list[0]: the function it calls is the one asked for; a builtin's
        # name (`set(f(x)) == ...`) only when it calls nothing else (MBPP 126 asks for `sum`).
        called = sorted(set(re.findall(r"(?<![.\w])([A-Za-z_]\w*)\s*\(", doc["test_list"][0])))
        return [n for n in called if not hasattr(builtins, n)] or called

    def _doc(self, row: dict, path: Path | str) -> dict:
        p = Path(path)
        tests = field(row, "test_list", p, list)
        if not tests or not all(isinstance(t, str) for t in tests):
            raise PhibookError(f"{path}:{row.get('_line', '?')}: test_list must be a non-empty list of strings")
        return {
            "task_id": field(row, "task_id", p, int),
            "text": field(row, "text", p),
            # The published file has CRLF line endings inside `code`; normalise for the sandbox.
            "code": field(row, "code", p).replace("\r\n", "\n"),
            "test_setup_code": (row.get("test_setup_code") or "").replace("\r\n", "\n"),
            "test_list": tests,
        }

    def load_files(self, data_dir: Path, limit: int | None) -> list[dict]:
        path = locate(data_dir, self.folder, ["mbpp.jsonl"], self.name)
        docs = [self._doc(row, path) for row in read_jsonl(path) if row.get("task_id") in self.test_ids]
        if not docs:
            raise PhibookError(f"{path}: no rows with task_id 11-510 (the MBPP test split)")
        return docs[:limit] if limit is not None else docs


# --------------------------------------------------------------------------- GSM8K via coding

# A number as GSM8K writes one: digits with optional comma thousands groups ("1,200", never
# "1,8"), an optional fraction and exponent, an optional sign and dollar sign.
STRICT_NUMBER = re.compile(r"[-+]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\$?\.\d+")


def gsm8k_gold(answer: str) -> float:
    """The number after "####" in a GSM8K answer ("#### 1,200" -> 1200.0)."""
    if "####" not in answer:
        raise ValueError("GSM8K answer has no '####' line")
    return float(answer.split("####")[-1].strip().replace(",", "").rstrip("."))


def parse_number(text: str) -> float | None:
    """``text`` as a number if the whole of it is one (see STRICT_NUMBER; a trailing period is
    allowed), else None: "1,8" and "12 apples" are not numbers."""
    text = text.strip().rstrip(".")
    if not STRICT_NUMBER.fullmatch(text):
        return None
    return float(text.replace(",", "").replace("$", ""))


def last_number(text: str) -> float | None:
    """The last whitespace-separated word of ``text`` that is a number (trailing punctuation and
    brackets aside), or None."""
    for word in reversed(text.split()):
        value = parse_number(word.strip("()[]{}:;,!?\"'"))
        if value is not None:
            return value
    return None


def program_answer(value: object, stdout: str, value_type: str = "NoneType") -> float | None:
    """solution()'s return value as a number; when it returned None (``value_type`` "NoneType"),
    the last number printed. A bool, NaN, inf, a string that is not wholly a number, or a value
    the sandbox could not report (``value`` None with another ``value_type``) is no answer."""
    if type(value) is int or type(value) is float:
        return float(value) if math.isfinite(value) else None
    if type(value) is str:
        return parse_number(value)
    if value is None and value_type == "NoneType":
        return last_number(stdout)
    return None


def answers_match(pred: float | None, gold: float) -> bool:
    return pred is not None and math.isclose(pred, gold, rel_tol=1e-6, abs_tol=1e-4)


@register("gsm8k")
class GSM8K(Task):
    output_type = "generate"
    runs_code = True
    metrics: ClassVar[dict[str, bool]] = {"acc": True}
    stops: ClassVar[list[str]] = CODE_STOPS
    max_new_tokens: ClassVar[int] = 512
    timeout_s: ClassVar[float] = 5.0
    prompt_settings: ClassVar[dict[str, Any]] = {
        "num_fewshot": 0, "method": "via coding (program-aided): solution() runs in the sandbox",
        "template": 'def solution():\\n    """{question}"""\\n', "stop": CODE_STOPS, "greedy": True,
        "max_new_tokens": 512, "answer": "solution()'s numeric result (Fraction, Decimal, numpy numbers too; "
        "when it returned None, the last number printed; NaN, inf or a non-number is wrong), "
        "only when the program ran to its end, vs the number after '####', math.isclose(rel 1e-6, abs 1e-4)",
    }

    @staticmethod
    def prompt(doc: dict) -> str:
        question = doc["question"].strip().replace('"""', "'''")
        return f'def solution():\n    """{question}"""\n'

    @staticmethod
    def program(doc: dict, completion: str) -> str:
        return GSM8K.prompt(doc) + completion + "\n"

    def requests(self, doc: dict) -> list[GenerationRequest]:
        return [GenerationRequest(self.prompt(doc), sampling_params(max_new_tokens=self.max_new_tokens,
                                                                    stop=self.stops))]

    def process_results(self, doc: dict, results: list) -> dict[str, float]:
        from phibook.sandbox.runner import run_python

        # The sandbox calls solution() after the program's top level; its value comes back on the
        # launcher's channel. A program that crashes, exits or times out is wrong, whatever it printed.
        run = run_python(self.program(doc, truncate_at_stops(str(results[0]), self.stops)), timeout_s=self.timeout_s,
                         call="solution", unsafe=self.unsafe_sandbox)
        pred = program_answer(run.value, run.stdout, run.value_type) if run.ok else None
        return {"acc": float(answers_match(pred, doc["gold"]))}

    @staticmethod
    def _doc(row: dict, path: Path | str, index: int) -> dict:
        p = Path(path)
        answer = field(row, "answer", p)
        try:
            gold = gsm8k_gold(answer)
        except ValueError as exc:
            raise PhibookError(f"{path}:{row.get('_line', index + 1)}: {exc}") from None
        return {"question": field(row, "question", p), "answer": answer, "gold": gold}

    def load_docs(self, data_dir: Path | None, limit: int | None) -> list[dict]:
        if data_dir is None:
            raise PhibookError(f"{self.name}: no benchmark folder given (phibook reads local files only; "
                               "pass --data-dir DIR or set $PHIBOOK_DATA_DIR)")
        path = locate(Path(data_dir), "gsm8k", ["test.jsonl"], self.name)
        return [self._doc(r, path, i) for i, r in enumerate(read_jsonl(path, limit))]


# --------------------------------------------------------------------------- SQuAD v1.1


def normalize_answer(s: str) -> str:
    """The official SQuAD v1.1 normalisation: lower case, drop punctuation, articles, extra space."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(prediction: str, golds: list[str]) -> dict[str, float]:
    """EM and F1 of one prediction: the best over the gold answers, as the official script."""
    return {"exact_match": max(exact_match(prediction, g) for g in golds),
            "f1": max(token_f1(prediction, g) for g in golds)}


def read_squad(path: Path, limit: int | None = None) -> list[dict]:
    """Questions of a SQuAD v1.1 JSON file (data[].paragraphs[].qas[]), in file order."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise PhibookError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except OSError as exc:
        raise PhibookError(f"{path}: cannot read ({exc.strerror}); get {SOURCE_HINTS['squad']}") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise PhibookError(f"{path}: expected the SQuAD layout {{\"data\": [{{\"title\", \"paragraphs\"}}]}}")
    docs: list[dict] = []
    for a, article in enumerate(data["data"]):
        for p, para in enumerate(article.get("paragraphs", [])):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            if not isinstance(para.get("context"), str) or not isinstance(para.get("qas"), list):
                raise PhibookError(f"{where}: needs a 'context' string and a 'qas' list")
            for q, qa in enumerate(para["qas"]):
                golds = [ans.get("text") for ans in qa.get("answers", []) if isinstance(ans, dict)]
                if not isinstance(qa.get("question"), str) or not golds or not all(isinstance(g, str) for g in golds):
                    raise PhibookError(f"{where}.qas[{q}]: needs a 'question' and at least one answers[].text")
                docs.append({"id": str(qa.get("id", f"{a}-{p}-{q}")), "title": str(article.get("title", "")),
                             "context": para["context"], "question": qa["question"], "answers": golds})
                if limit is not None and len(docs) >= limit:
                    return docs
    return docs


@register("squad")
class SQuAD(Task):
    output_type = "generate"
    metrics: ClassVar[dict[str, bool]] = {"exact_match": True, "f1": True}
    max_new_tokens: ClassVar[int] = 32
    prompt_settings: ClassVar[dict[str, Any]] = {
        "version": "SQuAD v1.1 dev", "num_fewshot": 0,
        "template": "Title: {title}\\n\\nBackground: {context}\\n\\nQuestion: {question}\\n\\nAnswer:",
        "title": "underscores replaced by spaces", "stop": ["\\n"], "greedy": True, "max_new_tokens": 32,
        "metrics": "official v1.1 normalisation; EM and token F1, max over gold answers; fractions in [0, 1]",
    }

    @staticmethod
    def prompt(doc: dict) -> str:
        title = doc["title"].replace("_", " ")
        return f"Title: {title}\n\nBackground: {doc['context']}\n\nQuestion: {doc['question']}\n\nAnswer:"

    def requests(self, doc: dict) -> list[GenerationRequest]:
        return [GenerationRequest(self.prompt(doc), sampling_params(max_new_tokens=self.max_new_tokens, stop=["\n"]))]

    def process_results(self, doc: dict, results: list) -> dict[str, float]:
        prediction = truncate_at_stops(str(results[0]), ["\n"]).strip()
        return squad_scores(prediction, doc["answers"])

    def aggregate(self, per_doc: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
        return {m: mean_and_stderr([d[m] for d in per_doc]) for m in self.metrics}

    def load_docs(self, data_dir: Path | None, limit: int | None) -> list[dict]:
        if data_dir is None:
            raise PhibookError(f"{self.name}: no benchmark folder given (phibook reads local files only; "
                               "pass --data-dir DIR or set $PHIBOOK_DATA_DIR)")
        path = locate(Path(data_dir), "squad", ["dev-v1.1.json"], self.name)
        return read_squad(path, limit)
