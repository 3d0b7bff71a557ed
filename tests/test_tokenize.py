"""`phibook tokenize` on real textbook text with a freshly trained tiny BPE."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from phibook.data.loader import PackedLoader, validation_batches
from phibook.data.mixture import load_mixture_file
from phibook.data.shards import file_sha256, load_manifest, write_shard_set
from phibook.data.tokenize import WORK_DIR, is_val, tokenize_inputs
from phibook.errors import PhibookError
from phibook.model.tokenizer import Tokenizer, train_bpe

REPO = Path(__file__).resolve().parents[1]
BOOKS = "corpora/library_of_phi/textbooks"
OPTS = dict(val_fraction=0.2, shard_tokens=6000, chunk_bytes=8000, progress=False)


def _book(shared: Path, word: str) -> str:
    (path,) = (shared / BOOKS).glob(f"*{word}*.md")
    return path.read_text(encoding="utf-8")


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


@pytest.fixture(scope="session")
def corpus(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tokenizer + inputs of all three kinds + the documents they hold, in input order."""
    root = tmp_path_factory.mktemp("corpus")
    tok = train_bpe([next((shared_dir / BOOKS).glob("*Interfacial*.md"))], 400, root / "tok")
    docs: list[tuple[str, str]] = []  # (split key, text) in the order the tokenizer reads them

    analog = _paragraphs(_book(shared_dir, "Analog"))[:260]
    lines = []
    for i, para in enumerate(analog):
        lines.append(json.dumps({"id": f"analog-{i}", "text": para, "source": "books", "meta": {}}))
        docs.append((f"analog-{i}", para))
        if i == 40:
            lines.append("")  # blank lines are allowed and skipped
    lines.append(json.dumps({"id": "uni", "text": "Ünïcödé → ∑ x² ✓ 字", "source": "t", "meta": {}}))
    docs.append(("uni", "Ünïcödé → ∑ x² ✓ 字"))
    forged = "a document that mentions <|endoftext|> is still one document"
    lines.append(json.dumps({"id": "forged", "text": forged}))
    docs.append(("forged", forged))
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    for name, word in (("a.txt", "Discrete"), ("b.md", "Fluid")):
        text = _book(shared_dir, word)[:12000]
        (root / name).write_text(text, encoding="utf-8")
        docs.append((text, text))

    naval = _paragraphs(_book(shared_dir, "Naval"))[:150]
    ids = [f"naval-{i}" for i in range(len(naval))]
    texts: list[str | None] = list(naval)
    texts[7] = None  # a null row is skipped, not an error
    pq.write_table(pa.table({"id": ids, "text": texts}), root / "c.parquet", row_group_size=50)
    docs.extend((i, t) for i, t in zip(ids, texts) if t)
    inputs = [root / "docs.jsonl", root / "a.txt", root / "b.md", root / "c.parquet"]
    return {"root": root, "tok": tok, "inputs": inputs, "docs": docs}


@pytest.fixture(scope="session")
def reference(corpus: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted single-worker run: the output every other run must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "shards"
    tokenize_inputs(corpus["inputs"], corpus["tok"].path, out, workers=1, **OPTS)
    return out


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}


def _split_docs(tok: Tokenizer, out: Path, split: str) -> list[str]:
    m = load_manifest(out)
    ids = np.concatenate([np.asarray(m.open_shard(s)) for s in m.split_shards(split)])
    ends = np.flatnonzero(ids == tok.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(ids[a:b].tolist()) for a, b in zip(starts, ends)]


def test_counts_and_decoded_shards_reproduce_the_documents(corpus: dict, reference: Path) -> None:
    tok, docs = corpus["tok"], corpus["docs"]
    m = load_manifest(reference)
    lengths = [len(ids) + 1 for ids in tok.encode_batch([t for _, t in docs], allow_special=False)]
    assert m.total_tokens("train") + m.total_tokens("val") == sum(lengths)
    assert m.fingerprint == tok.fingerprint and m.eos_id == tok.eos_id and m.vocab_size == tok.vocab_size
    assert m.dtype == "uint16" and m.extra["skipped_empty_documents"] == 1
    want_val = [t for k, t in docs if is_val(k, 0.2)]
    want_train = [t for k, t in docs if not is_val(k, 0.2)]
    assert 0.1 < len(want_val) / len(docs) < 0.3
    assert _split_docs(tok, reference, "train") == want_train
    assert _split_docs(tok, reference, "val") == want_val
    for shard in m.shards:
        data = np.asarray(m.open_shard(shard))
        assert shard.documents == int((data == tok.eos_id).sum()) and data[-1] == tok.eos_id
        assert shard.tokens <= 6000 or shard.documents == 1
        assert shard.sha256 == file_sha256(reference / shard.file)
    assert len(m.split_shards("train")) > 3
    assert not (reference / WORK_DIR).exists()
    copy = Tokenizer.from_file(reference / m.tokenizer["path"])  # the shard set carries its tokenizer
    assert copy.fingerprint == tok.fingerprint


def test_output_is_identical_for_any_worker_count_and_chunking(corpus: dict, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "w2"
    tokenize_inputs(corpus["inputs"], corpus["tok"].path, out, workers=2, **{**OPTS, "chunk_bytes": 3000})
    assert _shard_bytes(out) == _shard_bytes(reference)
    strip = lambda m: [(s.file, s.tokens, s.documents, s.sha256) for s in m.shards]
    assert strip(load_manifest(out)) == strip(load_manifest(reference))


def test_val_split_is_deterministic_and_by_id(corpus: dict, reference: Path, tmp_path: Path) -> None:
    # Another fraction moves documents only one way: every val doc at 0.2 stays val at 0.4.
    out = tmp_path / "v4"
    tokenize_inputs(corpus["inputs"], corpus["tok"].path, out, workers=1, **{**OPTS, "val_fraction": 0.4})
    tok = corpus["tok"]
    assert set(_split_docs(tok, reference, "val")) < set(_split_docs(tok, out, "val"))


def test_rerun_of_a_finished_build_does_nothing(corpus: dict, reference: Path, capfd) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in reference.iterdir()}
    tokenize_inputs(corpus["inputs"], corpus["tok"].path, reference, workers=1, **OPTS)
    assert "up to date" in capfd.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in reference.iterdir()} == before


def _cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "phibook.cli", "tokenize", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, **(env or {})}, **kw,
    )


def _killed_args(corpus: dict, out: Path) -> list[str]:
    return ["--tokenizer", str(corpus["tok"].path), "--out", str(out), "--workers", "1", "--no-progress",
            "--val-fraction", "0.2", "--shard-tokens", "6000", "--chunk-bytes", "8000", *map(str, corpus["inputs"])]


def _kill_at(args: list[str], fault: str) -> None:
    """Run `phibook tokenize` in a subprocess that the fault hook (phibook.faults) SIGKILLs at ``fault``."""
    proc = _cli(*args, env={"PHIBOOK_FAULT_INJECT": fault})
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, f"{fault}: not killed (exit {proc.returncode})\n{err}"


def _assert_resumes_to(reference: Path, out: Path, args: list[str], done: int) -> None:
    assert not (out / "manifest.json").exists()
    proc = _cli(*args)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"resuming: {done} of" in err
    assert _shard_bytes(out) == _shard_bytes(reference)
    assert not (out / WORK_DIR).exists() and [p.name for p in out.rglob("*.tmp-*")] == []


def test_killed_run_resumes_to_identical_output(corpus: dict, reference: Path, tmp_path: Path) -> None:
    units = load_manifest(reference).extra["build"]["units"]
    # Killed right after work unit 2: units 0-2 are kept, the rest is done by the rerun.
    out = tmp_path / "killed"
    args = _killed_args(corpus, out)
    _kill_at(args, "tokenize.unit_done@2")
    assert sorted(p.name for p in (out / WORK_DIR).glob("unit-*.json")) == [f"unit-{i:05d}.json" for i in range(3)]
    _assert_resumes_to(reference, out, args, 3)

    # Killed inside the write of shard train-00001: every unit is done, the shard is under its temporary name.
    out = tmp_path / "killed-in-shard"
    args = _killed_args(corpus, out)
    _kill_at(args, "shards.train_tmp_written@1")
    assert (out / "train-00000.bin").is_file() and len(list(out.glob(".train-00001.bin.tmp-*"))) == 1
    assert not (out / "train-00001.bin").exists()
    assert len(list((out / WORK_DIR).glob("unit-*.json"))) == units
    # What a kill in the other writers of the stage leaves: the tokenizer copy's and a sidecar's temporary files.
    (out / ".tokenizer.json.tmp-999999-0badc0de").write_text("{")
    (out / WORK_DIR / ".unit-00001.json.tmp-999999-0badc0de").write_text("{")
    _assert_resumes_to(reference, out, args, units)


def test_killed_at_random_points_resumes_to_identical_output(corpus: dict, reference: Path, tmp_path: Path) -> None:
    """The extra: two kills at seeded random points (the seed is in the message; PHIBOOK_FAULT_SEED repeats
    one): after a work unit, or in or after a shard write of either split."""
    m = load_manifest(reference)
    units = m.extra["build"]["units"]
    seed = int(os.environ.get("PHIBOOK_FAULT_SEED") or random.SystemRandom().randrange(2**31))
    rng = random.Random(seed)
    print(f"PHIBOOK_FAULT_SEED={seed}")  # shown with a failure
    out = tmp_path / "killed"
    args = _killed_args(corpus, out)
    first = rng.randrange(units - 1)
    _kill_at(args, f"tokenize.unit_done@{first}")
    split = rng.choice(["train", "val"])
    fault = f"shards.{split}_{rng.choice(['tmp_written', 'done'])}@{rng.randrange(len(m.split_shards(split)))}"
    _kill_at(args, fault)
    assert len(list((out / WORK_DIR).glob("unit-*.json"))) == units, f"seed {seed}: {fault}"
    _assert_resumes_to(reference, out, args, units)


def test_tokenized_shards_feed_the_loader(corpus: dict, reference: Path) -> None:
    loader = PackedLoader(reference, seq_len=64, seed=0)
    assert loader.tokenizer_fingerprint == corpus["tok"].fingerprint
    x, y = loader.next_batch(4)
    assert x.shape == (4, 64) and int(x.max()) < corpus["tok"].vocab_size
    val = list(validation_batches(reference, 64, max_sequences=10, batch_size=4))
    assert sum(b[0].shape[0] for b in val) == 10


def test_shipped_mixtures_parse_and_load(tmp_path: Path) -> None:
    tok = {"fingerprint": "f", "vocab_size": 100, "eos_id": 0}
    for src in ("synthetic", "code", "web"):
        write_shard_set(tmp_path / "shards" / src, {"train": [[1, 2, 3] * 50]}, tok)
    write_shard_set(tmp_path / "shards" / "web-code", {"train": [[4, 5, 6] * 50]}, tok)
    want = {"phi-1.5": [0.8, 0.2], "phi-1.5-web": [0.4, 0.2, 0.4], "phi-1.5-web-only": [0.8, 0.2]}
    for name, weights in want.items():
        shutil.copy(REPO / "phibook" / "data" / "mixtures" / f"{name}.toml", tmp_path)
        mix = load_mixture_file(tmp_path / f"{name}.toml")
        assert mix.name == name and mix.weights == pytest.approx(weights)
        PackedLoader(tmp_path / f"{name}.toml", seq_len=16).next_batch(4)


def test_the_reports_three_mixtures_run_by_name(tmp_path: Path, monkeypatch) -> None:
    from phibook.data.mixture import load_data, shipped_mixture_names

    assert shipped_mixture_names() == ["phi-1.5", "phi-1.5-web", "phi-1.5-web-only"]
    tok = {"fingerprint": "f", "vocab_size": 100, "eos_id": 0}
    for src in ("web", "web-code"):
        write_shard_set(tmp_path / "shards" / src, {"train": [[1, 2, 3] * 50]}, tok)
    monkeypatch.chdir(tmp_path)  # a name reads shards/<source> under the current directory
    mix = load_data("phi-1.5-web-only")
    assert mix.name == "phi-1.5-web-only" and [s.name for s in mix.sources] == ["web", "web-code"]
    assert mix.weights == pytest.approx([0.8, 0.2])
    with pytest.raises(PhibookError, match=r"synthetic.*shards/synthetic"):
        load_data("phi-1.5")  # no synthetic shards here: the error names the source and the path


def test_gzipped_jsonl_gives_the_same_shards(corpus: dict, tmp_path: Path) -> None:
    import gzip

    plain = corpus["root"] / "docs.jsonl"
    gz = tmp_path / "docs.jsonl.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    a, b = tmp_path / "a", tmp_path / "b"
    tokenize_inputs([plain], corpus["tok"].path, a, workers=1, **OPTS)
    tokenize_inputs([gz], corpus["tok"].path, b, workers=1, **OPTS)
    assert _shard_bytes(a) == _shard_bytes(b)
    gz.write_bytes(gzip.compress(b'{"text": "ok"}\n{"text": 5}\n'))
    with pytest.raises(PhibookError, match=r"docs.jsonl.gz:2: field 'text' is of type int, not a string"):
        tokenize_inputs([gz], corpus["tok"].path, tmp_path / "c", workers=1, progress=False)


def test_cli_defaults_match_the_library() -> None:
    import inspect

    from phibook.cli import build_parser

    args = build_parser().parse_args(["tokenize", "--tokenizer", "t", "--out", "o", "x.jsonl"])
    lib = inspect.signature(tokenize_inputs).parameters
    for name in ("val_fraction", "shard_tokens", "source", "text_field", "chunk_bytes", "text_unit"):
        assert getattr(args, name) == lib[name].default, name


# ------------------------------------------------------------------ errors


def test_bad_jsonl_line_is_named_by_file_and_line(corpus: dict, tmp_path: Path) -> None:
    lines = [json.dumps({"id": str(i), "text": f"document number {i} " * 20}) for i in range(300)]
    lines[250] = '{"id": "x", "text": "unterminated'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    # Small chunks: the bad line sits in a later work unit, so its number is counted from the file start.
    with pytest.raises(PhibookError, match=r"bad.jsonl:251: not valid JSON"):
        tokenize_inputs([bad], corpus["tok"].path, tmp_path / "o", workers=2, chunk_bytes=5000, progress=False)
    lines[250] = json.dumps({"id": "x", "body": "no text here"})
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(PhibookError, match=r"bad.jsonl:251: field 'text' is missing"):
        tokenize_inputs([bad], corpus["tok"].path, tmp_path / "o", workers=1, progress=False)


def test_cli_errors_exit_2_without_traceback(corpus: dict, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "text": "fine"}\n[1, 2]\n')
    odd = tmp_path / "data.csv"
    odd.write_text("a,b\n")
    nocol = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"body": ["x"]}), nocol)
    cases = [
        ([str(bad)], "bad.jsonl:2: expected a JSON object"),
        ([str(odd)], "unknown file type '.csv'"),
        ([str(tmp_path / "absent.jsonl")], "absent.jsonl does not exist"),
        ([str(nocol)], "no 'text' column (columns: body)"),
    ]
    for inputs, message in cases:
        proc = _cli("--tokenizer", str(corpus["tok"].path), "--out", str(tmp_path / "o"), "--no-progress", *inputs)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, err
        assert message in err and "Traceback" not in err, err
    proc = _cli("--tokenizer", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), str(bad))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "tokenizer not found" in err and "Traceback" not in err
