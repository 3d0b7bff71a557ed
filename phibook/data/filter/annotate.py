"""Teacher annotations: educational-value ratings for a sample of documents.

The prompt is a data file (``phibook/data/filter/annotate_prompt.txt``, or your
own via ``--prompt``) with the placeholders {document}, {subject} and
{scale_max}. The teacher answers in free text; ``parse_rating`` takes the first
"Rating: N", else the first "N/M" or "N out of M", else a line holding just a
number. An answer with no rating in range is *malformed*: it is counted,
recorded, and the document is asked again up to ``max_malformed`` times, then
skipped.

Every answer goes to an append-only JSONL cache keyed by (document id, prompt
hash, teacher fingerprint); a rerun, or a killed run started again, asks the
teacher only about documents that have no final record yet. Records carry the
document text, so the annotation file is itself a document JSONL that
``phibook filter embed`` reads.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import string
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from phibook.documents import doc_id, read_documents
from phibook.errors import PhibookError

PLACEHOLDERS = {"document", "subject", "scale_max"}
NUMBER = r"(\d+(?:\.\d+)?)"
# In order of trust: an explicit label, then a fraction, then a bare number on its own line.
RATING_PATTERNS = [
    re.compile(r"(?:rating|score|educational value)\s*[:=]?\s*\**\s*" + NUMBER, re.IGNORECASE),
    re.compile(NUMBER + r"\s*(?:/|out of)\s*\d+", re.IGNORECASE),
    re.compile(r"^\s*\**" + NUMBER + r"\**\s*\.?\s*$", re.MULTILINE),
]
JUSTIFICATION = re.compile(r"(?:justification|reason|explanation)\s*[:=]\s*(.+)", re.IGNORECASE)
# Statuses whose records are final: a rerun does not ask again. "failed" (the
# teacher could not be reached / errored after its retries) is asked again.
FINAL = {"ok", "malformed"}


def default_prompt_path() -> Path:
    return Path(str(resources.files(__package__) / "annotate_prompt.txt"))


def load_prompt(path: str | Path | None = None) -> str:
    path = Path(path) if path else default_prompt_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PhibookError(f"cannot read annotation prompt {path}: {exc}") from exc
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as exc:
        raise PhibookError(f"{path}: bad template ({exc}); write literal braces as {{{{ and }}}}") from exc
    if "document" not in fields:
        raise PhibookError(f"{path}: the annotation prompt needs a {{document}} placeholder")
    if fields - PLACEHOLDERS:
        raise PhibookError(f"{path}: unknown placeholder(s) {sorted(fields - PLACEHOLDERS)}; "
                           f"allowed: {sorted(PLACEHOLDERS)}")
    return text


def parse_rating(text: str, scale_max: int) -> tuple[float | None, str]:
    """(rating, justification) from a free-text answer; rating None when none in [0, scale_max] is found."""
    rating = None
    for pattern in RATING_PATTERNS:
        m = pattern.search(text)
        if m:
            value = float(m.group(1))
            rating = value if 0 <= value <= scale_max else None
            break
    j = JUSTIFICATION.search(text)
    justification = j.group(1).strip() if j else text.strip().splitlines()[-1].strip() if text.strip() else ""
    return rating, justification[:500]


def cache_key(doc: str, prompt_hash: str, teacher_fp: str) -> str:
    return hashlib.sha256(f"{doc}\0{prompt_hash}\0{teacher_fp}".encode()).hexdigest()[:32]


def load_cache(path: Path) -> dict[str, dict[str, Any]]:
    """The last record per key; a torn last line (killed mid-write) is ignored."""
    records: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return records
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                records[rec["key"]] = rec
            except (json.JSONDecodeError, KeyError, TypeError):
                print(f"phibook filter annotate: warning: skipping unreadable cache line {path}:{lineno}",
                      file=sys.stderr)
    return records


def sample_documents(paths: list[str | Path], n: int | None, seed: int, text_field: str = "text"):
    """A uniform sample of ``n`` documents (reservoir sampling, deterministic in ``seed``), in input order."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, dict[str, Any]]] = []
    for i, doc in enumerate(read_documents(paths, text_field)):
        if n is None or len(reservoir) < n:
            reservoir.append((i, doc))
        else:
            j = rng.randint(0, i)
            if j < n:
                reservoir[j] = (i, doc)
    return [doc for _, doc in sorted(reservoir, key=lambda p: p[0])]


@dataclass
class AnnotateStats:
    sampled: int = 0
    cached: int = 0
    asked: int = 0
    ok: int = 0
    malformed_answers: int = 0
    malformed_docs: int = 0
    failed: int = 0
    ratings: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        return (f"{self.sampled} sampled, {self.cached} cached, {self.ok} rated, "
                f"{self.malformed_answers} malformed answers ({self.malformed_docs} documents skipped), "
                f"{self.failed} failed")


def _spec(index: int, seed: int):
    """A placeholder DocSpec: teachers want one; for LocalTeacher it seeds sampling per attempt."""
    from phibook.data.synth.prompts import DocSpec

    return DocSpec(index=index, seed=seed, topic="annotation", subject="annotation", subject_kind="knowledge",
                   genre="annotation", audience="annotator", style="rating")


async def _annotate_one(teacher, doc, prompt, key, index, meta, max_malformed, scale_max, stats):
    from phibook.data.synth.teachers import TeacherFailure

    answers: list[str] = []
    for attempt in range(max_malformed + 1):
        try:
            reply = await teacher.generate(_spec(index, attempt), prompt)
        except PhibookError as exc:  # e.g. a local model whose context the prompt overflows
            raise PhibookError(f"document {meta['id']}: {exc} (shorten the prompt or lower --max-doc-chars)") from exc
        except TeacherFailure as exc:
            stats.failed += 1
            return {**meta, "key": key, "status": "failed", "error": str(exc), "answers": answers}
        rating, justification = parse_rating(reply.text, scale_max)
        if rating is not None:
            stats.ok += 1
            stats.ratings[str(rating)] = stats.ratings.get(str(rating), 0) + 1
            return {**meta, "key": key, "status": "ok", "rating": rating, "justification": justification,
                    "raw": reply.text, "malformed_answers": answers, "attempts": attempt + 1}
        stats.malformed_answers += 1
        answers.append(reply.text[:2000])
    stats.malformed_docs += 1
    return {**meta, "key": key, "status": "malformed", "rating": None, "malformed_answers": answers,
            "attempts": max_malformed + 1}


async def annotate(
    docs: list[dict[str, Any]], teacher, out: str | Path, prompt_template: str, subject: str = "anything",
    scale_max: int = 5, max_malformed: int = 3, concurrency: int = 8, max_doc_chars: int = 6000,
    progress: bool = True,
) -> AnnotateStats:
    """Rate ``docs`` with ``teacher``, appending one record per document to the cache file ``out``."""
    from tqdm import tqdm

    if getattr(teacher, "name", "") == "builtin":
        raise PhibookError("the builtin teacher cannot rate documents; annotate with --teacher openai "
                           "(an OpenAI-compatible server) or --teacher local --checkpoint PATH")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prompt_hash = hashlib.sha256(f"{prompt_template}\0{subject}\0{scale_max}\0{max_doc_chars}".encode()).hexdigest()[:16]
    teacher_fp = teacher.fingerprint()
    cache = load_cache(out)
    stats = AnnotateStats(sampled=len(docs))
    todo = []
    for i, doc in enumerate(docs):
        key = cache_key(doc_id(doc), prompt_hash, teacher_fp)
        if cache.get(key, {}).get("status") in FINAL:
            stats.cached += 1
        else:
            todo.append((i, doc, key))
    if not todo:
        return stats
    stats.asked = len(todo)
    sem = asyncio.Semaphore(max(1, concurrency))
    bar = tqdm(total=len(todo), desc="annotate", unit="doc", file=sys.stderr, disable=not progress)
    _end_torn_line(out)
    await teacher.start()
    try:
        with open(out, "a", encoding="utf-8") as f:

            async def one(i: int, doc: dict[str, Any], key: str) -> None:
                async with sem:
                    prompt = prompt_template.format(document=doc["text"][:max_doc_chars], subject=subject,
                                                    scale_max=scale_max)
                    meta = {"id": doc_id(doc), "text": doc["text"], "source": doc.get("source"),
                            "prompt_hash": prompt_hash, "teacher": teacher_fp}
                    rec = await _annotate_one(teacher, doc, prompt, key, i, meta, max_malformed, scale_max, stats)
                # One whole line per write, flushed: a kill loses at most the answers in flight.
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                bar.update(1)

            await asyncio.gather(*(one(i, doc, key) for i, doc, key in todo))
    finally:
        bar.close()
        await teacher.close()
    return stats


def _end_torn_line(path: Path) -> None:
    """A kill mid-write can leave a last line without its newline; end it so new records start clean."""
    if path.is_file() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")


def load_ratings(path: str | Path) -> dict[str, float]:
    """id -> rating from an annotation file (the last 'ok' record per document wins)."""
    path = Path(path)
    if not path.is_file():
        raise PhibookError(f"annotation file not found: {path}")
    ratings: dict[str, float] = {}
    for rec in load_cache(path).values():
        if rec.get("status") == "ok" and rec.get("rating") is not None:
            ratings[str(rec["id"])] = float(rec["rating"])
    if not ratings:
        raise PhibookError(f"{path} holds no usable ratings (no record with status 'ok'); "
                           "run `phibook filter annotate` first, or check its malformed/failed records")
    return ratings
