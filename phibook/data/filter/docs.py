"""Reading document JSONL (``{"id", "text", "source", "meta"}``) and writing files atomically."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from phibook.errors import PhibookError


def doc_id(doc: dict[str, Any]) -> str:
    """The document's id, or a hash of its text when it has none (stable across runs)."""
    if doc.get("id") is not None:
        return str(doc["id"])
    return "sha1:" + hashlib.sha1(doc["text"].encode("utf-8")).hexdigest()


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


