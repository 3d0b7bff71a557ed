"""Readers for benchmark files: JSONL, JSON, parquet, label lists, CSV; and the search for a split's
files in the layouts people have (the original releases, and Hugging Face hub copies: the hub's
`<config>/<split>-00000-of-00001.parquet` tree, its `refs/convert/parquet` tree
`<config>/<split>/0000.parquet`, or a flat folder of files named by split, `test.jsonl`,
`validation.parquet`, ...). Nothing here downloads anything.

Every reader raises PhibookError naming the file (and line, or row for parquet) at fault, so a
truncated download or a file in the wrong layout says exactly what is wrong and where.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phibook.errors import PhibookError

# Where the published files live; quoted in "missing file" errors. Each task also reads the
# Hugging Face hub copy named last (downloaded by you: git clone / huggingface-cli download).
SOURCE_HINTS = {
    "arc_easy": "ARC-Easy-Test.jsonl from the AI2 ARC release (https://allenai.org/data/arc), ARC-V1-Feb2018/ARC-Easy/, "
    "or the hub copy allenai/ai2_arc (ARC-Easy/test-00000-of-00001.parquet)",
    "arc_challenge": "ARC-Challenge-Test.jsonl from the AI2 ARC release (https://allenai.org/data/arc), "
    "ARC-V1-Feb2018/ARC-Challenge/, or the hub copy allenai/ai2_arc (ARC-Challenge/test-00000-of-00001.parquet)",
    "boolq": "the SuperGLUE BoolQ val.jsonl (https://super.gluebenchmark.com/tasks) "
    "or google's dev.jsonl (https://github.com/google-research-datasets/boolean-questions), "
    "or the hub copy super_glue/boolq (boolq/validation-00000-of-00001.parquet)",
    "siqa": "dev.jsonl + dev-labels.lst from socialiqa-train-dev.zip (https://leaderboard.allenai.org/socialiqa), "
    "or the hub copy allenai/social_i_qa (validation split)",
    "piqa": "valid.jsonl + valid-labels.lst (https://yonatanbisk.com/piqa/data/), "
    "or the hub copy ybisk/piqa (validation split, label in each row)",
    "hellaswag": "hellaswag_val.jsonl (https://github.com/rowanz/hellaswag/tree/master/data) "
    "or hellaswag_val_full.txt.bz2 (https://github.com/klosax/hellaswag_text_data), "
    "or the hub copy Rowan/hellaswag (validation split)",
    "openbookqa": "Main/test.jsonl from the OpenBookQA release (https://allenai.org/data/open-book-qa) "
    "or llm-foundry's openbook_qa.jsonl, or the hub copy allenai/openbookqa (main/test-00000-of-00001.parquet)",
    "winogrande": "dev.jsonl + dev-labels.lst from winogrande_1.1 (https://winogrande.allenai.org), "
    "or the hub copy allenai/winogrande (winogrande_xl/validation-00000-of-00001.parquet)",
    "mmlu": "the dev/ and test/ CSV folders of https://people.eecs.berkeley.edu/~hendrycks/data.tar",
}


def task_folder(data_dir: Path, folder: str, task: str) -> Path:
    path = data_dir / folder
    if not path.is_dir():
        hint = SOURCE_HINTS.get(task, "")
        raise PhibookError(
            f"{task}: data folder {path} not found (expected in the benchmark folder {data_dir}, "
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


# How a person names a JSON/parquet value's type in an error message.
TYPE_WORDS: dict[type, str] = {
    bool: "true/false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
    type(None): "null",
}


def type_words(kind: type | tuple[type, ...]) -> str:
    """`(bool, str)` -> "true/false or a string"; `int` -> "an integer"."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    words = [TYPE_WORDS.get(k, k.__name__) for k in kinds]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def describe_value(value: Any) -> str:
    """`5` -> "an integer (5)", `"x"` -> 'a string ("x")', `[..]` -> "a list", as a person writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"true/false ({'true' if value else 'false'})"
    word = next((w for k, w in TYPE_WORDS.items() if k is not bool and isinstance(value, k)), type(value).__name__)
    if isinstance(value, int | float):
        return f"{word} ({value})"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"{word} ({json.dumps(shown, ensure_ascii=False)})"
    return word


def where(row: dict, path: Path | str, line: Any = None) -> str:
    """"file:line" for messages: the row's own file when the reader recorded one (sharded splits)."""
    return f"{row.get('_path', path)}:{line if line is not None else row.get('_line', '?')}"


def field(row: dict, name: str, path: Path | str, kind: type | tuple[type, ...] = str, line: Any = None) -> Any:
    """row[name], checked for presence and type, with the file and line (or row) in the error.
    `line` is for a nested object (which carries no line of its own)."""
    if not isinstance(row, dict) or name not in row:
        raise PhibookError(f"{where(row if isinstance(row, dict) else {}, path, line)}: missing field {name!r}")
    value = row[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple)
                                                                               else (kind,))):
        raise PhibookError(
            f"{where(row, path, line)}: field {name!r} should be {type_words(kind)}, got {describe_value(value)}"
        )
    return value


def label_index(row: dict, name: str, path: Path | str, names: list[str], offset: int = 0) -> int:
    """A class label given as an integer or its digit string ("1"), -> 0-based index into `names`
    (`offset` 1 for 1-based labels). The error lists the values allowed."""
    value = field(row, name, path, (int, str))
    allowed = [str(i + offset) for i in range(len(names))]
    text = str(value).strip()
    if text not in allowed:
        raise PhibookError(
            f"{where(row, path)}: field {name!r} should be one of {', '.join(allowed)} (an integer or a string of "
            f"digits; {', '.join(f'{a} = {n}' for a, n in zip(allowed, names, strict=True))}), got "
            f"{describe_value(value)}"
        )
    return int(text) - offset


# --------------------------------------------------------------------------- more file formats

DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")


def data_format(path: Path) -> str:
    """"jsonl", "json" or "parquet" from the file name (a .jsonl.gz is "jsonl")."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".json"):
        return "json"
    return "jsonl"


def _lfs_pointer(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(40).startswith(b"version https://git-lfs")
    except OSError:
        return False


def read_parquet(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of a parquet file (structs as dicts, lists as lists); `_line` is "row N" (1-based)."""
    if _lfs_pointer(path):
        raise PhibookError(f"{path}: a Git LFS pointer, not the data; run `git lfs pull` in that clone")
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise PhibookError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    rows: list[dict[str, Any]] = []
    try:
        reader = pq.ParquetFile(path)
        for batch in reader.iter_batches(batch_size=512):
            for row in batch.to_pylist():
                row["_line"] = f"row {len(rows) + 1}"
                rows.append(row)
                if limit is not None and len(rows) >= limit:
                    return rows
    except PhibookError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for truncated or foreign files
        raise PhibookError(f"{path}: cannot read as parquet ({exc})") from None
    return rows


def read_json_rows(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """A .json file: JSON lines (what `datasets`' to_json writes) or one array of objects."""
    with open(path, encoding="utf-8") as fh:
        head = fh.read(4096).lstrip()
    if not head.startswith("["):
        return read_jsonl(path, limit)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PhibookError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    rows = []
    for i, row in enumerate(data[:limit] if limit is not None else data):
        if not isinstance(row, dict):
            raise PhibookError(f"{path}: item {i + 1} of the array should be an object, got {describe_value(row)}")
        rows.append(dict(row, _line=f"item {i + 1}"))
    return rows


def read_rows(paths: Path | list[Path], limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of one file or of a split's shards in order (jsonl[.gz], json, parquet); each row
    records its file in `_path` and its line (or "row N") in `_line`."""
    rows: list[dict[str, Any]] = []
    for path in [paths] if isinstance(paths, Path) else paths:
        left = None if limit is None else limit - len(rows)
        if left is not None and left <= 0:
            break
        fmt = data_format(path)
        if fmt == "jsonl" and _lfs_pointer(path):
            raise PhibookError(f"{path}: a Git LFS pointer, not the data; run `git lfs pull` in that clone")
        part = read_parquet(path, left) if fmt == "parquet" else read_json_rows(path, left) if fmt == "json" \
            else read_jsonl(path, left)
        for row in part:
            row["_path"] = path
        rows.extend(part)
    return rows


@dataclass
class DataSource:
    """The files a task read and the layout found in them ("hf-parquet", "ai2-jsonl", ...)."""

    layout: str
    files: list[Path]

    def describe(self) -> str:
        more = f" + {len(self.files) - 1} more" if len(self.files) > 1 else ""
        return f"{self.layout} ({self.files[0]}{more})"

    def as_json(self) -> dict[str, Any]:
        return {"layout": self.layout, "files": [str(p) for p in self.files]}


def find_split_files(folder: Path, splits: list[str], task: str, prefer: Iterable[str] = (),
                     avoid: Iterable[str] = ()) -> list[Path] | None:
    """The files of a split in a Hugging Face copy under `folder`, or None.

    Recognised (any depth up to 4): `<split>.jsonl|.json|.parquet|.jsonl.gz`, hub shards
    `<split>-00000-of-00002.parquet` (all shards, in order), and the parquet-converter's
    `<split>/0000.parquet`. `splits` are tried in order (e.g. validation, then val/dev). When
    several folders hold the split (a whole hub repo with several configs), those under a
    folder named in `prefer` win and those under `avoid` are dropped; several left is an error.
    """
    prefer = {p.lower() for p in prefer}
    avoid = {a.lower() for a in avoid}
    alts = "|".join(re.escape(s) for s in splits)
    named = re.compile(rf"^(?P<split>{alts})(?:-\d+-of-\d+)?(?:-[0-9a-f]{{8,}})?(?P<ext>\.jsonl\.gz|\.jsonl|\.json|\.parquet)$",
                       re.IGNORECASE)
    converted = re.compile(r"^\d+\.parquet$")
    groups: dict[tuple[Path, str, str], list[Path]] = {}
    base_depth = len(folder.parts)
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if len(here.parts) - base_depth < 4 else []
        for name in sorted(files):
            m = named.match(name)
            if m:
                groups.setdefault((here, m["split"].lower(), m["ext"].lower()), []).append(here / name)
            elif converted.match(name) and here.name.lower() in {s.lower() for s in splits}:
                groups.setdefault((here, here.name.lower(), ".parquet"), []).append(here / name)
    for split in splits:
        found = {k: v for k, v in groups.items() if k[1] == split.lower()}
        found = {k: v for k, v in found.items()
                 if not any(part.lower() in avoid for part in k[0].relative_to(folder).parts)}
        if len(found) > 1 and prefer:
            preferred = {k: v for k, v in found.items()
                         if any(part.lower() in prefer for part in k[0].relative_to(folder).parts)}
            found = preferred or found
        if len(found) > 1:
            listed = "; ".join(str(sorted(v)[0]) + (f" (+{len(v) - 1} shards)" if len(v) > 1 else "")
                               for v in found.values())
            raise PhibookError(f"{task}: several copies of the {split} split under {folder}: {listed}; "
                               "keep one of them (or point --data-dir at a folder holding one)")
        if found:
            return sorted(next(iter(found.values())))
    return None


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
