"""RowDecoder: the one place a token's text and its row's finish reason are decided
(phibook/inference/sampling.py), for Generator and the serve engine alike."""

from __future__ import annotations

import pytest

from phibook.inference.sampling import RowDecoder, SamplingParams
from phibook.model.tokenizer import train_bpe

CORPUS = "Alice had three apples. Bob gave Alice seven more apples, so Alice had ten apples.\n" * 30
TEXT = "Alice had three apples. Bob gave Alice seven more apples"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sampling")
    (tmp / "corpus.txt").write_text(CORPUS)
    return train_bpe([tmp / "corpus.txt"], vocab_size=300, out_dir=tmp / "tok")


def feed(row: RowDecoder, ids: list[int]) -> tuple[list[str], int]:
    """Push ids until the row finishes; (every non-empty piece released, tokens pushed)."""
    pieces = []
    for n, t in enumerate(ids, 1):
        delta, tail = row.push(t)
        pieces += [p for p in (delta, tail) if p]
        if row.finish is not None:
            return pieces, n
    return pieces, len(ids)


def test_eos_stops_the_row_and_releases_the_held_tail(tok) -> None:
    ids = tok.encode(TEXT)
    # "apples" ends the text, and "apples!" is a stop string: its start is held back until EOS.
    row = RowDecoder(tok, SamplingParams(stop=["apples!"]), budget=100)
    pieces, n = feed(row, [*ids, tok.eos_id, *ids])
    assert n == len(ids) + 1 and row.finish == "stop"
    assert "".join(pieces) == TEXT == row.text.text  # EOS adds no text
    c = row.completion(prompt_tokens=4)
    assert c.finish_reason == "stop" and c.token_ids == [*ids, tok.eos_id] and c.completion_tokens == n


def test_eos_is_text_when_the_row_does_not_stop_at_it(tok) -> None:
    row = RowDecoder(tok, SamplingParams(stop_at_eos=False), budget=3)
    feed(row, [tok.eos_id] * 3)
    assert row.finish == "length" and len(row.tokens) == 3


def test_a_stop_string_spanning_tokens_is_cut_and_nothing_after_it_released(tok) -> None:
    ids = tok.encode(TEXT)
    pieces = [tok.decode([t]) for t in ids]
    # a stop string made of the end of one token and the start of the next
    k = next(i for i in range(len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    before = "".join(pieces[:k]) + pieces[k][:-2]
    assert stop not in before
    row = RowDecoder(tok, SamplingParams(stop=[stop]), budget=100)
    released, n = feed(row, ids)
    assert n == k + 2 and row.finish == "stop"
    assert "".join(released) == before == row.completion(0).text
    assert row.completion(0).token_ids == ids[: k + 2]


def test_a_possible_stop_start_is_held_back_until_settled(tok) -> None:
    text = "Alice had three apples. Bob gave Alice seven more"
    row = RowDecoder(tok, SamplingParams(stop=["seven more pears"]), budget=100)
    released = ""
    for t in tok.encode(text):
        delta, tail = row.push(t)
        released += delta + tail
        assert row.text.text.startswith(released)  # released text is final: never taken back
    # "seven more" could still become the stop string: held back, not released
    assert row.finish is None and released == "Alice had three apples. Bob gave Alice "
    assert released + row.text.finish() == text  # the end of the row releases the held tail


def test_length_ends_the_row_at_its_budget_and_releases_everything(tok) -> None:
    ids = tok.encode(TEXT)
    row = RowDecoder(tok, SamplingParams(stop=["apples!"]), budget=5)
    pieces, n = feed(row, ids)
    assert n == 5 and row.finish == "length"
    assert "".join(pieces) == tok.decode(ids[:5]) == row.completion(0).text
    assert row.completion(0).finish_reason == "length"


def test_a_row_without_budget_is_finished_before_any_token(tok) -> None:
    row = RowDecoder(tok, SamplingParams(max_new_tokens=0), budget=0)
    assert row.finish == "length" and row.completion(7).completion_tokens == 0
