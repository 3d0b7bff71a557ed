"""The eval runner: harness token split, batched shared-context scoring == naive, rolling windows,
generation dispatch, results JSON/table, and the `phibook eval` command end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phibook.cli import main
from phibook.eval.runner import (
    LoglikelihoodScorer,
    Runner,
    TokenPair,
    encode_pair,
    rolling_windows,
    run_task,
)
from phibook.eval.task import (
    GenerationRequest,
    LoglikelihoodRequest,
    RollingLoglikelihoodRequest,
    get_task,
)
from phibook.weights.checkpoint import load_model


def naive_loglikelihood(model, pair: TokenPair) -> tuple[float, bool]:
    """Reference: one unbatched full forward of context + continuation (harness truncation)."""
    max_len = model.config.max_seq_len
    seq = (pair.context + pair.continuation)[-(max_len + 1) :]
    idx = torch.tensor([seq[:-1]], device=next(model.parameters()).device)
    with torch.no_grad():
        logp = model(idx).float().log_softmax(-1)[0, -len(pair.continuation) :]
    target = torch.tensor(pair.continuation, device=idx.device)
    return float(logp.gather(1, target.unsqueeze(1)).sum()), bool((logp.argmax(-1) == target).all())



@pytest.fixture(scope="module")
def tiny(tiny_checkpoint: Path):
    return load_model(tiny_checkpoint)


@pytest.fixture(scope="module")
def bench(shared_dir: Path) -> Path:
    return shared_dir / "benchmarks"


# --------------------------------------------------------------------------- token split


def test_encode_pair_moves_trailing_space_and_splits_whole(tiny) -> None:
    tok = tiny.tokenizer
    pair = encode_pair(tok, "Answer: ", "yes")
    ctx = tok.encode("Answer:")
    assert pair.context == ctx
    assert pair.continuation == tok.encode("Answer: yes")[len(ctx) :]
    # no trailing space: same rule, context encoded alone
    pair = encode_pair(tok, "def f", "(x):")
    assert pair.context == tok.encode("def f")
    assert pair.context + pair.continuation == tok.encode("def f(x):")


def test_encode_pair_empty_context_uses_eos(tiny) -> None:
    pair = encode_pair(tiny.tokenizer, "", "hello")
    assert pair.context == [tiny.tokenizer.eos_id]
    assert pair.continuation == tiny.tokenizer.encode("hello")


# --------------------------------------------------------------------------- scoring equivalence


def task_requests(bench: Path, names: list[str], limit: int) -> list[LoglikelihoodRequest]:
    reqs = []
    for name in names:
        task = get_task(name)
        for doc in task.load_docs(bench, limit):
            reqs.extend(task.requests(doc))
    return reqs


@pytest.fixture(scope="module")
def mc_cases(tiny, bench: Path):
    """Real requests from seven tasks with their naive (unbatched full-forward) answers."""
    names = ["arc_easy", "winogrande", "mmlu_anatomy", "hellaswag", "piqa", "openbookqa", "siqa"]
    reqs = task_requests(bench, names, 2)
    refs = [naive_loglikelihood(tiny.model, encode_pair(tiny.tokenizer, r.context, r.continuation)) for r in reqs]
    return reqs, refs


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_shared_context_equals_naive(tiny, mc_cases, batch_size: int) -> None:
    reqs, refs = mc_cases
    runner = Runner(tiny.model, tiny.tokenizer, batch_size=batch_size, progress=False)
    got = runner.loglikelihood(reqs)
    for req, (ll, greedy), (ref_ll, ref_greedy) in zip(reqs, got, refs, strict=True):
        assert ll == pytest.approx(ref_ll, abs=1e-4), req
        assert greedy == ref_greedy


def test_truncated_contexts_equal_naive(tiny, bench: Path) -> None:
    # BoolQ passages are longer than the tiny model's 256-token context: cut from the left.
    reqs = task_requests(bench, ["boolq"], 4)
    runner = Runner(tiny.model, tiny.tokenizer, batch_size=5, progress=False)
    got = runner.loglikelihood(reqs)
    assert runner.scorer.n_truncated > 0
    for req, (ll, _) in zip(reqs, got, strict=True):
        pair = encode_pair(tiny.tokenizer, req.context, req.continuation)
        assert ll == pytest.approx(naive_loglikelihood(tiny.model, pair)[0], abs=1e-4)


def test_greedy_flag_true_for_argmax_continuation(tiny) -> None:
    model = tiny.model
    ctx = tiny.tokenizer.encode("def add(a, b):")
    with torch.no_grad():
        seq = list(ctx)
        for _ in range(4):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    pair = TokenPair(ctx, seq[len(ctx) :])
    scorer = LoglikelihoodScorer(model, batch_size=4, progress=False)
    other = TokenPair(ctx, [(seq[-1] + 1) % 300] * 2)
    (ll, greedy), (_, greedy_other) = scorer.score([pair, other])
    assert greedy and not greedy_other
    # the scorer's LM-head slicing hook is gone afterwards: full logits again
    with torch.no_grad():
        assert model(torch.tensor([ctx])).shape[1] == len(ctx)
    assert ll == pytest.approx(naive_loglikelihood(model, pair)[0], abs=1e-4)


def test_group_by_prefix_shares_contexts_and_sentence_starts() -> None:
    from phibook.eval.scoring import _Row, group_by_prefix

    rows = [
        _Row(0, [5, 6, 7, 8, 1, 2], 4),  # four choices of one question: one group, prefix = context
        _Row(1, [5, 6, 7, 8, 3], 4),
        _Row(2, [5, 6, 7, 8, 4, 4], 4),
        _Row(3, [9, 9, 9, 9, 9, 10, 20, 21], 6),  # WinoGrande: the option differs, the start is shared
        _Row(4, [9, 9, 9, 9, 9, 11, 20, 21], 6),
        _Row(5, [30, 31, 32], 2),  # shares nothing: alone
    ]
    groups = {tuple(r.index for r in g.rows): g.prefix for g in group_by_prefix(rows)}
    assert groups == {(0, 1, 2): [5, 6, 7, 8], (3, 4): [9, 9, 9, 9, 9], (5,): [30, 31]}
    # a third sentence sharing one token with a long shared prefix would cost more than it saves
    rows.append(_Row(6, [9, 40, 41, 42], 3))
    groups = {tuple(r.index for r in g.rows) for g in group_by_prefix(rows)}
    assert (3, 4) in groups and (6,) in groups


@pytest.mark.parametrize("batch_size", [2, 7])
def test_shared_prefixes_across_contexts_equal_naive(tiny, batch_size: int) -> None:
    """WinoGrande-style pairs (contexts differ after a shared start), choices of one context, a
    one-token continuation and an unrelated row in the same batch: every score equals the naive one."""
    enc = tiny.tokenizer.encode
    texts = [
        ("The trophy does not fit into the suitcase because the trophy", " is too large."),
        ("The trophy does not fit into the suitcase because the suitcase", " is too large."),
        ("def add(a, b):", " return a + b"),
        ("def add(a, b):", " return a - b\n"),
        ("def add(a, b):", " pass"),
        ("Alice and Bob", " are learning"),
    ]
    pairs = [TokenPair(enc(c), enc(c + x)[len(enc(c)) :]) for c, x in texts]
    got = LoglikelihoodScorer(tiny.model, batch_size=batch_size, progress=False).score(pairs)
    for pair, (ll, greedy) in zip(pairs, got, strict=True):
        ref_ll, ref_greedy = naive_loglikelihood(tiny.model, pair)
        assert ll == pytest.approx(ref_ll, abs=1e-4)
        assert greedy == ref_greedy


# --------------------------------------------------------------------------- rolling


def test_rolling_windows_match_harness_algorithm() -> None:
    # get_rolling_token_windows(tokens, prefix=0, max_seq_len=3, context_len=1) + make_disjoint_window
    windows = rolling_windows([1, 2, 3, 4, 5, 6, 7], 0, 3)
    assert [(w.context, w.continuation) for w in windows] == [([0], [1, 2, 3]), ([3], [4, 5, 6]), ([4, 5, 6], [7])]
    assert rolling_windows([], 0, 3) == []
    assert [(w.context, w.continuation) for w in rolling_windows([5], 0, 3)] == [([0], [5])]


def test_rolling_loglikelihood_sums_every_token(tiny) -> None:
    text = "class Counter:\n    def __init__(self):\n        self.count = 0\n" * 12
    runner = Runner(tiny.model, tiny.tokenizer, batch_size=4, progress=False)
    (total, n), = runner.loglikelihood_rolling([RollingLoglikelihoodRequest(text)])
    tokens = tiny.tokenizer.encode(text)
    assert n == len(tokens) > tiny.config.max_seq_len  # several windows
    expected = sum(
        naive_loglikelihood(tiny.model, w)[0] for w in rolling_windows(tokens, tiny.tokenizer.eos_id, 256)
    )
    assert total == pytest.approx(expected, abs=1e-3)
    # one window: the whole text given the EOS token
    short = "x = 1\n"
    (ll, n), = runner.loglikelihood_rolling([RollingLoglikelihoodRequest(short)])
    pair = TokenPair([tiny.tokenizer.eos_id], tiny.tokenizer.encode(short))
    assert ll == pytest.approx(naive_loglikelihood(tiny.model, pair)[0], abs=1e-4)


# --------------------------------------------------------------------------- mixed dispatch


def test_answer_dispatches_generation_in_order(tiny) -> None:
    from phibook.inference.generate import Generator, SamplingParams

    params = SamplingParams(max_new_tokens=6)
    reqs = [
        GenerationRequest("def add(a, b):", params),
        LoglikelihoodRequest("x =", " 1"),
        GenerationRequest("class", SamplingParams(max_new_tokens=3)),
    ]
    runner = Runner(tiny.model, tiny.tokenizer, batch_size=2, progress=False)
    out = runner.answer(reqs, desc="mixed")
    direct = Generator(tiny.model, tiny.tokenizer).run(["def add(a, b):"], params)[0].text
    assert out[0] == direct
    assert isinstance(out[1], tuple) and out[1][0] < 0
    assert isinstance(out[2], str)


def test_prompt_keep_is_the_harness_rule_with_half_the_context_as_a_floor() -> None:
    from phibook.eval.runner import prompt_keep

    assert prompt_keep(2048, 512) == 1536  # lm-eval: max_length - max_gen_toks
    assert prompt_keep(256, 32) == 224
    assert prompt_keep(256, 512) == 128  # the budget alone overflows a toy context: keep half
    assert prompt_keep(2, 5) == 1


def test_long_generation_prompts_are_left_truncated(tiny) -> None:
    from phibook.inference.generate import SamplingParams

    tok, model = tiny.tokenizer, tiny.model
    context = model.config.max_seq_len
    long_prompt = "def fibonacci(n):\n    result = []\n" * 60
    ids = tok.encode(long_prompt)
    assert len(ids) > context
    params = SamplingParams(max_new_tokens=8, stop_at_eos=False)
    runner = Runner(model, tok, batch_size=2, progress=False)
    out = runner.generate([GenerationRequest("def add(a, b):", params), GenerationRequest(long_prompt, params)])
    assert runner.n_truncated == 1  # only the long prompt was cut

    # Reference: greedy decoding by full forwards on the prompt's last (context - 8) tokens.
    seq = ids[-(context - 8):]
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    completion = runner._generator.run([long_prompt], params)[0]
    assert completion.prompt_tokens == context - 8 and completion.token_ids == seq[context - 8:]
    assert out[1] == completion.text
    assert runner.n_truncated == 2


def test_run_task_log_samples(tiny, bench: Path) -> None:
    runner = Runner(tiny.model, tiny.tokenizer, batch_size=8, progress=False)
    outcome = run_task(runner, get_task("arc_easy"), bench, 5, log_samples=True)
    assert outcome["n"] == 5
    acc, se = outcome["metrics"]["acc"]
    assert 0 <= acc <= 1 and se >= 0
    sample = outcome["samples"][0]
    assert sample["requests"][0]["context"].startswith("Question: ")
    assert len(sample["results"]) == len(sample["doc"]["choices"])
    assert set(sample["metrics"]) == {"acc", "acc_norm"}


# --------------------------------------------------------------------------- CLI


def test_cli_end_to_end_writes_results_and_table(tiny_checkpoint: Path, bench: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "phibook.cli", "eval", "--model", str(tiny_checkpoint),
         "--tasks", "arc_easy,boolq,winogrande", "--limit", "10", "--data-dir", str(bench),
         "--output", str(out), "--batch-size", "8", "--compare"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert results["model"]["fingerprint"] and results["limit"] == 10
    assert set(results["results"]) == {"arc_easy", "boolq", "winogrande"}
    for entry in results["results"].values():
        assert entry["n"] == 10
        assert 0 <= entry["acc"] <= 1 and math.isfinite(entry["acc_stderr"])
        assert entry["prompt_settings"]["num_fewshot"] == 0
        assert entry["report"]["phi-1.5 (1.3B)"] > 0.7
    assert "acc_norm" in results["results"]["arc_easy"]
    # each task's files and their layout, on stderr and in the JSON
    assert f"phibook eval: arc_easy: ai2-jsonl ({bench / 'arc_easy' / 'ARC-Easy-Test.jsonl'})" in proc.stderr
    assert results["results"]["boolq"]["data"]["layout"] == "superglue-jsonl"
    # the table (--compare): our number beside the report's phi-1.5 and peers
    lines = {line.split()[0] + " " + line.split()[1]: line for line in proc.stdout.splitlines()[2:]}
    assert "0.756" in lines["arc_easy acc"] and "0.763" in lines["arc_easy acc"]  # phi-1.5, Llama2-7B
    assert "0.734" in lines["winogrande acc"]
    # BoolQ passages overflow the tiny model's 256-token context: counted per task, one warning line
    boolq = results["results"]["boolq"]
    assert boolq["truncated"] > 0 and results["results"]["arc_easy"]["truncated"] == 0
    assert (f"phibook eval: warning: boolq: {boolq['truncated']} of 20 requests were longer than the model's "
            "context of 256 tokens") in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_bad_inputs_exit_2_with_message(tiny_checkpoint: Path, bench: Path, tmp_path: Path, capsys,
                                            monkeypatch) -> None:
    from phibook.eval import data_dir

    monkeypatch.delenv("PHIBOOK_DATA_DIR", raising=False)
    # no ../shared/benchmarks anywhere: nothing to fall back on
    monkeypatch.setattr(data_dir, "default_locations", lambda: [tmp_path / "no-shared"])
    base = ["eval", "--model", str(tiny_checkpoint)]
    assert main(base + ["--tasks", "arc_medium", "--data-dir", str(bench)]) == 2
    assert "unknown task(s) arc_medium; known tasks:" in capsys.readouterr().err
    assert main(base + ["--tasks", "arc_easy"]) == 2
    assert "no benchmark data: pass --data-dir" in capsys.readouterr().err
    assert main(base + ["--tasks", "arc_easy", "--data-dir", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "arc_easy").mkdir()
    assert main(base + ["--tasks", "arc_easy", "--data-dir", str(tmp_path)]) == 2
    assert "none of ARC-Easy-Test.jsonl found in" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "missing"), "--tasks", "piqa", "--data-dir", str(bench),
                 "--limit", "1"]) == 2
    assert "error:" in capsys.readouterr().err


def test_cli_error_subprocess_has_no_traceback(tiny_checkpoint: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PHIBOOK_DATA_DIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "phibook.cli", "eval", "--model", str(tiny_checkpoint), "--tasks", "hellaswag"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 2
    assert "phibook eval: error: hellaswag: data folder" in proc.stderr
    assert "hellaswag_val.jsonl" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- the report's numbers


def _table_rows(text: str, header: str, caption: str) -> dict[str, list[str]]:
    block = text[text.index(header) + len(header) : text.index(caption)]
    rows = {}
    for line in block.strip().splitlines():
        parts = line.split()
        if len(parts) < 6:
            continue
        name = " ".join(parts[:-5]).replace(" (v1.1)", "")
        rows[name] = parts[-5:]
    return rows


def test_report_numbers_match_the_seed_tables(shared_dir: Path) -> None:
    from phibook.eval.report_numbers import REPORT_NUMBERS, TABLE_TASKS

    text = (shared_dir / "seeds" / "000_d0d2c6a124565ddb.txt").read_text()
    tables = {
        "Table 2": _table_rows(text, "WinoGrande ARC-Easy ARC-Challenge BoolQ SIQA\n", "Table 2:"),
        "Table 3": _table_rows(text, "PIQA Hellaswag MMLU OpenbookQA SQUAD (EM)\n", "Table 3:"),
    }
    checked = 0
    for table, rows in tables.items():
        assert len(rows) == 12, table
        for model, cells in rows.items():
            for task, cell in zip(TABLE_TASKS[table], cells, strict=True):
                expected = None if cell == "–" else float(cell)
                assert REPORT_NUMBERS[model][task] == expected, (model, task)
                checked += 1
    assert checked == 120
    assert REPORT_NUMBERS["phi-1.5 (1.3B)"]["humaneval"] == pytest.approx(0.341)
    assert REPORT_NUMBERS["Llama-65B"]["mbpp"] == pytest.approx(0.377)
