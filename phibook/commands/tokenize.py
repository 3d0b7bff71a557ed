"""``phibook tokenize``: documents in, token shards + manifest.json out."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from phibook.data.options import TokenizeOptions
from phibook.options import add_flags

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


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tokenize",
        help="documents (JSONL, text, parquet) -> token shards + manifest.json",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flags(p, TokenizeOptions, only=("tokenizer",))
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="output folder for the shards and manifest.json (created if missing)")
    add_flags(p, TokenizeOptions, only=("val_fraction",))
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes (default: the number of CPU cores)")
    add_flags(p, TokenizeOptions, skip=("tokenizer", "val_fraction"))
    p.add_argument("--text-unit", choices=("file", "paragraph"), default="file",
                   help="for .txt/.md inputs: one document per file (default), or one per blank-line-separated "
                        "paragraph (streams; use it for big text files)")
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
