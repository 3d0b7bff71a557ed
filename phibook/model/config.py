"""Model configuration: one dataclass and the named presets.

Every checkpoint carries its ``config.json``; presets only matter when a model
is built from scratch. Small presets keep phi-1.5's shape rules (head size 64,
rotary on 32 dims of each head, MLP 4x the width) so that CPU runs exercise the
same code and shapes as the 1.3B model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from phibook.errors import PhibookError


@dataclass
class PhiConfig:
    n_layer: int = 24
    d_model: int = 2048
    n_head: int = 32
    # Rows of the embedding and the LM head. phi-1.5 pads codegen-mono's
    # 50,295 tokens to 51,200 rows; extra rows are never produced by the
    # tokenizer and are masked out of sampling.
    vocab_size: int = 51200
    max_seq_len: int = 2048
    rotary_dim: int = 32
    rope_base: float = 10000.0
    d_ff: int = 0  # 0 means 4 * d_model
    ln_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.d_ff == 0:
            self.d_ff = 4 * self.d_model
        for name in ("n_layer", "d_model", "n_head", "vocab_size", "max_seq_len", "d_ff"):
            if int(getattr(self, name)) <= 0:
                raise PhibookError(f"config field {name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise PhibookError(
                f"config: d_model={self.d_model} is not divisible by n_head={self.n_head}"
            )
        if self.rotary_dim > self.head_dim or self.rotary_dim % 2:
            raise PhibookError(
                f"config: rotary_dim={self.rotary_dim} must be even and <= head_dim={self.head_dim}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> PhiConfig:
        if name not in PRESETS:
            raise PhibookError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> PhiConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"format", "phibook_version", "preset"})
        if unknown:
            raise PhibookError(f"{source}: unknown config fields {unknown}")
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_file(cls, path: str | Path) -> PhiConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PhibookError(f"cannot read model config {path}: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def num_params(self) -> int:
        d, f, v = self.d_model, self.d_ff, self.vocab_size
        per_block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
        return v * d + self.n_layer * per_block + 2 * d + (d * v + v)


# Named presets. phi-1.5 is the report's 1.3B model (section 2.1); the others
# shrink depth, width and vocabulary while keeping head_dim 64 and rotary 32.
PRESETS: dict[str, dict[str, Any]] = {
    "phi-1.5": dict(n_layer=24, d_model=2048, n_head=32, vocab_size=51200, max_seq_len=2048),
    "phi-small": dict(n_layer=10, d_model=768, n_head=12, vocab_size=51200, max_seq_len=2048),
    "phi-mini": dict(n_layer=12, d_model=512, n_head=8, vocab_size=8192, max_seq_len=1024),
    "phi-tiny": dict(n_layer=4, d_model=256, n_head=4, vocab_size=4096, max_seq_len=512),
}


def padded_vocab_size(n_tokens: int, multiple: int = 64) -> int:
    """Embedding rows for a tokenizer of ``n_tokens``, rounded up for fast matmuls."""
    return -(-n_tokens // multiple) * multiple
