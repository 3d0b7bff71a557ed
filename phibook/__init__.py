"""phibook: the phi-1.5 recipe end to end, from synthetic textbooks to served models.

The names people use from Python are importable from here::

    from phibook import PhiConfig, PhiModel, Tokenizer, load_model, Generator, SamplingParams

They load on first use (PEP 562), so ``import phibook`` and ``phibook --help``
do not pay for torch. The package map is docs/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from phibook.version import __version__

# public name -> the module that defines it
_PUBLIC = {
    "PhiConfig": "phibook.model.config",
    "PhiModel": "phibook.model.model",
    "Tokenizer": "phibook.model.tokenizer",
    "load_model": "phibook.weights.checkpoint",
    "save_checkpoint": "phibook.weights.checkpoint",
    "Generator": "phibook.inference.generate",
    "SamplingParams": "phibook.inference.generate",
}

__all__ = [
    "Generator", "PhiConfig", "PhiModel", "SamplingParams", "Tokenizer", "__version__", "load_model", "save_checkpoint",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily below
    from phibook.inference.generate import Generator, SamplingParams
    from phibook.model.config import PhiConfig
    from phibook.model.model import PhiModel
    from phibook.model.tokenizer import Tokenizer
    from phibook.weights.checkpoint import load_model, save_checkpoint


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'phibook' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
