"""`phibook clean`: planted exact/near duplicates and benchmark items are removed,
clean documents stay, bad input is reported clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from phibook.data.clean import CleanConfig, clean, dup_line_fraction
from phibook.errors import PhibookError


def _paragraphs(shared: Path, n: int) -> list[str]:
    """Distinct real paragraphs (>= 60 words) from the shared textbooks."""
    out: list[str] = []
    seen: set[str] = set()
    for path in sorted((shared / "corpora" / "library_of_phi" / "textbooks").glob("*.md")):
        for para in path.read_text(encoding="utf-8").split("\n\n"):
            para = " ".join(para.split())
            if len(para.split()) >= 60 and para not in seen and not para.startswith(("#", "|", "$")):
                seen.add(para)
                out.append(para)
                if len(out) == n:
                    return out
    return out


def _write(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def test_planted_duplicates_and_benchmark_items_are_removed(shared_dir: Path, tmp_path: Path) -> None:
    paras = _paragraphs(shared_dir, 40)
    assert len(paras) == 40
    docs = [{"id": f"clean{i}", "text": p, "source": "t", "meta": {}} for i, p in enumerate(paras)]
    # Exact duplicates differ only in case and whitespace.
    exact = [{"id": f"exact{i}", "text": "  " + paras[i].upper().replace(" ", "  ") + " "} for i in range(5)]
    # Near duplicates: the closing words edited (Jaccard of 5-gram shingles ~0.95).
    near = []
    for i in range(5, 10):
        w = paras[i].split()
        w[-1] = "zebra"
        near.append({"id": f"near{i}", "text": " ".join(w)})
    # Benchmark items (question + answer) pasted into otherwise new text.
    arc = [json.loads(x) for x in (shared_dir / "benchmarks/arc_easy/ARC-Easy-Test.jsonl").read_text().splitlines()]
    long_q = [q for q in arc if len(q["question"]["stem"].split()) >= 16][:5]
    planted = [
        {"id": f"bench{i}", "text": f"Here is a quiz we wrote for our class today. {q['question']['stem']} Think about it."}
        for i, q in enumerate(long_q)
    ]
    inp = _write(tmp_path / "in.jsonl", docs + exact + near + planted)
    report = clean([inp], tmp_path / "out.jsonl", CleanConfig(near_dup_threshold=0.8),
                   benchmarks=shared_dir / "benchmarks", report_path=tmp_path / "r.json", progress=False)
    kept = {json.loads(x)["id"] for x in (tmp_path / "out.jsonl").read_text().splitlines()}
    assert kept == {d["id"] for d in docs}
    assert report.removed["exact_duplicate"] == 5
    assert report.removed["near_duplicate"] == 5
    assert report.removed["benchmark_contamination"] == 5
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["kept"] == 40 and rep["read"] == 55
    assert {e["id"] for e in rep["examples"]["near_duplicate"]} == {f"near{i}" for i in range(5, 10)}


def test_threshold_controls_near_duplicate_removal(shared_dir: Path, tmp_path: Path) -> None:
    paras = _paragraphs(shared_dir, 3)
    w = paras[0].split()
    for k in range(0, len(w), 6):  # change every sixth word: Jaccard falls well below 0.9
        w[k] = "changed"
    inp = _write(tmp_path / "in.jsonl", [{"id": "a", "text": paras[0]}, {"id": "b", "text": " ".join(w)}])
    strict = clean([inp], tmp_path / "o1.jsonl", CleanConfig(near_dup_threshold=0.95), progress=False)
    loose = clean([inp], tmp_path / "o2.jsonl", CleanConfig(near_dup_threshold=0.05), progress=False)
    assert strict.kept == 2 and loose.kept == 1


def test_length_and_repetition_filters(tmp_path: Path) -> None:
    spam = "\n".join(["Buy cheap watches online now!!!"] * 20)
    assert dup_line_fraction(spam) == 1.0
    inp = _write(tmp_path / "in.jsonl", [{"id": "short", "text": "too short"}, {"id": "spam", "text": spam},
                                         {"id": "ok", "text": "A perfectly reasonable paragraph about plants. " * 3}])
    rep = clean([inp], tmp_path / "o.jsonl", progress=False)
    assert rep.removed["too_short"] == 1 and rep.removed["repetitive"] == 1 and rep.kept == 1


def test_malformed_line_is_named_or_skipped(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "a", "text": "x" * 80}) + "\n{broken\n")
    with pytest.raises(PhibookError, match=r"in.jsonl:2"):
        clean([inp], tmp_path / "o.jsonl", progress=False)
    assert not (tmp_path / "o.jsonl").exists()
    rep = clean([inp], tmp_path / "o.jsonl", CleanConfig(skip_bad=True), progress=False)
    assert rep.bad_lines == 1 and rep.kept == 1
    r = subprocess.run([sys.executable, "-m", "phibook.cli", "clean", str(inp), "--out", str(tmp_path / "c.jsonl")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "in.jsonl:2" in r.stderr and "Traceback" not in r.stderr
