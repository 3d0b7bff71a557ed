"""The ``tokenize`` stage: documents (JSONL, plain text, parquet) -> token shards + manifest.

Two phases, so the output never depends on how many workers ran:

1. Work units, in parallel. An input is cut into units that depend only on
   the input itself: a JSONL file into byte ranges of ``chunk_bytes`` (a line
   belongs to the range it starts in), a parquet file into row groups, a text
   file is one unit. Each unit streams its documents through the tokenizer in
   small batches and appends ids (+ EOS) to ``OUT/.work/unit-NNNNN.{train,val}.bin``
   with the document lengths beside them. A JSON sidecar, written atomically
   last, marks the unit done; a rerun skips every unit whose sidecar matches
   (same input size and mtime, tokenizer and options) and redoes the others
   from their start, so a killed run neither loses nor repeats documents.
2. Assembly, in one process (``assemble_shards``, public: the pipeline calls it too). Unit
   outputs are concatenated in input order and
   cut at document ends into ``train-NNNNN.bin`` / ``val-NNNNN.bin`` of at
   most ``shard_tokens`` tokens (temp name + rename), then ``manifest.json``
   is written atomically, last, and the work folder is removed.

A run first deletes the temporary files that a killed run's writers left (see
``remove_partial_files``); the fault points ``tokenize.unit_done`` and
``shards.*`` (phibook.faults) let tests kill a run exactly where they choose.

A document goes to the validation split when a stable hash of its id (the one
id rule of phibook.documents) falls below ``val_fraction``: the split is the same
for any worker count, chunking or input order.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from phibook import faults, io
from phibook.data.options import DEFAULT_SHARD_TOKENS, DEFAULT_TOKENIZE_CHUNK_BYTES
from phibook.data.shards import (
    MANIFEST,
    SPLITS,
    Manifest,
    ShardWriter,
    dtype_for_vocab,
    dtype_name,
    load_manifest,
)
from phibook.documents import doc_id, read_lines
from phibook.errors import PhibookError

WORK_DIR = ".work"
TOKENIZER_COPY = "tokenizer.json"
UNIT_VERSION = 1
JSONL_EXT = {".jsonl", ".ndjson"}
TEXT_EXT = {".txt", ".text", ".md"}
PARQUET_EXT = {".parquet"}
# Texts per tokenizer call: big enough for the Rust batch encoder, small
# enough that a worker's memory stays bounded whatever the input size.
BATCH_DOCS = 256
BATCH_CHARS = 4 << 20


@dataclass(frozen=True)
class Options:
    """Everything that changes the tokens a unit produces (part of each unit's identity)."""

    val_fraction: float = 0.0
    text_field: str = "text"
    text_unit: str = "file"  # .txt/.md: "file" = one document per file, "paragraph" = per blank-line block


@dataclass(frozen=True)
class Unit:
    index: int
    path: str  # absolute
    display: str  # as the user named it, for messages and the manifest
    kind: str  # "jsonl" | "text" | "parquet"
    part: int
    start: int  # jsonl: byte offset; parquet: row group; text: 0
    end: int  # jsonl: byte offset (exclusive); parquet: row group + 1; text: file size
    weight: int  # approximate input bytes, for the progress bar
    size: int
    mtime_ns: int

    def key(self, fingerprint: str, options: Options) -> str:
        ident = {
            "v": UNIT_VERSION,
            **{k: v for k, v in asdict(self).items() if k not in ("index", "display", "weight")},
            "tokenizer": fingerprint,
            **asdict(options),
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def origin(self) -> dict[str, Any]:
        return {"path": self.display, "part": self.part}


def is_val(key: str, val_fraction: float) -> bool:
    """The held-out decision for one document: a stable hash of its id (or text)."""
    if val_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(b"phibook-val\0" + key.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return h / 2.0**64 < val_fraction


# --------------------------------------------------------------------------- planning


def input_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if path.name.lower().endswith(tuple(e + ".gz" for e in JSONL_EXT)):
        return "jsonl.gz"
    if suffix in JSONL_EXT:
        return "jsonl"
    if suffix in TEXT_EXT:
        return "text"
    if suffix in PARQUET_EXT:
        return "parquet"
    raise PhibookError(
        f"input {path}: unknown file type {suffix or '(no extension)'!r}; expected document JSONL "
        f"({', '.join(sorted(JSONL_EXT))}, optionally .gz), plain text ({', '.join(sorted(TEXT_EXT))}) or .parquet"
    )


def _known_type(path: Path) -> bool:
    try:
        input_kind(path)
    except PhibookError:
        return False
    return True


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files as given, folders expanded to the files of known types inside them (sorted)."""
    if not inputs:
        raise PhibookError("no input files given")
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.is_file() and _known_type(p)
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise PhibookError(f"input folder {path} holds no .jsonl, .txt/.md or .parquet files")
            files.extend(found)
        elif path.is_file():
            input_kind(path)
            files.append(path)
        else:
            raise PhibookError(f"input {path} does not exist")
    return files


def plan_units(files: list[Path], chunk_bytes: int) -> list[Unit]:
    units: list[Unit] = []
    for path in files:
        kind = input_kind(path)
        st = path.stat()
        common = dict(path=str(path.resolve()), display=str(path), kind=kind, size=st.st_size, mtime_ns=st.st_mtime_ns)
        if kind == "jsonl":
            starts = range(0, max(st.st_size, 1), chunk_bytes)
            for part, start in enumerate(starts):
                end = min(start + chunk_bytes, st.st_size)
                units.append(Unit(len(units), part=part, start=start, end=end, weight=end - start, **common))
        elif kind == "parquet":
            import pyarrow.parquet as pq

            try:
                meta = pq.ParquetFile(path).metadata
            except Exception as exc:
                raise PhibookError(f"cannot read parquet file {path}: {exc}") from exc
            rows = max(meta.num_rows, 1)
            for rg in range(meta.num_row_groups):
                weight = st.st_size * meta.row_group(rg).num_rows // rows
                units.append(Unit(len(units), part=rg, start=rg, end=rg + 1, weight=weight, **common))
        else:  # text, or gzip-compressed JSONL (which cannot be entered mid-stream): one unit
            units.append(Unit(len(units), part=0, start=0, end=st.st_size, weight=st.st_size, **common))
    return units


# --------------------------------------------------------------------------- reading documents
# Each reader yields (split key, text, bytes consumed since the last yield);
# (None, None, n) when bytes were read that hold no document (blank lines).


def _read_jsonl(unit: Unit, options: Options) -> Iterator[tuple[str, str, int]]:
    gz = unit.kind == "jsonl.gz"
    span = {} if gz else {"start": unit.start, "end": unit.end}
    for line in read_lines(unit.path, text_field=options.text_field, name=unit.display, **span):
        # Progress for .gz counts compressed bytes, reported once at the end of the unit.
        if line.doc is None:
            yield None, None, 0 if gz else line.size  # a blank line: no document
        else:
            yield doc_id(line.doc, options.text_field), line.doc[options.text_field], 0 if gz else line.size
    if gz:
        yield None, None, unit.weight


def _read_text(unit: Unit, options: Options) -> Iterator[tuple[str, str, int]]:
    try:
        if options.text_unit == "file":
            # One document per file: the file is the unit of memory here (use JSONL for huge corpora).
            text = Path(unit.path).read_bytes().decode("utf-8")
            yield text, text, unit.size
            return
        with open(unit.path, "rb") as f:
            block: list[str] = []
            consumed = 0
            for raw in f:
                consumed += len(raw)
                line = raw.decode("utf-8")
                if line.strip():
                    block.append(line)
                elif block:
                    text = "".join(block).rstrip("\n")
                    yield text, text, consumed
                    block, consumed = [], 0
                else:
                    yield None, None, consumed
                    consumed = 0
            text = "".join(block).rstrip("\n")
            yield (text, text, consumed) if text else (None, None, consumed)
    except UnicodeDecodeError as exc:
        raise PhibookError(f"{unit.display}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _read_parquet(unit: Unit, options: Options) -> Iterator[tuple[str, str, int]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(unit.path)
    names = pf.schema_arrow.names
    if options.text_field not in names:
        raise PhibookError(f"{unit.display}: no {options.text_field!r} column (columns: {', '.join(names)})")
    columns = [options.text_field] + (["id"] if "id" in names and options.text_field != "id" else [])
    rows = max(pf.metadata.row_group(unit.start).num_rows, 1)
    row = 0
    for batch in pf.iter_batches(batch_size=BATCH_DOCS, row_groups=[unit.start], columns=columns):
        texts = batch.column(0).to_pylist()
        ids = batch.column(1).to_pylist() if len(columns) > 1 else [None] * len(texts)
        for text, own_id in zip(texts, ids):
            if text is not None and not isinstance(text, str):
                raise PhibookError(
                    f"{unit.display}: row group {unit.start} row {row}: column {options.text_field!r} is not text"
                )
            # Spread the row group's share of the file over its rows for the progress bar.
            weight = unit.weight * (row + 1) // rows - unit.weight * row // rows
            row += 1
            text = text or ""
            yield doc_id({"id": own_id, "text": text}), text, weight


READERS = {"jsonl": _read_jsonl, "jsonl.gz": _read_jsonl, "text": _read_text, "parquet": _read_parquet}


# --------------------------------------------------------------------------- one work unit


def unit_paths(work: Path, index: int) -> dict[str, Path]:
    stem = f"unit-{index:05d}"
    paths = {"meta": work / f"{stem}.json"}
    for split in SPLITS:
        paths[f"{split}.bin"] = work / f"{stem}.{split}.bin"
        paths[f"{split}.len"] = work / f"{stem}.{split}.len"
    return paths


def unit_done(work: Path, unit: Unit, key: str) -> dict[str, Any] | None:
    """The sidecar of a finished unit with this exact identity, else None."""
    paths = unit_paths(work, unit.index)
    try:
        meta = json.loads(paths["meta"].read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("key") != key:
        return None
    for split in SPLITS:  # the sidecar is written last, but check the data is all there
        tokens, docs = meta["tokens"][split], meta["documents"][split]
        itemsize = int(meta["itemsize"])
        for suffix, expect in (("bin", tokens * itemsize), ("len", docs * 4)):
            p = paths[f"{split}.{suffix}"]
            if (p.stat().st_size if p.exists() else 0) != expect:
                return None
    return meta


def run_unit(
    unit: Unit,
    tokenizer,
    fingerprint: str,
    options: Options,
    work: Path,
    dtype: np.dtype,
    progress: Callable[[int, int, int], None],
) -> dict[str, Any]:
    """Tokenize one unit into its work files and write its sidecar; returns the sidecar."""
    paths = unit_paths(work, unit.index)
    key = unit.key(fingerprint, options)
    eos = tokenizer.eos_id
    counts = {"tokens": dict.fromkeys(SPLITS, 0), "documents": dict.fromkeys(SPLITS, 0), "empty": 0}
    files = {name: open(p, "wb") for name, p in paths.items() if name != "meta"}  # noqa: SIM115
    try:
        batch: list[tuple[str, str]] = []
        pending = {"bytes": 0, "chars": 0}

        def flush() -> None:
            # allow_special=False: a literal "<|endoftext|>" in a document stays text, so a
            # document can never forge a boundary; only the EOS appended here separates documents.
            texts = [text for _, text in batch]
            ids_list = tokenizer.encode_batch(texts, allow_special=False) if batch else []
            tokens = 0
            for (split_key, _), ids in zip(batch, ids_list):
                split = "val" if is_val(split_key, options.val_fraction) else "train"
                arr = np.empty(len(ids) + 1, dtype=dtype)
                arr[:-1] = ids
                arr[-1] = eos
                files[f"{split}.bin"].write(arr.tobytes())
                files[f"{split}.len"].write(np.array([len(arr)], dtype="<u4").tobytes())
                counts["tokens"][split] += len(arr)
                counts["documents"][split] += 1
                tokens += len(arr)
            progress(pending["bytes"], len(batch), tokens)
            batch.clear()
            pending["bytes"] = pending["chars"] = 0

        for split_key, text, nbytes in READERS[unit.kind](unit, options):
            pending["bytes"] += nbytes
            if text is None:
                continue
            if not text:
                counts["empty"] += 1  # a document with empty text would be a lone EOS: skip it, count it
                continue
            batch.append((split_key, text))
            pending["chars"] += len(text)
            if len(batch) >= BATCH_DOCS or pending["chars"] >= BATCH_CHARS:
                flush()
        flush()
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files.values():
            f.close()
    meta = {"key": key, "itemsize": np.dtype(dtype).itemsize, "input": unit.display, "part": unit.part, **counts}
    io.write_json(paths["meta"], meta)
    faults.point("tokenize.unit_done", unit.index)
    return meta


# --------------------------------------------------------------------------- worker processes

_WORKER: dict[str, Any] = {}


def _worker_init(tokenizer_path: str, fingerprint: str, options: Options, work: str, dtype: str, queue) -> None:
    # One process per core already; keep the Rust encoder to one thread each.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    from phibook.model.tokenizer import Tokenizer

    _WORKER.update(
        # The parent's fingerprint: hashing the vocabulary again costs each worker about a second.
        tokenizer=Tokenizer.from_file(tokenizer_path), fingerprint=fingerprint, options=options, work=Path(work),
        dtype=np.dtype(dtype), queue=queue,
    )


def _worker_run(unit: Unit) -> dict[str, Any]:
    w = _WORKER
    return run_unit(unit, w["tokenizer"], w["fingerprint"], w["options"], w["work"], w["dtype"],
                    lambda b, d, t: w["queue"].put((b, d, t)))


# --------------------------------------------------------------------------- the stage


def build_plan_hash(units: list[Unit], fingerprint: str, options: Options, shard_tokens: int, source: str) -> str:
    """What a finished build was made from (units, tokenizer, options, shard size, source name):
    a manifest carrying the same hash is up to date. Phase 2 records it; `phibook pipeline` too."""
    desc = [[u.key(fingerprint, options) for u in units], shard_tokens, source]
    return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]


def _up_to_date(out: Path, plan_hash: str) -> Manifest | None:
    try:
        manifest = load_manifest(out / MANIFEST)
        manifest.validate_files()
    except PhibookError:
        return None
    return manifest if manifest.extra.get("build", {}).get("plan_hash") == plan_hash else None


def tokenize_inputs(
    inputs: list[str | Path],
    tokenizer_path: str | Path,
    out: str | Path,
    val_fraction: float = 0.0,
    workers: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    source: str | None = None,
    text_field: str = "text",
    text_unit: str = "file",
    chunk_bytes: int = DEFAULT_TOKENIZE_CHUNK_BYTES,
    progress: bool = True,
) -> Manifest:
    """Tokenize ``inputs`` into ``out`` (shards + manifest.json); see the module docstring."""
    from phibook.model.tokenizer import Tokenizer

    if not 0.0 <= val_fraction < 1.0:
        raise PhibookError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise PhibookError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    if chunk_bytes < 1:
        raise PhibookError(f"--chunk-bytes must be >= 1, got {chunk_bytes}")
    if text_unit not in ("file", "paragraph"):
        raise PhibookError(f"--text-unit must be 'file' or 'paragraph', got {text_unit!r}")
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise PhibookError(f"--workers must be >= 1, got {workers}")

    tokenizer = Tokenizer.from_file(tokenizer_path)
    options = Options(val_fraction=float(val_fraction), text_field=text_field, text_unit=text_unit)
    out = Path(out)
    source = source or out.resolve().name
    units = plan_units(expand_inputs(list(inputs)), chunk_bytes)
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    plan_hash = build_plan_hash(units, tokenizer.fingerprint, options, shard_tokens, source)
    if (done := _up_to_date(out, plan_hash)) is not None:
        _say(f"{out / MANIFEST} is up to date ({len(done.shards)} shards); nothing to do")
        return done

    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # stale or partial: the old shards no longer describe the inputs
    work = out / WORK_DIR
    work.mkdir(exist_ok=True)
    for stale in remove_partial_files(out):
        _say(f"removed {stale.relative_to(out)}, left half-written by a killed run")
    metas: dict[int, dict[str, Any]] = {}
    for unit in units:
        if (meta := unit_done(work, unit, unit.key(tokenizer.fingerprint, options))) is not None:
            metas[unit.index] = meta
    todo = [u for u in units if u.index not in metas]
    if metas:
        _say(f"resuming: {len(metas)} of {len(units)} work units already done in {work}")

    _run_units(todo, units, metas, tokenizer, tokenizer_path, options, work, dtype, workers, progress)
    manifest = assemble_shards(units, metas, tokenizer, tokenizer_path, options, out, work, dtype=dtype,
                               shard_tokens=shard_tokens, source=source, plan_hash=plan_hash, progress=progress)
    shutil.rmtree(work, ignore_errors=True)
    if val_fraction > 0 and not manifest.split_shards("val"):
        _say(f"warning: --val-fraction {val_fraction} held out none of the documents (too few documents?); "
             "there is no val split")
    return manifest


def remove_partial_files(out: Path) -> list[Path]:
    """Delete what the writers of this stage leave when a run is killed mid-write (phibook.io's
    stale temporary names, in OUT and OUT/.work): shards not yet renamed, the manifest, the
    tokenizer copy and the unit sidecars. (A unit's token files need no sweep: a unit without
    its sidecar is redone from its start.)"""
    return io.sweep(out) + io.sweep(out / WORK_DIR)


def _say(msg: str) -> None:
    print(f"phibook tokenize: {msg}", file=sys.stderr)


def _run_units(todo, units, metas, tokenizer, tokenizer_path, options, work, dtype, workers, show) -> None:
    from tqdm import tqdm

    total = sum(u.weight for u in units)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenize", file=sys.stderr, disable=not show,
               initial=sum(u.weight for u in units if u.index in metas), dynamic_ncols=True)
    stats = {"docs": 0, "tokens": 0, "t0": time.perf_counter()}

    def advance(nbytes: int, docs: int, tokens: int) -> None:
        stats["docs"] += docs
        stats["tokens"] += tokens
        rate = stats["tokens"] / max(time.perf_counter() - stats["t0"], 1e-9)
        bar.set_postfix(docs=f"{stats['docs']:,}", tokens=f"{stats['tokens']:,}", tok_s=f"{rate:,.0f}",
                        refresh=False)
        bar.update(nbytes)

    try:
        if workers == 1 or len(todo) <= 1:
            for unit in todo:
                metas[unit.index] = run_unit(unit, tokenizer, tokenizer.fingerprint, options, work, dtype, advance)
        else:
            _run_pool(todo, metas, tokenizer_path, tokenizer.fingerprint, options, work, dtype,
                      min(workers, len(todo)), advance)
    finally:
        bar.close()


def _run_pool(todo, metas, tokenizer_path, fingerprint, options, work, dtype, workers, advance) -> None:
    import multiprocessing as mp
    import queue as queue_mod

    # spawn, not fork: the parent may already hold Rust tokenizer threads.
    ctx = mp.get_context("spawn")
    progress_q = ctx.Queue()
    with ctx.Pool(workers, initializer=_worker_init,
                  initargs=(str(tokenizer_path), fingerprint, options, str(work), np.dtype(dtype).str, progress_q)) as pool:
        pending = {u.index: pool.apply_async(_worker_run, (u,)) for u in todo}
        while pending:
            try:
                while True:
                    advance(*progress_q.get(timeout=0.1))
            except queue_mod.Empty:
                pass
            for index in [i for i, r in pending.items() if r.ready()]:
                metas[index] = pending.pop(index).get()  # re-raises a worker's PhibookError here
        while True:
            try:
                advance(*progress_q.get_nowait())
            except queue_mod.Empty:
                break


def assemble_shards(units: list[Unit], metas: dict[int, dict[str, Any]], tokenizer, tokenizer_path,
                    options: Options, out: Path, work: Path, *, dtype, shard_tokens: int, source: str,
                    plan_hash: str, progress: bool) -> Manifest:
    """Phase 2 of tokenize: every finished work unit's token files (``metas``: their sidecars, by
    unit index) into shards of ``shard_tokens`` per split, in unit order, then the tokenizer copy
    and manifest.json, written last. Phase 1 is ``run_unit`` per unit (``phibook tokenize`` runs
    both; ``phibook pipeline``'s tokenize block runs phase 1 in its tasks and this in one)."""
    from tqdm import tqdm

    show = progress

    total = sum(m["tokens"][split] for m in metas.values() for split in SPLITS)
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="write shards", file=sys.stderr,
               disable=not show, dynamic_ncols=True)
    shards = []
    for split in SPLITS:
        writer = ShardWriter(out, split, dtype, shard_tokens)
        for unit in units:
            paths = unit_paths(work, unit.index)
            n_docs = metas[unit.index]["documents"][split]
            if n_docs == 0:
                continue
            lengths = np.fromfile(paths[f"{split}.len"], dtype="<u4")
            tokens = np.memmap(paths[f"{split}.bin"], dtype=dtype, mode="r")
            writer.add_documents(tokens, lengths, origin=unit.origin())
            bar.update(len(tokens))
            del tokens
        shards.extend(writer.finish())
    bar.close()
    keep = {s.file for s in shards}
    for split in SPLITS:  # shards left over from an earlier, bigger build of this folder
        for old in out.glob(f"{split}-*.bin"):
            if old.name not in keep:
                old.unlink()
    tokenizer.save(out)
    empty = sum(m["empty"] for m in metas.values())
    files: dict[str, int] = {}
    for u in units:
        files[u.display] = files.get(u.display, 0) + 1
    manifest = Manifest(
        path=out / MANIFEST,
        tokenizer={
            "fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            # Relative to the manifest: the shard set carries a copy of its tokenizer, so
            # training finds it (and puts it in checkpoints) wherever the folder is moved.
            "path": TOKENIZER_COPY,
            "source_path": str(Path(tokenizer_path).resolve()),
        },
        dtype=dtype_name(dtype),
        source=source,
        shards=shards,
        extra={
            "inputs": [{"path": p, "parts": n} for p, n in files.items()],
            "options": {**asdict(options), "shard_tokens": shard_tokens},
            "skipped_empty_documents": empty,
            "build": {"plan_hash": plan_hash, "units": len(units)},
        },
    )
    manifest.write()
    return manifest
