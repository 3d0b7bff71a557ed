"""Tokenizer: parity with transformers on codegen-mono, BPE training, streaming decode, CLI."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from phibook.errors import PhibookError
from phibook.model.tokenizer import StreamDecoder, Tokenizer, iter_training_texts, train_bpe

# Text that stresses byte-level BPE: whitespace runs (codegen-mono has added
# tokens for runs of 2..31 spaces and tabs), CRLF, multi-byte UTF-8 split
# across tokens (emoji, ZWJ sequences, CJK, combining marks, RTL scripts).
CONSTRUCTED = [
    "",
    " ",
    "\n",
    "a" + " " * 40 + "b",
    "x\t\t\ty\t \t z",
    "    def f(x):\n        return x  \n\n\n\treturn\t\n",
    "if a:\r\n\tb = 1\r\n\r\n",
    "trailing spaces   ",
    "   leading spaces",
    "tabs\t\t\t\t\t\t\t\t\t\t end",
    "mixed \t \t \t \n \n\n   \t",
    "naïve café résumé coöperate",
    "日本語のテキストと中文文本，还有한국어。",
    "emoji 😀🎉👩‍👩‍👧‍👦 🏳️‍🌈 flags 🇫🇷🇯🇵",
    "combining e\u0301 a\u0308 and zero\u200bwidth",
    "RTL: שלום עולם مرحبا بالعالم",
    "math ∀x∈ℝ: x² ≥ 0 — “quotes” ‘single’ …",
    "Hello , world . I 'm here ; don 't",
    "literal special <|endoftext|> inside text",
    "\u00a0non-breaking\u00a0space and \u3000 ideographic space",
    "0123456789 3.14159 -1e-7 0xDEADBEEF",
]


def _shared_lines(shared: Path) -> list[str]:
    """A few thousand lines and snippets of real English and code from ../shared."""
    lines: list[str] = []
    books = sorted((shared / "corpora" / "library_of_phi" / "textbooks").glob("*.md"))
    for book in books:
        text = book.read_text(encoding="utf-8").splitlines(keepends=True)
        lines.extend(text[:500])
    with gzip.open(shared / "benchmarks" / "humaneval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as fh:
        for row in map(json.loads, fh):
            program = row["prompt"] + row["canonical_solution"]
            lines.append(program)  # whole program: indentation runs across lines
            lines.extend(program.splitlines(keepends=True))
    with open(shared / "benchmarks" / "mbpp" / "mbpp.jsonl", encoding="utf-8") as fh:
        for row in map(json.loads, fh):
            lines.append(row["text"])
            lines.append(row["code"])  # CRLF line ends and tab indentation
    return lines


@pytest.fixture(scope="module")
def codegen(codegen_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(codegen_tokenizer_dir)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_dir: Path) -> dict[str, Path]:
    """A small training corpus: document JSONL (MBPP code) + a plain-text textbook excerpt."""
    root = tmp_path_factory.mktemp("corpus")
    docs = root / "docs.jsonl"
    with (
        open(shared_dir / "benchmarks" / "mbpp" / "mbpp.jsonl", encoding="utf-8") as src,
        open(docs, "w") as out,
    ):
        for i, row in enumerate(map(json.loads, src)):
            out.write(json.dumps({"id": str(i), "text": row["code"], "source": "mbpp", "meta": {}}) + "\n")
    book = sorted((shared_dir / "corpora" / "library_of_phi" / "textbooks").glob("*.md"))[0]
    txt = root / "book.txt"
    txt.write_text(book.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    return {"jsonl": docs, "txt": txt, "root": root}


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Tokenizer:
    return train_bpe([corpus["jsonl"], corpus["txt"]], 1000, tmp_path_factory.mktemp("tok1000"))


# -- codegen-mono against transformers -----------------------------------------


def test_codegen_matches_transformers(codegen, codegen_tokenizer_dir, shared_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(codegen_tokenizer_dir))
    lines = _shared_lines(shared_dir) + CONSTRUCTED
    assert len(lines) > 3000
    ours_batch = codegen.encode_batch(lines)
    for i, line in enumerate(lines):
        ids = codegen.encode(line)
        expected = hf.encode(line)  # transformers' default call: codegen-mono adds no special tokens
        assert ids == expected, f"line {i}: ids differ for {line[:80]!r}"
        assert ours_batch[i] == ids, f"line {i}: encode_batch differs from encode"
        assert codegen.decode(ids) == hf.decode(ids), f"line {i}: decoded text differs"
        assert codegen.decode(ids) == line, f"line {i}: byte-level BPE must round-trip exactly"
    # Special-token handling on decode, both ways.
    ids = codegen.encode("end of doc") + [codegen.eos_id] + codegen.encode("next")
    assert codegen.decode(ids) == hf.decode(ids)
    assert codegen.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    print(f"compared {len(lines)} lines with transformers")


def test_codegen_vocab_and_eos(codegen):
    assert codegen.vocab_size == 50295
    assert codegen.eos_id == 50256
    assert codegen.eos_token == "<|endoftext|>"
    assert codegen.token_to_id("<|endoftext|>") == 50256
    assert codegen.id_to_token(50256) == "<|endoftext|>"
    # codegen-mono's added whitespace-run tokens: a run of 4 spaces is one token.
    assert codegen.encode("    ") == [codegen.token_to_id(" " * 4)]
    assert codegen.path.name == "tokenizer.json"


@pytest.mark.parametrize("which", ["codegen", "trained"])
def test_allow_special_false_keeps_literal_eos_as_text(which, request):
    tok = request.getfixturevalue(which)
    text = "doc one <|endoftext|> still doc one"
    assert tok.eos_id in tok.encode(text)  # default: same as transformers
    plain = tok.encode(text, allow_special=False)
    assert tok.eos_id not in plain
    assert tok.decode(plain) == text
    assert tok.encode_batch([text, "x"], allow_special=False) == [plain, tok.encode("x")]
    assert tok.eos_id in tok.encode(text)  # the switch does not leak into the default path


def test_fingerprint_stable_and_distinct(codegen, codegen_tokenizer_dir, trained, tmp_path):
    again = Tokenizer.from_file(codegen_tokenizer_dir / "tokenizer.json")
    assert again.fingerprint == codegen.fingerprint
    assert len(codegen.fingerprint) == 16
    # Re-saving (newer library versions write merges as pairs) keeps the fingerprint.
    resaved = Tokenizer.from_file(codegen.save(tmp_path / "copy"))
    assert resaved.fingerprint == codegen.fingerprint
    assert resaved.encode("def f(x):\n    return x") == codegen.encode("def f(x):\n    return x")
    assert trained.fingerprint != codegen.fingerprint


def test_save_is_atomic_and_leaves_no_temp(trained, tmp_path):
    out = trained.save(tmp_path / "t")
    assert out == tmp_path / "t" / "tokenizer.json"
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["tokenizer.json"]
    assert Tokenizer.from_file(tmp_path / "t").fingerprint == trained.fingerprint


def test_vocab_json_and_merges_fallback_matches_tokenizer_json(
    codegen, codegen_tokenizer_dir, shared_dir, tmp_path
):
    # A model directory that predates tokenizer.json: GPT-2 style vocab/merges/added tokens.
    for name in ("vocab.json", "merges.txt", "added_tokens.json"):
        (tmp_path / name).symlink_to(codegen_tokenizer_dir / name)
    old = Tokenizer.from_file(tmp_path)
    assert old.vocab_size == 50295 and old.eos_id == 50256
    assert old.fingerprint == codegen.fingerprint
    lines = _shared_lines(shared_dir)[::4] + CONSTRUCTED
    assert old.encode_batch(lines) == codegen.encode_batch(lines)


def test_decode_accepts_tensors_and_check_fits(codegen):
    torch = pytest.importorskip("torch")
    ids = codegen.encode("print('hi')\n")
    assert codegen.decode(torch.tensor(ids)) == "print('hi')\n"
    assert codegen.decode_batch([torch.tensor(ids), ids]) == ["print('hi')\n"] * 2
    assert codegen.decode(ids + [51199]) == "print('hi')\n"  # padding rows decode to nothing
    codegen.check_fits(51200)
    with pytest.raises(PhibookError, match="50295 tokens but checkpoint x has only 2048 embedding rows"):
        codegen.check_fits(2048, "checkpoint x")


def test_from_file_errors_name_the_path(tmp_path):
    with pytest.raises(PhibookError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "missing.json")
    with pytest.raises(PhibookError, match=f"no tokenizer.json in directory {tmp_path}"):
        Tokenizer.from_file(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(PhibookError, match="cannot read tokenizer .*tokenizer.json"):
        Tokenizer.from_file(bad)


# -- training ----------------------------------------------------------------


def test_train_bpe_vocab_size_and_shape(trained):
    assert trained.vocab_size == 1000
    assert trained.eos_id == 0
    assert trained.id_to_token(0) == "<|endoftext|>"
    # All 256 byte symbols are present, so no input is ever unknown.
    data = json.loads(trained.backend.to_str())
    assert data["pre_tokenizer"]["type"] == "ByteLevel"
    assert data["pre_tokenizer"]["add_prefix_space"] is False
    assert data["decoder"]["type"] == "ByteLevel"
    from tokenizers.pre_tokenizers import ByteLevel

    assert set(ByteLevel.alphabet()) <= set(data["model"]["vocab"])
    # It learned something: code compresses better than one token per byte.
    code = "def add(a, b):\n    return a + b\n"
    assert len(trained.encode(code)) < len(code.encode("utf-8")) / 2


@pytest.mark.parametrize("text", CONSTRUCTED + ["\x00\x01\x7f control bytes", "ไทย ภาษา unseen script"])
def test_trained_round_trips_exactly(trained, text):
    assert trained.decode(trained.encode(text)) == text


def test_train_on_tiny_corpus_gives_fewer_tokens(tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hello world\nhello there\n")
    tok = train_bpe([tiny], 5000, tmp_path / "out")
    assert 257 < tok.vocab_size < 5000  # a few merges, then no pair is seen twice
    assert tok.decode(tok.encode("hello 世界")) == "hello 世界"


def test_train_rejects_too_small_vocab(corpus, tmp_path):
    with pytest.raises(PhibookError, match="at least 257"):
        train_bpe([corpus["txt"]], 256, tmp_path / "out")


def test_train_rejects_directories_and_empty_inputs(tmp_path):
    with pytest.raises(PhibookError, match="training input is not a file"):
        train_bpe([tmp_path], 300, tmp_path / "out")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(PhibookError, match="hold no text.*empty.txt"):
        train_bpe([empty], 300, tmp_path / "out")
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    with pytest.raises(PhibookError, match="no training files"):
        train_bpe([], 300, tmp_path / "out")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": broken\n')
    with pytest.raises(PhibookError, match=r"bad\.jsonl:4: not valid JSON"):
        train_bpe([bad], 300, tmp_path / "out")
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    no_text = tmp_path / "notext.jsonl"
    no_text.write_text('{"id": "a", "body": "x"}\n')
    with pytest.raises(PhibookError, match=r"notext\.jsonl:1: field 'text' is missing"):
        train_bpe([no_text], 300, tmp_path / "out")


def test_training_texts_stream_gz_jsonl_and_text(tmp_path):
    gz = tmp_path / "d.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two\n  three"}) + "\n")
    txt = tmp_path / "t.txt"
    txt.write_bytes(b"line a\r\n\tline b\n")  # CRLF kept as written
    assert list(iter_training_texts([gz, txt])) == ["one", "two\n  three", "line a\r\n\tline b\n"]
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(PhibookError, match=r"b\.txt:2: not UTF-8"):
        list(iter_training_texts([binary]))


# -- streaming decode --------------------------------------------------------

STREAM_TEXT = "Hi 👋! 日本語とemoji 😀🎉👩‍👩‍👧‍👦, café\n\tdef f():  return '世界'  # 🇫🇷\n"


@pytest.mark.parametrize("which", ["codegen", "trained"])
def test_stream_decoder_matches_full_decode(which, request):
    tok = request.getfixturevalue(which)
    ids = tok.encode(STREAM_TEXT)
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == tok.decode(ids) == STREAM_TEXT
    assert not any("\ufffd" in p for p in pieces), "an incomplete character leaked out"
    assert sum(1 for p in pieces if p) > 10, "text should arrive incrementally"
    assert any(p == "" for p in pieces[:-1]), "some tokens end mid-character and must be held back"


def test_stream_decoder_flushes_incomplete_character(codegen):
    ids = codegen.encode("😀")
    assert len(ids) > 1  # the emoji's 4 bytes span several tokens
    dec = StreamDecoder(codegen)
    assert dec.push(ids[0]) == ""
    assert dec.flush() == codegen.decode(ids[:1])  # the caller sees the replacement char at the end


# -- CLI ---------------------------------------------------------------------


def _phibook(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "phibook.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_train_end_to_end(corpus, tmp_path):
    out = tmp_path / "tok"
    res = _phibook(
        "tokenizer",
        "train",
        "--vocab-size",
        "600",
        "--out",
        str(out),
        str(corpus["jsonl"]),
        str(corpus["txt"]),
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("vocab size: 600\n")  # nothing else on stdout before the report
    assert "tokens/char:" in res.stdout
    assert str(out / "tokenizer.json") in res.stdout
    tok = Tokenizer.from_file(out)
    assert tok.vocab_size == 600 and tok.eos_id == 0
    info = _phibook("tokenizer", "info", str(out))
    assert info.returncode == 0, info.stderr
    assert f"fingerprint: {tok.fingerprint}" in info.stdout


def test_cli_errors_cleanly(tmp_path):
    res = _phibook(
        "tokenizer", "train", "--vocab-size", "600", "--out", str(tmp_path / "o"), str(tmp_path / "nope.txt")
    )
    assert res.returncode == 2
    assert "phibook tokenizer: error: training file not found:" in res.stderr
    assert "nope.txt" in res.stderr
    assert "Traceback" not in res.stderr
    res = _phibook("tokenizer", "info", str(tmp_path))
    assert res.returncode == 2 and "no tokenizer.json in directory" in res.stderr
    assert "Traceback" not in res.stderr
