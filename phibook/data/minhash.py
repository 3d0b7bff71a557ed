"""The one near-duplicate rule: MinHash signatures, the LSH band shape and keep-the-first.

`phibook clean` (in memory) and `phibook pipeline run` (datatrove's bucket stages) both call
this module, so a document is kept or dropped for the same reason whichever way it runs and
however the input is sharded. The rule, in input order: a document is a near duplicate when an
earlier *kept* document shares at least one whole LSH band with it and their signatures agree
on at least `threshold` of their hashes (the estimated Jaccard of their shingle sets); it is
then dropped and the earliest such kept document is named as its original.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from functools import lru_cache

import numpy as np

MERSENNE = np.uint64((1 << 61) - 1)
SEED = 1  # fixed: every process and every task must draw the same permutations


def shingle_hashes(shingles: Iterable[str]) -> np.ndarray:
    """64-bit hashes of the shingles, sorted (a set's hashes do not depend on its iteration order)."""
    # blake2b, not Python's hash(): that one is salted per process.
    hs = [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") for s in shingles]
    return np.sort(np.array(hs, dtype=np.uint64))


@lru_cache(maxsize=8)
def permutations(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) of the num_perm hash functions h -> (a*h + b) mod 2^61-1; RandomState is stable across numpy versions."""
    gen = np.random.RandomState(SEED)
    a = gen.randint(1, int(MERSENNE), dtype=np.uint64, size=num_perm)
    b = gen.randint(0, int(MERSENNE), dtype=np.uint64, size=num_perm)
    return a, b


def signature(hashes: np.ndarray, num_perm: int) -> np.ndarray:
    """MinHash signature (uint32, num_perm values) of a shingle-hash array, vectorized over shingles x permutations."""
    a, b = permutations(num_perm)
    h = np.asarray(hashes, dtype=np.uint64).reshape(-1, 1)
    if not len(h):
        return np.full(num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
    # In place on one (shingles x num_perm) buffer: ~3x faster than `(h * a + b) % p`'s temporaries.
    with np.errstate(over="ignore"):  # the product wraps modulo 2^64 by design, as in datasketch and datatrove
        phv = h * a
        phv += b
        phv %= MERSENNE
    return (phv.min(axis=0) & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def text_signature(shingles: Iterable[str], num_perm: int) -> np.ndarray:
    return signature(shingle_hashes(shingles), num_perm)


@lru_cache(maxsize=32)
def lsh_shape(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) for a threshold: the shape datasketch's MinHashLSH picks (equal weight
    on false positives and negatives); b * r may be less than num_perm, the rest only verify."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Estimated Jaccard: the share of hashes two signatures agree on."""
    return float(np.mean(a == b))


class NearDupIndex:
    """The kept documents' signatures, banded. `match` then `add` in input order is keep-the-first."""

    def __init__(self, threshold: float, num_perm: int) -> None:
        self.threshold, self.num_perm = threshold, num_perm
        self.bands, self.rows = lsh_shape(threshold, num_perm)
        self._tables: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self._sigs: dict[int, np.ndarray] = {}

    def _keys(self, sig: np.ndarray) -> list[bytes]:
        return [x.tobytes() for x in sig[: self.bands * self.rows].reshape(self.bands, self.rows)]

    def match(self, sig: np.ndarray) -> int | None:
        """The earliest kept key this signature is a near duplicate of, or None."""
        cands = {k for table, key in zip(self._tables, self._keys(sig)) for k in table.get(key, ())}
        # A shared band is only a candidate; the threshold is checked on the whole signature.
        hits = [k for k in cands if similarity(self._sigs[k], sig) >= self.threshold]
        return min(hits) if hits else None

    def add(self, key: int, sig: np.ndarray) -> None:
        """Index a kept document; keys must grow in input order (the smallest match is the first)."""
        self._sigs[key] = sig
        for table, k in zip(self._tables, self._keys(sig)):
            table.setdefault(k, []).append(key)
