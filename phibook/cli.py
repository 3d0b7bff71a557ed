"""The ``phibook`` command: one verb per pipeline stage (the map of stages is in README.md and docs/architecture.md)."""

from __future__ import annotations

import argparse
import importlib
import sys

from phibook.errors import PhibookError
from phibook.version import __version__

# Verb modules under phibook.commands, in the order --help lists them. A module
# that does not exist yet is skipped, so stages can land one at a time.
COMMANDS = [
    "demo",
    "synth",
    "filter",
    "clean",
    "tokenizer",
    "tokenize",
    "pipeline",
    "train",
    "eval",
    "generate",
    "chat",
    "serve",
    "export",
    "report",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phibook",
        description="phibook: the phi-1.5 recipe end to end. Run `phibook VERB --help` for each stage.",
    )
    parser.add_argument("--version", action="version", version=f"phibook {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="VERB")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"phibook.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"phibook.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PhibookError as exc:
        print(f"phibook {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"phibook {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
