"""``phibook tokenize``: documents in, token shards + manifest.json out."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Tokenize documents once into flat token shards for training.

Inputs: document JSONL (one {"id", "text", "source", "meta"} object a line;
.jsonl/.ndjson, optionally .gz), plain text (.txt/.md/.text: one document per
file, or per blank-line-separated paragraph with --text-unit paragraph), or
.parquet (a text column, read a row group at a time). A folder stands for the
files of those types inside it.

Output in DIR: train-00000.bin, ... (and val-00000.bin, ... with
--val-fraction): little-endian uint16 token ids (uint32 when the vocabulary
exceeds 65,535), every document followed by EOS; and manifest.json with the
tokenizer fingerprint and per-shard token and document counts.

Work runs in parallel across input chunks, streams (memory stays bounded
whatever the input size), and resumes: rerunning the same command after a
crash skips the chunks already done. The output is byte-identical for any
--workers."""

EPILOG = """\
examples:
  phibook tokenize --tokenizer tok/tokenizer.json --out shards/synthetic --val-fraction 0.01 data/synth/*.jsonl
  phibook tokenize --tokenizer tok --out shards/books --text-unit paragraph books/
  phibook train --data shards/synthetic ...   (or a mixture .toml naming several shard folders)"""


# The library's defaults (phibook.data.tokenize), repeated here so `--help` does not import
# numpy; tests/test_tokenize.py checks they agree.
DEFAULT_SHARD_TOKENS = 1 << 24
DEFAULT_CHUNK_BYTES = 16 << 20


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tokenize",
        help="documents (JSONL, text, parquet) -> token shards + manifest.json",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="tokenizer.json, or a folder holding one (its fingerprint goes into the manifest)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="output folder for the shards and manifest.json (created if missing)")
    p.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                   help="hold out about this fraction of documents as the val split, chosen by a stable hash "
                        "of each document's id (or text): deterministic, the same for any worker count "
                        "(default: 0, no val split)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes (default: the number of CPU cores)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                   help="close a shard at the first document end that would pass N tokens; a single longer "
                        f"document gets a shard to itself (default: {DEFAULT_SHARD_TOKENS:,})")
    p.add_argument("--source", default=None, metavar="NAME",
                   help="source name recorded in the manifest (default: the output folder's name)")
    p.add_argument("--text-field", default="text", metavar="FIELD",
                   help="JSONL field / parquet column holding the text (default: text)")
    p.add_argument("--text-unit", choices=("file", "paragraph"), default="file",
                   help="for .txt/.md inputs: one document per file (default), or one per blank-line-separated "
                        "paragraph (streams; use it for big text files)")
    p.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES, metavar="N",
                   help="JSONL files are split into work units of N bytes (whole lines); the unit is what runs "
                        f"in parallel and what a rerun skips once done (default: {DEFAULT_CHUNK_BYTES:,})")
    p.add_argument("--no-progress", action="store_true", help="do not draw the progress bar")
    p.add_argument("inputs", nargs="+", metavar="INPUTS", help="input files or folders")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from phibook.data.tokenize import tokenize_inputs

    manifest = tokenize_inputs(
        args.inputs,
        tokenizer_path=args.tokenizer,
        out=args.out,
        val_fraction=args.val_fraction,
        workers=args.workers,
        shard_tokens=args.shard_tokens,
        source=args.source,
        text_field=args.text_field,
        text_unit=args.text_unit,
        chunk_bytes=args.chunk_bytes,
        progress=not args.no_progress,
    )
    parts = []
    for split in ("train", "val"):
        shards = manifest.split_shards(split)
        if shards:
            docs = sum(s.documents for s in shards)
            parts.append(f"{split}: {manifest.total_tokens(split):,} tokens, {docs:,} documents, {len(shards)} shards")
    print(f"{manifest.path}: " + "; ".join(parts or ["no documents"]), file=sys.stderr)
    return 0
