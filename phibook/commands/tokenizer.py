"""``phibook tokenizer``: train a byte-level BPE, or describe a tokenizer.json."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# tokens/char is measured on at most this much training text, so the report
# after training stays a small fraction of the training time on big corpora.
MEASURE_CHARS = 50_000_000
ENCODE_BATCH = 256


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "tokenizer",
        help="train a byte-level BPE tokenizer, or show a tokenizer's vocab size, EOS id and fingerprint",
        description=(
            "Tokenizer tools. phi-1.5 uses the codegen-mono tokenizer (50,295 tokens); small models "
            "train better with a small vocabulary, which `phibook tokenizer train` builds with the same "
            "byte-level BPE shape (GPT-2 style, <|endoftext|> as id 0)."
        ),
    )
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION")

    train = sub.add_parser(
        "train",
        help="train a byte-level BPE on JSONL or text files",
        description=(
            "Train a byte-level BPE tokenizer (ByteLevel pre-tokenizer without prefix space, the 256 byte "
            "alphabet always included, <|endoftext|> special token at id 0) and write DIR/tokenizer.json. "
            'Document JSONL files (.jsonl, .jsonl.gz) contribute the "text" field of each line; any other '
            "file is read as UTF-8 plain text. Files are streamed, not loaded whole."
        ),
        epilog="example: phibook tokenizer train --vocab-size 8192 --out runs/tok8k data/docs.jsonl notes.txt",
    )
    train.add_argument(
        "--vocab-size",
        type=int,
        required=True,
        metavar="N",
        help="total vocabulary size including <|endoftext|> and the 256 byte tokens (at least 257); "
        "a corpus too small for N merges gives fewer, and the command says so",
    )
    train.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="directory to write tokenizer.json into"
    )
    train.add_argument(
        "--min-frequency",
        type=int,
        default=2,
        metavar="K",
        help="only merge pairs seen at least K times (default: 2)",
    )
    train.add_argument("files", nargs="+", type=Path, metavar="FILES", help="training files (.jsonl or text)")
    train.set_defaults(func=run_train)

    info = sub.add_parser(
        "info",
        help="print vocab size, EOS id and fingerprint of a tokenizer",
        description="Describe a tokenizer.json (or a model/checkpoint directory holding one).",
    )
    info.add_argument("path", type=Path, metavar="PATH", help="tokenizer.json or a directory that holds one")
    info.set_defaults(func=run_info)

    parser.set_defaults(func=lambda args: _no_action(parser))


def _no_action(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def run_train(args: argparse.Namespace) -> int:
    from phibook.model.tokenizer import train_bpe

    # The trainer's own progress bars also print blank lines to stdout, so
    # they are only shown to a terminal, never into a pipe or a log file.
    tok = train_bpe(
        args.files,
        args.vocab_size,
        args.out,
        min_frequency=args.min_frequency,
        show_progress=sys.stdout.isatty(),
    )
    print(f"vocab size: {tok.vocab_size}")
    if tok.vocab_size < args.vocab_size:
        print(
            f"note: asked for {args.vocab_size} tokens, but the corpus has no more pairs seen "
            f"{args.min_frequency}+ times; add text or lower --min-frequency for a larger vocabulary",
            file=sys.stderr,
        )
    tokens, chars, capped = measure_tokens_per_char(tok, args.files)
    scope = f"first {chars:,} chars of the training data" if capped else f"training data, {chars:,} chars"
    print(f"tokens/char: {tokens / max(chars, 1):.4f} ({scope})")
    print(f"fingerprint: {tok.fingerprint}")
    print(f"wrote {tok.path}")
    return 0


def measure_tokens_per_char(tok, files: list[Path]) -> tuple[int, int, bool]:
    """Encode the training texts again (up to MEASURE_CHARS) and count tokens and characters."""
    from tqdm import tqdm

    from phibook.model.tokenizer import iter_training_texts

    tokens = chars = 0
    batch: list[str] = []
    capped = False
    with tqdm(
        total=None, unit="char", unit_scale=True, desc="measuring", file=sys.stderr, leave=False
    ) as bar:
        for text in iter_training_texts(files):
            batch.append(text)
            chars += len(text)
            bar.update(len(text))
            if len(batch) >= ENCODE_BATCH:
                tokens += sum(len(ids) for ids in tok.encode_batch(batch))
                batch = []
            if chars >= MEASURE_CHARS:
                capped = True
                break
        if batch:
            tokens += sum(len(ids) for ids in tok.encode_batch(batch))
    return tokens, chars, capped


def run_info(args: argparse.Namespace) -> int:
    from phibook.model.tokenizer import Tokenizer

    tok = Tokenizer.from_file(args.path)
    eos = tok.token_to_id(tok.eos_token)
    print(f"path: {tok.path}")
    print(f"vocab size: {tok.vocab_size}")
    print(f"eos: {tok.eos_token} = {eos if eos is not None else 'missing'}")
    print(f"fingerprint: {tok.fingerprint}")
    return 0
