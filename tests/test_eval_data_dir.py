"""Where benchmark files are looked for: --data-dir, then $PHIBOOK_DATA_DIR, then ../shared/benchmarks
beside the current directory or the repository; `phibook eval` and `phibook demo` share the rule, and
the error when nothing is found says where it looked and that nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phibook.cli import main
from phibook.errors import PhibookError

ARC_ROW = {"id": "x", "question": {"stem": "Two plus two?", "choices": [
    {"text": "3", "label": "A"}, {"text": "4", "label": "B"}]}, "answerKey": "B"}


@pytest.fixture
def layout(tmp_path: Path, monkeypatch) -> dict[str, Path]:
    """tmp/work/proj (the current directory), tmp/work/shared/benchmarks beside it, and a fake
    repository whose ../shared/benchmarks does not exist; $PHIBOOK_DATA_DIR unset."""
    from phibook.eval import data_dir

    work = tmp_path / "work"
    cwd = work / "proj"
    cwd.mkdir(parents=True)
    shared = work / "shared" / "benchmarks"
    (shared / "arc_easy").mkdir(parents=True)
    (shared / "arc_easy" / "ARC-Easy-Test.jsonl").write_text(json.dumps(ARC_ROW) + "\n")
    repo = tmp_path / "elsewhere" / "phibook"
    repo.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(data_dir, "REPO", repo)
    monkeypatch.delenv("PHIBOOK_DATA_DIR", raising=False)
    return {"cwd": cwd, "shared": shared, "repo": repo, "tmp": tmp_path}


def test_rule_order(layout: dict[str, Path], monkeypatch) -> None:
    from phibook.eval.data_dir import find_data_dir

    other = layout["tmp"] / "other"
    other.mkdir()
    assert find_data_dir(None) == layout["shared"]  # ../shared/benchmarks beside the cwd
    monkeypatch.setenv("PHIBOOK_DATA_DIR", str(other))
    assert find_data_dir(None) == other  # the variable before the fallback
    flag = layout["tmp"] / "flag"
    flag.mkdir()
    assert find_data_dir(str(flag)) == flag  # the flag before everything
    with pytest.raises(PhibookError, match=r"--data-dir .*nope is not a directory"):
        find_data_dir(str(layout["tmp"] / "nope"))
    monkeypatch.setenv("PHIBOOK_DATA_DIR", str(layout["tmp"] / "nope"))
    with pytest.raises(PhibookError, match=r"\$PHIBOOK_DATA_DIR=.*nope is not a directory"):
        find_data_dir(None)


def test_fallback_beside_the_repository(layout: dict[str, Path], monkeypatch) -> None:
    from phibook.eval import data_dir

    monkeypatch.chdir(layout["tmp"])  # no ../shared beside the cwd
    assert data_dir.find_data_dir(None) is None
    monkeypatch.setattr(data_dir, "REPO", layout["cwd"])  # a checkout at work/proj
    assert data_dir.find_data_dir(None) == layout["shared"]


def test_nothing_found_says_where_it_looked_and_offers_no_hub(layout: dict[str, Path], monkeypatch,
                                                              capsys) -> None:
    monkeypatch.chdir(layout["tmp"])
    rc = main(["eval", "--model", str(layout["tmp"] / "m"), "--tasks", "arc_easy"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no benchmark data: pass --data-dir DIR or set $PHIBOOK_DATA_DIR" in err
    assert str(layout["tmp"].parent / "shared" / "benchmarks") in err  # beside the cwd
    assert str(layout["repo"].parent / "shared" / "benchmarks") in err  # beside the repository
    assert "Nothing is downloaded" in err
    assert "--data-dir hf" not in err and "from the Hugging Face hub" not in err and "datasets" not in err


def test_eval_finds_the_shared_folder_and_names_the_layout(layout: dict[str, Path], capsys) -> None:
    # No --data-dir, no variable: ../shared/benchmarks beside the cwd is used; the files are read
    # (and their layout printed) before the model loads, which fails here (no model).
    rc = main(["eval", "--model", str(layout["tmp"] / "missing-model"), "--tasks", "arc_easy", "--limit", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"phibook eval: arc_easy: ai2-jsonl ({layout['shared'] / 'arc_easy' / 'ARC-Easy-Test.jsonl'})" in err
    assert "no benchmark data" not in err


def test_demo_uses_the_same_function(layout: dict[str, Path], monkeypatch) -> None:
    from phibook.demo.run import find_benchmarks
    from phibook.eval import data_dir

    assert find_benchmarks(None) == data_dir.find_data_dir(None) == layout["shared"]
    calls = []
    monkeypatch.setattr(data_dir, "find_data_dir", lambda value: calls.append(value) or Path("/x"))
    assert find_benchmarks("given") == Path("/x") and calls == ["given"]


def test_help_offers_no_hub_and_documents_compare(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert "--compare" in out
    assert "'hf'" not in out and "--data-dir hf" not in out
    assert "nothing is downloaded" in out.lower()
