"""`phibook demo` and `phibook report`: a real short demo (killed mid-training, then resumed),
the learning it must show, and the report for a plain training run.

The demo fixture (tests/demo_helpers.py) runs `phibook demo --minutes 3` twice as real
subprocesses: the first kills itself (fault hook) right after training step 31, the second
finishes. Those tests are marked slow: the demo trains at least 200 steps, 16 minutes on the
shared, loaded 2-core machine (a few minutes on a quiet one). The rest of the file is fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.demo_helpers import KILL_AT_STEP, REPO, get_demo_run

EARLY_STAGES = ["synth", "clean", "tokenizer", "tokenize", "baseline"]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    bench = REPO.parent / "shared" / "benchmarks"
    return get_demo_run(tmp_path_factory, bench if bench.is_dir() else None)


def corpus_unigram_entropy(shards: Path) -> float:
    """Entropy (nats) of the training tokens' frequencies, read straight from the shard files."""
    manifest = json.loads((shards / "manifest.json").read_text())
    dtype = np.dtype("<u2") if manifest["dtype"] == "uint16" else np.dtype("<u4")
    tokens = np.concatenate([np.fromfile(shards / s["file"], dtype=dtype)
                             for s in manifest["shards"] if s["split"] == "train"])
    p = np.bincount(tokens) / len(tokens)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- the short demo


@pytest.mark.slow
@pytest.mark.ci
def test_demo_outputs_report_and_run_dir(demo_run):
    out = demo_run.out
    for name in ("report.html", "report.md", "samples.md", "samples.json", "run/metrics.jsonl",
                 "run/config.resolved.json", "data/clean_report.json", "shards/manifest.json"):
        assert (out / name).is_file(), name
    state = json.loads((out / "stages.json").read_text())
    assert list(state["stages"]) == ["synth", "clean", "tokenizer", "tokenize", "baseline", "train", "evaluate",
                                     "samples", "report"]
    samples = json.loads((out / "samples.json").read_text())["samples"]
    assert [s["format"] for s in samples] == ["completion", "step-by-step", "qa", "chat", "code"]
    # every stage announced itself and its duration in the finishing run
    for i in range(1, 10):
        assert f"[{i}/9]" in demo_run.second_log


@pytest.mark.slow
@pytest.mark.ci
def test_demo_validation_loss_beats_unigram_entropy(demo_run):
    entropy = corpus_unigram_entropy(demo_run.out / "shards")
    vals = [r["val_loss"] for r in metrics(demo_run.out / "run") if r.get("val_loss") is not None]
    assert vals, "no validation loss recorded"
    # "Well below": the model must use context worth at least a quarter of the entropy.
    assert vals[-1] < 0.75 * entropy, (vals[-1], entropy)
    before = json.loads((demo_run.out / "eval/before.json").read_text())
    assert before["val_loss"] > entropy  # the step-0 model is worse than unigram statistics


@pytest.mark.slow
@pytest.mark.ci
def test_demo_exercise_accuracy_improves(demo_run):
    before = json.loads((demo_run.out / "eval/before.json").read_text())["exercises"]
    after = json.loads((demo_run.out / "eval/after.json").read_text())["exercises"]
    assert after["overall"]["n"] == before["overall"]["n"] >= 50
    assert after["overall"]["accuracy"] > before["overall"]["accuracy"], (before["per_kind"], after["per_kind"])


@pytest.mark.slow
@pytest.mark.ci
def test_demo_heldout_questions_are_unseen(demo_run):
    from phibook.demo.run import training_questions

    seen = training_questions([demo_run.out / "data/clean.jsonl"])
    items = json.loads((demo_run.out / "eval/heldout.json").read_text())["items"]
    assert items and not {it["question"] for it in items} & seen


@pytest.mark.slow
@pytest.mark.ci
def test_demo_resumes_after_sigkill_without_redoing_stages(demo_run):
    log = demo_run.second_log
    at_kill = demo_run.stages_at_kill["stages"]
    final = json.loads((demo_run.out / "stages.json").read_text())
    assert final["runs"] == 2
    for name in EARLY_STAGES:
        assert name in at_kill, f"{name} had not finished before the kill"
        assert f"] {name}:" in log and at_kill[name]["finished"] == final["stages"][name]["finished"], name
    assert log.count("  reusing ") == len(EARLY_STAGES)
    # the first run died right after the chosen step, past calibration, with the plan recorded
    assert demo_run.steps_at_kill == list(range(1, KILL_AT_STEP + 1))
    plan = demo_run.stages_at_kill["train_plan"]
    assert final["train_plan"] == plan
    # training continued from the newest checkpoint the kill left, into the same time budget
    assert "continuing the recorded plan" in log
    resumed = [int(line.rsplit(" ", 1)[1]) for line in log.splitlines() if "resumed from" in line]
    assert resumed == [demo_run.killed_at_checkpoint] and 6 <= resumed[0] <= KILL_AT_STEP
    # every step once, from 1 to where the budget (or the minimum) ended it: none repeated or skipped
    recs = metrics(demo_run.out / "run")
    steps = [r["step"] for r in recs]
    last = final["stages"]["train"]["stats"]["steps"]
    assert steps == list(range(1, last + 1)) and plan["min_steps"] <= last <= plan["step_cap"]
    # the training seconds continued across the kill; training stopped at the first step past the budget
    if plan["min_steps"] < last < plan["step_cap"]:
        assert recs[-1]["elapsed"] >= plan["time_budget_s"] > recs[-2]["elapsed"]


@pytest.mark.slow
@pytest.mark.ci
def test_demo_numbers_mean_something_on_a_shared_machine(demo_run):
    final = json.loads((demo_run.out / "stages.json").read_text())
    # --no-progress reached every bar, the trainer's included: no carriage-return lines in the logs
    for log in (demo_run.first_log, demo_run.second_log):
        assert "\r" not in log
    # MFU against the CPU's derived peak: never above 100%
    assert all(0 < r["mfu"] <= 1.0 for r in metrics(demo_run.out / "run"))
    assert "MFU against a peak of" in demo_run.first_log and "FLOPs/cycle" in demo_run.first_log
    # precision from the CPU's features, said in the output
    from phibook.train.peak import precision_choice

    precision, why = precision_choice()
    assert final["precision"] == precision and f"  precision: {precision} ({why})" in demo_run.first_log
    # the plan is a time budget, re-projected during training
    assert "training stops when those seconds are spent" in demo_run.first_log
    assert "trained " in demo_run.second_log and "stopped by" in demo_run.second_log
    # the baseline's generation and benchmark items are capped, and the stats say so
    from phibook.demo.run import answer_tokens
    from phibook.model.tokenizer import Tokenizer

    caps = final["stages"]["baseline"]["stats"]["caps"]
    items = json.loads((demo_run.out / "eval/heldout.json").read_text())["items"]
    tok = Tokenizer.from_file(demo_run.out / "tokenizer/tokenizer.json")
    assert caps["max_new_tokens"] == answer_tokens(tok, items) and caps["stop"] == ["\n", ". "]
    # No benchmark files (no ../shared) means no benchmark stage to cap: both are None then.
    assert caps["benchmark_items"] is None or caps["benchmark_items"] <= caps["benchmark_items_uncapped"]


@pytest.mark.slow
@pytest.mark.ci
def test_demo_rerun_of_finished_demo_reuses_everything(demo_run):
    proc = subprocess.run([sys.executable, "-m", "phibook.cli", "demo", "--out", str(demo_run.out), "--minutes", "3",
                           "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("  reusing ") == 8  # every stage but the report, which is rewritten
    assert "phibook train:" not in proc.stderr  # the trainer never started


# --------------------------------------------------------------------------- fast checks


def test_heldout_exercises_skip_seen_questions():
    from phibook.demo.run import heldout_exercises

    first, _ = heldout_exercises(set(), 10, seed=1)
    seen = {it["question"] for it in first}
    second, notes = heldout_exercises(seen, 10, seed=1)
    assert not {it["question"] for it in second} & seen
    assert {it["kind"] for it in second} >= {"arithmetic", "word_problem", "theory_of_mind"}
    # the ten Python functions are all seen after one draw of each; the kind is reported, not scored
    assert "python" in notes or all(it["kind"] != "python" or it["question"] not in seen for it in second)


def test_answer_span_reads_the_training_layout():
    from phibook.demo.run import answer_span

    assert answer_span(" the basket. Maya saw the ball go into the basket.", "theory_of_mind") == "the basket"
    assert answer_span(" 150 minutes. One hour is 60 minutes.", "unit_conversion") == "150 minutes"
    assert answer_span(" 2.25 kilograms. There are", "unit_conversion") == "2.25 kilograms"
    assert answer_span(" 42. First, work inside", "arithmetic") == "42"
    assert answer_span(" -7.", "fact") == "-7"
    assert answer_span("", "fact") == ""
    assert answer_span(" What is 0 + 9?", "fact") == ""  # a new question is no answer, though it holds a 0


def test_demo_bad_input_is_a_clear_error(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "phibook.cli", "demo", "--out", str(tmp_path / "o"), *args],
                              capture_output=True, text=True, timeout=120)

    proc = run("--minutes", "0")
    assert proc.returncode == 2 and "--minutes must be > 0" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("--text", str(tmp_path / "missing.txt"))
    assert proc.returncode == 2 and "missing.txt: no such file" in proc.stderr
    proc = run("--data-dir", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "is not a directory" in proc.stderr


def test_demo_refuses_a_directory_of_another_run(tmp_path):
    from phibook.demo.run import DemoOptions, StageState
    from phibook.errors import PhibookError

    StageState(tmp_path, DemoOptions(out=tmp_path, seed=1)).save()
    with pytest.raises(PhibookError, match="other options"):
        StageState(tmp_path, DemoOptions(out=tmp_path, seed=2))


def test_text_files_become_documents(tmp_path):
    from phibook.demo.run import text_documents

    src = tmp_path / "notes.txt"
    src.write_text("\n\n".join(f"Paragraph {i}. " + "word " * 300 for i in range(10)))
    out = tmp_path / "text.jsonl"
    n = text_documents([src], out, max_chars=4000)
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    assert n == len(docs) > 1 and len({d["id"] for d in docs}) == n
    assert all(d["source"] == "text" and len(d["text"]) < 6000 for d in docs)
    assert "Paragraph 9." in docs[-1]["text"]


def test_report_for_a_plain_training_run(tmp_path, shared_dir):
    """`phibook report RUN_DIR` on a real (tiny) `phibook train` run: plots, config, samples."""
    from tests.train_helpers import TINY_MODEL, make_shards

    shards = make_shards(shared_dir, tmp_path / "data")
    run_dir = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, "-m", "phibook.cli", "train", "--preset", "phi-tiny", "--data", str(shards), "--out",
         str(run_dir), "--max-steps", "12", "--set", *TINY_MODEL, "global_batch=4", "micro_batch=4",
         "eval_every=4", "eval_sequences=4", "tensorboard=false", "lr=3e-3"],
        capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr
    proc = subprocess.run([sys.executable, "-m", "phibook.cli", "report", str(run_dir), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "r/report.html").read_text()
    for section in ("summary", "configuration", "training", "samples"):
        assert f'<section id="{section}">' in page
    assert page.count('src="data:image/png;base64,') == 2  # loss curves + throughput
    assert "http://" not in page and "https://" not in page and "<script" not in page
    md = (tmp_path / "r/report.md").read_text()
    assert "![train and validation loss" in md and (tmp_path / "r/report-loss.png").stat().st_size > 5000
    samples = json.loads((tmp_path / "r/samples.json").read_text())["samples"]
    assert len(samples) == 5


def test_report_rejects_a_directory_that_is_no_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "phibook.cli", "report", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "neither stages.json" in proc.stderr and "Traceback" not in proc.stderr
