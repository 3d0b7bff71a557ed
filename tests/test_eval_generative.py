"""Generative tasks: loaders on the real files, programs through the sandbox, SQuAD and pass@k math."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from phibook.errors import PhibookError
from phibook.eval.generative import (
    GSM8K,
    MBPP,
    SQuAD,
    exact_match,
    gsm8k_gold,
    last_number,
    normalize_answer,
    parse_number,
    pass_at_k,
    program_answer,
    read_squad,
    squad_scores,
    token_f1,
    truncate_at_stops,
)
from phibook.eval.task import get_task
from phibook.sandbox.runner import check_many

FIXTURE = Path(__file__).parent / "fixtures" / "squad_mini.json"


@pytest.fixture(scope="module")
def benchmarks(shared_dir: Path) -> Path:
    return shared_dir / "benchmarks"


# --------------------------------------------------------------------------- pass@k


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
        (5, 2, 1, 0.4),  # 1 - C(3,1)/C(5,1) = 1 - 3/5
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (10, 0, 5, 0.0),
        (4, 1, 4, 1.0),  # n - c < k: every draw of 4 contains the passing one
        (200, 13, 100, 1 - math.comb(187, 100) / math.comb(200, 100)),
    ],
)
def test_pass_at_k_against_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


# --------------------------------------------------------------------------- HumanEval


@pytest.mark.usefixtures("jail")
def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(benchmarks):
    task = get_task("humaneval")
    docs = task.load_docs(benchmarks, 20)
    assert [d["task_id"] for d in docs[:2]] == ["HumanEval/0", "HumanEval/1"]
    good = check_many([task.program(d, d["canonical_solution"]) for d in docs])
    assert [o.status for o in good] == ["ok"] * 20
    wrong = check_many([task.program(d, "    return None\n") for d in docs[:5]])
    assert not any(o.passed for o in wrong)


@pytest.mark.usefixtures("jail")
def test_humaneval_all_164_canonical_solutions_pass(benchmarks):
    task = get_task("humaneval")
    docs = task.load_docs(benchmarks, None)
    assert len(docs) == 164
    outcomes = check_many([task.program(d, d["canonical_solution"]) for d in docs])
    assert [d["task_id"] for d, o in zip(docs, outcomes) if not o.passed] == []


@pytest.mark.usefixtures("jail")
def test_humaneval_process_results_greedy_and_sampled(benchmarks):
    doc = get_task("humaneval").load_docs(benchmarks, 1)[0]
    greedy = get_task("humaneval")
    assert greedy.metrics == {"pass@1": True} and greedy.temperature == 0.0
    (req,) = greedy.requests(doc)
    assert req.prompt == doc["prompt"] and req.params.stop == ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
    # What follows the function body is cut at the first stop sequence, as the generator does.
    noisy = doc["canonical_solution"] + "\ndef helper():\n    raise SystemExit(1)\nprint(helper())\n"
    assert greedy.process_results(doc, [noisy]) == {"pass@1": 1.0}
    assert greedy.process_results(doc, ["    return not_defined\n"]) == {"pass@1": 0.0}

    sampled = type(greedy)(samples=4, temperature=0.8)
    reqs = sampled.requests(doc)
    assert len(reqs) == 4 and [r.params.seed for r in reqs] == [0, 1, 2, 3]
    assert all(r.params.temperature == 0.8 and r.params.top_p == 0.95 for r in reqs)
    assert set(sampled.metrics) == {"pass@1"}  # k=10, 100 need >= 10 samples
    sampled.ks = (1, 2)
    good, bad = doc["canonical_solution"], "    return 42\n"
    out = sampled.process_results(doc, [good, bad, good, bad])
    assert out["pass@1"] == pytest.approx(0.5)
    assert out["pass@2"] == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    with pytest.raises(PhibookError, match="temperature"):
        type(greedy)(samples=4, temperature=0.0)


# --------------------------------------------------------------------------- MBPP


@pytest.mark.usefixtures("jail")
def test_mbpp_loader_split_and_reference_code_passes(benchmarks):
    task = get_task("mbpp")
    docs = task.load_docs(benchmarks, None)
    assert len(docs) == 500 and docs[0]["task_id"] == 11 and docs[-1]["task_id"] == 510
    assert "\r" not in docs[0]["code"]
    sample = docs[:20]
    good = check_many([task.program(d, d["code"]) for d in sample])
    assert [o.status for o in good] == ["ok"] * 20
    wrong = check_many([task.program(d, "def f():\n    return 0\n") for d in sample[:5]])
    assert not any(o.passed for o in wrong)
    assert task.prompt(docs[0]) == (
        '"""\nWrite a python function to remove first and last occurrence of a given character from the '
        'string.\nassert remove_Occ("hello","l") == "heo"\n"""\n'
    )


@pytest.mark.usefixtures("jail")
def test_mbpp_all_500_reference_solutions_pass(benchmarks):
    task = get_task("mbpp")
    docs = task.load_docs(benchmarks, None)
    # (program, tests, the function under test): MBPP 126 asks for a function named `sum`.
    outcomes = check_many([(*task.program(d, d["code"]), task.entry(d)) for d in docs])
    assert [d["task_id"] for d, o in zip(docs, outcomes) if not o.passed] == []


def test_mbpp_missing_file_names_where(tmp_path):
    (tmp_path / "mbpp").mkdir()
    with pytest.raises(PhibookError, match=r"mbpp\.jsonl not found in .*mbpp.*google-research"):
        MBPP().load_docs(tmp_path, None)


# --------------------------------------------------------------------------- GSM8K via coding


def test_gsm8k_gold_extraction():
    assert gsm8k_gold("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18") == 18.0
    assert gsm8k_gold("... #### 1,200") == 1200.0
    assert gsm8k_gold("#### -3.5") == -3.5
    with pytest.raises(ValueError):
        gsm8k_gold("no marker here")


def test_gsm8k_program_answer_extraction():
    assert program_answer(18, "noise 3\n") == 18.0  # the returned value wins
    assert program_answer(18.0, "") == 18.0
    assert program_answer("1,234", "") == 1234.0
    assert program_answer(None, "The answer is 42.\n") == 42.0  # printed, not returned
    assert program_answer(None, "nothing numeric\n") is None
    assert program_answer("1,8", "") is None  # not a number GSM8K writes: never 18
    assert program_answer("12 apples", "") is None
    assert program_answer(True, "") is None and program_answer([18], "18") is None
    assert program_answer(float("nan"), "") is None


def test_strict_number_parsing():
    for text, value in (("18", 18.0), ("-3.5", -3.5), ("1,200", 1200.0), ("$1,200.50", 1200.5), (" 7. ", 7.0),
                        ("1e3", 1000.0), (".5", 0.5)):
        assert parse_number(text) == value, text
    for text in ("1,8", "1,20", "12,0000", "18a", "", "--1", "1.2.3", "one"):
        assert parse_number(text) is None, text
    assert last_number("We have 3 apples, then 1,8 pears; total: 18.") == 18.0
    assert last_number("x=18") is None and last_number("(42)") == 42.0


@pytest.mark.usefixtures("jail")
def test_gsm8k_hand_written_programs_on_a_real_problem(benchmarks):
    task = get_task("gsm8k")
    task.timeout_s = 1.0  # the busy-loop case below only has to time out
    docs = task.load_docs(benchmarks, 2)
    doc = docs[0]
    assert doc["gold"] == 18.0 and "Janet" in doc["question"]
    (req,) = task.requests(doc)
    assert req.prompt.startswith('def solution():\n    """Janet') and req.prompt.endswith('"""\n')
    correct = "    eggs = 16 - 3 - 4\n    return eggs * 2\n"
    assert task.process_results(doc, [correct]) == {"acc": 1.0}
    assert task.process_results(doc, ["    print(9 * 2)\n"]) == {"acc": 1.0}  # printed answer counts
    assert task.process_results(doc, ["    return 16 - 3\n"]) == {"acc": 0.0}
    assert task.process_results(doc, ["    while True:\n        pass\n"]) == {"acc": 0.0}  # timeout = wrong
    assert task.process_results(doc, ["    return 18\n\ndef extra():\n    return 1\n"]) == {"acc": 1.0}


def test_gsm8k_malformed_row_names_file_and_line(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n{oops\n")
    with pytest.raises(PhibookError, match=r"test\.jsonl:2"):
        GSM8K().load_docs(tmp_path, None)


# --------------------------------------------------------------------------- SQuAD


def test_squad_normalization_matches_the_official_script():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("Levi's Stadium") == "levis stadium"
    assert normalize_answer("1,000") == "1000"


@pytest.mark.parametrize(
    ("prediction", "golds", "em", "f1"),
    [
        ("the Denver Broncos", ["Denver Broncos"], 1.0, 1.0),
        ("Denver Broncos won", ["Denver Broncos", "Broncos"], 0.0, 0.8),  # P=2/3 R=1 vs the first gold
        ("Santa Clara, California.", ["Levi's Stadium", "Santa Clara, California"], 1.0, 1.0),
        ("the the cat cat cat", ["cat"], 0.0, 0.5),  # P=1/3 R=1
        ("Carolina Panthers", ["Denver Broncos"], 0.0, 0.0),
        ("", ["8"], 0.0, 0.0),
        ("a highly reactive element", ["a highly reactive nonmetal", "nonmetal"], 0.0, 2 / 3),  # P=R=2/3
    ],
)
def test_squad_em_and_f1_known_cases(prediction, golds, em, f1):
    assert squad_scores(prediction, golds) == {"exact_match": em, "f1": pytest.approx(f1)}
    assert exact_match(prediction, golds[0]) <= em
    assert token_f1(prediction, golds[0]) <= f1 + 1e-12


def test_squad_loader_prompt_and_scoring_on_the_fixture():
    task = SQuAD()
    docs = read_squad(FIXTURE)
    assert len(docs) == 5
    assert docs[0]["answers"] == ["Denver Broncos", "The Denver Broncos", "Broncos"]
    (req,) = task.requests(docs[0])
    assert req.prompt.startswith("Title: Super Bowl 50\n\nBackground: Super Bowl 50 was")
    assert req.prompt.endswith("\n\nQuestion: Which team won Super Bowl 50?\n\nAnswer:")
    assert req.params.stop == ["\n"] and req.params.temperature == 0.0
    assert task.process_results(docs[0], [" The Denver Broncos.\nQuestion: next"]) == {"exact_match": 1.0, "f1": 1.0}
    per_doc = [task.process_results(docs[0], [" Broncos"]), task.process_results(docs[3], [" 9"])]
    agg = task.aggregate(per_doc)
    assert agg["exact_match"][0] == 0.5 and agg["f1"][0] == 0.5


def test_squad_data_dir_layout_and_errors(tmp_path):
    (tmp_path / "squad").mkdir()
    with pytest.raises(PhibookError, match=r"dev-v1\.1\.json not found .*rajpurkar\.github\.io"):
        SQuAD().load_docs(tmp_path, None)
    (tmp_path / "squad" / "dev-v1.1.json").write_text(FIXTURE.read_text())
    assert len(SQuAD().load_docs(tmp_path, 2)) == 2
    (tmp_path / "squad" / "dev-v1.1.json").write_text('{"data": [{"title": "x", "paragraphs": [{"context": "c"}]}]}')
    with pytest.raises(PhibookError, match=r"data\[0\]\.paragraphs\[0\]"):
        SQuAD().load_docs(tmp_path, None)


def test_truncate_at_stops_takes_the_earliest():
    assert truncate_at_stops("a\nprint(x)\n#c", ["\n#", "\nprint"]) == "a"
    assert truncate_at_stops("no stop", ["\n"]) == "no stop"


# --------------------------------------------------------------------------- through the runner


@pytest.mark.usefixtures("jail")
def test_squad_and_gsm8k_through_the_eval_command(tiny_checkpoint, benchmarks, tmp_path, capsys):
    from phibook.cli import main

    data = tmp_path / "data"
    (data / "squad").mkdir(parents=True)
    (data / "squad" / "dev-v1.1.json").write_text(FIXTURE.read_text())
    (data / "gsm8k").mkdir()
    (data / "gsm8k" / "test.jsonl").write_text(
        "".join(line for line in (benchmarks / "gsm8k" / "test.jsonl").open() if len(line) < 400)
    )
    out = tmp_path / "results.json"
    rc = main(["eval", "--model", str(tiny_checkpoint), "--tasks", "squad,gsm8k", "--data-dir", str(data),
               "--limit", "2", "--output", str(out), "--log-samples", "--no-progress"])
    assert rc == 0
    results = json.loads(out.read_text())
    for name, metrics in (("squad", ("exact_match", "f1")), ("gsm8k", ("acc",))):
        entry = results["results"][name]
        assert entry["n"] == 2
        for metric in metrics:
            assert 0.0 <= entry[metric] <= 1.0
        assert entry["prompt_settings"]["num_fewshot"] == 0
        samples = results["samples"][name]
        assert len(samples) == 2 and isinstance(samples[0]["results"][0], str)  # the generated text
    assert results["samples"]["squad"][0]["requests"][0]["prompt"].startswith("Title: Super Bowl 50")
    assert results["sandbox"]["mode"] == "bubblewrap" and all(results["sandbox"]["verified"].values())
    text = capsys.readouterr().out
    assert "squad" in text and "gsm8k" in text


@pytest.mark.usefixtures("jail")
def test_humaneval_longer_than_the_context_is_truncated_with_a_warning(tiny_checkpoint, benchmarks, tmp_path,
                                                                         capsys):
    from phibook.cli import main

    # HumanEval/0's prompt is 323 tokens of the tiny tokenizer; the tiny model's context is 256.
    out = tmp_path / "he.json"
    rc = main(["eval", "--model", str(tiny_checkpoint), "--tasks", "humaneval", "--data-dir", str(benchmarks),
               "--limit", "3", "--output", str(out), "--log-samples", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    entry = json.loads(out.read_text())["results"]["humaneval"]
    assert entry["n"] == 3 and entry["truncated"] >= 1 and entry["pass@1"] is not None
    warning = [line for line in captured.err.splitlines() if "warning: humaneval" in line]
    assert warning == [
        f"phibook eval: warning: humaneval: {entry['truncated']} of 3 prompts did not fit the model's context of "
        "256 tokens with 512 new tokens; each kept its last 128 tokens (left truncation, as lm-evaluation-harness "
        "does; up to 128 new tokens); programs and scores still use the full prompt"
    ]
    assert "truncated" not in captured.out  # a JSON count, not a table row


@pytest.mark.usefixtures("jail")
def test_sampled_pass_at_k_through_the_eval_command(tiny_checkpoint, benchmarks, tmp_path, capsys):
    from phibook.cli import main

    out = tmp_path / "he.json"
    rc = main(["eval", "--model", str(tiny_checkpoint), "--tasks", "humaneval", "--data-dir", str(benchmarks),
               "--limit", "2", "--samples", "10", "--temperature", "0.8", "--output", str(out), "--log-samples",
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    results = json.loads(out.read_text())
    entry = results["results"]["humaneval"]
    assert [k for k in entry if k.startswith("pass@") and not k.endswith("_stderr")] == ["pass@1", "pass@10"]
    assert entry["pass@1"] <= entry["pass@10"]
    settings = entry["prompt_settings"]
    assert (settings["samples"], settings["temperature"], settings["top_p"]) == (10, 0.8, 0.95)
    for sample in results["samples"]["humaneval"]:
        params = [r["params"] for r in sample["requests"]]
        assert [p["seed"] for p in params] == list(range(10)) and {p["temperature"] for p in params} == {0.8}
        texts = sample["results"]
        assert len(texts) == 10 and len(set(texts)) > 1  # sampled, not ten copies of one answer
    table = capsys.readouterr().out
    assert "pass@10" in table


def test_samples_flags_are_checked(tiny_checkpoint, benchmarks, capsys):
    from phibook.cli import main

    base = ["eval", "--model", str(tiny_checkpoint), "--data-dir", str(benchmarks), "--limit", "1"]
    assert main(base + ["--tasks", "arc_easy", "--samples", "5"]) == 2
    assert "--samples only apply to the code tasks (humaneval, mbpp); none is in --tasks" in capsys.readouterr().err
    assert main(base + ["--tasks", "humaneval", "--samples", "4", "--temperature", "0"]) == 2
    assert "set --temperature > 0 for pass@k" in capsys.readouterr().err
    assert main(base + ["--tasks", "mbpp", "--samples", "0"]) == 2
    assert "--samples must be >= 1" in capsys.readouterr().err
    assert main(base + ["--tasks", "mbpp", "--temperature", "-1"]) == 2
    assert "--temperature must be a finite number >= 0" in capsys.readouterr().err


def _one_problem_humaneval(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    (data / "humaneval").mkdir(parents=True)
    row = {"task_id": "Test/0", "prompt": "def add(a, b):\n", "entry_point": "add",
           "canonical_solution": "    return a + b\n", "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"}
    (data / "humaneval" / "HumanEval.jsonl").write_text(json.dumps(row) + "\n")
    return data


def test_code_tasks_fail_closed_without_the_jail(tmp_path):
    """No bubblewrap: one clear line and exit 2, before the model loads (the model path is bogus)."""
    import os
    import subprocess
    import sys

    data = _one_problem_humaneval(tmp_path)
    env = dict(os.environ, PHIBOOK_BWRAP=str(tmp_path / "no-bwrap"))
    for task in ("humaneval", "gsm8k"):
        if task == "gsm8k":
            (data / "gsm8k").mkdir(exist_ok=True)
            (data / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
        r = subprocess.run([sys.executable, "-m", "phibook.cli", "eval", "--model", str(tmp_path / "no-model"),
                            "--tasks", task, "--data-dir", str(data)], capture_output=True, text=True, env=env,
                           timeout=300)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("phibook eval: error: the code sandbox needs bubblewrap")
        assert "apt-get install bubblewrap" in lines[0] and "--unsafe-no-sandbox" in lines[0]
        assert "Traceback" not in r.stderr


def test_unsafe_no_sandbox_is_recorded(tiny_checkpoint, tmp_path, capsys):
    from phibook.cli import main

    data = _one_problem_humaneval(tmp_path)
    out = tmp_path / "he.json"
    rc = main(["eval", "--model", str(tiny_checkpoint), "--tasks", "humaneval", "--data-dir", str(data),
               "--output", str(out), "--no-progress", "--unsafe-no-sandbox"])
    assert rc == 0
    assert "WITHOUT the jail" in capsys.readouterr().err
    results = json.loads(out.read_text())
    assert results["sandbox"]["mode"] == "unsafe-no-sandbox"
    (data / "squad").mkdir()
    (data / "squad" / "dev-v1.1.json").write_text(FIXTURE.read_text())
    assert main(["eval", "--model", str(tiny_checkpoint), "--tasks", "squad", "--data-dir", str(data), "--limit", "1",
                 "--output", str(out), "--no-progress"]) == 0
    assert "sandbox" not in json.loads(out.read_text())  # no code ran
