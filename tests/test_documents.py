"""One id rule for a document without an id, the same in every stage however the input is sharded or ordered."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from pathlib import Path

import pytest

from phibook.data import tokenize
from phibook.data.clean import CleanConfig, CleanReport
from phibook.data.clean import read_documents as clean_read
from phibook.documents import DocumentError, doc_id, read_documents, read_lines, text_id, why_not_a_document

TEXTS = [f"Document number {i} says something about topic {i * 7 % 13}, at some length." for i in range(40)]


def _docs() -> list[dict]:
    # Every third document brings its own id; the rest have none (absent, null or empty).
    docs = []
    for i, text in enumerate(TEXTS):
        doc: dict = {"text": text, "source": "test"}
        if i % 3 == 0:
            doc["id"] = f"own-{i}"
        elif i % 3 == 1:
            doc["id"] = None if i % 2 else ""
        docs.append(doc)
    return docs


def _write(path: Path, docs: list[dict]) -> Path:
    data = "".join(json.dumps(d) + "\n" for d in docs).encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def _layouts(tmp_path: Path, gz: bool = True) -> list[list[Path]]:
    """The same documents as one file, as four shuffled shards, and as two (gzipped) shards in reverse."""
    docs = _docs()
    shuffled = docs[:]
    random.Random(7).shuffle(shuffled)
    rev = docs[::-1]
    return [
        [_write(tmp_path / "all.jsonl", docs)],
        [_write(tmp_path / f"shard-{k}.jsonl", shuffled[k::4]) for k in range(4)],
        [_write(tmp_path / f"rev-{k}.jsonl{'.gz' if gz else ''}", rev[k * 20:(k + 1) * 20]) for k in range(2)],
    ]


def _want() -> dict[str, str]:
    return {d["text"]: (d["id"] if d.get("id") else text_id(d["text"])) for d in _docs()}


def test_the_rule() -> None:
    text = "a document without an id"
    assert text_id(text) == "sha1:" + hashlib.sha1(text.encode()).hexdigest()
    assert doc_id({"text": text}) == doc_id({"text": text, "id": None}) == doc_id({"text": text, "id": ""})
    assert doc_id({"text": text, "id": 17}) == "17" and doc_id({"body": text}, "body") == text_id(text)


def test_filter_reader_ids(tmp_path: Path) -> None:
    for files in _layouts(tmp_path):
        assert {d["text"]: doc_id(d) for d in read_documents(files)} == _want()


def test_clean_reader_ids(tmp_path: Path) -> None:
    for files in _layouts(tmp_path, gz=False):  # `phibook clean` reads plain JSONL only
        got = {d["text"]: d["id"] for d in clean_read(files, CleanConfig(), CleanReport())}
        assert got == _want()


def test_pipeline_reader_ids(tmp_path: Path) -> None:
    pytest.importorskip("datatrove")
    from phibook.pipeline.blocks import read_lines

    for files in _layouts(tmp_path):
        got = {d["text"]: d["id"] for path in files for _, d in read_lines(path, skip_bad=False)}
        assert got == _want()


def test_tokenize_split_keys(tmp_path: Path) -> None:
    # Tokenize keys its train/val split by the id; small chunks cut the files into many units.
    for files in _layouts(tmp_path):
        for chunk_bytes in (1 << 20, 300):
            got = {}
            for unit in tokenize.plan_units(files, chunk_bytes):
                for key, text, _ in tokenize._read_jsonl(unit, tokenize.Options()):
                    if text is not None:
                        got[text] = key
            assert got == _want(), chunk_bytes


def test_byte_ranges_tile_a_file(tmp_path: Path) -> None:
    # Ranges cut anywhere, mid-line included, read every line exactly once, in order.
    path = _write(tmp_path / "all.jsonl", _docs())
    whole = [d["text"] for d in read_documents([path])]
    size = path.stat().st_size
    for step in (1, 7, 100, 333, size):
        got = []
        for start in range(0, size, step):
            got += [ln.doc["text"] for ln in read_lines(path, start=start, end=min(size, start + step)) if ln.doc]
        assert got == whole, step


def _bad_file(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in _docs()[:5]) + "\n" + '{"text": broken\n'
                    + json.dumps({"text": "after"}) + "\n")
    return path


def test_a_bad_line_is_named_by_file_and_line_even_inside_a_range(tmp_path: Path) -> None:
    path = _bad_file(tmp_path)
    with pytest.raises(DocumentError, match=r"bad\.jsonl:7: not valid JSON"):
        list(read_lines(path))
    offset = len("".join(json.dumps(d) + "\n" for d in _docs()[:5]))
    with pytest.raises(DocumentError, match=r"bad\.jsonl:7: not valid JSON"):
        list(read_lines(path, start=offset - 3, end=path.stat().st_size))
    lines = list(read_lines(path, skip_bad=True))
    assert [ln.bad for ln in lines].count(True) == 1 and lines[-1].doc == {"text": "after"}
    assert sum(ln.size for ln in lines) == path.stat().st_size


@pytest.mark.parametrize(("line", "why"), [
    ("[1, 2]", "expected a JSON object per line, got list"),
    ('{"body": "x"}', "field 'text' is missing"),
    ('{"text": 3}', "field 'text' is of type int, not a string"),
    (b'{"text": "\xff"}', "not UTF-8"),
])
def test_what_is_not_a_document(line: str | bytes, why: str) -> None:
    doc, reason = why_not_a_document(line)
    assert doc is None and reason.startswith(why)


def test_every_stage_reports_a_bad_line_the_same_way(tmp_path: Path) -> None:
    # One reader: tokenize, clean, the tokenizer trainer and filter name the same line with the same words.
    from phibook.data.filter.apply import plan_chunks, read_chunk
    from phibook.model.tokenizer import iter_training_texts

    path = _bad_file(tmp_path)
    want = r"bad\.jsonl:7: not valid JSON \(Expecting value, column 10\)"
    with pytest.raises(DocumentError, match=want):
        list(clean_read([path], CleanConfig(), CleanReport()))
    with pytest.raises(DocumentError, match=want):
        list(iter_training_texts([path]))
    with pytest.raises(DocumentError, match=want):
        for unit in tokenize.plan_units([path], 64):
            list(tokenize._read_jsonl(unit, tokenize.Options()))
    with pytest.raises(DocumentError, match=want):
        for chunk in plan_chunks([path], 64):
            read_chunk(chunk, "text")
