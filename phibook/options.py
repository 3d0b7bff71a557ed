"""Typed stage options: one dataclass per stage, from which both the verb's flags and the
pipeline TOML's table are built, so a name, a default or a help text is written once.

A field is declared with ``option(default, help, ...)``; its type annotation says what
values it takes. ``add_flags`` turns the fields into argparse flags (``near_dup_threshold``
-> ``--near-dup-threshold``; a bool defaulting to true -> ``--no-NAME``), ``from_args``
reads them back into the dataclass, and ``specs`` gives the pipeline its checked table
(type, default, required, whether it is a path). This module imports neither numpy nor
torch: ``--help`` and the pipeline's config check import it.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Any

REQUIRED: Any = MISSING  # option(REQUIRED, ...): no default; the verb and the TOML must give it


def option(default: Any = REQUIRED, help: str = "", *, path: bool = False, metavar: str | None = None,
           choices: tuple[str, ...] | None = None, flag: str | None = None) -> Any:
    """A dataclass field carrying what a flag and a TOML option need.

    ``path``: a file or folder (the pipeline resolves it against the TOML's folder);
    ``flag``: the verb's flag when it is not ``--`` + the name with dashes.
    """
    meta = {"help": help, "path": path, "metavar": metavar, "choices": choices, "flag": flag}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionSpec:
    """One option as the pipeline's TOML check sees it."""

    kind: tuple[type, ...]  # the accepted TOML value types
    default: Any = None
    required: bool = False
    path: bool = False
    help: str = ""
    choices: tuple[str, ...] | None = None


def _kinds(annotation: Any) -> tuple[type, ...]:
    """``float`` -> (float,); ``str | None`` -> (str,); ``list[str]`` -> (list,)."""
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    out = []
    for a in args:
        if a is type(None):
            continue
        out.append(typing.get_origin(a) or a)
    return tuple(out)


def _fields(cls: type) -> list[tuple[dataclasses.Field, tuple[type, ...]]]:
    hints = typing.get_type_hints(cls)
    return [(f, _kinds(hints[f.name])) for f in dataclasses.fields(cls)]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def specs(cls: type) -> dict[str, OptionSpec]:
    """{name: OptionSpec} for every field of the options dataclass ``cls``, in declaration order."""
    out = {}
    for f, kinds in _fields(cls):
        required = f.default is MISSING and f.default_factory is MISSING
        out[f.name] = OptionSpec(kinds, _default(f), required, f.metadata.get("path", False),
                                 f.metadata.get("help", ""), f.metadata.get("choices"))
    return out


def flag_name(f: dataclasses.Field) -> str:
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    return "--" + f.name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
              only: tuple[str, ...] | None = None, skip: tuple[str, ...] = (),
              defaults: dict[str, Any] | None = None) -> None:
    """Add a flag for every field of ``cls`` (or those in ``only``; none in ``skip``) to ``parser``;
    ``defaults`` overrides some defaults (the option stays optional)."""
    defaults = defaults or {}
    for f, kinds in _fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        default = defaults.get(f.name, _default(f))
        required = f.default is MISSING and f.default_factory is MISSING and f.name not in defaults
        text = f.metadata.get("help", "")
        kw: dict[str, Any] = {"dest": f.name, "help": text}
        if kinds == (bool,):
            if default:
                name = f.metadata.get("flag") or "--no-" + f.name.replace("_", "-")
                parser.add_argument(name, action="store_false", **kw)
            else:
                parser.add_argument(flag_name(f), action="store_true", **kw)
            continue
        if list in kinds:  # repeatable flag
            kw.update(action="append", default=list(default or []))
        else:
            kind = kinds[0]
            kw.update(type=kind, default=default)
            if required:
                kw.update(required=True)
            elif default is not None and "default" not in text:
                shown = f"{default:,}" if kind is int and abs(default) >= 10_000 else default
                kw["help"] = f"{text} (default: {shown})" if text else f"(default: {shown})"
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        parser.add_argument(flag_name(f), **kw)


def from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """The ``cls`` instance the parsed flags describe (fields missing from ``args`` keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


def from_table(cls: type, table: dict[str, Any]) -> Any:
    """The ``cls`` instance of a checked pipeline table (keys of other tables' classes are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in table.items() if k in names})
