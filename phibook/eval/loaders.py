"""Readers for benchmark files: JSONL, label lists, CSV, and the optional Hugging Face `datasets` route.

Every reader raises PhibookError naming the file (and line) at fault, so a truncated
download or a file in the wrong layout says exactly what is wrong and where.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from phibook.errors import PhibookError

# Where the published files live; quoted in "missing file" errors.
SOURCE_HINTS = {
    "arc_easy": "ARC-Easy-Test.jsonl from the AI2 ARC release (https://allenai.org/data/arc), ARC-V1-Feb2018/ARC-Easy/",
    "arc_challenge": "ARC-Challenge-Test.jsonl from the AI2 ARC release (https://allenai.org/data/arc), "
    "ARC-V1-Feb2018/ARC-Challenge/",
    "boolq": "the SuperGLUE BoolQ val.jsonl (https://super.gluebenchmark.com/tasks) "
    "or google's dev.jsonl (https://github.com/google-research-datasets/boolean-questions)",
    "siqa": "dev.jsonl + dev-labels.lst from socialiqa-train-dev.zip (https://leaderboard.allenai.org/socialiqa)",
    "piqa": "valid.jsonl + valid-labels.lst (https://yonatanbisk.com/piqa/data/)",
    "hellaswag": "hellaswag_val.jsonl (https://github.com/rowanz/hellaswag/tree/master/data) "
    "or hellaswag_val_full.txt.bz2 (https://github.com/klosax/hellaswag_text_data)",
    "openbookqa": "Main/test.jsonl from the OpenBookQA release (https://allenai.org/data/open-book-qa) "
    "or llm-foundry's openbook_qa.jsonl",
    "winogrande": "dev.jsonl + dev-labels.lst from winogrande_1.1 (https://winogrande.allenai.org)",
    "mmlu": "the dev/ and test/ CSV folders of https://people.eecs.berkeley.edu/~hendrycks/data.tar",
}


def data_dir_from_env(value: str | os.PathLike | None) -> Path | None:
    """--data-dir, else $PHIBOOK_DATA_DIR; None when neither is set."""
    value = value or os.environ.get("PHIBOOK_DATA_DIR")
    return Path(value) if value else None


def task_folder(data_dir: Path, folder: str, task: str) -> Path:
    path = data_dir / folder
    if not path.is_dir():
        hint = SOURCE_HINTS.get(task, "")
        raise PhibookError(
            f"{task}: data folder {path} not found (expected under --data-dir {data_dir}, "
            f"laid out one folder per task){'; get ' + hint if hint else ''}"
        )
    return path


def first_existing(folder: Path, names: Iterable[str], task: str) -> Path:
    """The first of `names` present in `folder`; an error listing all of them otherwise."""
    names = list(names)
    for name in names:
        if (folder / name).is_file():
            return folder / name
    hint = SOURCE_HINTS.get(task, "")
    raise PhibookError(
        f"{task}: none of {', '.join(names)} found in {folder}{'; get ' + hint if hint else ''}"
    )


def read_jsonl(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """One JSON object a line (gzip-compressed when the name ends in .gz); blank lines
    skipped. `limit` stops early. Errors name the file and line."""
    rows: list[dict[str, Any]] = []
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise PhibookError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise PhibookError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                row["_line"] = lineno
                rows.append(row)
                if limit is not None and len(rows) >= limit:
                    break
    except (gzip.BadGzipFile, EOFError) as exc:
        raise PhibookError(f"{path}: cannot read as gzip ({exc})") from None
    return rows


def read_labels(path: Path, n: int, allowed: set[str]) -> list[str]:
    """A .lst file of one label a line, checked against `allowed`; must have at least `n` lines."""
    labels: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            value = line.strip()
            if not value:
                continue
            if value not in allowed:
                raise PhibookError(f"{path}:{lineno}: label {value!r} is not one of {sorted(allowed)}")
            labels.append(value)
            if len(labels) >= n:
                break
    if len(labels) < n:
        raise PhibookError(f"{path}: {len(labels)} labels for {n} rows; the label file must align line by line")
    return labels


def field(row: dict, name: str, path: Path, kind: type | tuple[type, ...] = str) -> Any:
    """row[name], checked for presence and type, with the file and line in the error."""
    if name not in row:
        raise PhibookError(f"{path}:{row.get('_line', '?')}: missing field {name!r}")
    value = row[name]
    if not isinstance(value, kind):
        raise PhibookError(
            f"{path}:{row.get('_line', '?')}: field {name!r} should be {getattr(kind, '__name__', kind)}, "
            f"got {type(value).__name__}"
        )
    return value


def read_csv_rows(path: Path, n_cols: int, limit: int | None = None) -> list[list[str]]:
    """Headerless CSV (MMLU): quoted fields with embedded newlines, so a real CSV parser."""
    rows: list[list[str]] = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        for row in reader:
            if not row:
                continue
            if len(row) != n_cols:
                raise PhibookError(f"{path}:{reader.line_num}: expected {n_cols} columns, got {len(row)}")
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    return rows


def hf_rows(path: str, name: str | None, split: str, limit: int | None) -> list[dict[str, Any]]:
    """Rows of a Hugging Face hub dataset (needs the optional `datasets` package and network)."""
    try:
        import datasets
    except ImportError:
        raise PhibookError(
            "reading benchmarks from the Hugging Face hub needs the `datasets` package "
            "(pip install datasets); or pass --data-dir with local files"
        ) from None
    try:
        ds = datasets.load_dataset(path, name, split=split)
    except Exception as exc:  # network, auth, unknown config: all user-fixable
        raise PhibookError(f"could not load {path}{'/' + name if name else ''} split {split} from the hub: {exc}") from exc
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return [dict(row, _line=i + 1) for i, row in enumerate(ds)]
