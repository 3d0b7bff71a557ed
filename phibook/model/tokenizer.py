"""Tokenizers: load a ``tokenizer.json``, encode/decode, stream-decode, and train a byte-level BPE.

Everything runs on the Rust ``tokenizers`` library, reading the same
``tokenizer.json`` that ``transformers`` reads, so ids match the released
phi-1.5 (codegen-mono: 50,257 byte-level BPE tokens + 38 added tokens, 50,295
in all; ``<|endoftext|>`` is 50256). Trained tokenizers have the same shape
(ByteLevel pre-tokenizer without prefix space, ByteLevel decoder) with
``<|endoftext|>`` added first, at id 0.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from phibook import io
from phibook.documents import read_lines
from phibook.errors import PhibookError

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
# 256 byte symbols + the EOS special token: the smallest byte-level BPE.
MIN_VOCAB_SIZE = 257
# Plain-text files are fed to the trainer in blocks of whole lines this large,
# so whitespace runs that cross line ends (indentation after "\n") are learned.
TEXT_BLOCK_CHARS = 1 << 16


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the small surface the rest of phibook uses."""

    def __init__(self, backend, path: Path | None = None) -> None:
        self._tok = backend
        self.path = path
        self._fingerprint: str | None = None
        self._plain = None  # copy that encodes special tokens as text; built on first use

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load ``path``: a tokenizer.json file, or a directory (model/checkpoint) that holds one."""
        from tokenizers import Tokenizer as RustTokenizer

        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if path.is_dir() and not file.is_file() and (path / "vocab.json").is_file():
            return cls(_from_vocab_and_merges(path), path)
        if not file.is_file():
            where = f"no {TOKENIZER_FILE} in directory {path}" if path.is_dir() else f"{path} does not exist"
            raise PhibookError(f"tokenizer not found: {where}")
        try:
            backend = RustTokenizer.from_file(str(file))
        except Exception as exc:  # the library raises a bare Exception on bad JSON
            raise PhibookError(f"cannot read tokenizer {file}: {exc}") from exc
        return cls(backend, file)

    # -- encoding ---------------------------------------------------------

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of ``text``; no BOS/EOS added (the caller appends ``eos_id`` between documents).

        With ``allow_special=False`` a literal ``<|endoftext|>`` in the text is
        encoded as ordinary characters instead of the EOS id, so document text
        can never forge a document boundary (use it when tokenizing corpora).
        """
        return self._backend_for(allow_special).encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], allow_special: bool = True) -> list[list[int]]:
        """Encode many texts on all cores (the library's parallel batch encode)."""
        backend = self._backend_for(allow_special)
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]

    def _backend_for(self, allow_special: bool):
        if allow_special:
            return self._tok
        # A separate copy with the library's encode_special_tokens switch on:
        # flipping the switch on the shared backend would race other threads.
        if self._plain is None:
            from tokenizers import Tokenizer as RustTokenizer

            self._plain = RustTokenizer.from_str(self._tok.to_str())
            self._plain.encode_special_tokens = True
        return self._plain

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list, or a 1-D torch/numpy array). Ids past the
        vocabulary (padding rows of the embedding) decode to nothing."""
        return self._tok.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch, skip_special_tokens: bool = False) -> list[str]:
        return self._tok.decode_batch(
            [_as_id_list(ids) for ids in batch], skip_special_tokens=skip_special_tokens
        )

    # -- vocabulary -------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (codegen-mono: 50,295)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token(self) -> str:
        return EOS_TOKEN

    @property
    def eos_id(self) -> int:
        eos = self._tok.token_to_id(EOS_TOKEN)
        if eos is None:
            raise PhibookError(f"tokenizer {self.path or '(in memory)'} has no {EOS_TOKEN} token")
        return eos

    def check_fits(self, n_rows: int, what: str = "the model") -> None:
        """Raise PhibookError unless every token id has a row in an embedding of ``n_rows``."""
        if self.vocab_size > n_rows:
            raise PhibookError(
                f"tokenizer {self.path or '(in memory)'} has {self.vocab_size} tokens but {what} "
                f"has only {n_rows} embedding rows; use the tokenizer the model was trained with"
            )

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    @property
    def fingerprint(self) -> str:
        """Short stable hash of vocab + merges + added tokens.

        Token shards record it and training refuses shards made with another
        tokenizer. It hashes a canonical form (sorted vocab, merges as pairs)
        so that re-saving the file or a newer library version (which writes
        merges as pairs instead of "a b" strings) does not change it.
        """
        if self._fingerprint is None:
            data = json.loads(self._tok.to_str())
            model = data.get("model", {})
            merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges", [])]
            canon = {
                "type": model.get("type"),
                "vocab": sorted(model.get("vocab", {}).items(), key=lambda kv: kv[1]),
                "merges": merges,
                "added": sorted(
                    (t["id"], t["content"], bool(t.get("special"))) for t in data.get("added_tokens", [])
                ),
            }
            blob = json.dumps(canon, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            self._fingerprint = hashlib.sha256(blob).hexdigest()[:16]
        return self._fingerprint

    # -- files ------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/tokenizer.json`` atomically (temp file + rename) and return its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / TOKENIZER_FILE
        # The same bytes Tokenizer.save writes (pretty JSON), through the one atomic writer.
        io.write_text(target, self._tok.to_str(pretty=True))
        return target

    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer`` (for code that needs the full library)."""
        return self._tok

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size})"


def _as_id_list(ids) -> list[int]:
    return ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]


def _from_vocab_and_merges(directory: Path):
    """Build a byte-level BPE from the older GPT-2 file set (vocab.json, merges.txt,
    added_tokens.json) for model directories that predate tokenizer.json."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as RustTokenizer

    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    if not merges.is_file():
        raise PhibookError(
            f"tokenizer not found: {directory} has vocab.json but no merges.txt or {TOKENIZER_FILE}"
        )
    try:
        backend = RustTokenizer(models.BPE.from_file(str(vocab), str(merges)))
        added_file = directory / "added_tokens.json"
        added = json.loads(added_file.read_text(encoding="utf-8")) if added_file.is_file() else {}
    except Exception as exc:
        raise PhibookError(f"cannot read tokenizer files in {directory}: {exc}") from exc
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    if backend.token_to_id(EOS_TOKEN) is not None or EOS_TOKEN in added:
        backend.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    # Added tokens get the next free ids in the order they are added, so add
    # them by id and check each landed where added_tokens.json says.
    for content, token_id in sorted(added.items(), key=lambda kv: kv[1]):
        if content != EOS_TOKEN:
            backend.add_tokens([AddedToken(content, normalized=True)])
        if backend.token_to_id(content) != token_id:
            raise PhibookError(
                f"{directory / 'added_tokens.json'}: token {content!r} should have id {token_id} "
                f"but the vocabulary gives {backend.token_to_id(content)}"
            )
    return backend


class StreamDecoder:
    """Turn a stream of token ids into text pieces as soon as they are printable.

    A byte-level token can end in the middle of a UTF-8 character (emoji and
    CJK often span two tokens); decoding it alone gives U+FFFD. We keep a
    short window of ids, decode it, and emit only the new text once it no
    longer ends in U+FFFD (the approach of TGI/vLLM's incremental
    detokenizers). The pieces concatenate to ``decode(all ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # A short window of ids: the first ``_read`` were already emitted and
        # only give context; the rest are pending.
        self._ids: list[int] = []
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the text that became printable (often '', sometimes several chars)."""
        self._ids.append(int(token_id))
        done = self._decode(self._ids[: self._read])
        full = self._decode(self._ids)
        if len(full) > len(done) and not full.endswith("\ufffd"):
            # The pending ids become the context for the next step.
            del self._ids[: self._read]
            self._read = len(self._ids)
            return full[len(done) :]
        return ""

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character decodes as U+FFFD)."""
        done = self._decode(self._ids[: self._read])
        full = self._decode(self._ids)
        self._ids, self._read = [], 0
        return full[len(done) :]


# -- training ---------------------------------------------------------------


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) pairs. Binary reads keep CRLF as written (text mode
    would turn it into LF) and let a decoding error name its exact line."""
    with _open_binary(path) as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PhibookError(
                    f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start})"
                ) from exc


def iter_training_texts(files: list[Path]) -> Iterator[str]:
    """Stream texts from document JSONL (the "text" field) and plain-text files.

    ``.jsonl``/``.jsonl.gz`` give one text per document; any other file is read
    in blocks of whole lines. A malformed JSONL line raises PhibookError naming
    ``file:line``.
    """
    for path in map(Path, files):
        try:
            if path.name.endswith((".jsonl", ".jsonl.gz")):
                for line in read_lines(path):
                    if line.doc is not None:
                        yield line.doc["text"]
            else:
                block: list[str] = []
                size = 0
                for _, line in _iter_lines(path):
                    block.append(line)
                    size += len(line)
                    if size >= TEXT_BLOCK_CHARS:
                        yield "".join(block)
                        block, size = [], 0
                if block:
                    yield "".join(block)
        except (OSError, EOFError) as exc:  # unreadable file, truncated .gz
            raise PhibookError(f"cannot read {path}: {exc}") from exc


def _check_files(files: list[Path]) -> list[Path]:
    if not files:
        raise PhibookError("no training files given")
    paths = [Path(f) for f in files]
    for p in paths:
        if not p.exists():
            raise PhibookError(f"training file not found: {p}")
        if not p.is_file():
            raise PhibookError(f"training input is not a file: {p}")
    return paths


def train_bpe(
    files: list[Path],
    vocab_size: int,
    out_dir: Path,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE (GPT-2/codegen shape) on ``files`` and save ``out_dir/tokenizer.json``.

    ``vocab_size`` counts everything: ``<|endoftext|>`` (id 0), the 256 byte
    symbols, then merges. A corpus too small to support that many merges at
    ``min_frequency`` yields fewer tokens; compare ``result.vocab_size``.
    """
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise PhibookError(
            f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least "
            f"{MIN_VOCAB_SIZE} (256 bytes + {EOS_TOKEN})"
        )
    if min_frequency < 1:
        raise PhibookError(f"min_frequency must be >= 1, got {min_frequency}")
    paths = _check_files(files)

    backend = RustTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    seen = {"texts": 0}

    def texts() -> Iterator[str]:
        for text in iter_training_texts(paths):
            seen["texts"] += 1
            yield text

    # Exceptions raised inside the iterator come back out of the Rust trainer;
    # keep ours (they name file:line) rather than a wrapped copy.
    failure: list[PhibookError] = []

    def guarded() -> Iterator[str]:
        try:
            yield from texts()
        except PhibookError as exc:
            failure.append(exc)
            raise

    try:
        backend.train_from_iterator(guarded(), trainer=trainer)
    except Exception as exc:
        if failure:
            raise failure[0] from None
        raise PhibookError(f"BPE training failed: {exc}") from exc
    if seen["texts"] == 0:
        raise PhibookError("the training files hold no text: " + ", ".join(str(p) for p in paths))
    tok = Tokenizer(backend)
    tok.path = tok.save(out_dir)
    return tok
