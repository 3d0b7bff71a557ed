"""The log-likelihood multiple-choice tasks of the report's Tables 2-3, as lm-evaluation-harness runs them.

Each choice is one `LoglikelihoodRequest(context, target_delimiter + choice)`; the
prediction is the choice with the highest summed log-probability (`acc`), or the highest
log-probability per character of the choice (`acc_norm`, the choice string without the
delimiter, as the harness divides). WinoGrande is the exception: the harness puts the
options into the context ("partial evaluation") and scores the text after the blank.

Prompts are copied from the harness's task YAMLs (lm-eval 0.4.x):
  arc_*       "Question: {question}\\nAnswer:"            choices: the answer texts
  boolq       "{passage}\\nQuestion: {question}?\\nAnswer:" choices: "no", "yes"
  siqa        "Q: {context} {question}\\nA:"              choices: answerA-C     (acc only)
  piqa        "Question: {goal}\\nAnswer:"                choices: sol1, sol2
  hellaswag   preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
  openbookqa  "{question_stem}"                          choices: the answer texts
  winogrande  sentence[:blank] + option  ->  " " + sentence[blank+1:].strip()  (acc only)
  mmlu        "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
              + 2 dev examples "{q}\\nA. ..\\nD. ..\\nAnswer: X\\n\\n" + the question; choices " A".." D"
"""

from __future__ import annotations

import bz2
import re
from pathlib import Path
from typing import Any, ClassVar

from phibook.errors import PhibookError
from phibook.eval.loaders import (
    field,
    first_existing,
    hf_rows,
    read_csv_rows,
    read_jsonl,
    read_labels,
    task_folder,
)
from phibook.eval.task import LoglikelihoodRequest, Task, mean_and_stderr, register


def argmax(values: list[float]) -> int:
    """Index of the first maximum, as numpy.argmax picks it."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


class MultipleChoiceTask(Task):
    """A question with choices; docs are dicts with at least "choices" (list[str]) and "gold" (int)."""

    output_type = "loglikelihood"
    metrics: ClassVar[dict[str, bool]] = {"acc": True, "acc_norm": True}
    target_delimiter: ClassVar[str] = " "
    folder: ClassVar[str] = ""

    def doc_to_text(self, doc: dict) -> str:
        raise NotImplementedError

    def context(self, doc: dict) -> str:
        return self.doc_to_text(doc)

    def requests(self, doc: dict) -> list[LoglikelihoodRequest]:
        ctx = self.context(doc)
        return [LoglikelihoodRequest(ctx, self.target_delimiter + choice) for choice in doc["choices"]]

    def process_results(self, doc: dict, results: list) -> dict[str, float]:
        lls = [float(r[0]) for r in results]
        gold = doc["gold"]
        out = {"acc": float(argmax(lls) == gold)}
        if "acc_norm" in self.metrics:
            # The harness divides by len(choice) in characters, the delimiter not counted.
            normed = [ll / float(len(c)) for ll, c in zip(lls, doc["choices"], strict=True)]
            out["acc_norm"] = float(argmax(normed) == gold)
        return out

    def load_docs(self, data_dir: Path | None, limit: int | None) -> list[dict]:
        if data_dir is None:
            return self.load_hf(limit)
        return self.load_files(task_folder(Path(data_dir), self.folder, self.name), limit)

    def load_files(self, folder: Path, limit: int | None) -> list[dict]:
        raise NotImplementedError

    def load_hf(self, limit: int | None) -> list[dict]:
        raise PhibookError(f"{self.name}: no Hugging Face route; pass --data-dir")


def check_gold(gold: int, n: int, path: Path | str, line: Any) -> int:
    if not 0 <= gold < n:
        raise PhibookError(f"{path}:{line}: answer index {gold} is out of range for {n} choices")
    return gold


# --------------------------------------------------------------------------- ARC


class ArcTask(MultipleChoiceTask):
    filename: ClassVar[str] = ""
    hf_name: ClassVar[str] = ""
    prompt_settings: ClassVar[dict[str, Any]] = {
        "num_fewshot": 0,
        "template": "Question: {question}\\nAnswer:",
        "target_delimiter": " ",
        "split": "test",
    }

    def doc_to_text(self, doc: dict) -> str:
        return f"Question: {doc['question']}\nAnswer:"

    def load_files(self, folder: Path, limit: int | None) -> list[dict]:
        path = first_existing(folder, [self.filename], self.name)
        docs = []
        for row in read_jsonl(path, limit):
            q = field(row, "question", path, dict)
            stem = field(q, "stem", path)
            choices = field(q, "choices", path, list)
            texts = [c["text"] for c in choices]
            labels = [c["label"] for c in choices]
            docs.append(self._doc(row.get("id"), stem, texts, labels, field(row, "answerKey", path), path, row["_line"]))
        return docs

    def _doc(self, id_, stem, texts, labels, key, path, line) -> dict:
        # answerKey is a label ("A".."E" or "1".."5"); look it up, as the harness does.
        if key not in labels:
            raise PhibookError(f"{path}:{line}: answerKey {key!r} is not among the choice labels {labels}")
        return {"id": id_, "question": stem, "choices": texts, "gold": labels.index(key)}

    def load_hf(self, limit: int | None) -> list[dict]:
        rows = hf_rows("allenai/ai2_arc", self.hf_name, "test", limit)
        return [
            self._doc(r["id"], r["question"], r["choices"]["text"], r["choices"]["label"], r["answerKey"], "hf", r["_line"])
            for r in rows
        ]


@register("arc_easy")
class ArcEasy(ArcTask):
    folder = "arc_easy"
    filename = "ARC-Easy-Test.jsonl"
    hf_name = "ARC-Easy"


@register("arc_challenge")
class ArcChallenge(ArcTask):
    folder = "arc_challenge"
    filename = "ARC-Challenge-Test.jsonl"
    hf_name = "ARC-Challenge"


# --------------------------------------------------------------------------- BoolQ


@register("boolq")
class BoolQ(MultipleChoiceTask):
    folder = "boolq"
    metrics: ClassVar[dict[str, bool]] = {"acc": True}
    prompt_settings: ClassVar[dict[str, Any]] = {
        "num_fewshot": 0,
        "template": "{passage}\\nQuestion: {question}?\\nAnswer:",
        "choices": ["no", "yes"],
        "target_delimiter": " ",
        "split": "validation",
    }

    def doc_to_text(self, doc: dict) -> str:
        return f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"

    def load_files(self, folder: Path, limit: int | None) -> list[dict]:
        # SuperGLUE's val.jsonl has "label"; google's original dev.jsonl has "answer" (and "title").
        path = first_existing(folder, ["val.jsonl", "dev.jsonl"], self.name)
        docs = []
        for row in read_jsonl(path, limit):
            key = "label" if "label" in row else "answer"
            # booleans in google's file; the SuperGLUE copy here stores the strings "true"/"false".
            label = field(row, key, path, (bool, str))
            if isinstance(label, str):
                if label.lower() not in {"true", "false"}:
                    raise PhibookError(f"{path}:{row['_line']}: {key} {label!r} should be true or false")
                label = label.lower() == "true"
            docs.append(
                {
                    "id": row.get("idx", row["_line"] - 1),
                    "passage": field(row, "passage", path),
                    "question": field(row, "question", path),
                    "choices": ["no", "yes"],
                    "gold": int(label),
                }
            )
        return docs

    def load_hf(self, limit: int | None) -> list[dict]:
        rows = hf_rows("aps/super_glue", "boolq", "validation", limit)
        return [
            {"id": r["idx"], "passage": r["passage"], "question": r["question"], "choices": ["no", "yes"],
             "gold": int(r["label"])}
            for r in rows
        ]


# --------------------------------------------------------------------------- SIQA


@register("siqa")
class SocialIQA(MultipleChoiceTask):
    folder = "siqa"
    metrics: ClassVar[dict[str, bool]] = {"acc": True}
    prompt_settings: ClassVar[dict[str, Any]] = {
        "num_fewshot": 0,
        "template": "Q: {context} {question}\\nA:",
        "choices": ["answerA", "answerB", "answerC"],
        "target_delimiter": " ",
        "split": "dev",
        "harness_task": "social_iqa",
    }

    def doc_to_text(self, doc: dict) -> str:
        return f"Q: {doc['context']} {doc['question']}\nA:"

    def _doc(self, row: dict, label: str, path: Path | str) -> dict:
        choices = [field(row, k, path) for k in ("answerA", "answerB", "answerC")]
        return {
            "context": field(row, "context", path),
            "question": field(row, "question", path),
            "choices": choices,
            "gold": check_gold(int(label) - 1, 3, path, row["_line"]),
        }

    def load_files(self, folder: Path, limit: int | None) -> list[dict]:
        path = first_existing(folder, ["dev.jsonl"], self.name)
        labels_path = first_existing(folder, ["dev-labels.lst"], self.name)
        rows = read_jsonl(path, limit)
        labels = read_labels(labels_path, len(rows), {"1", "2", "3"})
        return [self._doc(row, label, path) for row, label in zip(rows, labels, strict=True)]

    def load_hf(self, limit: int | None) -> list[dict]:
        return [self._doc(r, r["label"], "hf") for r in hf_rows("allenai/social_i_qa", None, "validation", limit)]


# --------------------------------------------------------------------------- PIQA


@register("piqa")
class PIQA(MultipleChoiceTask):
    folder = "piqa"
    prompt_settings: ClassVar[dict[str, Any]] = {
        "num_fewshot": 0,
        "template": "Question: {goal}\\nAnswer:",
        "choices": ["sol1", "sol2"],
        "target_delimiter": " ",
        "split": "valid",
    }

    def doc_to_text(self, doc: dict) -> str:
        return f"Question: {doc['goal']}\nAnswer:"

    def _doc(self, row: dict, label: int, path: Path | str) -> dict:
        return {
            "goal": field(row, "goal", path),
            "choices": [field(row, "sol1", path), field(row, "sol2", path)],
            "gold": check_gold(label, 2, path, row["_line"]),
        }

    def load_files(self, folder: Path, limit: int | None) -> list[dict]:
        path = first_existing(folder, ["valid.jsonl"], self.name)
        labels_path = first_existing(folder, ["valid-labels.lst"], self.name)
        rows = read_jsonl(path, limit)
        labels = read_labels(labels_path, len(rows), {"0", "1"})
        return [self._doc(row, int(label), path) for row, label in zip(rows, labels, strict=True)]

    def load_hf(self, limit: int | None) -> list[dict]:
        return [self._doc(r, int(r["label"]), "hf") for r in hf_rows("baber/piqa", None, "validation", limit)]


# --------------------------------------------------------------------------- HellaSwag


def hellaswag_preprocess(text: str) -> str:
    """The harness's preprocess(): WikiHow bracket artefacts out, " [title]" -> ". "."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


@register("hellaswag")
class HellaSwag(MultipleChoiceTask):
    folder = "hellaswag"
    prompt_settings: ClassVar[dict[str, Any]] = {
        "num_fewshot": 0,
        "template": 'preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())',
        "choices": "preprocess(ending) for the four endings",
        "target_delimiter": " ",
        "split": "validation",
    }

    def doc_to_text(self, doc: dict) -> str:
        return doc["query"]

    def _from_original(self, row: dict, path: Path | str) -> dict:
        ctx = field(row, "ctx_a", path) + " " + field(row, "ctx_b", path).capitalize()
        endings = field(row, "endings", path, list)
        return {
            "query": hellaswag_preprocess(field(row, "activity_label", path) + ": " + ctx),
            "choices": [hellaswag_preprocess(e) for e in endings],
            "gold": check_gold(int(field(row, "label", path, (int, str))), len(endings), path, row["_line"]),
        }

    def load_files(self, folder: Path, limit: int | None) -> list[dict]:
        path = first_existing(folder, ["hellaswag_val.jsonl", "hellaswag_val_full.txt.bz2", "hellaswag_val_full.txt"],
                              self.name)
        if path.name == "hellaswag_val.jsonl":
            return [self._from_original(row, path) for row in read_jsonl(path, limit)]
        return read_hellaswag_text(path, limit)

    def load_hf(self, limit: int | None) -> list[dict]:
        return [self._from_original(r, "hf") for r in hf_rows("Rowan/hellaswag", None, "validation", limit)]


def read_hellaswag_text(path: Path, limit: int | None) -> list[dict]:
    """klosax's derived layout: 6 lines per item (query, gold, 4 endings), already preprocessed.

    The file joined ctx_a and ctx_b without the harness's ctx_b.capitalize(), and that split is
    lost, so queries can differ from the harness's in the case of one word (see docs/eval.md).
    """
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise PhibookError(f"{path}: {len(lines)} lines is not a multiple of 6 (query, label, 4 endings per item)")
    docs = []
    for start in range(0, len(lines), 6):
        label = lines[start + 1].strip()
        if label not in {"0", "1", "2", "3"}:
            raise PhibookError(f"{path}:{start + 2}: label {label!r} should be 0-3 (6 lines per item)")
        docs.append({"query": lines[start], "choices": lines[start + 2 : start + 6], "gold": int(label)})
        if limit is not None and len(docs) >= limit:
            break
    return docs


# --------------------------------------------------------------------------- OpenBookQA


@register("openbookqa")
class OpenBookQA(MultipleChoiceTask):
    folder = "openbookqa"
    prompt_settings: ClassVar[dict[str, Any]] = {
        "num_fewshot": 0,
        "template": "{question_stem}",
        "target_delimiter": " ",
        "split": "test (main)",
    }

    def doc_to_text(self, doc: dict) -> str:
        return doc["question_stem"]

    def load_files(self, folder: Path, limit: int | None) -> list[dict]:
        path = first_existing(folder, ["Main/test.jsonl", "test.jsonl", "openbook_qa.llmfoundry.jsonl",
                                       "openbook_qa.jsonl"], self.name)
        docs = []
        for row in read_jsonl(path, limit):
            if "question" in row:  # the original AI2 layout
                q = field(row, "question", path, dict)
                choices = field(q, "choices", path, list)
                labels = [c["label"] for c in choices]
                key = field(row, "answerKey", path).lstrip()
                if key not in labels:
                    raise PhibookError(f"{path}:{row['_line']}: answerKey {key!r} is not among the labels {labels}")
                docs.append({"id": row.get("id"), "question_stem": field(q, "stem", path),
                             "choices": [c["text"] for c in choices], "gold": labels.index(key)})
            else:  # llm-foundry's {query, choices, gold}
                choices = field(row, "choices", path, list)
                docs.append({"question_stem": field(row, "query", path), "choices": choices,
                             "gold": check_gold(field(row, "gold", path, int), len(choices), path, row["_line"])})
        return docs

    def load_hf(self, limit: int | None) -> list[dict]:
        docs = []
        for r in hf_rows("allenai/openbookqa", "main", "test", limit):
            labels = r["choices"]["label"]
            docs.append({"id": r["id"], "question_stem": r["question_stem"], "choices": r["choices"]["text"],
                         "gold": labels.index(r["answerKey"].lstrip())})
        return docs


# --------------------------------------------------------------------------- WinoGrande


@register("winogrande")
class WinoGrande(MultipleChoiceTask):
    folder = "winogrande"
    metrics: ClassVar[dict[str, bool]] = {"acc": True}
    prompt_settings: ClassVar[dict[str, Any]] = {
        "num_fewshot": 0,
        "template": "partial evaluation: context = sentence[:blank] + option, "
        "continuation = ' ' + sentence[blank+1:].strip()",
        "target_delimiter": " ",
        "split": "dev (winogrande_xl validation)",
    }

    @staticmethod
    def partial_contexts(doc: dict) -> list[str]:
        idx = doc["sentence"].index("_")
        return [doc["sentence"][:idx] + opt for opt in doc["options"]]

    @staticmethod
    def suffix(doc: dict) -> str:
        idx = doc["sentence"].index("_") + 1
        return doc["sentence"][idx:].strip()

    def requests(self, doc: dict) -> list[LoglikelihoodRequest]:
        cont = self.target_delimiter + self.suffix(doc)
        return [LoglikelihoodRequest(ctx, cont) for ctx in self.partial_contexts(doc)]

    def _doc(self, row: dict, answer: str, path: Path | str) -> dict:
        sentence = field(row, "sentence", path)
        if "_" not in sentence:
            raise PhibookError(f"{path}:{row['_line']}: sentence has no '_' blank")
        options = [field(row, "option1", path), field(row, "option2", path)]
        if answer not in {"1", "2"}:
            raise PhibookError(f"{path}:{row['_line']}: answer {answer!r} should be '1' or '2'")
        return {"id": row.get("qID"), "sentence": sentence, "options": options, "choices": options,
                "gold": int(answer) - 1}

    def load_files(self, folder: Path, limit: int | None) -> list[dict]:
        path = first_existing(folder, ["dev.jsonl"], self.name)
        rows = read_jsonl(path, limit)
        if (folder / "dev-labels.lst").is_file():
            labels = read_labels(folder / "dev-labels.lst", len(rows), {"1", "2"})
        else:
            labels = [str(field(row, "answer", path)) for row in rows]
        return [self._doc(row, label, path) for row, label in zip(rows, labels, strict=True)]

    def load_hf(self, limit: int | None) -> list[dict]:
        return [self._doc(r, r["answer"], "hf") for r in hf_rows("allenai/winogrande", "winogrande_xl", "validation",
                                                                  limit)]


# --------------------------------------------------------------------------- MMLU

MMLU_SUBJECTS = [
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics",
    "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality", "international_law",
    "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing", "medical_genetics",
    "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy", "prehistory",
    "professional_accounting", "professional_law", "professional_medicine", "professional_psychology",
    "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology", "world_religions",
]
MMLU_LETTERS = ["A", "B", "C", "D"]


@register("mmlu")
class MMLU(MultipleChoiceTask):
    """All 57 subjects, 2-shot (the first two dev rows of the subject, the harness's first_n sampler).

    `acc` is over all questions (the harness's group score, weighted by subject size);
    `acc_subject_avg` is the unweighted mean of subject accuracies; `acc:<subject>` per subject.
    --limit applies per subject, as the harness applies it per subtask.
    """

    folder = "mmlu"
    metrics: ClassVar[dict[str, bool]] = {"acc": True}
    num_fewshot: ClassVar[int] = 2
    subjects: ClassVar[list[str]] = MMLU_SUBJECTS
    prompt_settings: ClassVar[dict[str, Any]] = {
        "num_fewshot": 2,
        "fewshot_split": "dev (first 2 rows)",
        "description": "The following are multiple choice questions (with answers) about {subject}.\\n\\n",
        "template": "{question.strip()}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer:",
        "choices": [" A", " B", " C", " D"],
        "fewshot_delimiter": "\\n\\n",
        "split": "test",
    }

    def doc_to_text(self, doc: dict) -> str:
        c = doc["options"]
        return f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"

    def context(self, doc: dict) -> str:
        description = f"The following are multiple choice questions (with answers) about {doc['subject'].replace('_', ' ')}.\n\n"
        shots = "".join(
            self.doc_to_text(s) + self.target_delimiter + MMLU_LETTERS[s["gold"]] + "\n\n" for s in doc["fewshot"]
        )
        return description + shots + self.doc_to_text(doc)

    @staticmethod
    def _doc(subject: str, question: str, options: list[str], answer: str, path: Path | str, line: Any) -> dict:
        if answer not in MMLU_LETTERS:
            raise PhibookError(f"{path}:{line}: answer {answer!r} should be one of A-D")
        return {"subject": subject, "question": question, "options": options, "choices": list(MMLU_LETTERS),
                "gold": MMLU_LETTERS.index(answer)}

    def load_files(self, folder: Path, limit: int | None) -> list[dict]:
        docs = []
        for subject in self.subjects:
            dev = first_existing(folder / "dev", [f"{subject}_dev.csv"], self.name)
            test = first_existing(folder / "test", [f"{subject}_test.csv"], self.name)
            shots = [self._doc(subject, r[0], r[1:5], r[5].strip(), dev, i + 1)
                     for i, r in enumerate(read_csv_rows(dev, 6, self.num_fewshot))]
            for i, r in enumerate(read_csv_rows(test, 6, limit)):
                doc = self._doc(subject, r[0], r[1:5], r[5].strip(), test, i + 1)
                doc["fewshot"] = shots
                docs.append(doc)
        return docs

    def load_hf(self, limit: int | None) -> list[dict]:
        docs = []
        for subject in self.subjects:
            shots = [self._doc(subject, r["question"], r["choices"], MMLU_LETTERS[r["answer"]], "hf", r["_line"])
                     for r in hf_rows("cais/mmlu", subject, "dev", self.num_fewshot)]
            for r in hf_rows("cais/mmlu", subject, "test", limit):
                doc = self._doc(subject, r["question"], r["choices"], MMLU_LETTERS[r["answer"]], "hf", r["_line"])
                doc["fewshot"] = shots
                docs.append(doc)
        return docs

    def aggregate(self, per_doc: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
        out = {"acc": mean_and_stderr([d["acc"] for d in per_doc])}
        by_subject: dict[str, list[float]] = {}
        for d in per_doc:
            by_subject.setdefault(d["subject"], []).append(d["acc"])
        subject_means = {s: mean_and_stderr(v) for s, v in sorted(by_subject.items())}
        if len(subject_means) > 1:
            out["acc_subject_avg"] = mean_and_stderr([m for m, _ in subject_means.values()])
        for s, m in subject_means.items():
            out[f"acc:{s}"] = m
        return out

    def process_results(self, doc: dict, results: list) -> dict[str, float]:
        out = super().process_results(doc, results)
        out["subject"] = doc["subject"]  # type: ignore[assignment]  # carried for aggregate()
        return out


def _mmlu_subject_task(subject: str) -> type[MMLU]:
    cls = type(f"MMLU_{subject}", (MMLU,), {"subjects": [subject], "__doc__": f"MMLU {subject}, 2-shot."})
    return register(f"mmlu_{subject}")(cls)


for _subject in MMLU_SUBJECTS:
    _mmlu_subject_task(_subject)
