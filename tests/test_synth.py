"""Synthetic data: built-in teacher correctness, resumable jobs, the OpenAI teacher
against a real (and deliberately misbehaving) HTTP server on loopback, and errors."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from phibook.data.synth import exercises as ex
from phibook.data.synth.prompts import load_templates, load_topics, plan, render_prompt
from phibook.data.synth.run import run_synth
from phibook.data.synth.teachers import BuiltinTeacher, OpenAITeacher
from phibook.errors import PhibookError

NUM = r"-?\d+(?:\.\d+)?"
STEP = re.compile(rf"(?<![\d.])({NUM}) ([+\-*/]) ({NUM}) = ({NUM})(?![\d])")


def _check_steps(text: str) -> int:
    """Re-evaluate every 'a op b = c' written in a text; return how many were checked."""
    n = 0
    for a, op, b, c in STEP.findall(text):
        a, b, c = Fraction(a), Fraction(b), Fraction(c)
        assert {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op] == c, f"wrong step: {a} {op} {b} = {c}"
        n += 1
    return n


@pytest.mark.parametrize("kind", sorted(ex.GENERATORS))
def test_every_generator_emits_verified_answers(kind: str) -> None:
    rng = random.Random(1234)
    for _ in range(25 if kind == "python" else 200):
        e = ex.make_exercise(rng, kind)
        assert ex.verify(e), (kind, e.question, e.answer)
        _check_steps(e.worked_solution())


def test_verify_catches_wrong_answers() -> None:
    rng = random.Random(0)
    e = ex.arithmetic_chain(rng)
    e.answer = str(int(e.answer) + 1)
    assert not ex.verify(e)
    p = ex.python_function(rng)
    p.check["tests"] = [p.check["tests"][0].rsplit("==", 1)[0] + "== 'definitely wrong'"]
    assert not ex.verify(p)


def test_builtin_documents_hold_only_checked_answers(tmp_path: Path) -> None:
    out = tmp_path / "docs.jsonl"
    stats = run_synth(out, 120, BuiltinTeacher(), load_topics(), load_templates(), seed=7, progress=False)
    assert stats.written == 120 and stats.failed == 0
    checked_steps = 0
    for line in out.read_text().splitlines():
        doc = json.loads(line)
        assert doc["source"] == "synthetic" and doc["meta"]["teacher"] == "builtin"
        assert doc["meta"]["exercises"], doc["id"]
        for meta in doc["meta"]["exercises"]:
            e = ex.Exercise(meta["kind"], meta["question"], [], meta["answer"], meta["check"])
            assert ex.verify(e), meta
            assert meta["question"].split(".")[0][:40] in doc["text"]
            if meta["kind"] != "python":
                assert meta["answer"] in doc["text"]
        checked_steps += _check_steps(doc["text"])
    assert checked_steps > 100


def test_plan_is_deterministic_and_sharding_partitions(tmp_path: Path) -> None:
    topics, templates = load_topics(), load_templates()
    assert plan(5, 3, topics, templates) == plan(5, 3, topics, templates)
    full = tmp_path / "full.jsonl"
    run_synth(full, 40, BuiltinTeacher(), topics, templates, seed=1, progress=False)
    parts = []
    for i in range(3):
        part = tmp_path / f"part{i}.jsonl"
        run_synth(part, 40, BuiltinTeacher(), topics, templates, seed=1, shard=(i, 3), progress=False)
        parts += [json.loads(x)["id"] for x in part.read_text().splitlines()]
    ids = [json.loads(x)["id"] for x in full.read_text().splitlines()]
    assert sorted(parts) == sorted(ids) and len(set(ids)) == 40


def test_seed_taxonomy_is_large_and_covers_the_reports_areas() -> None:
    topics = load_topics()
    assert len(topics) >= 200
    kinds = {t.kind for t in topics}
    assert {"math", "science", "daily", "mind", "coding", "knowledge"} <= kinds


def test_topic_expansion_dedups(tmp_path: Path) -> None:
    out = tmp_path / "topics.txt"
    r = subprocess.run([sys.executable, "-m", "phibook.cli", "synth", "topics", "--num", "1500", "--out", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    topics = load_topics(out)
    assert len(topics) == 1500
    assert len({t.name.lower() for t in topics}) == 1500


# --------------------------------------------------------------------------- errors


def test_empty_topics_and_unknown_placeholder(tmp_path: Path) -> None:
    empty = tmp_path / "topics.txt"
    empty.write_text("# nothing here\n## Subject [math]\n")
    with pytest.raises(PhibookError, match="no topics"):
        load_topics(empty)
    bad = tmp_path / "t.toml"
    bad.write_text('[x]\nprompt = "Write about {topic} for {reader}"\n')
    with pytest.raises(PhibookError, match=r"unknown placeholder.*reader"):
        load_templates(bad)
    r = subprocess.run(
        [sys.executable, "-m", "phibook.cli", "synth", "run", "--num-docs", "3", "--out", str(tmp_path / "o.jsonl"),
         "--templates", str(bad)], capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2 and "reader" in r.stderr and "Traceback" not in r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_teacher_names_the_endpoint(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}/v1"
    r = subprocess.run(
        [sys.executable, "-m", "phibook.cli", "synth", "run", "--teacher", "openai", "--base-url", url,
         "--num-docs", "2", "--out", str(tmp_path / "o.jsonl"), "--max-retries", "1", "--timeout", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert url in r.stderr and "unreachable" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- a real OpenAI-style server


class FakeTeacherServer:
    """A real HTTP server speaking the OpenAI chat API, with scripted misbehaviour.

    The answer to a prompt is a pure function of the prompt, so documents are
    reproducible. ``faults`` maps a prompt's first-attempt number to a fault:
    500, 429, 'slow' (sleeps past the client timeout), 'badjson', 'empty'.
    """

    def __init__(self, faults: list[str] | None = None, always_fail_every: int = 0, delay_s: float = 0.0) -> None:
        self.faults = faults or []
        self.always_fail_every = always_fail_every
        self.delay_s = delay_s
        self.attempts: dict[str, int] = {}
        self.requests = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._send(200, json.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]}).encode())

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                key = hashlib.sha1(prompt.encode()).hexdigest()
                with outer.lock:
                    outer.requests += 1
                    n = outer.attempts[key] = outer.attempts.get(key, 0) + 1
                fault = None
                bucket = int(key[:6], 16)
                if outer.always_fail_every and bucket % outer.always_fail_every == 0:
                    fault = 500
                elif n == 1 and outer.faults:
                    fault = outer.faults[bucket % len(outer.faults)]
                if outer.delay_s:
                    time.sleep(outer.delay_s)
                if fault in (500, 429):
                    return self._send(fault, json.dumps({"error": {"message": f"scripted {fault}"}}).encode())
                if fault == "slow":
                    time.sleep(3)
                if fault == "badjson":
                    return self._send(200, b'{"choices": [ this is not json')
                if fault == "empty":
                    return self._send(200, json.dumps({"id": "x", "object": "chat.completion", "created": 0,
                                                       "model": "fake", "choices": []}).encode())
                text = f"A textbook passage for prompt {key[:12]}.\n" + prompt[:200]
                resp = {
                    "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30},
                }
                self._send(200, json.dumps(resp).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeTeacherServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _openai_teacher(url: str, **kw: object) -> OpenAITeacher:
    return OpenAITeacher([url], "fake", timeout_s=1.0, backoff_base_s=0.01, backoff_max_s=0.05, **kw)


def test_openai_teacher_survives_a_misbehaving_server(tmp_path: Path) -> None:
    out = tmp_path / "docs.jsonl"
    with FakeTeacherServer(faults=[500, 429, "slow", "badjson", "empty", None]) as srv:
        stats = run_synth(out, 30, _openai_teacher(srv.url), load_topics(), load_templates(),
                          concurrency=8, progress=False)
    assert stats.failed == 0 and stats.written == 30
    assert stats.retries >= 20  # five of six fault kinds hit each prompt's first attempt
    docs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len({d["id"] for d in docs}) == 30
    assert all(d["meta"]["teacher"] == "openai" and d["meta"]["teacher_model"] == "fake" for d in docs)
    assert stats.completion_tokens == 30 * 20


def test_permanent_failures_are_recorded_not_fatal(tmp_path: Path) -> None:
    out = tmp_path / "docs.jsonl"
    with FakeTeacherServer(always_fail_every=3) as srv:
        stats = run_synth(out, 30, _openai_teacher(srv.url, max_retries=2), load_topics(), load_templates(),
                          progress=False)
    assert stats.failed > 0 and stats.written + stats.failed == 30
    log = [json.loads(x) for x in Path(str(out) + ".failures.jsonl").read_text().splitlines()]
    assert len(log) == stats.failed and all("500" in rec["error"] and rec["attempts"] == 3 for rec in log)


def _synth_cmd(url: str, out: Path, n: int) -> list[str]:
    return [sys.executable, "-m", "phibook.cli", "synth", "run", "--teacher", "openai", "--base-url", url,
            "--teacher-model", "fake", "--num-docs", str(n), "--out", str(out), "--seed", "5",
            "--concurrency", "4", "--no-progress"]


def _killed_synth(cmd: list[str], fault: str) -> None:
    """Run the job in a subprocess that the fault hook (phibook.faults) SIGKILLs at ``fault``."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PHIBOOK_FAULT_INJECT": fault})
    assert res.returncode == -signal.SIGKILL, f"{fault}: not killed (exit {res.returncode})\n{res.stderr}"


def _complete_lines(out: Path) -> tuple[int, bool]:
    """(whole lines in the output, whether a torn line follows them)."""
    data = out.read_bytes()
    return data.count(b"\n"), not data.endswith(b"\n")


def _assert_same_docs(out: Path, ref: Path, n: int) -> None:
    ref_docs = {json.loads(x)["id"]: json.loads(x) for x in ref.read_text().splitlines()}
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(got) == len({d["id"] for d in got}) == n  # no duplicates, none lost
    assert {d["id"] for d in got} == set(ref_docs)
    assert all(d["text"] == ref_docs[d["id"]]["text"] for d in got)
    assert [p.name for p in out.parent.glob("*.tmp*")] == []


def test_killed_job_resumes_to_exactly_the_uninterrupted_output(tmp_path: Path) -> None:
    n = 40
    with FakeTeacherServer() as srv:
        ref = tmp_path / "ref.jsonl"
        run_synth(ref, n, _openai_teacher(srv.url), load_topics(), load_templates(), seed=5, concurrency=4,
                  progress=False)
        out = tmp_path / "killed.jsonl"
        cmd = _synth_cmd(srv.url, out, n)
        _killed_synth(cmd, "synth.record_write@10")  # in the middle of the 10th line
        assert _complete_lines(out) == (9, True)
        _killed_synth(cmd, "synth.record_done@5")  # the torn line is dropped, 5 more are written
        assert _complete_lines(out) == (14, False)
        final = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert final.returncode == 0, final.stderr
    stats = json.loads(Path(f"{out}.stats.json").read_text())
    assert (stats["already_done"], stats["written"]) == (14, n - 14)
    _assert_same_docs(out, ref, n)


def test_killed_job_at_random_points_resumes_exactly(tmp_path: Path) -> None:
    """The extra: three kills at seeded random points (the seed is in the message; PHIBOOK_FAULT_SEED
    repeats one), each after or in the middle of a random document."""
    n = 30
    seed = int(os.environ.get("PHIBOOK_FAULT_SEED") or random.SystemRandom().randrange(2**31))
    rng = random.Random(seed)
    print(f"PHIBOOK_FAULT_SEED={seed}")  # shown with a failure
    with FakeTeacherServer() as srv:
        ref = tmp_path / "ref.jsonl"
        run_synth(ref, n, _openai_teacher(srv.url), load_topics(), load_templates(), seed=5, concurrency=4,
                  progress=False)
        out = tmp_path / "killed.jsonl"
        cmd = _synth_cmd(srv.url, out, n)
        done = 0
        for _ in range(3):
            k = rng.randint(1, min(8, n - done))
            torn = rng.random() < 0.5
            fault = f"synth.record_{'write' if torn else 'done'}@{k}"
            _killed_synth(cmd, fault)
            done += k - torn
            assert _complete_lines(out) == (done, torn), f"seed {seed}: {fault}"
        final = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert final.returncode == 0, final.stderr
    _assert_same_docs(out, ref, n)


def test_torn_last_line_is_dropped_and_redone(tmp_path: Path) -> None:
    out = tmp_path / "docs.jsonl"
    run_synth(out, 10, BuiltinTeacher(), load_topics(), load_templates(), progress=False)
    full = out.read_text()
    lines = full.splitlines(keepends=True)
    out.write_text("".join(lines[:6]) + lines[6][: len(lines[6]) // 2])
    # What a kill leaves of the side files: the stats file's temporary copy, a torn failures line.
    stale = out.parent / f".{out.name}.stats.json.tmp-999999-0badc0de"
    stale.write_text('{"planned": ')
    failures = Path(f"{out}.failures.jsonl")
    failures.write_text('{"index": 3, "id": "x", "error": "e", "attempts": 1}\n{"index": 4, "id"')
    stats = run_synth(out, 10, BuiltinTeacher(), load_topics(), load_templates(), progress=False)
    assert stats.already_done == 6 and stats.written == 4
    assert sorted(out.read_text().splitlines()) == sorted(full.splitlines())
    assert not stale.exists() and json.loads(Path(f"{out}.stats.json").read_text())["written"] == 4
    assert failures.read_text() == '{"index": 3, "id": "x", "error": "e", "attempts": 1}\n'


def test_a_bad_line_in_the_existing_output_names_its_line(tmp_path: Path) -> None:
    """Resuming reads the output through phibook.documents' one reader: a damaged line stops the run
    with file:line instead of a KeyError, and nothing is appended to the damaged file."""
    out = tmp_path / "docs.jsonl"
    run_synth(out, 4, BuiltinTeacher(), load_topics(), load_templates(), progress=False)
    lines = out.read_text().splitlines(keepends=True)
    damaged = lines[0] + '{"id": "x", "txt": "no text field"}\n' + "".join(lines[1:])
    out.write_text(damaged)
    with pytest.raises(PhibookError, match=rf"{re.escape(str(out))}:2: field 'text' is missing.*earlier run"):
        run_synth(out, 8, BuiltinTeacher(), load_topics(), load_templates(), progress=False)
    assert out.read_text() == damaged


def test_web_samples_reach_the_prompt(tmp_path: Path) -> None:
    from phibook.data.synth.prompts import load_web_samples

    web = tmp_path / "web.jsonl"
    web.write_text(json.dumps({"id": "w1", "text": "The quick brown fox studies geology."}) + "\n")
    samples = load_web_samples(web)
    spec = plan(0, 0, load_topics(), load_templates(), samples)
    assert spec.web_sample_id == "w1"
    assert "geology" in render_prompt(load_templates()[spec.genre], spec)
    web.write_text("not json\n")
    with pytest.raises(PhibookError, match=r"web.jsonl:1"):
        load_web_samples(web)


def test_synth_cli_help_mentions_resume() -> None:
    r = subprocess.run([sys.executable, "-m", "phibook.cli", "synth", "run", "--help"], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0 and "rerun" in r.stdout and "--shard" in r.stdout


def test_openai_teacher_against_phibook_serve(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The teacher client end to end against phibook's own OpenAI-compatible server."""
    from phibook.inference.generate import Generator
    from phibook.serve.server import create_app
    from tests.test_server import serve_in_thread

    app = create_app(Generator.from_path(tiny_checkpoint, device="cpu"), "tiny", max_batch_size=8)
    out = tmp_path / "docs.jsonl"
    with serve_in_thread(app) as base:
        for api in ("chat", "completions"):
            teacher = OpenAITeacher([base + "/v1"], "tiny", temperature=0.0, max_tokens=24, timeout_s=60, api=api)
            stats = run_synth(out, 4, teacher, load_topics(), load_templates(), seed=3, concurrency=4,
                              progress=False)
            assert stats.failed == 0 and stats.written == 4 and stats.completion_tokens > 0
    docs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(docs) == 8 and len({d["id"] for d in docs}) == 8  # api is part of the teacher fingerprint
    assert {d["meta"]["api"] for d in docs} == {"chat", "completions"}
