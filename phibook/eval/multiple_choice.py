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

Each task reads the original release's files or a Hugging Face hub copy of the same split (parquet,
jsonl or json; the hub's tree or a flat folder of files named by split): `MultipleChoiceTask.locate`
finds the files, each `load_files` detects the row layout from the rows, and `data_source` names it
("hf-parquet", "ai2-jsonl", ...). Every layout gives the same documents (tests/test_eval_layouts.py).
"""

from __future__ import annotations

import bz2
import re
from pathlib import Path
from typing import Any, ClassVar

from phibook.errors import PhibookError
from phibook.eval.loaders import (
    SOURCE_HINTS,
    DataSource,
    data_format,
    describe_value,
    field,
    find_split_files,
    first_existing,
    label_index,
    read_csv_rows,
    read_labels,
    read_rows,
    task_folder,
    where,
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

    # Where the evaluated split is: the original release's file names (first found wins), else a
    # Hugging Face copy of split `splits[0]` (or an alias) in the task folder; `hub_prefer`/`hub_avoid`
    # pick the config folder when a whole hub repo is there (ARC-Easy vs ARC-Challenge).
    original_names: ClassVar[list[str]] = []
    splits: ClassVar[list[str]] = []
    hub_example: ClassVar[str] = ""
    hub_prefer: ClassVar[list[str]] = []
    hub_avoid: ClassVar[list[str]] = []

    # What load_docs found: the layout and its files (reported by `phibook eval`, kept in the results JSON).
    data_source: DataSource | None = None

    def load_docs(self, data_dir: Path | None, limit: int | None) -> list[dict]:
        if data_dir is None:
            raise PhibookError(f"{self.name}: no benchmark folder given (phibook reads local files only; "
                               "pass --data-dir DIR or set $PHIBOOK_DATA_DIR)")
        return self.load_files(task_folder(Path(data_dir), self.folder, self.name), limit)

    def load_files(self, folder: Path, limit: int | None) -> list[dict]:
        raise NotImplementedError

    def locate(self, folder: Path) -> tuple[list[Path], bool]:
        """(files of the evaluated split, True when found under an original release name)."""
        for name in self.original_names:
            if (folder / name).is_file():
                return [folder / name], True
        files = find_split_files(folder, self.splits, self.name, self.hub_prefer, self.hub_avoid)
        if files:
            return files, False
        hint = SOURCE_HINTS.get(self.name, "")
        raise PhibookError(
            f"{self.name}: none of {', '.join(self.original_names)} found in {folder}, nor a Hugging Face copy of "
            f"the {self.splits[0]} split ({self.splits[0]}.jsonl, {self.splits[0]}.parquet"
            f"{', ' + self.hub_example if self.hub_example else ''}, ...){'; get ' + hint if hint else ''}"
        )

    def found(self, layout: str, files: list[Path]) -> None:
        self.data_source = DataSource(layout, list(files))


def check_gold(gold: int, n: int, path: Path | str, line: Any) -> int:
    if not 0 <= gold < n:
        raise PhibookError(f"{path}:{line}: answer index {gold} is out of range for {n} choices")
    return gold


def labels_beside(data: Path, name: str, task: str) -> Path:
    """The release's label file next to its data file (whose rows carry no "label")."""
    if (data.parent / name).is_file():
        return data.parent / name
    hint = SOURCE_HINTS.get(task, "")
    raise PhibookError(f"{task}: the rows of {data} have no \"label\" field (the hub's layout) and none of {name} "
                       f"found in {data.parent} (the release keeps labels there, line by line)"
                       f"{'; get ' + hint if hint else ''}")


def fields_of(row: dict) -> str:
    return ", ".join(k for k in row if not k.startswith("_")) or "none"


def arc_schema(row: dict, path: Path, task: str) -> str:
    """"ai2" (the release's jsonl: question {stem, choices}) or "hf" (allenai/ai2_arc: question a string)."""
    question = row.get("question")
    if isinstance(question, dict):
        return "ai2"
    if isinstance(question, str) and isinstance(row.get("choices"), dict):
        return "hf"
    raise PhibookError(
        f"{where(row, path)}: not an ARC row in a layout phibook knows: expected \"question\" as an object with "
        "\"stem\" and \"choices\" (AI2's release) or \"question\" as a string with \"choices\" {text, label} "
        f"(the hub's allenai/ai2_arc); found fields {fields_of(row)}"
    )


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

    splits: ClassVar[list[str]] = ["test"]

    def load_files(self, folder: Path, limit: int | None) -> list[dict]:
        files, _ = self.locate(folder)
        rows = read_rows(files, limit)
        schema = arc_schema(rows[0], files[0], self.name) if rows else "ai2"
        docs = []
        for row in rows:
            path = row["_path"]
            if schema == "ai2":  # {"question": {"stem", "choices": [{text, label}]}, "answerKey"}
                q = field(row, "question", path, dict)
                stem = field(q, "stem", path, line=row["_line"])
                choices = field(q, "choices", path, list, line=row["_line"])
                texts = [field(c, "text", path, line=row["_line"]) for c in choices]
                labels = [field(c, "label", path, line=row["_line"]) for c in choices]
            else:  # hub: {"question": str, "choices": {"text": [...], "label": [...]}, "answerKey"}
                stem = field(row, "question", path)
                choices = field(row, "choices", path, dict)
                texts = field(choices, "text", path, list, line=row["_line"])
                labels = field(choices, "label", path, list, line=row["_line"])
            docs.append(self._doc(row.get("id"), stem, texts, labels, field(row, "answerKey", path), path, row["_line"]))
        self.found(f"{schema}-{data_format(files[0])}", files)
        return docs

    def _doc(self, id_, stem, texts, labels, key, path, line) -> dict:
        # answerKey is a label ("A".."E" or "1".."5"); look it up, as the harness does.
        if len(texts) != len(labels):
            raise PhibookError(f"{path}:{line}: {len(texts)} choice texts but {len(labels)} labels")
        if key not in labels:
            raise PhibookError(f"{path}:{line}: answerKey {key!r} is not among the choice labels {labels}")
        return {"id": id_, "question": stem, "choices": list(texts), "gold": labels.index(key)}


@register("arc_easy")
class ArcEasy(ArcTask):
    folder = "arc_easy"
    filename = "ARC-Easy-Test.jsonl"
    original_names: ClassVar[list[str]] = ["ARC-Easy-Test.jsonl"]
    hf_name = "ARC-Easy"
    hub_example = "ARC-Easy/test-00000-of-00001.parquet"
    hub_prefer: ClassVar[list[str]] = ["ARC-Easy"]
    hub_avoid: ClassVar[list[str]] = ["ARC-Challenge"]


@register("arc_challenge")
class ArcChallenge(ArcTask):
    folder = "arc_challenge"
    filename = "ARC-Challenge-Test.jsonl"
    original_names: ClassVar[list[str]] = ["ARC-Challenge-Test.jsonl"]
    hf_name = "ARC-Challenge"
    hub_example = "ARC-Challenge/test-00000-of-00001.parquet"
    hub_prefer: ClassVar[list[str]] = ["ARC-Challenge"]
    hub_avoid: ClassVar[list[str]] = ["ARC-Easy"]


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

    original_names: ClassVar[list[str]] = ["val.jsonl", "dev.jsonl"]
    splits: ClassVar[list[str]] = ["validation", "val", "dev"]
    hub_example = "boolq/validation-00000-of-00001.parquet"
    hub_prefer: ClassVar[list[str]] = ["boolq"]

    @staticmethod
    def label(row: dict, key: str, path: Path | str) -> bool:
        """true/false, "true"/"false" (any case) or 0/1 (the hub's class label: 0 = False, 1 = True)."""
        value = row.get(key)
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in {"true", "false"}:
            return value.strip().lower() == "true"
        if key not in row:
            raise PhibookError(f"{where(row, path)}: missing field 'label' (SuperGLUE, hub) or 'answer' (google's "
                               f"dev.jsonl); found fields {fields_of(row)}")
        raise PhibookError(f"{where(row, path)}: field {key!r} should be true/false, 0/1 or the string "
                           f"\"true\"/\"false\", got {describe_value(value)}")

    def load_files(self, folder: Path, limit: int | None) -> list[dict]:
        # SuperGLUE's val.jsonl has "label" (true/false, or "true"/"false" strings in the copy in
        # shared/benchmarks); the hub's super_glue/boolq has "label" 0/1; google's original dev.jsonl
        # (and the hub's google/boolq) has "answer" (and "title").
        files, original = self.locate(folder)
        rows = read_rows(files, limit)
        docs = []
        for row in rows:
            key = "label" if "label" in row else "answer"
            docs.append(
                {
                    "id": row.get("idx", len(docs)),
                    "passage": field(row, "passage", row["_path"]),
                    "question": field(row, "question", row["_path"]),
                    "choices": ["no", "yes"],
                    "gold": int(self.label(row, key, row["_path"])),
                }
            )
        first = rows[0] if rows else {}
        if "label" not in first and "answer" in first:
            schema = "google"
        elif isinstance(first.get("label"), int) and not isinstance(first.get("label"), bool):
            schema = "hf"
        else:
            schema = "superglue"
        self.found(f"{schema}-{data_format(files[0])}", files)
        return docs


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

    original_names: ClassVar[list[str]] = ["dev.jsonl"]
    splits: ClassVar[list[str]] = ["validation", "dev"]
    hub_example = "validation/0000.parquet"

    def _doc(self, row: dict, label: str, path: Path | str) -> dict:
        choices = [field(row, k, path) for k in ("answerA", "answerB", "answerC")]
        return {
            "context": field(row, "context", path),
            "question": field(row, "question", path),
            "choices": choices,
            "gold": check_gold(int(label) - 1, 3, path, row["_line"]),
        }

    def load_files(self, folder: Path, limit: int | None) -> list[dict]:
        # The AI2 release keeps labels (1-3) in dev-labels.lst; the hub's allenai/social_i_qa has
        # "label" ("1".."3") in each row.
        files, _ = self.locate(folder)
        rows = read_rows(files, limit)
        if rows and "label" in rows[0]:
            labels = [str(label_index(r, "label", r["_path"], ["answerA", "answerB", "answerC"], offset=1) + 1)
                      for r in rows]
            self.found(f"hf-{data_format(files[0])}", files)
        else:
            labels_path = labels_beside(files[0], "dev-labels.lst", self.name)
            labels = read_labels(labels_path, len(rows), {"1", "2", "3"})
            self.found(f"ai2-{data_format(files[0])}+labels", [*files, labels_path])
        return [self._doc(row, label, row["_path"]) for row, label in zip(rows, labels, strict=True)]


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

    original_names: ClassVar[list[str]] = ["valid.jsonl"]
    splits: ClassVar[list[str]] = ["validation", "valid", "dev"]
    hub_example = "plain_text/validation-00000-of-00001.parquet"

    def load_files(self, folder: Path, limit: int | None) -> list[dict]:
        # The release splits labels into valid-labels.lst (0 -> sol1, 1 -> sol2), line by line; the
        # hub's ybisk/piqa has "label" in each row.
        files, _ = self.locate(folder)
        rows = read_rows(files, limit)
        if rows and "label" in rows[0]:
            labels = [label_index(r, "label", r["_path"], ["sol1", "sol2"]) for r in rows]
            self.found(f"hf-{data_format(files[0])}", files)
        else:
            labels_path = labels_beside(files[0], "valid-labels.lst", self.name)
            labels = [int(x) for x in read_labels(labels_path, len(rows), {"0", "1"})]
            self.found(f"ybisk-{data_format(files[0])}+labels", [*files, labels_path])
        return [self._doc(row, label, row["_path"]) for row, label in zip(rows, labels, strict=True)]


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

    original_names: ClassVar[list[str]] = ["hellaswag_val.jsonl", "hellaswag_val_full.txt.bz2",
                                           "hellaswag_val_full.txt"]
    splits: ClassVar[list[str]] = ["validation", "val"]
    hub_example = "data/validation-00000-of-00001.parquet"

    def _from_original(self, row: dict, path: Path | str) -> dict:
        ctx = field(row, "ctx_a", path) + " " + field(row, "ctx_b", path).capitalize()
        endings = field(row, "endings", path, list)
        return {
            "query": hellaswag_preprocess(field(row, "activity_label", path) + ": " + ctx),
            "choices": [hellaswag_preprocess(e) for e in endings],
            # an integer in rowanz's hellaswag_val.jsonl, a string ("0".."3") on the hub
            "gold": label_index(row, "label", path, [f"ending {i}" for i in range(len(endings))]),
        }

    def load_files(self, folder: Path, limit: int | None) -> list[dict]:
        files, original = self.locate(folder)
        if files[0].name.startswith("hellaswag_val_full.txt"):
            self.found("klosax-text", files)
            return read_hellaswag_text(files[0], limit)
        docs = [self._from_original(row, row["_path"]) for row in read_rows(files, limit)]
        self.found(f"{'rowanz' if original else 'hf'}-{data_format(files[0])}", files)
        return docs


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

    original_names: ClassVar[list[str]] = ["Main/test.jsonl", "test.jsonl", "openbook_qa.llmfoundry.jsonl",
                                           "openbook_qa.jsonl"]
    splits: ClassVar[list[str]] = ["test"]
    hub_example = "main/test-00000-of-00001.parquet"
    hub_prefer: ClassVar[list[str]] = ["main"]

    def load_files(self, folder: Path, limit: int | None) -> list[dict]:
        files, _ = self.locate(folder)
        rows = read_rows(files, limit)
        schema = openbookqa_schema(rows[0], files[0]) if rows else "ai2"
        docs = []
        for row in rows:
            path, line = row["_path"], row["_line"]
            if schema == "llmfoundry":  # llm-foundry's {query, choices, gold}
                choices = field(row, "choices", path, list)
                docs.append({"question_stem": field(row, "query", path), "choices": choices,
                             "gold": check_gold(field(row, "gold", path, int), len(choices), path, line)})
                continue
            if schema == "ai2":  # the release: {"question": {"stem", "choices": [{text, label}]}, "answerKey"}
                q = field(row, "question", path, dict)
                stem = field(q, "stem", path, line=line)
                choices = field(q, "choices", path, list, line=line)
                texts = [field(c, "text", path, line=line) for c in choices]
                labels = [field(c, "label", path, line=line) for c in choices]
            else:  # the hub's allenai/openbookqa: {"question_stem", "choices": {"text": [..], "label": [..]}}
                stem = field(row, "question_stem", path)
                choices = field(row, "choices", path, dict)
                texts = field(choices, "text", path, list, line=line)
                labels = field(choices, "label", path, list, line=line)
            key = field(row, "answerKey", path).strip()
            if key not in labels:
                raise PhibookError(f"{path}:{line}: answerKey {key!r} is not among the labels {labels}")
            docs.append({"id": row.get("id"), "question_stem": stem, "choices": list(texts),
                         "gold": labels.index(key)})
        self.found(f"{schema}-{data_format(files[0])}", files)
        return docs


def openbookqa_schema(row: dict, path: Path) -> str:
    if isinstance(row.get("question"), dict):
        return "ai2"
    if "question_stem" in row:
        return "hf"
    if "query" in row:
        return "llmfoundry"
    raise PhibookError(
        f"{where(row, path)}: not an OpenBookQA row in a layout phibook knows: expected \"question\" {{stem, "
        "choices}} (AI2's release), \"question_stem\" with \"choices\" {text, label} (the hub's allenai/openbookqa) "
        f"or \"query\", \"choices\", \"gold\" (llm-foundry); found fields {fields_of(row)}"
    )


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

    original_names: ClassVar[list[str]] = ["dev.jsonl"]
    splits: ClassVar[list[str]] = ["validation", "dev"]
    hub_example = "winogrande_xl/validation-00000-of-00001.parquet"
    # Every hub config (xs .. xl, debiased) has the same 1267-row validation split; xl is lm-eval's.
    hub_prefer: ClassVar[list[str]] = ["winogrande_xl"]

    def _doc(self, row: dict, answer: int, path: Path | str) -> dict:
        sentence = field(row, "sentence", path)
        if "_" not in sentence:
            raise PhibookError(f"{where(row, path)}: sentence has no '_' blank")
        options = [field(row, "option1", path), field(row, "option2", path)]
        return {"id": row.get("qID"), "sentence": sentence, "options": options, "choices": options,
                "gold": answer}

    def load_files(self, folder: Path, limit: int | None) -> list[dict]:
        # "answer" is the string "1"/"2" in the release and on the hub, an integer in some copies;
        # the release's dev-labels.lst (when beside dev.jsonl) repeats it.
        files, original = self.locate(folder)
        rows = read_rows(files, limit)
        labels_path = files[0].parent / "dev-labels.lst"
        if original and labels_path.is_file():
            labels = [int(x) - 1 for x in read_labels(labels_path, len(rows), {"1", "2"})]
            self.found(f"ai2-{data_format(files[0])}+labels", [*files, labels_path])
        else:
            labels = [label_index(row, "answer", row["_path"], ["option1", "option2"], offset=1) for row in rows]
            self.found(f"{'ai2' if original else 'hf'}-{data_format(files[0])}", files)
        return [self._doc(row, label, row["_path"]) for row, label in zip(rows, labels, strict=True)]


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
        hendrycks = (folder / "dev").is_dir() and (folder / "test").is_dir()
        if not hendrycks and (any((folder / s).is_dir() for s in self.subjects) or self._hub_files(folder, "test")):
            return self.load_hub(folder, limit)
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
        self.found("hendrycks-csv", [folder / "dev", folder / "test"])
        return docs

    def _hub_files(self, folder: Path, split: str, subject: str | None = None) -> list[Path] | None:
        """A split of the hub's cais/mmlu: `<subject>/<split>-*.parquet`, else the `all` config (or a
        flat `<split>.parquet|jsonl` holding every subject, told apart by the "subject" field)."""
        if subject is not None and (folder / subject).is_dir():
            return find_split_files(folder / subject, [split], self.name)
        return find_split_files(folder, [split], self.name, prefer=["all"], avoid=[*MMLU_SUBJECTS, "auxiliary_train"])

    def _hub_rows(self, folder: Path, split: str, subject: str, limit: int | None,
                  cache: dict[tuple[Path, ...], list[dict]]) -> tuple[list[dict], list[Path]]:
        files = self._hub_files(folder, split, subject)
        if not files:
            raise PhibookError(f"{self.name}: no {split} split for {subject} in {folder} ({subject}/{split}-00000-of-"
                               f"00001.parquet or all/{split}-00000-of-00001.parquet); get the hub copy cais/mmlu "
                               f"or {SOURCE_HINTS['mmlu']}")
        if (folder / subject).is_dir():
            return read_rows(files, limit), files
        key = tuple(files)
        if key not in cache:
            cache[key] = read_rows(files)
        rows = [r for r in cache[key] if field(r, "subject", r["_path"]) == subject]
        return (rows if limit is None else rows[:limit]), files

    def _hub_doc(self, subject: str, row: dict) -> dict:
        path = row["_path"]
        options = field(row, "choices", path, list)
        if len(options) != 4:
            raise PhibookError(f"{where(row, path)}: {len(options)} choices; MMLU has 4 (A-D)")
        answer = row.get("answer")
        if isinstance(answer, str) and answer.strip() in MMLU_LETTERS:
            letter = answer.strip()
        else:
            letter = MMLU_LETTERS[label_index(row, "answer", path, MMLU_LETTERS)]
        return self._doc(subject, field(row, "question", path), options, letter, path, row["_line"])

    def load_hub(self, folder: Path, limit: int | None) -> list[dict]:
        docs: list[dict] = []
        cache: dict[tuple[Path, ...], list[dict]] = {}
        used: list[Path] = []
        for subject in self.subjects:
            dev_rows, dev_files = self._hub_rows(folder, "dev", subject, self.num_fewshot, cache)
            test_rows, test_files = self._hub_rows(folder, "test", subject, limit, cache)
            used += [f for f in [*test_files, *dev_files] if f not in used]
            shots = [self._hub_doc(subject, r) for r in dev_rows]
            for r in test_rows:
                doc = self._hub_doc(subject, r)
                doc["fewshot"] = shots
                docs.append(doc)
        self.found(f"hf-{data_format(used[0])}", used)
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
