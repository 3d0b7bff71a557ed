"""phibook's stages as datatrove blocks.

Every block is a thin wrapper: the decisions are made by the single-machine
stages' own functions (phibook.data.clean's per-document checks, the tokenize
stage's work units and shard assembly, the synth job, the quality classifier),
so `phibook pipeline` and the verbs cannot drift apart.

Documents travel as datatrove ``Document``s. phibook's own fields ride in
``metadata`` (``source``, ``meta`` and any other key of the input line) with
two private keys: ``_phibook_keys`` (the line's key order, so the writer
reproduces the line byte for byte) and ``_phibook_ordinal`` (the document's
position in the whole input, so "the first copy is kept" means the same as in
`phibook clean` over the concatenated input, whatever task a copy landed in).

Files: every task ``r`` of a document stage writes ``<stage>/NNNNN.jsonl``
(N = r), through a temporary name renamed at the end of the task, so a killed
task leaves nothing that looks finished; datatrove's completion marker is
written after that, and a rerun redoes exactly the tasks without one.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
from datatrove.pipeline.filters.base_filter import BaseFilter

from phibook import documents, faults, io
from phibook.data.clean import (
    contamination,
    filter_reason,
    normalized_hash,
    shingle_set,
    words,
)
from phibook.data.minhash import NearDupIndex, lsh_shape, shingle_hashes, signature
from phibook.data.options import CleanConfig, TeacherOptions
from phibook.errors import PhibookError
from phibook.options import from_table

KEYS = "_phibook_keys"
ORDINAL = "_phibook_ordinal"
ROOT_ENV = "PHIBOOK_PIPELINE_ROOT"  # pid of `phibook pipeline run`, for fault injection
EXAMPLES = 20  # per removal reason, as in `phibook clean`'s report


def fault(name: str, n: int) -> None:
    """A phibook.faults point that takes the whole pipeline down (every task process), as a crash would."""
    if faults.armed(name, n):
        root = os.environ.get(ROOT_ENV)
        if root:
            faults.kill_tree(int(root))
        faults.kill()


def rank_file(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"{rank:05d}.jsonl"


def share(n: int, rank: int, world_size: int) -> range:
    """Contiguous share of ``n`` items: task order is input order, so concatenating
    the tasks' outputs in rank order gives the documents in input order."""
    return range(n * rank // world_size, n * (rank + 1) // world_size)


# --------------------------------------------------------------------------- documents <-> JSONL


def to_document(line: dict[str, Any], ordinal: int) -> Document:
    meta = {k: v for k, v in line.items() if k not in ("text", "id")}
    meta[KEYS] = list(line)
    meta[ORDINAL] = ordinal
    if not isinstance(line["id"], str):
        meta["_phibook_raw_id"] = line["id"]  # an integer id stays an integer in the output
    return Document(text=line["text"], id=str(line["id"]), metadata=meta)


def from_document(doc: Document) -> dict[str, Any]:
    meta = doc.metadata
    keys = list(meta.get(KEYS) or ["id", "text", "source", "meta"])
    keys += [k for k in meta if k not in keys and not k.startswith("_") and k != "file_path"]
    out: dict[str, Any] = {}
    for k in keys:
        if k == "text":
            out[k] = doc.text
        elif k == "id":
            out[k] = meta.get("_phibook_raw_id", doc.id)
        elif k in meta:
            out[k] = meta[k]
    return out


def read_lines(path: Path, skip_bad: bool, counts: Counter | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, document) for each document line of ``path``, read as `phibook clean` reads it."""
    lines = documents.read_lines(path, skip_bad=skip_bad, fill_id=True,
                                 bad_hint="; set skip_bad = true in [clean] to count and skip such lines")
    for lineno, line in enumerate(lines, 1):
        if counts is not None and (line.doc is not None or line.bad):
            counts["bytes"] += line.size
            counts["bad_lines"] += line.bad
        if line.doc is not None:
            yield lineno, line.doc


class PhibookReader(PipelineStep):
    """Reads phibook document JSONL: either the pipeline's input files (task r takes a
    contiguous share of them) or task r's file of the previous stage."""

    name = "phibook JSONL reader"
    type = "📖 - READER"

    def __init__(self, files: list[str] | None = None, stage_dir: str | None = None, skip_bad: bool = False,
                 counts_dir: str | None = None) -> None:
        super().__init__()
        self.files, self.stage_dir, self.skip_bad, self.counts_dir = files, stage_dir, skip_bad, counts_dir

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        counts: Counter = Counter()
        if self.files is not None:
            # Ordinal = (input file, line): the document's place in the concatenated input.
            sources = [(i, Path(self.files[i])) for i in share(len(self.files), rank, world_size)]
            shift = 32
        else:
            sources = [(rank, rank_file(self.stage_dir, rank))]
            shift = 40  # (task, position): the earlier stage kept input order within and across tasks
        for index, path in sources:
            if self.files is None and not path.exists():
                raise PhibookError(f"{path} is missing: the previous stage's task {rank} did not finish")
            for n, (lineno, line) in enumerate(read_lines(path, self.skip_bad, counts)):
                counts["read"] += 1
                doc = to_document(line, (index << shift) | (lineno if shift == 32 else n))
                self.stat_update("documents")
                yield doc
        if self.counts_dir:
            Path(self.counts_dir).mkdir(parents=True, exist_ok=True)
            io.write_json(Path(self.counts_dir) / f"read-{rank:05d}.json", dict(counts))


class PhibookWriter(PipelineStep):
    """Writes task r's documents to FOLDER/NNNNN.jsonl as phibook document JSONL (temp name, then rename)."""

    name = "phibook JSONL writer"
    type = "💽 - WRITER"

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        final = rank_file(self.folder, rank)
        final.parent.mkdir(parents=True, exist_ok=True)
        io.sweep(final.parent, names=[final.name])  # what a killed earlier try of this task left
        with io.open_atomic(final) as f:
            for n, doc in enumerate(data or [], 1):
                f.write(json.dumps(from_document(doc), ensure_ascii=False) + "\n")
                if faults.armed("pipeline.doc_written", n):
                    f.flush()
                fault("pipeline.doc_written", n)
                self.stat_update("written")
                yield doc


def task_done_point(data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
    """Last step of every task: drains the stream, then fault point ``pipeline.task_done@RANK``
    (the task's files are complete, its datatrove completion marker is not yet written)."""
    for _ in data or []:
        pass
    fault("pipeline.task_done", rank)
    return None


# --------------------------------------------------------------------------- clean: per-document filters


class RecordedFilter(BaseFilter):
    """A datatrove filter whose removals (count + first examples per reason) go to a JSON file per task,
    which the clean report sums over all tasks."""

    key = "filter"

    def __init__(self, counts_dir: str) -> None:
        super().__init__()
        self.counts_dir = counts_dir
        self._removed: Counter = Counter()
        self._examples: dict[str, list] = {}

    def drop(self, doc: Document, reason: str, detail: str) -> tuple[bool, str]:
        self._removed[reason] += 1
        bucket = self._examples.setdefault(reason, [])
        if len(bucket) < EXAMPLES:
            bucket.append([doc.metadata.get(ORDINAL, 0), doc.id, detail])
        return False, reason

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self._removed, self._examples = Counter(), {}
        yield from super().run(data, rank, world_size)
        Path(self.counts_dir).mkdir(parents=True, exist_ok=True)
        io.write_json(Path(self.counts_dir) / f"{self.key}-{rank:05d}.json",
                          {"removed": dict(self._removed), "examples": self._examples})


class LengthRepetitionFilter(RecordedFilter):
    """`phibook clean`'s length and repetition filters (phibook.data.clean.filter_reason)."""

    name = "phibook length/repetition"
    key = "length"

    def __init__(self, counts_dir: str, cfg: CleanConfig) -> None:
        super().__init__(counts_dir)
        self.cfg = cfg

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        why = filter_reason(doc.text, self.cfg)
        return True if why is None else self.drop(doc, *why)


class DecontaminationFilter(RecordedFilter):
    """Drops a document sharing any word n-gram with the benchmarks (phibook.data.clean.contamination).
    The benchmark n-gram hashes are computed once by the driver into a .npy that each task maps."""

    name = "phibook 13-gram decontamination"
    key = "decontaminate"

    def __init__(self, counts_dir: str, ngrams_path: str, n: int) -> None:
        super().__init__(counts_dir)
        self.ngrams_path, self.n = ngrams_path, n
        self._grams: np.ndarray | None = None

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self._grams is None:
            self._grams = np.load(self.ngrams_path, mmap_mode="r")
        gram = contamination(words(doc.text), self._grams, self.n)
        return True if gram is None else self.drop(doc, "benchmark_contamination", gram)


class QualityFilter(RecordedFilter):
    """phi-1's quality classifier (`phibook filter apply --threshold`): keeps documents scoring >= threshold
    and records the score in meta.quality_score, as the verb does."""

    name = "phibook quality classifier"
    key = "quality"

    def __init__(self, counts_dir: str, classifier: str, threshold: float, embedder: str | None,
                 batch_size: int) -> None:
        super().__init__(counts_dir)
        self.batch_size = batch_size
        self.classifier, self.threshold, self.embedder_spec = classifier, threshold, embedder
        self._clf = self._embedder = None

    def _load(self) -> None:
        from phibook.data.filter.classifier import load_classifier
        from phibook.data.filter.embed import load_embedder

        self._clf = load_classifier(self.classifier)
        spec = self.embedder_spec or self._clf.meta.get("embedder_spec") or "hash"
        self._embedder = load_embedder(spec, max_tokens=int(self._clf.meta.get("max_tokens") or 512))
        self._clf.check_embedder(self._embedder.name, self._embedder.dim, f"[filter] embedder {spec}")

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return self.filter_batch([doc])[0]

    def filter_batch(self, batch: list[Document]) -> list[bool | tuple[bool, str]]:
        from phibook.data.filter.apply import SCORE_DIGITS
        from phibook.data.filter.embed import embed_texts

        if self._clf is None:
            self._load()
        scores = self._clf.score(embed_texts(self._embedder, [d.text for d in batch], self.batch_size))
        out: list[bool | tuple[bool, str]] = []
        for doc, score in zip(batch, scores.tolist()):
            if score >= self.threshold:
                meta = doc.metadata.get("meta") if isinstance(doc.metadata.get("meta"), dict) else {}
                doc.metadata["meta"] = {**meta, "quality_score": round(score, SCORE_DIGITS)}
                out.append(True)
            else:
                out.append(self.drop(doc, "low_quality", f"score {score:.3f} < {self.threshold}"))
        return out


# --------------------------------------------------------------------------- clean: global dedup


def minhash_config(cfg: CleanConfig) -> MinhashConfig:
    """phibook's threshold -> datatrove's LSH shape: phibook.data.minhash's (bands, rows), the
    candidate step of `phibook clean`; 32-bit values, as phibook's signatures are."""
    from datatrove.utils.hashing import HashConfig

    bands, rows = lsh_shape(cfg.near_dup_threshold, cfg.num_perm)
    return MinhashConfig(n_grams=cfg.shingle, num_buckets=bands, hashes_per_bucket=rows,
                         hash_config=HashConfig(precision=32))


EXACT_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("ordinal", "<u8")])


class DedupSignature(MinhashDedupSignature):
    """datatrove's MinHash stage 1 with phibook's shingles and signatures (phibook.data.minhash, the
    functions `phibook clean` calls), plus what the cluster step needs besides: per task, the exact-dedup key (phibook's normalized
    hash, 128 bits) and ordinal of each document, the full signature (to confirm LSH candidates
    at the threshold), and the ids (for the report's examples)."""

    name = "phibook dedup signatures"

    def __init__(self, work: str, cfg: CleanConfig) -> None:
        from datatrove.utils.word_tokenizers import WhitespaceTokenizer

        # The word tokenizer is unused (get_shingles is phibook's); this one needs no extra package.
        super().__init__(output_folder=str(Path(work) / "minhash"), config=minhash_config(cfg),
                         language=WhitespaceTokenizer())
        self.work, self.cfg = work, cfg
        self._full = None

    def get_shingles(self, text: str) -> np.ndarray:
        return shingle_hashes(shingle_set(words(text), self.cfg.shingle)).reshape(-1, 1)

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        # phibook's signature, not datatrove's hashes: the verb computes the very same array.
        sig = signature(shingles, self.cfg.num_perm)
        self._full.write(sig.astype("<u4").tobytes())
        c = self.config
        return sig[: c.num_buckets * c.hashes_per_bucket].reshape(c.num_buckets, -1).tolist()

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        work = Path(self.work) / "sig"
        work.mkdir(parents=True, exist_ok=True)
        keys: list[tuple[int, int, int]] = []
        ids_final, full_final = work / f"ids-{rank:05d}.jsonl", work / f"full-{rank:05d}.bin"
        io.sweep(work, names=[ids_final.name, full_final.name])  # a killed earlier try's leftovers
        ids_tmp, full_tmp = io.temp_path(ids_final), io.temp_path(full_final)
        with ids_tmp.open("w", encoding="utf-8") as ids, full_tmp.open("wb") as self._full:

            def tap() -> Iterator[Document]:
                for doc in data or []:
                    h = int(normalized_hash(doc.text), 16)
                    keys.append((h >> 96, (h >> 32) & 0xFFFFFFFFFFFFFFFF, doc.metadata[ORDINAL]))
                    ids.write(json.dumps(doc.id) + "\n")
                    yield doc

            if self.cfg.near_dup:
                super().run(tap(), rank, world_size)
            else:
                for _ in tap():
                    pass
        self._full = None
        np.save(work / f"exact-{rank:05d}.npy", np.array(keys, dtype=EXACT_DTYPE))
        io.commit(full_tmp, full_final)
        io.commit(ids_tmp, ids_final)
        return None


class DedupCluster(PipelineStep):
    """One task over all tasks' signatures: which documents are exact or near duplicates.

    Exact: per normalized hash, the document with the smallest ordinal (the first in input
    order) is kept. Near: datatrove's bucket step links documents sharing a whole LSH band; in
    each linked group, phibook.data.minhash.NearDupIndex (the index `phibook clean` uses) drops a
    document when an earlier kept one shares a band with it and agrees on at least
    `near_dup_threshold` of the signature. Writes datatrove's
    ``NNNNNN.remove`` files (read by MinhashDedupFilter) and a JSON summary for the report."""

    name = "phibook dedup cluster"
    type = "🫂 - DEDUP"

    def __init__(self, work: str, cfg: CleanConfig, tasks: int) -> None:
        super().__init__()
        self.work, self.cfg, self.tasks = work, cfg, tasks

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        work = Path(self.work)
        exact = [np.load(work / "sig" / f"exact-{r:05d}.npy") for r in range(self.tasks)]
        sizes = np.array([len(e) for e in exact], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        keys = np.concatenate(exact) if len(exact) else np.zeros(0, EXACT_DTYPE)
        ordinal = keys["ordinal"]
        removed: dict[int, tuple[str, int]] = {}  # global index -> (reason, index of the kept copy)

        order = np.lexsort((ordinal, keys["lo"], keys["hi"]))
        if len(order):
            hi, lo = keys["hi"][order], keys["lo"][order]
            first = np.r_[True, (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])]
            group_start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
            for pos in np.flatnonzero(~first):
                removed[int(order[pos])] = ("exact_duplicate", int(order[group_start[pos]]))

        if self.cfg.near_dup:
            self._near(work, offsets, ordinal, removed)

        remove_dir = work / "remove"
        remove_dir.mkdir(parents=True, exist_ok=True)
        gidx = np.array(sorted(removed), dtype=np.int64)
        task_of = np.searchsorted(offsets, gidx, side="right") - 1
        for r in range(self.tasks):
            local = (gidx[task_of == r] - offsets[r]).astype("<u4")
            io.write_bytes(remove_dir / f"{r:06d}.remove", np.sort(local).tobytes())

        # The report's examples: the first removals in input order, with the ids they name.
        counts = Counter(reason for reason, _ in removed.values())
        first_removed = sorted(removed, key=lambda g: int(ordinal[g]))
        examples: dict[str, list] = {}
        wanted = []
        for g in first_removed:
            reason, keeper = removed[g]
            bucket = examples.setdefault(reason, [])
            if len(bucket) < EXAMPLES:
                bucket.append([int(ordinal[g]), g, keeper])
                wanted += [g, keeper]
        ids = self._ids(work, offsets, set(wanted))
        words_for = {"exact_duplicate": "same text as", "near_duplicate": "near duplicate of"}
        for reason, bucket in examples.items():
            examples[reason] = [[o, ids[g], f"{words_for[reason]} {ids[k]}"] for o, g, k in bucket]
        io.write_json(work / "counts" / "dedup.json", {"removed": dict(counts), "examples": examples})
        return None

    def _near(self, work: Path, offsets: np.ndarray, ordinal: np.ndarray, removed: dict) -> None:
        pairs = [np.fromfile(p, dtype="<u4").reshape(-1, 4) for p in sorted((work / "buckets").glob("*.dups"))]
        pairs = np.concatenate(pairs) if pairs else np.zeros((0, 4), dtype="<u4")
        a = offsets[pairs[:, 0].astype(np.int64)] + pairs[:, 1]
        b = offsets[pairs[:, 2].astype(np.int64)] + pairs[:, 3]
        if not len(a):
            return
        # datatrove's bucket step chains the documents sharing a band (each to the previous one in
        # sort order), so documents sharing any band land in one connected component. Inside each,
        # phibook.data.minhash's index decides in input order: the verb's rule on the verb's candidates.
        parent: dict[int, int] = {}

        def root(x: int) -> int:
            while parent.setdefault(x, x) != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for x, y in zip(a.tolist(), b.tolist()):
            parent[root(x)] = root(y)
        groups: dict[int, list[int]] = {}
        for g in parent:
            groups.setdefault(root(g), []).append(g)
        sigs = [np.memmap(work / "sig" / f"full-{r:05d}.bin", dtype="<u4", mode="r").reshape(-1, self.cfg.num_perm)
                if offsets[r + 1] > offsets[r] else None for r in range(len(offsets) - 1)]
        for members in groups.values():
            index = NearDupIndex(self.cfg.near_dup_threshold, self.cfg.num_perm)
            by_ordinal: dict[int, int] = {}
            for g in sorted(members, key=lambda g: int(ordinal[g])):
                if g in removed:  # exact duplicates took no part in `phibook clean`'s index either
                    continue
                r = int(np.searchsorted(offsets, g, side="right")) - 1
                sig = np.asarray(sigs[r][g - int(offsets[r])])
                match = index.match(sig)
                if match is not None:
                    removed[g] = ("near_duplicate", by_ordinal[match])
                else:
                    index.add(int(ordinal[g]), sig)
                    by_ordinal[int(ordinal[g])] = g

    @staticmethod
    def _ids(work: Path, offsets: np.ndarray, wanted: set[int]) -> dict[int, str]:
        out: dict[int, str] = {}
        for r in range(len(offsets) - 1):
            need = {g - int(offsets[r]) for g in wanted if offsets[r] <= g < offsets[r + 1]}
            if not need:
                continue
            with (work / "sig" / f"ids-{r:05d}.jsonl").open(encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if i in need:
                        out[int(offsets[r]) + i] = json.loads(line)
        return out


class CleanReport(PipelineStep):
    """One task: sums every task's counts into OUT/clean/report.json (the shape of `phibook clean`'s report)."""

    name = "phibook clean report"
    type = "📊 - STATS"

    def __init__(self, work: str, out: str, inputs: list[str], benchmark_ngrams: int, tasks: int) -> None:
        super().__init__()
        self.work, self.out, self.inputs, self.benchmark_ngrams, self.tasks = work, out, inputs, benchmark_ngrams, tasks

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        counts_dir = Path(self.work) / "counts"
        read: Counter = Counter()
        removed: Counter = Counter()
        examples: dict[str, list] = {}
        for path in sorted(counts_dir.glob("*.json")):
            part = json.loads(path.read_text())
            if path.name.startswith("read-"):
                read.update(part)
                continue
            removed.update(part["removed"])
            for reason, bucket in part["examples"].items():
                examples.setdefault(reason, []).extend(bucket)
        report = {
            "inputs": self.inputs,
            "read": read["read"],
            "kept": read["read"] - sum(removed.values()),
            "bad_lines": read["bad_lines"],
            "removed": dict(sorted(removed.items())),
            "examples": {r: [{"id": i, "detail": d} for _, i, d in sorted(b, key=lambda e: e[0])[:EXAMPLES]]
                         for r, b in sorted(examples.items())},
            "benchmark_ngrams": self.benchmark_ngrams,
            "bytes_read": read["bytes"],
            "tasks": self.tasks,
        }
        io.write_json(Path(self.out) / "report.json", report)
        return None


# --------------------------------------------------------------------------- synth


class SynthBlock(PipelineStep):
    """Task r makes the planned documents with index = r (mod tasks), exactly as `phibook synth run
    --shard r/tasks` does (same specs, ids and texts for the same seed), into a resumable work file;
    then yields them in plan order. A rerun of a killed task asks the teacher only for what is missing."""

    name = "phibook synth"
    type = "📖 - READER"

    def __init__(self, work: str, opts: dict[str, Any]) -> None:
        super().__init__()
        self.work, self.opts = work, opts

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from phibook.data.synth.prompts import load_templates, load_topics, load_web_samples
        from phibook.data.synth.run import run_synth
        from phibook.data.synth.teachers import teacher_from_options

        o = self.opts
        topics = load_topics(o["topics"])
        templates = load_templates(o["templates"])
        web = load_web_samples(o["web_samples"]) if o["web_samples"] else None
        teacher = teacher_from_options(from_table(TeacherOptions, o), templates)  # api_key: $OPENAI_API_KEY
        path = Path(self.work) / f"{rank:05d}.jsonl"
        stats = run_synth(path, o["num_docs"], teacher, topics, templates, web, o["seed"], (rank, world_size),
                          o["concurrency"], progress=False)
        if stats.failed:
            raise PhibookError(f"synth task {rank}: {stats.failed} documents failed (see {path}.failures.jsonl); "
                               "rerun the pipeline to retry them")
        docs = [line for _, line in read_lines(path, skip_bad=False)]
        docs.sort(key=lambda d: d["meta"]["index"])  # completion order varies; plan order does not
        for line in docs:
            self.stat_update("documents")
            yield to_document(line, int(line["meta"]["index"]))


# --------------------------------------------------------------------------- tokenize


def _tokenize_files(files: list[str] | None, stage_dir: str | None, tasks: int) -> list[Path]:
    if files is not None:
        return [Path(f) for f in files]
    return [rank_file(stage_dir, r) for r in range(tasks)]


def _tokenize_options(opts: dict[str, Any]):
    from phibook.data.tokenize import Options

    return Options(val_fraction=float(opts["val_fraction"]), text_field=opts["text_field"])


class TokenizeUnits(PipelineStep):
    """`phibook tokenize`'s phase 1: task r runs the work units with index = r (mod tasks) of the plan
    over the previous stage's files (in task order); a unit whose sidecar matches is skipped."""

    name = "phibook tokenize units"
    type = "🔢 - TOKENIZER"

    def __init__(self, out: str, opts: dict[str, Any], files: list[str] | None, stage_dir: str | None,
                 prev_tasks: int) -> None:
        super().__init__()
        self.out, self.opts, self.files, self.stage_dir, self.prev_tasks = out, opts, files, stage_dir, prev_tasks

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from phibook.data.shards import dtype_for_vocab
        from phibook.data.tokenize import WORK_DIR, plan_units, run_unit, unit_done
        from phibook.model.tokenizer import Tokenizer

        for _ in data or []:
            pass
        tokenizer = Tokenizer.from_file(self.opts["tokenizer"])
        options = _tokenize_options(self.opts)
        work = Path(self.out) / WORK_DIR
        work.mkdir(parents=True, exist_ok=True)
        units = plan_units(_tokenize_files(self.files, self.stage_dir, self.prev_tasks), self.opts["chunk_bytes"])
        dtype = dtype_for_vocab(tokenizer.vocab_size)
        for unit in units[rank::world_size]:
            if unit_done(work, unit, unit.key(tokenizer.fingerprint, options)) is None:
                meta = run_unit(unit, tokenizer, tokenizer.fingerprint, options, work, dtype, lambda *a: None)
                self.stat_update("documents", value=sum(meta["documents"].values()))
                self.stat_update("tokens", value=sum(meta["tokens"].values()))
        return None


class TokenizeAssemble(PipelineStep):
    """`phibook tokenize`'s phase 2 in one task: every rank's units, in order, cut into shards;
    then manifest.json over all of them, written last."""

    name = "phibook tokenize manifest"
    type = "🔢 - TOKENIZER"

    def __init__(self, out: str, opts: dict[str, Any], files: list[str] | None, stage_dir: str | None,
                 prev_tasks: int) -> None:
        super().__init__()
        self.out, self.opts, self.files, self.stage_dir, self.prev_tasks = out, opts, files, stage_dir, prev_tasks

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        import shutil

        from phibook.data.shards import MANIFEST, dtype_for_vocab
        from phibook.data.tokenize import (
            WORK_DIR,
            assemble_shards,
            build_plan_hash,
            plan_units,
            remove_partial_files,
            unit_done,
        )
        from phibook.model.tokenizer import Tokenizer

        out = Path(self.out)
        tokenizer = Tokenizer.from_file(self.opts["tokenizer"])
        options = _tokenize_options(self.opts)
        work = out / WORK_DIR
        units = plan_units(_tokenize_files(self.files, self.stage_dir, self.prev_tasks), self.opts["chunk_bytes"])
        metas = {}
        for unit in units:
            meta = unit_done(work, unit, unit.key(tokenizer.fingerprint, options))
            if meta is None:
                raise PhibookError(f"tokenize: work unit {unit.index} ({unit.display}) is not done; rerun the pipeline")
            metas[unit.index] = meta
        source = self.opts["source"] or out.resolve().name
        (out / MANIFEST).unlink(missing_ok=True)
        remove_partial_files(out)
        plan_hash = build_plan_hash(units, tokenizer.fingerprint, options, self.opts["shard_tokens"], source)
        assemble_shards(units, metas, tokenizer, self.opts["tokenizer"], options, out, work,
                        dtype=dtype_for_vocab(tokenizer.vocab_size), shard_tokens=self.opts["shard_tokens"],
                        source=source, plan_hash=plan_hash, progress=False)
        shutil.rmtree(work, ignore_errors=True)
        return None
