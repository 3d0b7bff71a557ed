"""Token shards on disk: the flat token files, their manifest, and checks.

A shard set is a directory holding ``train-00000.bin``, ``train-00001.bin``,
... (and ``val-*.bin`` when a held-out split was asked for) plus
``manifest.json``. A shard is nothing but little-endian token ids, uint16 when
the tokenizer's ids fit in 16 bits and uint32 otherwise, with every document
followed by the tokenizer's EOS id. The manifest says which tokenizer made
them (its fingerprint) and how many tokens and documents each file holds, so a
reader can check every file before training touches it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phibook import faults, io
from phibook.data.options import DEFAULT_SHARD_TOKENS
from phibook.errors import PhibookError

FORMAT = "phibook-shards"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 while every id fits in 16 bits (DESIGN: uint32 when the vocab exceeds 65,535)."""
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


def dtype_name(dtype: np.dtype) -> str:
    return {np.dtype("<u2"): "uint16", np.dtype("<u4"): "uint32"}[np.dtype(dtype)]


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


# --------------------------------------------------------------------------- atomic writes


def file_sha256(path: str | Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- manifest


@dataclass
class ShardInfo:
    file: str  # name relative to the manifest's directory
    split: str
    tokens: int
    documents: int
    sha256: str = ""
    inputs: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "split": self.split,
            "tokens": self.tokens,
            "documents": self.documents,
            "sha256": self.sha256,
            "inputs": self.inputs,
        }


@dataclass
class Manifest:
    """A parsed ``manifest.json``; ``path`` is the file it came from."""

    path: Path
    tokenizer: dict[str, Any]
    dtype: str
    source: str
    shards: list[ShardInfo]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        return self.path.parent

    @property
    def fingerprint(self) -> str:
        return str(self.tokenizer["fingerprint"])

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer["eos_id"])

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype("<u2") if self.dtype == "uint16" else np.dtype("<u4")

    def split_shards(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    def total_tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.split_shards(split))

    def shard_path(self, shard: ShardInfo) -> Path:
        return self.directory / shard.file

    def validate_files(self, split: str | None = None) -> None:
        """Every listed shard exists and holds exactly ``tokens * itemsize`` bytes."""
        itemsize = self.np_dtype.itemsize
        for shard in self.shards:
            if split is not None and shard.split != split:
                continue
            path = self.shard_path(shard)
            if not path.is_file():
                raise PhibookError(f"shard {path} listed in {self.path} is missing")
            expected = shard.tokens * itemsize
            actual = path.stat().st_size
            if actual != expected:
                raise PhibookError(
                    f"shard {path} is truncated or corrupt: {self.path} says {shard.tokens} tokens "
                    f"x {itemsize} bytes ({self.dtype}) = {expected} bytes, the file has {actual} bytes"
                )

    def open_shard(self, shard: ShardInfo) -> np.ndarray:
        """A read-only memory map: only the pages a reader touches are loaded."""
        if shard.tokens == 0:
            return np.zeros(0, dtype=self.np_dtype)
        return np.memmap(self.shard_path(shard), dtype=self.np_dtype, mode="r", shape=(shard.tokens,))

    def to_dict(self) -> dict[str, Any]:
        totals = {split: self.total_tokens(split) for split in SPLITS if self.split_shards(split)}
        docs = {split: sum(s.documents for s in self.split_shards(split)) for split in totals}
        return {
            "format": FORMAT,
            "version": VERSION,
            "tokenizer": self.tokenizer,
            "dtype": self.dtype,
            "source": self.source,
            "shards": [s.to_dict() for s in self.shards],
            "total_tokens": totals,
            "total_documents": docs,
            **self.extra,
        }

    def write(self) -> None:
        io.write_json(self.path, self.to_dict())


def resolve_manifest_path(path: str | Path) -> Path:
    """Accept a manifest.json or the directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise PhibookError(f"no shard manifest at {path} (run `phibook tokenize` to make one)")
    return path


def load_manifest(path: str | Path) -> Manifest:
    """Read and check a manifest (fields and dtype); shard files are checked by ``validate_files``."""
    path = resolve_manifest_path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PhibookError(f"cannot read shard manifest {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PhibookError(f"{path} is not a phibook shard manifest (format != {FORMAT!r})")
    if data.get("version") != VERSION:
        raise PhibookError(f"{path}: manifest version {data.get('version')!r} is not supported (want {VERSION})")
    tok = data.get("tokenizer")
    if not isinstance(tok, dict) or not all(k in tok for k in ("fingerprint", "vocab_size", "eos_id")):
        raise PhibookError(f"{path}: field 'tokenizer' needs fingerprint, vocab_size and eos_id")
    dtype = data.get("dtype")
    if dtype not in ("uint16", "uint32"):
        raise PhibookError(f"{path}: dtype must be 'uint16' or 'uint32', got {dtype!r}")
    if dtype != dtype_name(dtype_for_vocab(int(tok["vocab_size"]))):
        raise PhibookError(
            f"{path}: dtype {dtype} does not match a vocabulary of {tok['vocab_size']} "
            f"(want {dtype_name(dtype_for_vocab(int(tok['vocab_size'])))})"
        )
    shards = []
    for i, raw in enumerate(data.get("shards") or []):
        try:
            shard = ShardInfo(
                file=str(raw["file"]),
                split=str(raw["split"]),
                tokens=int(raw["tokens"]),
                documents=int(raw.get("documents", 0)),
                sha256=str(raw.get("sha256", "")),
                inputs=list(raw.get("inputs", [])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PhibookError(f"{path}: shards[{i}] is malformed ({exc!r})") from exc
        if shard.split not in SPLITS:
            raise PhibookError(f"{path}: shards[{i}] has split {shard.split!r}, want one of {SPLITS}")
        if "/" in shard.file or shard.file.startswith(".."):
            raise PhibookError(f"{path}: shards[{i}] file {shard.file!r} must be a plain name in the manifest's folder")
        shards.append(shard)
    known = {"format", "version", "tokenizer", "dtype", "source", "shards", "total_tokens", "total_documents"}
    extra = {k: v for k, v in data.items() if k not in known}
    return Manifest(
        path=path,
        tokenizer=dict(tok),
        dtype=dtype,
        source=str(data.get("source", path.parent.name)),
        shards=shards,
        extra=extra,
    )


# --------------------------------------------------------------------------- writing


class ShardWriter:
    """Appends token arrays to one split's shards, closing a shard at a document end once
    it would pass ``shard_tokens``. Each shard is written under a temporary name and
    renamed when complete, so a finished ``train-00003.bin`` is always whole."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, np.dtype(dtype), shard_tokens
        self.shards: list[ShardInfo] = []
        self._file = None
        self._tmp: Path | None = None

    def _open(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self._tmp = io.temp_path(self.out_dir / name)
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in _close
        self._hash = hashlib.sha256()
        self._cur = ShardInfo(file=name, split=self.split, tokens=0, documents=0)

    def _close(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self._cur.sha256 = self._hash.hexdigest()
        faults.point(f"shards.{self.split}_tmp_written", len(self.shards))  # test hooks (phibook.faults)
        io.commit(self._tmp, self.out_dir / self._cur.file, synced=True)
        self.shards.append(self._cur)
        faults.point(f"shards.{self.split}_done", len(self.shards) - 1)

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray, origin: dict[str, Any] | None = None) -> None:
        """Append consecutive documents: ``tokens`` is their concatenation, ``lengths`` their sizes."""
        lengths = np.asarray(lengths, dtype=np.int64)
        ends = np.cumsum(lengths)
        start_doc, start_tok = 0, 0
        while start_doc < len(lengths):
            if self._file is None:
                self._open()
            room = self.shard_tokens - self._cur.tokens
            # Last document index (exclusive) whose end still fits in this shard.
            stop_doc = int(np.searchsorted(ends, start_tok + room, side="right"))
            if stop_doc <= start_doc:
                if self._cur.tokens > 0:
                    self._close()
                    continue
                stop_doc = start_doc + 1  # one document bigger than a whole shard gets a shard to itself
            stop_tok = int(ends[stop_doc - 1])
            piece = np.ascontiguousarray(tokens[start_tok:stop_tok], dtype=self.dtype)
            data = piece.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._cur.tokens += stop_tok - start_tok
            self._cur.documents += stop_doc - start_doc
            if origin is not None and origin not in self._cur.inputs:
                self._cur.inputs.append(origin)
            start_doc, start_tok = stop_doc, stop_tok
            if self._cur.tokens >= self.shard_tokens:
                self._close()

    def finish(self) -> list[ShardInfo]:
        self._close()
        return self.shards


def write_shard_set(
    out_dir: str | Path,
    documents: dict[str, Iterable[Iterable[int]]],
    tokenizer: dict[str, Any],
    source: str = "",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    append_eos: bool = True,
) -> Manifest:
    """Write a shard set straight from token lists (tests, tools, and tiny corpora).

    ``documents`` maps a split ("train", "val") to its documents' token ids;
    ``tokenizer`` needs fingerprint, vocab_size and eos_id. The CLI stage for
    real corpora is ``phibook tokenize`` (phibook.data.tokenize).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = dtype_for_vocab(int(tokenizer["vocab_size"]))
    eos = int(tokenizer["eos_id"])
    shards: list[ShardInfo] = []
    for split, docs in documents.items():
        if split not in SPLITS:
            raise PhibookError(f"unknown split {split!r}; want one of {SPLITS}")
        arrays = [np.asarray(list(d) + ([eos] if append_eos else []), dtype=np.int64) for d in docs]
        if not arrays:
            continue
        writer = ShardWriter(out_dir, split, dtype, shard_tokens)
        writer.add_documents(np.concatenate(arrays), np.array([len(a) for a in arrays]))
        shards.extend(writer.finish())
    manifest = Manifest(
        path=out_dir / MANIFEST,
        tokenizer=dict(tokenizer),
        dtype=dtype_name(dtype),
        source=source or out_dir.name,
        shards=shards,
    )
    manifest.write()
    return manifest
