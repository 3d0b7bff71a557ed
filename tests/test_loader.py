"""The packed loader and mixtures, on shard sets written from known token lists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from phibook.data.loader import PackedLoader, has_validation, validation_batches
from phibook.data.mixture import load_data, load_mixture_file
from phibook.data.shards import load_manifest, write_shard_set
from phibook.errors import PhibookError

TOK = {"fingerprint": "tok-a", "vocab_size": 1000, "eos_id": 0, "path": "tok.json"}


def _docs(rng: np.random.Generator, n: int, lo: int, hi: int, vocab: tuple[int, int]) -> list[list[int]]:
    return [rng.integers(vocab[0], vocab[1], size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def make_set(path: Path, seed: int, vocab: tuple[int, int] = (1, 1000), n_docs: int = 60,
             shard_tokens: int = 700, val_docs: int = 0, tok: dict | None = None) -> Path:
    rng = np.random.default_rng(seed)
    docs = {"train": _docs(rng, n_docs, 5, 80, vocab)}
    if val_docs:
        docs["val"] = _docs(rng, val_docs, 5, 80, vocab)
    write_shard_set(path, docs, tok or TOK, source=path.name, shard_tokens=shard_tokens)
    return path


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    return make_set(tmp_path / "synthetic", seed=1, val_docs=20)


def write_mixture(path: Path, sources: list[tuple[str, str, float]], name: str = "m") -> Path:
    lines = [f'name = "{name}"']
    for src, rel, w in sources:
        lines += ["[[sources]]", f'name = "{src}"', f'path = "{rel}"', f"weight = {w}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def stream_tokens(manifest_dir: Path, split: str = "train") -> np.ndarray:
    m = load_manifest(manifest_dir)
    return np.concatenate([np.asarray(m.open_shard(s)) for s in m.split_shards(split)])


def test_writer_shards_hold_documents_with_eos(shard_dir: Path) -> None:
    m = load_manifest(shard_dir)
    train = m.split_shards("train")
    assert len(train) > 1 and all(s.tokens <= 700 for s in train)
    assert sum(s.documents for s in train) == 60
    toks = stream_tokens(shard_dir)
    assert int((toks == 0).sum()) == 60 and toks[-1] == 0
    for s in train:  # every shard ends at a document boundary
        assert np.asarray(m.open_shard(s))[-1] == 0
    assert m.dtype == "uint16" and (shard_dir / "train-00000.bin").stat().st_size == train[0].tokens * 2


def test_batches_are_windows_of_the_stream_and_y_is_x_shifted(shard_dir: Path) -> None:
    loader = PackedLoader(shard_dir, seq_len=16, seed=3)
    assert (loader.vocab_size, loader.eos_id, loader.tokenizer_fingerprint) == (1000, 0, "tok-a")
    assert loader.total_tokens == load_manifest(shard_dir).total_tokens("train")
    x, y = loader.next_batch(8)
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # Consecutive windows of one epoch overlap by one token (stride seq_len).
    assert torch.equal(y[:-1, -1], x[1:, 0])
    # Every window is a real slice of the concatenation of the shards in some order.
    m = load_manifest(shard_dir)
    shards = [np.asarray(m.open_shard(s)) for s in m.split_shards("train")]
    order = np.random.default_rng([3, 0, 0]).permutation(len(shards))
    stream = np.concatenate([shards[i] for i in order])
    full = torch.cat([x, y[:, -1:]], dim=1).numpy()
    for i, row in enumerate(full):
        np.testing.assert_array_equal(row, stream[i * 16 : i * 16 + 17])


def test_next_batch_is_deterministic_from_seed(shard_dir: Path) -> None:
    a, b, c = (PackedLoader(shard_dir, 16, seed=s) for s in (5, 5, 6))
    got_a = [a.next_batch(4)[0] for _ in range(30)]
    got_b = [b.next_batch(4)[0] for _ in range(30)]
    got_c = [c.next_batch(4)[0] for _ in range(30)]
    assert all(torch.equal(p, q) for p, q in zip(got_a, got_b))
    assert not all(torch.equal(p, q) for p, q in zip(got_a, got_c))


def test_epochs_roll_over_and_reshuffle(shard_dir: Path) -> None:
    loader = PackedLoader(shard_dir, seq_len=32, seed=0)
    windows = (loader.total_tokens - 1) // 32
    first = torch.cat([loader.next_batch(1)[0] for _ in range(windows)])
    assert loader.source_epochs() == {"synthetic": 0}
    second = torch.cat([loader.next_batch(1)[0] for _ in range(windows - 40)])
    assert loader.source_epochs() == {"synthetic": 1}
    assert not torch.equal(first[: len(second)], second)


def test_state_dict_resumes_exactly(tmp_path: Path, shard_dir: Path) -> None:
    other = make_set(tmp_path / "code", seed=2)
    mix = write_mixture(tmp_path / "mix.toml", [("synthetic", "synthetic", 0.7), ("code", "code", 0.3)])
    straight = PackedLoader(mix, seq_len=24, seed=9)
    ref = [straight.next_batch(6) for _ in range(40)]
    first = PackedLoader(mix, seq_len=24, seed=9)
    for _ in range(17):
        first.next_batch(6)
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    resumed = PackedLoader(mix, seq_len=24, seed=9)
    resumed.load_state_dict(state)
    assert resumed.sequences_served == 17 * 6
    for i in range(17, 40):
        x, y = resumed.next_batch(6)
        assert torch.equal(x, ref[i][0]) and torch.equal(y, ref[i][1]), f"batch {i} differs after resume"
    assert other.exists()


def test_ranks_slice_the_same_global_batch(tmp_path: Path, shard_dir: Path) -> None:
    make_set(tmp_path / "code", seed=2)
    mix = write_mixture(tmp_path / "mix.toml", [("synthetic", "synthetic", 0.5), ("code", "code", 0.5)])
    single = PackedLoader(mix, 20, seed=1)
    ranks = [PackedLoader(mix, 20, seed=1) for _ in range(2)]
    for _ in range(12):
        x, y = single.next_batch(8)
        parts = [r.next_batch(8, rank=i, world_size=2) for i, r in enumerate(ranks)]
        assert parts[0][0].shape == (4, 20)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    # Batching does not change the stream: 2 x 4 sequences == 1 x 8.
    a, b = PackedLoader(mix, 20, seed=4), PackedLoader(mix, 20, seed=4)
    big = a.next_batch(8)[0]
    small = torch.cat([b.next_batch(4)[0], b.next_batch(4)[0]])
    assert torch.equal(big, small)


def test_mixture_proportions_follow_weights(tmp_path: Path) -> None:
    # Disjoint token ranges tell the sources apart.
    make_set(tmp_path / "a", seed=1, vocab=(1, 300))
    make_set(tmp_path / "b", seed=2, vocab=(300, 600))
    make_set(tmp_path / "c", seed=3, vocab=(600, 1000))
    mix = write_mixture(tmp_path / "mix.toml", [("a", "a", 4), ("b", "b", 2), ("c", "c", 4)])
    loader = PackedLoader(mix, seq_len=8, seed=0)
    n = 6000
    x = torch.cat([loader.next_batch(100)[0] for _ in range(n // 100)])
    top = x.max(dim=1).values  # EOS is 0, so the max id identifies the source
    share = [float(((top >= lo) & (top < hi)).float().mean()) for lo, hi in ((1, 300), (300, 600), (600, 1000))]
    # Binomial standard deviation at p=0.4, n=6000 is 0.0063; allow 4 sigma.
    for got, want in zip(share, (0.4, 0.2, 0.4)):
        assert abs(got - want) < 0.026, share


def test_mixture_weights_normalize_and_zero_weight_sources_drop(tmp_path: Path) -> None:
    make_set(tmp_path / "a", seed=1)
    make_set(tmp_path / "b", seed=2)
    mix = load_mixture_file(write_mixture(tmp_path / "m.toml", [("a", "a", 3), ("b", "b/manifest.json", 1)]))
    assert mix.weights == [0.75, 0.25] and mix.name == "m"
    mix = load_mixture_file(write_mixture(tmp_path / "z.toml", [("a", "a", 1), ("b", "b", 0)]))
    assert [s.name for s in mix.sources] == ["a"]


def test_validation_batches_fixed_and_rank_sliced(shard_dir: Path) -> None:
    assert has_validation(shard_dir)
    full = list(validation_batches(shard_dir, 16, max_sequences=30, batch_size=8))
    again = list(validation_batches(shard_dir, 16, max_sequences=30, batch_size=8))
    assert [b[0].shape[0] for b in full] == [8, 8, 8, 6]
    assert all(torch.equal(p[0], q[0]) for p, q in zip(full, again))
    val = stream_tokens(shard_dir, "val")
    np.testing.assert_array_equal(full[0][0][1].numpy(), val[16:32])
    parts = [list(validation_batches(shard_dir, 16, 30, 8, rank=r, world_size=2)) for r in range(2)]
    for k, (x, y) in enumerate(full):
        assert torch.equal(torch.cat([parts[0][k][0], parts[1][k][0]]), x)
        assert torch.equal(torch.cat([parts[0][k][1], parts[1][k][1]]), y)


def test_no_validation_split_is_a_clear_error(tmp_path: Path) -> None:
    d = make_set(tmp_path / "noval", seed=1)
    assert not has_validation(d)
    with pytest.raises(PhibookError, match="no validation split"):
        validation_batches(d, 16, 10, 4)


# ------------------------------------------------------------------ errors


def test_fingerprint_mismatch_names_both_sources(tmp_path: Path) -> None:
    make_set(tmp_path / "a", seed=1)
    make_set(tmp_path / "b", seed=2, tok={**TOK, "fingerprint": "tok-b"})
    mix = write_mixture(tmp_path / "m.toml", [("web", "a", 1), ("code", "b", 1)])
    with pytest.raises(PhibookError, match=r"'web'.*tok-a.*'code'.*tok-b"):
        PackedLoader(mix, 16)


def test_missing_and_truncated_shards(shard_dir: Path) -> None:
    shard = shard_dir / "train-00001.bin"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 2)
    with pytest.raises(PhibookError, match=rf"train-00001.bin is truncated.*{size} bytes.*{size - 2} bytes"):
        PackedLoader(shard_dir, 16)
    shard.unlink()
    with pytest.raises(PhibookError, match="train-00001.bin.*missing"):
        PackedLoader(shard_dir, 16)


def test_bad_mixtures(tmp_path: Path) -> None:
    make_set(tmp_path / "a", seed=1)
    empty = tmp_path / "empty.toml"
    empty.write_text('name = "nothing"\n')
    with pytest.raises(PhibookError, match="mixture is empty"):
        PackedLoader(empty, 16)
    zero = write_mixture(tmp_path / "zero.toml", [("a", "a", 0)])
    with pytest.raises(PhibookError, match="weights are zero"):
        load_data(zero)
    missing = write_mixture(tmp_path / "missing.toml", [("a", "a", 1), ("web", "nowhere", 1)])
    with pytest.raises(PhibookError, match=r"'web'.*no shard manifest.*nowhere"):
        load_data(missing)
    with pytest.raises(PhibookError, match="no shard manifest"):
        PackedLoader(tmp_path / "nothing-here", 16)


def test_batch_not_divisible_by_world_size(shard_dir: Path) -> None:
    loader = PackedLoader(shard_dir, 16)
    with pytest.raises(PhibookError, match="global batch of 6 sequences is not divisible by world size 4"):
        loader.next_batch(6, rank=0, world_size=4)


def test_state_from_other_data_is_refused(tmp_path: Path, shard_dir: Path) -> None:
    other = make_set(tmp_path / "other", seed=7)
    state = PackedLoader(shard_dir, 16).state_dict()
    with pytest.raises(PhibookError, match="different data"):
        PackedLoader(other, 16).load_state_dict(state)
    with pytest.raises(PhibookError, match="seq_len"):
        PackedLoader(shard_dir, 32).load_state_dict(state)


def test_corpus_shorter_than_one_sequence(tmp_path: Path) -> None:
    d = tmp_path / "tiny"
    write_shard_set(d, {"train": [[5, 6, 7]]}, TOK)
    with pytest.raises(PhibookError, match="fewer than one sequence"):
        PackedLoader(d, 16)


def test_large_vocab_uses_uint32(tmp_path: Path) -> None:
    d = tmp_path / "big"
    tok = {**TOK, "vocab_size": 70000, "eos_id": 69999}
    write_shard_set(d, {"train": [[66000, 1, 2, 3] * 10]}, tok)
    m = load_manifest(d)
    assert m.dtype == "uint32"
    x, _ = PackedLoader(d, 8).next_batch(2)
    assert set(x.flatten().tolist()) <= {66000, 1, 2, 3, 69999} and int(x.max()) == 66000
