"""Document JSONL (``{"id", "text", "source", "meta"}``): the one id rule, and reading it.

The id rule (``doc_id``): a document's own ``id`` when it has one (not null, not
empty), else ``"sha1:" + sha1(text)``. Every stage that names a document (clean's
report and output, the pipeline, filter's embeddings and annotations, tokenize's
train/val split) uses this rule, so one document carries one id everywhere. The
hash of the text, not ``file:line``, because it is stable across sharding,
re-ordering, concatenating or gzipping the input, and across stages: ``file:line``
changes with every one of those, and the text itself as an id is unbounded in size.
Two documents with the same text share an id, which is what exact deduplication
says about them anyway.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from phibook.errors import PhibookError


def text_id(text: str) -> str:
    """The id of a document that has none: a hash of its text (see the module docstring)."""
    return "sha1:" + hashlib.sha1(text.encode("utf-8")).hexdigest()


def doc_id(doc: dict[str, Any], text_field: str = "text") -> str:
    """The document's id, or ``text_id`` of its text when it has none (null or empty)."""
    if doc.get("id") not in (None, ""):
        return str(doc["id"])
    return text_id(doc[text_field])


def open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def parse_line(line: str, where: str, text_field: str = "text") -> dict[str, Any] | None:
    """One JSONL line -> document dict (None for a blank line); bad lines raise naming ``where``."""
    if not line.strip():
        return None
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PhibookError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get(text_field), str):
        raise PhibookError(f"{where}: a document must be a JSON object with a string {text_field!r} field")
    if text_field != "text":
        doc["text"] = doc[text_field]
    return doc


def read_documents(paths: list[str | Path], text_field: str = "text") -> Iterator[dict[str, Any]]:
    """Every document of every JSONL (or .jsonl.gz) file, in order."""
    for path in map(Path, paths):
        if not path.is_file():
            raise PhibookError(f"input file not found: {path}")
        with open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                doc = parse_line(line, f"{path}:{lineno}", text_field)
                if doc is not None:
                    yield doc


