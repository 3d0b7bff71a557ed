"""The quality classifier: scikit-learn on document embeddings, labels from teacher ratings.

A document is positive ("educational") when its rating >= ``label_threshold``.
The classifier is a random forest by default (phi-1's choice) or a logistic
regression. A stratified held-out split measures precision, recall, F1 and
ROC-AUC, plus the threshold curve (precision / recall / kept share at each
score threshold), which is what you read to pick ``apply --threshold``.

The saved file is a joblib pickle of ``{"format", "model", "meta"}``; the meta
names the embedder (space + dim) it was trained on, so ``apply`` refuses other
embeddings. Like any pickle, load classifier files only from sources you trust.

Scores are independent of batching: a document gets the bit-identical score
whatever batch, chunk or order it is scored in (``filter apply`` scores byte
ranges of files, the pipeline's filter block scores datatrove's batches, and both
must write the same ``meta.quality_score``). A BLAS matrix product does not give
that (its blocking, and so its rounding, depends on the number of rows), so
``QualityClassifier.score`` computes each row with elementwise operations only:
the logistic regression's dot product is accumulated column by column in float64
(``row_dot``), the forest's tree probabilities are summed in tree order, and any
other model is scored one row at a time. The embedders keep the same contract
(phibook.data.filter.embed); tests/test_filter_batching.py checks both.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from phibook import io
from phibook.errors import PhibookError
from phibook.version import __version__

FORMAT = "phibook-quality-classifier-v1"
KINDS = ("forest", "logreg")
CURVE_THRESHOLDS = [round(t, 2) for t in np.arange(0.05, 1.0, 0.05)]


def make_estimator(kind: str, seed: int, workers: int = 1):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "forest":
        return RandomForestClassifier(n_estimators=300, min_samples_leaf=2, class_weight="balanced",
                                      random_state=seed, n_jobs=workers)
    if kind == "logreg":
        return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced"))
    raise PhibookError(f"unknown classifier {kind!r}; choose one of {', '.join(KINDS)}")


def join_labels(X: np.ndarray, ids: list[str], ratings: dict[str, float], label_threshold: float,
                where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of X that have a rating -> (X, y, rating), y = rating >= label_threshold."""
    rows = [i for i, d in enumerate(ids) if d in ratings]
    if not rows:
        raise PhibookError(f"none of the {len(ids)} embedded documents in {where} has a rating in the annotations "
                           "(ids must match); embed the annotation file itself: phibook filter embed ANNOTATIONS")
    r = np.array([ratings[ids[i]] for i in rows], dtype=np.float64)
    y = (r >= label_threshold).astype(np.int64)
    for cls, word in ((1, "below"), (0, "at or above")):
        if not (y == cls).any():
            raise PhibookError(
                f"all {len(y)} rated documents are {word} --label-threshold {label_threshold} "
                f"(ratings {sorted(set(r.tolist()))}); both classes are needed: change the threshold or annotate more"
            )
    return X[rows], y, r


def metrics_at(y: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, float]:
    pred = score >= threshold
    tp = int((pred & (y == 1)).sum())
    fp = int((pred & (y == 0)).sum())
    fn = int((~pred & (y == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"threshold": threshold, "precision": round(precision, 4), "recall": round(recall, 4),
            "f1": round(f1, 4), "kept": round(float(pred.mean()), 4)}


def evaluate(y: np.ndarray, score: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    at = metrics_at(y, score, threshold)
    auc = float(roc_auc_score(y, score)) if len(set(y.tolist())) == 2 else float("nan")
    return {
        "n": int(len(y)), "positives": int(y.sum()), "threshold": threshold,
        "precision": at["precision"], "recall": at["recall"], "f1": at["f1"],
        "accuracy": round(float(((score >= threshold) == (y == 1)).mean()), 4), "roc_auc": round(auc, 4),
        "curve": [metrics_at(y, score, t) for t in CURVE_THRESHOLDS],
    }


@dataclass
class QualityClassifier:
    model: Any
    meta: dict[str, Any]
    path: Path | None = None

    def check_embedder(self, name: str, dim: int, where: str) -> None:
        """Refuse embeddings from another space than the one the classifier was trained on."""
        want, want_dim = self.meta["embedder"], self.meta["dim"]
        if name != want or dim != want_dim:
            raise PhibookError(
                f"classifier {self.path} was trained on embeddings from {want} (dim {want_dim}) but {where} "
                f"gives {name} (dim {dim}); embed with --embedder {self.meta.get('embedder_spec')} "
                "or retrain the classifier on these embeddings"
            )

    def score(self, X: np.ndarray) -> np.ndarray:
        """P(educational) per row, float32; a row's score does not depend on the other rows."""
        if len(X) == 0:
            return np.zeros(0, dtype=np.float32)
        return positive_proba(self.model, X).astype(np.float32)


def row_dot(X: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``X @ w`` with each row's sum taken in the same order (column 0, 1, ...) in float64,
    whatever the number of rows: elementwise multiplies and adds only, no BLAS."""
    cols = np.ascontiguousarray(np.asarray(X, dtype=np.float64).T)
    w = np.asarray(w, dtype=np.float64)
    out = np.zeros(cols.shape[1], dtype=np.float64)
    term = np.empty_like(out)
    for j in range(len(w)):
        np.multiply(cols[j], w[j], out=term)
        out += term
    return out


def positive_proba(model: Any, X: np.ndarray) -> np.ndarray:
    """``model.predict_proba(X)[:, 1]`` (float64) computed row by row in effect: the project's
    two kinds (StandardScaler + binary LogisticRegression, RandomForestClassifier) without a
    matrix product; anything else one row per call."""
    from scipy.special import expit
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    steps = list(model.steps) if isinstance(model, Pipeline) else [(None, model)]
    *prep, (_, last) = steps
    if all(isinstance(step, StandardScaler) for _, step in prep):  # elementwise: (x - mean) / scale
        if isinstance(last, LogisticRegression) and last.coef_.shape[0] == 1:
            for _, step in prep:
                X = step.transform(X)
            return expit(row_dot(X, last.coef_[0]) + float(last.intercept_[0]))
        if isinstance(last, RandomForestClassifier) and not prep:
            # sklearn sums the trees in whatever order its threads finish; here always tree 0, 1, ...
            X = np.asarray(X, dtype=np.float32)
            total = np.zeros(len(X), dtype=np.float64)
            for tree in last.estimators_:
                total += tree.predict_proba(X, check_input=False)[:, 1]
            return total / len(last.estimators_)
    return np.concatenate([model.predict_proba(X[i : i + 1])[:, 1] for i in range(len(X))])


def train(
    X: np.ndarray, y: np.ndarray, kind: str = "forest", test_fraction: float = 0.2, seed: int = 0,
    workers: int = 1,
) -> tuple[Any, dict[str, Any]]:
    """Fit on a stratified split and report held-out metrics; then refit on all data for the saved model."""
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise PhibookError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    n_min = int(min(y.sum(), len(y) - y.sum()))
    if n_min < 2:
        raise PhibookError(f"the smaller class has {n_min} document(s); at least 2 of each class are needed "
                           "for a held-out split: annotate more documents")
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=test_fraction, random_state=seed, stratify=y)
    held = make_estimator(kind, seed, workers).fit(X_tr, y_tr)
    report = {"train": int(len(y_tr)), "heldout": evaluate(y_te, held.predict_proba(X_te)[:, 1])}
    final = make_estimator(kind, seed, workers).fit(X, y)
    return final, report


def save_classifier(path: str | Path, model: Any, meta: dict[str, Any]) -> None:
    import joblib

    with io.open_atomic(path, "wb") as f:
        joblib.dump({"format": FORMAT, "model": model, "meta": {**meta, "phibook_version": __version__}}, f)


def load_classifier(path: str | Path) -> QualityClassifier:
    import joblib

    path = Path(path)
    if not path.is_file():
        raise PhibookError(f"classifier file not found: {path}")
    try:
        blob = joblib.load(path)
    except Exception as exc:  # a pickle can fail in many ways; all mean "not our file"
        raise PhibookError(f"{path} is not a readable classifier file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise PhibookError(f"{path} is not a phibook quality classifier (written by `phibook filter train`)")
    return QualityClassifier(blob["model"], blob["meta"], path)


def file_fingerprint(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
