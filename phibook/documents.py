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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phibook.errors import PhibookError


def text_id(text: str) -> str:
    """The id of a document that has none: a hash of its text (see the module docstring)."""
    return "sha1:" + hashlib.sha1(text.encode("utf-8")).hexdigest()


def doc_id(doc: dict[str, Any], text_field: str = "text") -> str:
    """The document's id, or ``text_id`` of its text when it has none (null or empty)."""
    if doc.get("id") not in (None, ""):
        return str(doc["id"])
    return text_id(doc[text_field])


class DocumentError(PhibookError):
    """A line that is not a document; the message names ``file:line`` and what is wrong."""


def why_not_a_document(raw: bytes | str, text_field: str = "text") -> tuple[dict[str, Any] | None, str | None]:
    """(document, None) for a document line, (None, why) for anything else (a blank line is the caller's)."""
    try:
        doc = json.loads(raw)
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 ({exc.reason})"
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg}, column {exc.colno})"
    if not isinstance(doc, dict):
        return None, f"expected a JSON object per line, got {type(doc).__name__}"
    text = doc.get(text_field)
    if not isinstance(text, str):
        what = "missing" if text is None else f"of type {type(text).__name__}, not a string"
        return None, f"field {text_field!r} is {what}"
    return doc, None


def line_number(path: str | Path, offset: int) -> int:
    """1-based number of the line starting at byte ``offset`` of an uncompressed file (for messages)."""
    count, done = 0, 0
    with open(path, "rb") as f:
        while done < offset:
            block = f.read(min(1 << 22, offset - done))
            if not block:
                break
            count += block.count(b"\n")
            done += len(block)
    return count + 1


@dataclass(frozen=True, slots=True)
class Line:
    """One line of a document file as ``read_lines`` saw it."""

    doc: dict[str, Any] | None  # None: a blank line, or a bad line skipped under skip_bad
    size: int  # bytes the line takes in the (decompressed) file, newline included
    bad: bool = False  # a bad line that skip_bad let through (doc is None)


def read_lines(
    path: str | Path,
    *,
    text_field: str = "text",
    start: int = 0,
    end: int | None = None,
    skip_bad: bool = False,
    fill_id: bool = False,
    name: str | None = None,
    bad_hint: str = "",
) -> Iterator[Line]:
    """Every line of one document JSONL file (``.gz`` too), checked: the one reader of the format.

    ``start``/``end`` read the lines that *start* in that byte range of an uncompressed
    file, so ranges that tile a file read each line exactly once. A bad line raises
    ``DocumentError`` naming ``name`` (default: the path) and its line number, with
    ``bad_hint`` appended; under ``skip_bad`` it is yielded as ``Line(None, size, bad=True)``.
    ``fill_id`` stores ``doc_id`` in a document that has no id of its own. With a
    ``text_field`` other than "text", the text is also copied to ``doc["text"]``.
    """
    path = Path(path)
    where_name = name or str(path)
    gz = path.name.endswith(".gz")
    if gz and (start or end is not None):
        raise PhibookError(f"{path}: a gzip file is read whole, not by byte range")
    with gzip.open(path, "rb") if gz else open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # the line running through byte start-1 belongs to the previous range
        first_offset = f.tell()
        pos, index = first_offset, 0
        while end is None or pos < end:
            raw = f.readline()
            if not raw:
                break
            pos += len(raw)
            index += 1
            if not raw.strip():
                yield Line(None, len(raw))
                continue
            doc, why = why_not_a_document(raw, text_field)
            if doc is None:
                if skip_bad:
                    yield Line(None, len(raw), bad=True)
                    continue
                # Line numbers inside a range are found only when needed: it costs a read of the prefix.
                first = 1 if first_offset == 0 else line_number(path, first_offset)
                raise DocumentError(f"{where_name}:{first + index - 1}: {why}{bad_hint}")
            if text_field != "text":
                doc["text"] = doc[text_field]
            if fill_id and doc.get("id") in (None, ""):
                doc["id"] = doc_id(doc)
            yield Line(doc, len(raw))


def read_documents(paths: list[str | Path], text_field: str = "text") -> Iterator[dict[str, Any]]:
    """Every document of every JSONL (or .jsonl.gz) file, in order."""
    for path in map(Path, paths):
        if not path.is_file():
            raise PhibookError(f"input file not found: {path}")
        for line in read_lines(path, text_field=text_field):
            if line.doc is not None:
                yield line.doc
