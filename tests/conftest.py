"""Shared test helpers: where ../shared lives, and skips when it is absent."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def pytest_configure(config) -> None:
    """Kernel verdicts (phibook.inference.kernels) go to a cache of this session's own, so every
    run proves the native kernels afresh on the CPU and ATEN_CPU_CAPABILITY it runs under, and
    the CLI subprocesses the tests start share it (they inherit the environment)."""
    os.environ["PHIBOOK_CACHE_DIR"] = tempfile.mkdtemp(prefix="phibook-test-cache-")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared not found at {SHARED}: real data files are needed for this test")
    return SHARED


@pytest.fixture(scope="session")
def jail() -> dict:
    """The verified bubblewrap jail (phibook.sandbox.runner.capabilities()); tests that run model
    code skip without bubblewrap (.ci/run installs it, and fails if it cannot)."""
    from phibook.sandbox import runner as sandbox

    try:
        sandbox.bwrap()
    except sandbox.JailUnavailable as exc:
        pytest.skip(f"no code sandbox on this machine: {exc}")
    return sandbox.capabilities()


@pytest.fixture(scope="session")
def codegen_tokenizer_dir(shared_dir: Path) -> Path:
    path = shared_dir / "tokenizer" / "codegen-mono"
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"codegen-mono tokenizer.json not found under {path}")
    return path


# Inline English + Python for the tiny tokenizer: a few KB, enough for ~500 merges.
_TINY_TEXT = """\
Alice and Bob are learning about numbers. Alice says: "A prime number has exactly two divisors."
Bob asks why one is not prime. Alice answers that one has only a single divisor, itself.
The students counted the apples in the basket, then they shared them equally among the friends.
When the sun rises in the morning, the birds begin to sing and the town slowly wakes up.
Water boils at one hundred degrees Celsius at sea level, and it freezes at zero degrees.
Let's think step by step. First we add the two numbers, then we multiply the result by three.
Question: What is the capital of France? Answer: The capital of France is Paris.
A good textbook explains each idea with a clear example and a short exercise at the end.

def is_prime(n: int) -> bool:
    \"\"\"Return True if n is a prime number.\"\"\"
    if n < 2:
        return False
    for d in range(2, int(n ** 0.5) + 1):
        if n % d == 0:
            return False
    return True


def fibonacci(n):
    \"\"\"Return the first n Fibonacci numbers as a list.\"\"\"
    result = []
    a, b = 0, 1
    for _ in range(n):
        result.append(a)
        a, b = b, a + b
    return result


class Counter:
    def __init__(self):
        self.count = 0

    def increment(self, step=1):
        self.count += step
        return self.count
"""


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A phibook checkpoint dir with a 2x128 random-init model and a ~512-token byte-level BPE.

    Deterministic (init seed 0); built once per session in well under 3 s.
    """
    import torch

    from phibook.model.config import PhiConfig, padded_vocab_size
    from phibook.model.model import PhiModel
    from phibook.model.tokenizer import train_bpe
    from phibook.weights.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("tiny_checkpoint")
    text = root / "corpus.txt"
    text.write_text(_TINY_TEXT * 4)
    tok = train_bpe([text], 512, root / "tokenizer")
    cfg = PhiConfig(n_layer=2, d_model=128, n_head=2, vocab_size=padded_vocab_size(tok.vocab_size), max_seq_len=256)
    model = PhiModel(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    return save_checkpoint(root / "ckpt", model, tok)
