"""Shared test helpers: where ../shared lives, and skips when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared not found at {SHARED}: real data files are needed for this test")
    return SHARED


@pytest.fixture(scope="session")
def codegen_tokenizer_dir(shared_dir: Path) -> Path:
    path = shared_dir / "tokenizer" / "codegen-mono"
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"codegen-mono tokenizer.json not found under {path}")
    return path
