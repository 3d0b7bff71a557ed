"""One --dtype vocabulary for every verb that loads a model (generate, chat, serve, eval; export for
the file it writes): auto, fp32, bf16, fp16, with the long torch names accepted as silent aliases,
and eval loading through the same loader as the others (phibook.inference.load).

No test here assumes which dtype `auto` picks (that depends on the CPU): where a dtype matters it
is pinned, or compared with what choose_dtype says for this machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from phibook.cli import build_parser, main
from phibook.commands.generate import DTYPE_ALIASES, DTYPE_CHOICES
from phibook.inference.load import DTYPE_NAMES, choose_dtype

VERBS = ("generate", "chat", "serve", "eval", "export")
DEFAULTS = {"generate": "auto", "chat": "auto", "serve": "auto", "eval": "fp32", "export": "auto"}


def verb_parser(verb: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[verb]


def dtype_action(verb: str) -> argparse.Action:
    return next(a for a in verb_parser(verb)._actions if "--dtype" in a.option_strings)


def parse_dtype(verb: str, *argv: str) -> str:
    """The --dtype value the verb's parser gives for ``argv`` (with its required arguments filled in)."""
    required = {"generate": ["--model", "m", "p"], "chat": ["--model", "m"], "serve": ["--model", "m"],
                "eval": ["--model", "m", "--tasks", "arc_easy"], "export": ["ckpt", "out"]}[verb]
    return verb_parser(verb).parse_args([*required, *argv]).dtype


def test_every_verb_has_the_same_dtype_choices() -> None:
    assert DTYPE_CHOICES == ("auto", "fp32", "bf16", "fp16")
    for verb in VERBS:
        assert tuple(dtype_action(verb).choices) == DTYPE_CHOICES, verb
        assert parse_dtype(verb) == DEFAULTS[verb], verb
        assert "{auto,fp32,bf16,fp16}" in verb_parser(verb).format_help(), verb


def test_names_are_the_loaders_names() -> None:
    for name in DTYPE_CHOICES[1:]:
        assert choose_dtype(name) == (DTYPE_NAMES[name], "requested")
    for long, short in DTYPE_ALIASES.items():
        assert DTYPE_NAMES[long] == DTYPE_NAMES[short]
        assert str(DTYPE_NAMES[long]) == f"torch.{long}"


@pytest.mark.parametrize("verb", VERBS)
def test_long_names_are_aliases(verb: str) -> None:
    for long, short in DTYPE_ALIASES.items():
        assert parse_dtype(verb, "--dtype", long) == short
        assert parse_dtype(verb, "--dtype", short) == short
    assert parse_dtype(verb, "--dtype", "auto") == "auto"


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize("bad", ["fp8", "float64", "BF16", ""])
def test_unknown_dtype_is_an_argparse_error(verb: str, bad: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_dtype(verb, "--dtype", bad)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --dtype: invalid choice: '{bad}'" in err
    assert "(choose from auto, fp32, bf16, fp16)" in err.replace("'", "") and "Traceback" not in err


@pytest.fixture(scope="module")
def arc_easy(shared_dir: Path) -> Path:
    bench = shared_dir / "benchmarks"
    if not (bench / "arc_easy").is_dir():
        pytest.skip(f"no arc_easy under {bench}")
    return bench


def run_eval(tiny_checkpoint: Path, bench: Path, out: Path, *flags: str) -> dict:
    assert main(["eval", "--model", str(tiny_checkpoint), "--tasks", "arc_easy", "--limit", "4", "--data-dir",
                 str(bench), "--no-progress", "--log-samples", "--output", str(out), *flags]) == 0
    return json.loads(out.read_text())


def loglikelihoods(results: dict) -> list[float]:
    return [r[0] for doc in results["samples"]["arc_easy"] for r in doc["results"]]


def test_eval_takes_the_one_vocabulary_through_the_one_loader(tiny_checkpoint: Path, arc_easy: Path,
                                                             tmp_path: Path, monkeypatch, capsys) -> None:
    import phibook.inference.load as load

    calls = []
    real = load.load_inference_model

    def spy(*args, **kwargs):
        calls.append(kwargs.get("dtype"))
        return real(*args, **kwargs)

    monkeypatch.setattr(load, "load_inference_model", spy)
    fp32 = run_eval(tiny_checkpoint, arc_easy, tmp_path / "default.json")
    assert fp32["dtype"] == "float32" and calls == ["fp32"]  # the default, without --quant too
    alias = run_eval(tiny_checkpoint, arc_easy, tmp_path / "alias.json", "--dtype", "float32")
    assert alias["dtype"] == "float32" and loglikelihoods(alias) == loglikelihoods(fp32)

    bf16 = run_eval(tiny_checkpoint, arc_easy, tmp_path / "bf16.json", "--dtype", "bf16")
    assert bf16["dtype"] == "bfloat16" and calls[-1] == "bf16"
    assert loglikelihoods(bf16) != loglikelihoods(fp32)  # really run in bf16
    assert loglikelihoods(bf16) == pytest.approx(loglikelihoods(fp32), rel=0.05, abs=0.5)

    capsys.readouterr()
    auto = run_eval(tiny_checkpoint, arc_easy, tmp_path / "auto.json", "--dtype", "auto")
    chosen, _ = choose_dtype("auto", "cpu")
    assert auto["dtype"] == str(chosen).removeprefix("torch.")  # whichever this CPU gets
    assert loglikelihoods(auto) == loglikelihoods(fp32 if chosen == torch.float32 else bf16)
    assert f"dtype: {'fp32' if chosen == torch.float32 else 'bf16'} (" in capsys.readouterr().err
