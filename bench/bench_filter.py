"""Benchmark `phibook filter`: documents/s for embed and apply, and machines for the report's 95B tokens.

    python bench/bench_filter.py --docs 1000 --embedders hash,minilm --workers 2

Documents are web-sized (about --chars characters each): textbook paragraphs
from ../shared/corpora glued together, and junk web text built as in
tests/test_filter.py, half and half. For each embedder it times
``embed`` (in-process, model already loaded) and ``apply`` end to end
(``--workers`` processes, model loading included, threshold 0.5), then
scales the apply rate to the corpus the report filtered.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_filter import educational_passages, junk_documents  # noqa: E402

from phibook.data.filter.apply import apply_filter  # noqa: E402
from phibook.data.filter.classifier import save_classifier, train  # noqa: E402
from phibook.data.filter.embed import embed_texts, load_embedder  # noqa: E402

# Assumptions for the estimate (say them next to the numbers).
KEPT_TOKENS = 95e9  # report 2.4: 88B web (Falcon RefinedWeb) + 7B code (The Stack, StackOverflow), after filtering
TOKENS_PER_DOC = 620  # RefinedWeb: ~600B tokens in ~968M documents
KEEP_FRACTION = 1 / 6  # phi-1 kept ~6B of ~35B tokens of The Stack + StackOverflow


def build_docs(n: int, chars: int, shared: Path, seed: int = 0) -> tuple[list[str], list[int]]:
    rng = random.Random(seed)
    paras = educational_passages(shared)
    lengths = [len(p) for p in paras]
    junk = junk_documents(n * 4, lengths, seed=seed + 1)
    texts, labels = [], []
    for i in range(n):
        pool = paras if i % 2 == 0 else junk
        parts: list[str] = []
        while sum(map(len, parts)) < chars:
            parts.append(rng.choice(pool))
        texts.append("\n\n".join(parts)[:chars])
        labels.append(1 - i % 2)
    return texts, labels


def bench(spec: str, texts: list[str], labels: list[int], workers: int, batch_size: int, tmp: Path) -> dict:
    import numpy as np

    t0 = time.perf_counter()
    embedder = load_embedder(spec)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    X = embed_texts(embedder, texts, batch_size)
    embed_s = time.perf_counter() - t0
    y = np.array(labels)
    model, report = train(X, y, "logreg")
    clf = tmp / f"clf-{spec.replace(':', '_').replace('/', '_')}.joblib"
    save_classifier(clf, model, {"embedder": embedder.name, "embedder_spec": embedder.spec, "dim": embedder.dim,
                                 "max_tokens": getattr(embedder, "max_tokens", None)})
    # Two runs, a tiny one and the full one: their difference is the steady rate without
    # the start-up (worker spawn, imports, model load) that a long job pays once.
    runs = {}
    for name, part in (("small", texts[: 2 * workers]), ("full", texts)):
        docs = tmp / f"{name}.jsonl"
        docs.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(part)))
        t0 = time.perf_counter()
        summary = apply_filter([docs], clf, tmp / f"out-{name}-{clf.stem}", threshold=0.5, workers=workers,
                               batch_size=batch_size, chunk_bytes=max(1, docs.stat().st_size // (4 * workers)),
                               progress=False)
        runs[name] = (len(part), time.perf_counter() - t0)
    n = len(texts)
    apply_s = runs["full"][1]
    apply_rate = (n - runs["small"][0]) / max(1e-9, runs["full"][1] - runs["small"][1])
    input_docs = KEPT_TOKENS / KEEP_FRACTION / TOKENS_PER_DOC
    return {
        "embedder": embedder.name, "dim": embedder.dim, "docs": n, "load_s": round(load_s, 2),
        "embed_docs_per_s": round(n / embed_s, 1), "apply_docs_per_s_end_to_end": round(n / apply_s, 1),
        "apply_startup_s": round(runs["small"][1], 1), "apply_docs_per_s_steady": round(apply_rate, 1),
        "apply_kept": summary["kept"], "heldout_auc": report["heldout"]["roc_auc"],
        "input_docs_for_95B": f"{input_docs:.3g}",
        "machine_hours_2_cores": round(input_docs / apply_rate / 3600),
        "machines_for_30_days": round(input_docs / apply_rate / (30 * 86400), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=1000, help="documents to embed and filter")
    ap.add_argument("--chars", type=int, default=2500, help="characters per document (~620 tokens)")
    ap.add_argument("--embedders", default="hash,minilm", help="comma-separated: hash, minilm, phibook:PATH")
    ap.add_argument("--workers", type=int, default=2, help="apply worker processes")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    args = ap.parse_args()
    texts, labels = build_docs(args.docs, args.chars, Path(args.shared))
    print(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "load_avg_1m": os.getloadavg()[0], "docs": len(texts), "chars_per_doc": args.chars,
                      "assumptions": {"kept_tokens": KEPT_TOKENS, "tokens_per_doc": TOKENS_PER_DOC,
                                      "keep_fraction": KEEP_FRACTION}}))
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.embedders.split(","):
            print(json.dumps(bench(spec, texts, labels, args.workers, args.batch_size, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
