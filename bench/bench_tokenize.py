"""Tokenize throughput (MB of document text per second): `phibook tokenize` vs a plain `tokenizers` loop.

    python bench/bench_tokenize.py                  # ~64 MB of textbook paragraphs, 3 rounds
    python bench/bench_tokenize.py --mb 100 --rounds 5

Input: the shared textbooks (library_of_phi), one JSONL document per
paragraph, repeated (with distinct ids) until the JSONL holds about --mb MB;
written once to --input. Tokenizer: codegen-mono (50,295 tokens, the phi-1.5
tokenizer).

Systems, in ALTERNATING rounds:

- ``phibook-wN``: the command ``phibook tokenize --workers N`` end to end, as
  a user runs it (a subprocess: start-up, planning, N worker processes,
  shards + manifest written and fsynced, val split 0.01, no progress bar), into
  a fresh output folder each round.
- ``tokenizers-tT``: the peer: one Python process reading the same JSONL
  (``json.loads`` per line), ``Tokenizer.encode_batch`` on batches of 256
  documents with the library's own thread pool at T threads
  (``RAYON_NUM_THREADS``), EOS appended, token ids written as uint16 to one
  file. No val split, no manifest, no resume bookkeeping.

Throughput is the UTF-8 size of the documents' text divided by the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_rev, load_average, machine, median, now  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKENIZER = SHARED / "tokenizer" / "codegen-mono"
BOOKS = SHARED / "corpora" / "library_of_phi" / "textbooks"

PEER = r"""
import json, sys, time
import numpy as np
from tokenizers import Tokenizer
src, tok_path, out = sys.argv[1:4]
tok = Tokenizer.from_file(tok_path)
tok.encode_special_tokens = True  # like phibook: a literal <|endoftext|> in a document stays text
eos = tok.token_to_id("<|endoftext|>")
with open(src, encoding="utf-8") as f, open(out, "wb") as w:
    batch = []
    def flush():
        for e in tok.encode_batch(batch, add_special_tokens=False):
            ids = e.ids
            ids.append(eos)
            w.write(np.asarray(ids, dtype=np.uint16).tobytes())
        batch.clear()
    for line in f:
        if line.strip():
            batch.append(json.loads(line)["text"])
            if len(batch) == 256:
                flush()
    flush()
"""


def make_input(path: Path, mb: float) -> int:
    """Write the JSONL (once); return the UTF-8 bytes of its documents' text."""
    sizes = path.with_suffix(".textbytes")
    if path.is_file() and sizes.is_file():
        return int(sizes.read_text())
    paragraphs = []
    for book in sorted(BOOKS.glob("*.md")):
        paragraphs += [p.strip() for p in book.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    if not paragraphs:
        sys.exit(f"no textbooks under {BOOKS}")
    tmp = path.with_suffix(".tmp")
    text_bytes, written, copy = 0, 0, 0
    with open(tmp, "w", encoding="utf-8") as f:
        while written < mb * 1e6:
            for i, text in enumerate(paragraphs):
                line = json.dumps({"id": f"c{copy}-p{i}", "text": text, "source": "textbooks"}) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
                text_bytes += len(text.encode("utf-8"))
            copy += 1
    os.replace(tmp, path)
    sizes.write_text(str(text_bytes))
    return text_bytes


def run_phibook(src: Path, out: Path, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "phibook.cli", "tokenize", "--tokenizer", str(TOKENIZER), "--out", str(out),
           "--workers", str(workers), "--val-fraction", "0.01", "--no-progress", str(src)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def run_peer(src: Path, out: Path, threads: int) -> float:
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="true")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", PEER, str(src), str(TOKENIZER / "tokenizer.json"), str(out)],
                   check=True, env=env)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=64, help="JSONL size to build from the textbooks (MB)")
    ap.add_argument("--input", type=Path, default=Path(tempfile.gettempdir()) / "phibook-bench-tokenize.jsonl",
                    help="the JSONL (built once if missing)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    ap.add_argument("--systems", nargs="+", default=["phibook-w1", "phibook-w2", "tokenizers-t1", "tokenizers-t2"],
                    help="phibook-wN (N workers) and tokenizers-tT (T Rust threads)")
    ap.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = ap.parse_args()
    if not TOKENIZER.is_dir():
        sys.exit(f"codegen-mono tokenizer not found at {TOKENIZER}")
    text_bytes = make_input(args.input, args.mb)
    work = Path(tempfile.mkdtemp(prefix="phibook-bench-tokenize-"))
    load_before = load_average()
    times: dict[str, list[float]] = {s: [] for s in args.systems}
    try:
        for r in range(args.rounds):
            order = args.systems[r % len(args.systems):] + args.systems[: r % len(args.systems)]
            for name in order:
                kind, n = name.rsplit("-", 1)
                count = int(n[1:])
                if kind == "phibook":
                    sec = run_phibook(args.input, work / "shards", count)
                else:
                    sec = run_peer(args.input, work / "peer.bin", count)
                times[name].append(sec)
                print(f"round {r} {name}: {text_bytes / 1e6 / sec:.2f} MB/s ({sec:.1f}s); load {load_average()}",
                      file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mbs = {s: [text_bytes / 1e6 / t for t in ts] for s, ts in times.items()}
    ref = "tokenizers-t2" if "tokenizers-t2" in mbs else args.systems[-1]
    print(f"Tokenize throughput, {now()}, git {git_rev()}\n")
    print(f"Machine: {machine()}. Load average before: {load_before}, after: {load_average()}.\n")
    print(f"Command: python bench/bench_tokenize.py {' '.join(sys.argv[1:])}\n")
    print(f"Input: {args.input.stat().st_size / 1e6:.1f} MB JSONL, {text_bytes / 1e6:.1f} MB of document text; "
          f"codegen-mono; {args.rounds} alternating rounds, wall time end to end.\n")
    print(f"| system | MB of text/s (median) | range | vs {ref} |")
    print("|---|---:|---:|---:|")
    for s in args.systems:
        m = median(mbs[s])
        print(f"| {s} | {m:.2f} | {min(mbs[s]):.2f}-{max(mbs[s]):.2f} | {m / median(mbs[ref]):.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"text_bytes": text_bytes, "seconds": times}, indent=1))


if __name__ == "__main__":
    main()
