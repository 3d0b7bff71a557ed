"""The packed data loader: token shards (or a mixture of shard sets) -> (x, y) batches.

How the stream is built, so that every process agrees on it without talking:

* Each source's split is one long token stream: its shards concatenated in an
  order shuffled per epoch from ``(seed, source index, epoch)``. Documents are
  already separated by EOS inside the shards, so packing is just cutting.
* A sequence is a window of ``seq_len + 1`` tokens; windows step by
  ``seq_len``, so the last target of one window is the first input of the
  next and no token is wasted as a target. Windows may span two shards. The
  tail of an epoch shorter than one window is dropped, and the next epoch
  starts at a random phase in ``[0, seq_len)`` so that small corpora do not
  repeat the exact same windows every epoch.
* For a mixture, the source of every sequence in the global stream is drawn
  from the weights with one seeded ``numpy`` Generator (uniform draw + CDF),
  so the draw for sequence n does not depend on how the stream is batched.
* ``next_batch(G, rank, W)`` advances the global stream by G sequences and
  reads only rank's contiguous slice: 1 process and W processes see the same
  global batches.

The cursor (per-source epoch and window, the Generator's state, sequences
served) is a small JSON-able dict, so a resumed run continues exactly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phibook.data.mixture import Mixture, Source, load_data
from phibook.data.shards import ShardInfo
from phibook.errors import PhibookError

STATE_VERSION = 1


def _log(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"phibook loader: {msg}")


class _SourceStream:
    """Windows of ``seq_len + 1`` tokens over one source's split, epoch after epoch."""

    def __init__(self, source: Source, index: int, split: str, seq_len: int, seed: int, shuffle: bool) -> None:
        self.source, self.index, self.seq_len, self.seed, self.shuffle = source, index, seq_len, seed, shuffle
        manifest = source.manifest
        self.shards: list[ShardInfo] = [s for s in manifest.split_shards(split) if s.tokens > 0]
        manifest.validate_files(split)
        self.total = sum(s.tokens for s in self.shards)
        self._maps: dict[int, np.ndarray] = {}
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray, int, int]] = {}
        self.epoch = 0
        self.window = 0

    def _map(self, i: int) -> np.ndarray:
        if i not in self._maps:
            self._maps[i] = self.source.manifest.open_shard(self.shards[i])
        return self._maps[i]

    def layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(shard order, token start of each ordered shard, phase, window count) for an epoch."""
        if epoch not in self._layouts:
            n = len(self.shards)
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.index, epoch])
                order = rng.permutation(n)
                phase = int(rng.integers(0, self.seq_len)) if epoch > 0 else 0
            else:
                order, phase = np.arange(n), 0
            sizes = np.array([self.shards[i].tokens for i in order], dtype=np.int64)
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
            if self.total - phase - 1 < self.seq_len:
                phase = 0  # tiny corpus: keep at least one window
            windows = (self.total - phase - 1) // self.seq_len
            if len(self._layouts) > 4:
                self._layouts.pop(min(self._layouts))
            self._layouts[epoch] = (order, starts, phase, windows)
        return self._layouts[epoch]

    def take(self, log: bool) -> tuple[int, int]:
        """The next window's (epoch, index), advancing the cursor (a new epoch when this one is used up)."""
        windows = self.layout(self.epoch)[3]
        if self.window >= windows:
            if log:
                _log(
                    f"source {self.source.name!r} finished epoch {self.epoch} "
                    f"({windows} sequences); starting epoch {self.epoch + 1}"
                )
            self.epoch, self.window = self.epoch + 1, 0
        loc = (self.epoch, self.window)
        self.window += 1
        return loc

    def read(self, epoch: int, window: int) -> np.ndarray:
        order, starts, phase, _ = self.layout(epoch)
        lo = phase + window * self.seq_len
        hi = lo + self.seq_len + 1
        out = np.empty(hi - lo, dtype=np.int64)
        k = int(np.searchsorted(starts, lo, side="right")) - 1
        filled = 0
        while lo + filled < hi:  # a window may run across the end of a shard into the next
            shard = int(order[k])
            off = lo + filled - int(starts[k])
            n = min(hi - lo - filled, self.shards[shard].tokens - off)
            out[filled : filled + n] = self._map(shard)[off : off + n]
            filled += n
            k += 1
        return out


def _data_id(mixture: Mixture, split: str) -> str:
    """Identifies the exact data a cursor belongs to (sources, weights, shards)."""
    desc = [
        [s.name, round(s.weight, 12), [[sh.file, sh.tokens, sh.sha256] for sh in s.manifest.split_shards(split)]]
        for s in mixture.sources
    ]
    return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]


class PackedLoader:
    """Fixed-length training sequences from a manifest, its folder, or a mixture ``.toml``.

    ``next_batch(global_batch, rank, world_size)`` returns this rank's
    ``(x, y)``, int64 tensors of shape ``(global_batch // world_size, seq_len)``
    with ``y`` = ``x`` shifted by one token.
    """

    def __init__(self, data: str | Path | Mixture, seq_len: int, seed: int = 0, split: str = "train") -> None:
        if int(seq_len) < 1:
            raise PhibookError(f"seq_len must be >= 1, got {seq_len}")
        if split not in ("train", "val"):
            raise PhibookError(f"split must be 'train' or 'val', got {split!r}")
        self.mixture = data if isinstance(data, Mixture) else load_data(data)
        self.seq_len, self.seed, self.split = int(seq_len), int(seed), split
        self.tokenizer_fingerprint: str = self.mixture.fingerprint
        self.vocab_size: int = self.mixture.vocab_size
        self.eos_id: int = self.mixture.eos_id
        self.streams = [
            _SourceStream(src, i, split, self.seq_len, self.seed, shuffle=True)
            for i, src in enumerate(self.mixture.sources)
        ]
        for stream in self.streams:
            if stream.total < self.seq_len + 1:
                raise PhibookError(
                    f"source {stream.source.name!r} ({stream.source.manifest.path}) has {stream.total} "
                    f"{split} tokens, fewer than one sequence of seq_len + 1 = {self.seq_len + 1}"
                )
        self.total_tokens: int = sum(s.total for s in self.streams)
        cdf = np.cumsum(np.array(self.mixture.weights, dtype=np.float64))
        cdf[-1] = 1.0
        self._cdf = cdf
        self._rng = np.random.default_rng(self.seed)
        self.sequences_served = 0
        self._data_id = _data_id(self.mixture, split)

    @property
    def source_names(self) -> list[str]:
        return [s.source.name for s in self.streams]

    def next_batch(self, global_batch: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        if global_batch < 1:
            raise PhibookError(f"global batch must be >= 1 sequence, got {global_batch}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise PhibookError(f"rank {rank} is not in [0, world_size={world_size})")
        if global_batch % world_size:
            raise PhibookError(
                f"global batch of {global_batch} sequences is not divisible by world size {world_size}"
            )
        per_rank = global_batch // world_size
        lo, hi = rank * per_rank, (rank + 1) * per_rank
        # One uniform draw per sequence, consumed in stream order whatever the batching.
        u = self._rng.random(global_batch)
        choice = np.minimum(np.searchsorted(self._cdf, u, side="right"), len(self.streams) - 1)
        rows = np.empty((per_rank, self.seq_len + 1), dtype=np.int64)
        for i in range(global_batch):
            stream = self.streams[int(choice[i])]
            epoch, window = stream.take(log=rank == 0)
            if lo <= i < hi:
                rows[i - lo] = stream.read(epoch, window)
        self.sequences_served += global_batch
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def source_epochs(self) -> dict[str, int]:
        """How many times each source has been started over (0 during the first pass)."""
        return {s.source.name: s.epoch for s in self.streams}

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "data_id": self._data_id,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "split": self.split,
            "sequences_served": self.sequences_served,
            "rng": self._rng.bit_generator.state,
            "sources": [{"name": s.source.name, "epoch": s.epoch, "window": s.window} for s in self.streams],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version = state.get("version") if isinstance(state, dict) else None
        if version != STATE_VERSION:
            raise PhibookError(f"data loader state has version {version!r}, want {STATE_VERSION}")
        for key, mine in (("seq_len", self.seq_len), ("seed", self.seed), ("split", self.split)):
            if state.get(key) != mine:
                raise PhibookError(
                    f"data loader state was saved with {key}={state.get(key)!r} but this loader has {key}={mine!r}"
                )
        if state.get("data_id") != self._data_id:
            raise PhibookError(
                "data loader state belongs to different data (sources, weights or shards changed since it was "
                f"saved: state has data id {state.get('data_id')}, {self.mixture.path} gives {self._data_id})"
            )
        names = [s["name"] for s in state["sources"]]
        if names != self.source_names:
            raise PhibookError(f"data loader state has sources {names}, this loader has {self.source_names}")
        for stream, saved in zip(self.streams, state["sources"]):
            stream.epoch, stream.window = int(saved["epoch"]), int(saved["window"])
        self._rng.bit_generator.state = state["rng"]
        self.sequences_served = int(state["sequences_served"])


def has_validation(data: str | Path | Mixture) -> bool:
    """True when at least one source has a non-empty ``val`` split."""
    mixture = data if isinstance(data, Mixture) else load_data(data)
    return any(s.manifest.total_tokens("val") > 0 for s in mixture.sources)


def _allocate(total: int, weights: list[float]) -> list[int]:
    """Split ``total`` by weights with the largest-remainder rule (exact sum, deterministic)."""
    raw = [total * w for w in weights]
    counts = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def validation_batches(
    data: str | Path | Mixture,
    seq_len: int,
    max_sequences: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed held-out set: up to ``max_sequences`` windows from the ``val`` shards.

    Sources share ``max_sequences`` by weight (among those with a val split);
    each source contributes its first windows in manifest order, unshuffled, so
    every call and every world size evaluates the same sequences. ``batch_size``
    is global: each batch is split into equal contiguous rank slices, so it must
    be divisible by ``world_size``; the total is cut to a multiple of
    ``world_size`` and the last batch may be smaller. Raises PhibookError (at
    the call, not at the first ``next``) when there is no val split.
    """
    mixture = data if isinstance(data, Mixture) else load_data(data)
    if batch_size < 1 or batch_size % world_size:
        raise PhibookError(f"validation batch of {batch_size} sequences is not divisible by world size {world_size}")
    if not 0 <= rank < world_size:
        raise PhibookError(f"rank {rank} is not in [0, world_size={world_size})")
    with_val = [s for s in mixture.sources if s.manifest.total_tokens("val") > 0]
    if not with_val:
        raise PhibookError(
            f"{mixture.path} has no validation split; rerun `phibook tokenize --val-fraction F` to hold some out"
        )
    total_w = sum(s.weight for s in with_val)
    counts = _allocate(int(max_sequences), [s.weight / total_w for s in with_val])
    seqs: list[tuple[_SourceStream, int]] = []
    for i, (src, n) in enumerate(zip(with_val, counts)):
        stream = _SourceStream(src, i, "val", int(seq_len), 0, shuffle=False)
        available = stream.layout(0)[3] if stream.total >= seq_len + 1 else 0
        seqs.extend((stream, w) for w in range(min(n, available)))
    n_total = len(seqs) - len(seqs) % world_size
    if n_total == 0:
        raise PhibookError(
            f"{mixture.path}: the validation split holds fewer than {world_size} sequence(s) of "
            f"{seq_len + 1} tokens"
        )
    return _iter_val(seqs[:n_total], batch_size, rank, world_size)


def _iter_val(seqs: list, batch_size: int, rank: int, world_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for b in range(0, len(seqs), batch_size):
        batch = seqs[b : b + batch_size]
        per = len(batch) // world_size
        rows = np.stack([stream.read(0, w) for stream, w in batch[rank * per : (rank + 1) * per]])
        t = torch.from_numpy(rows)
        yield t[:, :-1].contiguous(), t[:, 1:].contiguous()
