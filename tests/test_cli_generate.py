"""`phibook generate` and `phibook chat` as a user runs them (real subprocesses where it matters)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phibook.cli import main
from phibook.inference.generate import Generator, SamplingParams
from phibook.inference.templates import chat_transcript, fit_chat_prompt, get_template

ENV = {**os.environ, "PYTHONIOENCODING": "utf-8"}


def phibook(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "phibook.cli", *args],
        input=stdin, capture_output=True, text=True, encoding="utf-8", env=ENV, timeout=120,
    )


@pytest.fixture(scope="module")
def gen(tiny_checkpoint: Path) -> Generator:
    """fp32, as every CLI run below that is compared with it pins (--dtype auto depends on the CPU)."""
    return Generator.from_path(tiny_checkpoint, dtype="fp32")


def test_generate_subprocess_streams_greedy_continuation(tiny_checkpoint: Path, gen: Generator) -> None:
    expected = gen.generate(["Alice and Bob"], SamplingParams(max_new_tokens=12))[0].text
    proc = phibook("generate", "--model", str(tiny_checkpoint), "--dtype", "fp32", "--max-new-tokens", "12", "--temperature", "0",
                   "Alice and Bob")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"


def test_generate_batch_prints_in_order(tiny_checkpoint: Path, gen: Generator, capsys) -> None:
    prompts = ["The students", "def fibonacci(n):", ""]
    expected = gen.generate(prompts, SamplingParams(max_new_tokens=6, stop=["\n"]))
    assert main(["generate", "--model", str(tiny_checkpoint), "--dtype", "fp32", "--max-new-tokens", "6", "--stop", r"\n", *prompts]) == 0
    out, err = capsys.readouterr()
    assert out == "".join(r.text + "\n" for r in expected)
    assert err.index("=== prompt 0") < err.index("=== prompt 1") < err.index("=== prompt 2")


def test_prompt_escapes_match_stop_escapes(tiny_checkpoint: Path, gen: Generator, capsys, monkeypatch) -> None:
    # "\n" in a PROMPT argument is a newline, as it is in --stop; "\\n" stays a backslash and an n;
    # a prompt read from stdin is taken as it is.
    from phibook.commands.generate import read_prompts

    assert read_prompts([r"Alice: hi\nBob:", r"a\\nb", r"tab\there"]) == ["Alice: hi\nBob:", "a\\nb", "tab\there"]
    prompts = ["Alice: hi\nBob:", "a\\nb"]
    argv = [r"Alice: hi\nBob:", r"a\\nb"]
    expected = gen.generate(prompts, SamplingParams(max_new_tokens=5))
    assert main(["generate", "--model", str(tiny_checkpoint), "--dtype", "fp32", "--max-new-tokens", "5", *argv]) == 0
    assert capsys.readouterr().out == "".join(r.text + "\n" for r in expected)
    literal = gen.generate([r"x\ny"], SamplingParams(max_new_tokens=5))[0].text
    monkeypatch.setattr(sys, "stdin", io.StringIO(r"x\ny" + "\n"))
    assert main(["generate", "--model", str(tiny_checkpoint), "--dtype", "fp32", "--max-new-tokens", "5", "--no-stream", "-"]) == 0
    assert capsys.readouterr().out == literal + "\n"


def test_generate_template_and_stdin_prompt(tiny_checkpoint: Path, gen: Generator, capsys, monkeypatch) -> None:
    qa = get_template("qa")
    question = "What is the capital of France?"
    expected = gen.generate([qa.format(question)], SamplingParams(max_new_tokens=10, stop=qa.stops()))[0].text
    monkeypatch.setattr(sys, "stdin", io.StringIO(question + "\n"))
    code = main(["generate", "--model", str(tiny_checkpoint), "--dtype", "fp32", "--template", "qa", "--max-new-tokens", "10",
                 "--no-stream", "-"])
    assert code == 0
    assert capsys.readouterr().out == expected + "\n"


def test_generate_seeded_sampling_repeats(tiny_checkpoint: Path, capsys) -> None:
    args = ["generate", "--model", str(tiny_checkpoint), "--dtype", "fp32", "--temperature", "1.0", "--top-k", "40", "--top-p", "0.9",
            "--repetition-penalty", "1.2", "--seed", "5", "--max-new-tokens", "8", "Water boils"]
    outs = []
    for _ in range(2):
        assert main(args) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].strip()


def test_generate_bf16(tiny_checkpoint: Path, capsys) -> None:
    assert main(["generate", "--model", str(tiny_checkpoint), "--dtype", "bf16", "--max-new-tokens", "5", "x"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert Generator.from_path(tiny_checkpoint, dtype=torch.bfloat16).model.embed.weight.dtype == torch.bfloat16


def test_prompt_too_long_exits_2_without_traceback(tiny_checkpoint: Path, capsys) -> None:
    # In process: a traceback would surface here as an exception out of main().
    assert main(["generate", "--model", str(tiny_checkpoint), "Alice " * 400]) == 2
    err = capsys.readouterr().err
    assert "phibook generate: error: prompt 0 is" in err and "context is 256 tokens" in err


@pytest.mark.parametrize(
    "flags, message",
    [(["--top-p", "0"], "top_p"), (["--max-new-tokens", "-2"], "max_new_tokens"), (["--temperature", "-1"], "temperature")],
)
def test_bad_flags_exit_2(tiny_checkpoint: Path, capsys, flags: list[str], message: str) -> None:
    assert main(["generate", "--model", str(tiny_checkpoint), *flags, "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("phibook generate: error:") and message in err


def test_generate_missing_model_is_clean_error(tmp_path: Path, capsys) -> None:
    assert main(["generate", "--model", str(tmp_path / "nope"), "hi"]) == 2
    assert "phibook generate: error:" in capsys.readouterr().err


def test_chat_over_stdin_keeps_history(tiny_checkpoint: Path, gen: Generator) -> None:
    proc = phibook("chat", "--model", str(tiny_checkpoint), "--dtype", "fp32", "--max-new-tokens", "8", "--show-prompt",
                   stdin="Hello Bob\nWhat is a prime number?\n/reset\nAgain\n")
    assert proc.returncode == 0, proc.stderr
    replies = [line for line in proc.stdout.splitlines() if line.startswith("Bob:")]
    assert len(replies) == 3
    prompts = [block.split("\n--- end of prompt ---")[0] for block in proc.stderr.split("--- prompt ---\n")[1:]]
    assert len(prompts) == 3
    stops = get_template("chat").stops()
    first = gen.generate(["Alice: Hello Bob\nBob:"], SamplingParams(max_new_tokens=8, stop=stops))[0].text.strip()
    assert prompts[0] == "Alice: Hello Bob\nBob:"
    assert prompts[1] == f"Alice: Hello Bob\nBob: {first}\nAlice: What is a prime number?\nBob:"
    assert replies[0] == f"Bob: {first}"
    assert prompts[2] == "Alice: Again\nBob:"  # /reset forgot the first two turns


def test_fit_chat_prompt_drops_oldest_turns() -> None:
    turns = [("one", "uno"), ("two", "dos"), ("three", "tres")]
    assert chat_transcript(turns[:1], "hi") == "Alice: one\nBob: uno\nAlice: hi\nBob:"
    count = len  # characters stand in for tokens here
    full, dropped = fit_chat_prompt(turns, "four", count, 10_000)
    assert dropped == 0 and full.startswith("Alice: one\n")
    limit = len(chat_transcript(turns[1:], "four"))
    prompt, dropped = fit_chat_prompt(turns, "four", count, limit)
    assert dropped == 1 and prompt == chat_transcript(turns[1:], "four")
    prompt, dropped = fit_chat_prompt(turns, "four", count, 3)
    assert dropped == 3 and prompt == "Alice: four\nBob:"
