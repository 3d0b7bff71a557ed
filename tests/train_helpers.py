"""Shared fixtures for the trainer tests: a small real corpus, a trained BPE, token shards,
and a helper that runs `phibook train` as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The smallest of the shared textbooks (61 KB of phi-style text).
CORPUS = "corpora/library_of_phi/textbooks/gpt_4_full_synth_field_mechanical_engineering_subfield_fluid_mechanics_course_name_Interfacial_Phenomena.md"

# A model small enough for a CPU test: 2 layers x 64 wide, 2 heads of 32 (rotary on 16 dims).
TINY_MODEL = ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.rotary_dim=16", "model.max_seq_len=64"]


def make_shards(shared: Path, out: Path, vocab_size: int = 384, val_fraction: float = 0.1) -> Path:
    """Train a byte-level BPE on the corpus, tokenize paragraphs into train/val shards; return the manifest dir."""
    from phibook.data.shards import write_shard_set
    from phibook.model.tokenizer import train_bpe

    src = shared / CORPUS
    tok = train_bpe([src], vocab_size, out / "tok")
    paragraphs = [p for p in src.read_text().split("\n\n") if p.strip()]
    n_val = max(1, int(len(paragraphs) * val_fraction))
    docs = {
        "train": [tok.encode(p) for p in paragraphs[:-n_val]],
        "val": [tok.encode(p) for p in paragraphs[-n_val:]],
    }
    info = {"fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "path": str(tok.path)}
    write_shard_set(out / "shards", docs, info, source="textbook", shard_tokens=4096)
    return out / "shards"


def train_cmd(data: Path, out: Path, *sets: str, steps: int, extra: list[str] | None = None) -> list[str]:
    return [
        sys.executable, "-m", "phibook.cli", "train", "--preset", "phi-tiny", "--data", str(data), "--out", str(out),
        "--max-steps", str(steps), *(extra or []), "--set", *TINY_MODEL, "tensorboard=false", *sets,
    ]


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    # Same thread count in every process, so fp32 reductions are reproducible run to run.
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return e


def run(cmd: list[str], timeout: float = 300, **env_extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(**env_extra), cwd=REPO)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
