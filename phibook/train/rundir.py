"""The run directory's housekeeping: where the shards' tokenizer is, whether --out may be
used, and the metrics file cut back to the step a resumed run starts from."""

from __future__ import annotations

import json
import math
from pathlib import Path

from phibook import io
from phibook.errors import PhibookError
from phibook.train.config import TOKENIZER_FILE


def find_tokenizer_file(data: str | Path) -> Path | None:
    """The tokenizer.json that made the shards: the manifest's tokenizer path, or one beside a manifest."""
    from phibook.data.mixture import load_data

    mixture = load_data(data)
    for source in mixture.sources:
        manifest = source.manifest
        for key in ("path", "file", "tokenizer_path"):
            value = manifest.tokenizer.get(key)
            if value:
                p = Path(value)
                p = p if p.is_absolute() else manifest.directory / p
                if p.is_dir():
                    p = p / TOKENIZER_FILE
                if p.is_file():
                    return p
        beside = manifest.directory / TOKENIZER_FILE
        if beside.is_file():
            return beside
    return None


def prepare_run_dir(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PhibookError(f"--out {out} exists and is not a directory")
    if not resume and out.is_dir() and any(out.iterdir()):
        raise PhibookError(
            f"run directory {out} is not empty; pass --resume to continue it, or choose a new --out"
        )


def rewrite_metrics(path: Path, keep_through: int) -> None:
    """Drop metrics lines past the step we resume from (and any torn last line), atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and int(rec.get("step", 0)) <= keep_through:
            kept.append(line)
    io.write_text(path, "".join(k + "\n" for k in kept))


def finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None
