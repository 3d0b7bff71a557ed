"""`phibook clean`: filters, exact and near deduplication, decontamination.

One streaming pass over document JSONL, in this order (cheapest first, so the
expensive checks see fewer documents):
1. length and repetition filters;
2. exact duplicates: SHA-1 of the text lowercased with whitespace collapsed;
3. decontamination: any word 13-gram shared with the benchmark files
   (questions and answers) under --benchmarks drops the document;
4. near duplicates: MinHash over word 5-gram shingles and an LSH index at a
   Jaccard threshold (0.8 by default), both from phibook.data.minhash, which
   `phibook pipeline run` calls too; the first document of a cluster is kept.

State lives in memory (one hash per kept document plus the LSH index), which
is fine to tens of millions of documents on one machine; past that,
`phibook pipeline run` runs these same checks as datatrove blocks, with exact
and MinHash near-dup removal global across shards (phibook.pipeline,
docs/scale.md). The per-document checks are separate functions for that reason.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phibook import io
from phibook.data.options import CleanConfig
from phibook.documents import read_lines
from phibook.errors import PhibookError

WORD = re.compile(r"[a-z0-9]+")


@dataclass
class CleanReport:
    inputs: list[str] = field(default_factory=list)
    read: int = 0
    kept: int = 0
    bad_lines: int = 0
    removed: Counter = field(default_factory=Counter)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    benchmark_ngrams: int = 0
    seconds: float = 0.0
    bytes_read: int = 0

    def note(self, reason: str, doc_id: str, detail: str, limit: int = 20) -> None:
        self.removed[reason] += 1
        bucket = self.examples.setdefault(reason, [])
        if len(bucket) < limit:
            bucket.append({"id": doc_id, "detail": detail})

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "read": self.read,
            "kept": self.kept,
            "bad_lines": self.bad_lines,
            "removed": dict(self.removed),
            "examples": self.examples,
            "benchmark_ngrams": self.benchmark_ngrams,
            "seconds": round(self.seconds, 3),
            "docs_per_s": round(self.read / self.seconds, 1) if self.seconds else None,
            "mb_per_s": round(self.bytes_read / 1e6 / self.seconds, 2) if self.seconds else None,
        }


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def normalized_hash(text: str) -> str:
    return hashlib.sha1(" ".join(text.lower().split()).encode()).hexdigest()


def dup_line_fraction(text: str) -> float:
    # Short lines (code fences, "Solution:") repeat in any structured text; only
    # substantial lines count.
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) >= 12]
    if not lines:
        return 0.0
    counts = Counter(lines)
    dup_chars = sum(len(ln) * c for ln, c in counts.items() if c > 1)
    return dup_chars / sum(len(ln) for ln in lines)


_WORD_IDS: dict[str, int] = {}
_MULT = np.uint64(0x100000001B3)  # FNV prime: mixes word hashes into an n-gram hash


def _word_hashes(tokens: list[str]) -> np.ndarray:
    # Stable 64-bit word hashes, cached: a corpus has far fewer distinct words
    # than n-grams, so hashing each word once makes n-grams a few numpy ops.
    out = np.empty(len(tokens), dtype=np.uint64)
    for i, t in enumerate(tokens):
        h = _WORD_IDS.get(t)
        if h is None:
            h = _WORD_IDS[t] = int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little")
        out[i] = h
    return out


def _ngram_hashes(tokens: list[str], n: int) -> np.ndarray:
    """64-bit hashes of every word n-gram (polynomial in the word hashes, mod 2**64)."""
    if len(tokens) < n:
        return np.empty(0, dtype=np.uint64)
    h = _word_hashes(tokens)
    m = len(tokens) - n + 1
    acc = h[:m].copy()
    with np.errstate(over="ignore"):
        for k in range(1, n):
            acc = acc * _MULT + h[k : k + m]
    return acc


# --------------------------------------------------------------------------- benchmarks


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def benchmark_texts(root: str | Path) -> Iterator[tuple[str, str]]:
    """(file, text) for every question/answer-like string under a benchmark folder.

    Format-agnostic on purpose: JSON/JSONL (gz or bz2 too) values, CSV cells
    and text lines are all taken, so every benchmark the evaluation reads
    (and any the user adds) is covered without a per-task loader.
    """
    root = Path(root)
    if not root.is_dir():
        raise PhibookError(f"--benchmarks {root} is not a directory")
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix in (".zip", ".lst", ".md"):
            continue
        name = path.name.lower()
        opener = gzip.open if name.endswith(".gz") else bz2.open if name.endswith(".bz2") else open
        base = name.removesuffix(".gz").removesuffix(".bz2")
        try:
            with opener(path, "rt", encoding="utf-8", errors="replace") as f:
                if base.endswith(".jsonl"):
                    for line in f:
                        if line.strip():
                            try:
                                yield from ((str(path), s) for s in _strings(json.loads(line)))
                            except json.JSONDecodeError:
                                yield str(path), line
                elif base.endswith(".json"):
                    yield from ((str(path), s) for s in _strings(json.load(f)))
                elif base.endswith(".csv"):
                    for row in csv.reader(f):
                        yield str(path), " ".join(row)
                elif base.endswith(".txt"):
                    for line in f:
                        yield str(path), line
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, EOFError) as exc:
            raise PhibookError(f"cannot read benchmark file {path}: {exc}") from exc


def benchmark_ngrams(root: str | Path, n: int = 13) -> np.ndarray:
    """Sorted unique hashes of every word n-gram in the benchmark files."""
    chunks = [_ngram_hashes(words(text), n) for _, text in benchmark_texts(root)]
    chunks = [c for c in chunks if len(c)]
    if not chunks:
        raise PhibookError(f"no benchmark text with {n}+ words found under {root}")
    return np.unique(np.concatenate(chunks))


# --------------------------------------------------------------------------- per-document checks
# Each check looks at one document alone, so the same function serves this
# single pass and the datatrove blocks of `phibook pipeline` (phibook.pipeline).


def length_reason(text: str, cfg: CleanConfig) -> tuple[str, str] | None:
    """("too_short" | "too_long", detail) when the length filter drops ``text``, else None."""
    if len(text) < cfg.min_chars:
        return "too_short", f"{len(text)} chars < {cfg.min_chars}"
    if len(text) > cfg.max_chars:
        return "too_long", f"{len(text)} chars > {cfg.max_chars}"
    return None


def repetition_reason(text: str, cfg: CleanConfig) -> tuple[str, str] | None:
    """("repetitive", detail) when repeated lines hold too much of ``text``, else None."""
    frac = dup_line_fraction(text)
    if frac > cfg.max_dup_line_frac:
        return "repetitive", f"{frac:.2f} of characters in repeated lines"
    return None


def filter_reason(text: str, cfg: CleanConfig) -> tuple[str, str] | None:
    """The first length/repetition filter that drops ``text`` (cheapest first), else None."""
    return length_reason(text, cfg) or repetition_reason(text, cfg)


def contamination(tokens: list[str], contaminated: np.ndarray, n: int) -> str | None:
    """The first word n-gram of ``tokens`` found in the sorted benchmark hashes, else None."""
    grams = _ngram_hashes(tokens, n)
    if not len(grams) or not len(contaminated):
        return None
    pos = np.searchsorted(contaminated, grams)
    hit = (pos < len(contaminated)) & (contaminated[np.minimum(pos, len(contaminated) - 1)] == grams)
    if not hit.any():
        return None
    i = int(np.argmax(hit))
    return " ".join(tokens[i : i + n])


def shingle_set(tokens: list[str], k: int) -> set[str]:
    """Word k-gram shingles for MinHash (a document shorter than k words is one shingle)."""
    return {" ".join(tokens[i : i + k]) for i in range(max(1, len(tokens) - k + 1))}


# --------------------------------------------------------------------------- documents


def read_documents(paths: list[str | Path], cfg: CleanConfig, report: CleanReport) -> Iterator[dict[str, Any]]:
    for path in map(Path, paths):
        if not path.is_file():
            raise PhibookError(f"input {path} does not exist")
        report.inputs.append(str(path))
        for line in read_lines(path, skip_bad=cfg.skip_bad, fill_id=True,
                               bad_hint="; pass --skip-bad to count and skip such lines"):
            if line.doc is not None or line.bad:
                report.bytes_read += line.size
            report.bad_lines += line.bad
            if line.doc is not None:
                yield line.doc


def clean(
    inputs: list[str | Path],
    out: str | Path,
    cfg: CleanConfig | None = None,
    benchmarks: str | Path | None = None,
    report_path: str | Path | None = None,
    progress: bool = True,
) -> CleanReport:
    from tqdm import tqdm

    from phibook.data.minhash import NearDupIndex, text_signature

    cfg = cfg or CleanConfig()
    if not 0 < cfg.near_dup_threshold < 1:
        raise PhibookError(
            f"--near-dup-threshold must be in (0, 1), got {cfg.near_dup_threshold}; use --no-near-dup to skip it"
        )
    if not inputs:
        raise PhibookError("no input files given")
    report = CleanReport()
    start = time.perf_counter()
    contaminated = benchmark_ngrams(benchmarks, cfg.ngram) if benchmarks else None
    report.benchmark_ngrams = 0 if contaminated is None else len(contaminated)
    # The one near-duplicate rule (phibook.data.minhash), shared with `phibook pipeline run`.
    lsh = NearDupIndex(cfg.near_dup_threshold, cfg.num_perm)
    seen: dict[str, str] = {}  # normalized hash -> id of the kept document
    lsh_ids: dict[int, str] = {}

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(desc="clean", unit="doc", disable=not progress, file=sys.stderr)
    with io.open_atomic(out) as sink:
        for doc in read_documents(inputs, cfg, report):
            report.read += 1
            bar.update(1)
            text, did = doc["text"], str(doc["id"])
            if (why := filter_reason(text, cfg)) is not None:
                report.note(why[0], did, why[1])
                continue
            h = normalized_hash(text)
            if h in seen:
                report.note("exact_duplicate", did, f"same text as {seen[h]}")
                continue
            tokens = words(text)
            if contaminated is not None and (gram := contamination(tokens, contaminated, cfg.ngram)) is not None:
                report.note("benchmark_contamination", did, gram)
                continue
            if not cfg.near_dup:
                seen[h] = did
                sink.write(json.dumps(doc, ensure_ascii=False) + "\n")
                report.kept += 1
                continue
            sig = text_signature(shingle_set(tokens, cfg.shingle), cfg.num_perm)
            match = lsh.match(sig)
            if match is not None:
                report.note("near_duplicate", did, f"near duplicate of {lsh_ids[match]}")
                continue
            # Keys are the read count: unique even when input ids are not, and growing in input order.
            lsh.add(report.read, sig)
            lsh_ids[report.read] = did
            seen[h] = did
            sink.write(json.dumps(doc, ensure_ascii=False) + "\n")
            report.kept += 1
    bar.close()
    report.seconds = time.perf_counter() - start
    if report_path:
        report_path = Path(report_path)
        io.write_json(report_path, report.to_dict())
    return report
