"""The table `phibook eval` prints: compact by default (task, metric, value ± stderr, n), the report's
comparison columns under --compare, and a line saying what a score where every item scored the same
(0.0000 ± 0.0000) means. The results JSON names the layout each task's files were read in."""

from __future__ import annotations

import json
from pathlib import Path

from phibook.eval.results import format_table, task_entry, uniform_notes
from phibook.eval.task import get_task


def results() -> dict:
    return {"results": {
        "arc_easy": {"acc": 0.25, "acc_stderr": 0.0993, "acc_norm": 0.0, "acc_norm_stderr": 0.0, "n": 20,
                     "truncated": 0, "higher_is_better": {"acc": True, "acc_norm": True}, "prompt_settings": {},
                     "report_metric": "acc", "report": {}},
        "boolq": {"acc": 0.6, "acc_stderr": 0.1124, "n": 20, "truncated": 3, "higher_is_better": {"acc": True},
                  "prompt_settings": {}, "report_metric": "acc", "report": {},
                  "data": {"layout": "hf-parquet", "files": ["x"]}},
        "mmlu": {"acc": 0.3, "acc_stderr": 0.1, "acc_subject_avg": 0.31, "acc_subject_avg_stderr": 0.1,
                 "acc:anatomy": 0.3, "acc:anatomy_stderr": 0.1, "n": 20, "report_metric": "acc", "report": {}},
    }}


def test_default_table_is_compact() -> None:
    lines = format_table(results()).splitlines()
    assert lines[0].split() == ["task", "metric", "value", "±", "stderr", "n"]
    assert max(len(line) for line in lines[:7]) <= 60
    body = {" ".join(line.split()[:2]): line for line in lines[2:7]}
    assert set(body) == {"arc_easy acc", "arc_easy acc_norm", "boolq acc", "mmlu acc", "mmlu acc_subject_avg"}
    assert body["arc_easy acc"].split()[2:] == ["0.2500", "±", "0.0993", "20"]
    assert "0.756" not in format_table(results())  # no report column by default
    assert "phi-1.5" not in lines[0]


def test_compare_adds_the_report_columns() -> None:
    table = format_table(results(), compare=True)
    header = table.splitlines()[0]
    assert "phi-1.5 (report)" in header and "Llama2-7B" in header and "ours ± stderr" in header
    row = next(line for line in table.splitlines() if line.startswith("arc_easy") and " acc " in line)
    assert "0.756" in row and "0.763" in row  # phi-1.5 and Llama2-7B, Table 2


def test_zero_score_has_a_line_saying_what_it_means() -> None:
    table = format_table(results())
    note = [line for line in table.splitlines() if line.startswith("note:")]
    assert note == ["note: arc_easy acc_norm = 0.0000 ± 0.0000 on 20 items: all 20 items wrong by "
                    "length-normalized score (the choice with the highest log-likelihood per character was never "
                    "the gold answer); a stderr of 0 means every item scored the same, not that the number is "
                    "exact."]
    assert note[0] in format_table(results(), compare=True).splitlines()


def test_notes_for_all_right_one_item_and_other_metrics() -> None:
    res = {"results": {
        "piqa": {"acc": 1.0, "acc_stderr": 0.0, "n": 5},
        "siqa": {"acc": 0.0, "acc_stderr": None, "n": 1},
        "humaneval": {"pass@1": 0.0, "pass@1_stderr": 0.0, "n": 3},
        "boolq": {"acc": 0.5, "acc_stderr": 0.2, "n": 4},
    }}
    notes = uniform_notes(res)
    assert notes[0].startswith("note: piqa acc = 1.0000 ± 0.0000 on 5 items: all 5 items right by log-likelihood")
    assert notes[1].startswith("note: siqa acc = 0.0000 on 1 item: the only item wrong by log-likelihood")
    assert notes[1].endswith("one item has no stderr.")
    assert notes[2].startswith("note: humaneval pass@1 = 0.0000 ± 0.0000 on 3 items: all 3 items scored 0;")
    assert len(notes) == 3
    # a single item shows no made-up stderr in the table
    assert "0.0000 ± n/a" in format_table(res)


def test_results_json_names_the_layout(tmp_path: Path) -> None:
    row = {"id": "x", "question": "Two plus two?", "choices": {"text": ["3", "4"], "label": ["A", "B"]},
           "answerKey": "B"}
    (tmp_path / "arc_easy").mkdir()
    (tmp_path / "arc_easy" / "test.jsonl").write_text(json.dumps(row) + "\n")
    task = get_task("arc_easy")
    task.load_docs(tmp_path, None)
    entry = task_entry(task, {"metrics": {"acc": (1.0, float("nan")), "acc_norm": (1.0, float("nan"))}, "n": 1})
    assert entry["data"] == {"layout": "hf-jsonl", "files": [str(tmp_path / "arc_easy" / "test.jsonl")]}
    # "data" is no metric: the table does not show it
    table = format_table({"results": {"arc_easy": entry}})
    assert "data" not in table and "hf-jsonl" not in table
