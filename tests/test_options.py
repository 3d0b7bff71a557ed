"""Stage options are declared once (phibook/data/options.py): the verbs' flags and the pipeline's
tables are built from the same dataclasses, so their names and defaults cannot drift apart."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from phibook.cli import build_parser
from phibook.data.options import CleanConfig, FilterOptions, SynthOptions, TeacherOptions, TokenizeOptions
from phibook.errors import PhibookError
from phibook.options import REQUIRED, add_flags, from_args, option, specs
from phibook.pipeline.config import OPTIONS, check_tables

# argv that satisfies each verb's required flags, and the pipeline table built from the same class.
VERBS = {
    "clean": (["clean", "--out", "o", "x.jsonl"], [CleanConfig]),
    "tokenize": (["tokenize", "--tokenizer", "t", "--out", "o", "x.jsonl"], [TokenizeOptions]),
    "filter": (["filter", "apply", "--classifier", "c", "--threshold", "0.5", "--out", "o", "x.jsonl"],
               [FilterOptions]),
    "synth": (["synth", "run", "--num-docs", "3", "--out", "o"], [SynthOptions, TeacherOptions]),
}


@pytest.mark.parametrize("stage", sorted(VERBS))
def test_verb_flags_and_pipeline_table_share_names_and_defaults(stage: str) -> None:
    argv, classes = VERBS[stage]
    args = build_parser().parse_args(argv)
    given = {"tokenizer": "t", "classifier": "c", "threshold": 0.5, "num_docs": 3}
    table = OPTIONS[stage]
    for cls in classes:
        for f in dataclasses.fields(cls):
            assert hasattr(args, f.name), f"`phibook {stage}` has no flag for {f.name}"
            want = given.get(f.name, specs(cls)[f.name].default)
            assert getattr(args, f.name) == want, f.name
            if f.name != "api_key":  # kept out of pipeline files on purpose
                assert table[f.name].default == specs(cls)[f.name].default, f.name


def test_the_option_modules_import_neither_numpy_nor_torch() -> None:
    code = ("import sys, phibook.data.options, phibook.pipeline.config, phibook.commands.clean, "
            "phibook.commands.tokenize, phibook.commands.filter, phibook.commands.synth; "
            "print(sorted(m for m in ('numpy', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@dataclasses.dataclass
class _Demo:
    name: str = option(REQUIRED, "a name")
    rate: float = option(0.5, "a rate")
    fast: bool = option(True, "be fast")
    loud: bool = option(False, "be loud")
    urls: list[str] = option([], "endpoints", metavar="URL")
    mode: str = option("a", "a mode", choices=("a", "b"))
    where: str | None = option(None, "a file", path=True)


def test_flags_round_trip() -> None:
    p = argparse.ArgumentParser()
    add_flags(p, _Demo)
    got = from_args(_Demo, p.parse_args(["--name", "n", "--rate", "2", "--no-fast", "--loud", "--urls", "u1",
                                         "--urls", "u2", "--mode", "b", "--where", "f"]))
    assert got == _Demo("n", 2.0, False, True, ["u1", "u2"], "b", "f")
    assert from_args(_Demo, p.parse_args(["--name", "n"])) == _Demo("n")
    with pytest.raises(SystemExit):
        p.parse_args([])  # --name is required
    with pytest.raises(SystemExit):
        p.parse_args(["--name", "n", "--mode", "c"])
    s = specs(_Demo)
    assert s["name"].required and not s["rate"].required and s["where"].path and s["where"].kind == (str,)
    assert s["urls"].kind == (list,) and s["mode"].choices == ("a", "b")


def test_pipeline_table_checks_come_from_the_dataclass(tmp_path: Path) -> None:
    toml = tmp_path / "p.toml"
    base = {"pipeline": {"input": ["*.jsonl"], "output": "out", "stages": ["synth"]}}
    _, opts = check_tables(toml, {**base, "synth": {"num_docs": 2, "base_url": "http://h:1/v1"}})
    assert opts["synth"]["base_url"] == ["http://h:1/v1"]  # one URL is a list of one
    assert opts["synth"]["temperature"] == TeacherOptions().temperature
    with pytest.raises(PhibookError, match=r"\[synth\] option 'teacher' must be one of builtin, openai, local"):
        check_tables(toml, {**base, "synth": {"num_docs": 2, "teacher": "gpt"}})
    with pytest.raises(PhibookError, match=r"\[synth\] needs option 'num_docs'"):
        check_tables(toml, {**base, "synth": {}})
    with pytest.raises(PhibookError, match=r"\[synth\] unknown option 'api_key'"):
        check_tables(toml, {**base, "synth": {"num_docs": 2, "api_key": "sk-x"}})
