"""RowDecoder: the one place a token's text and its row's finish reason are decided
(phibook/inference/sampling.py), for Generator and the serve engine alike."""

from __future__ import annotations

import math

import pytest
import torch

from phibook.errors import PhibookError
from phibook.inference.sampling import RowDecoder, SamplingParams, mask_eos
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


# --------------------------------------------------------------------------- ignore_eos / min_tokens


def test_without_stop_at_eos_eos_is_text_and_never_banned(tok) -> None:
    # vLLM's ignore_eos: EOS decodes to the tokenizer's text for it, and min_tokens has nothing to mask.
    row = RowDecoder(tok, SamplingParams(stop_at_eos=False, min_tokens=2), budget=3)
    assert not row.ban_eos
    pieces, n = feed(row, [tok.eos_id] * 5)
    assert n == 3 and row.finish == "length" and not row.ban_eos
    assert "".join(pieces) == tok.decode([tok.eos_id] * 3) == "<|endoftext|>" * 3 == row.completion(0).text


def test_min_tokens_bans_eos_until_n_tokens_came_before_it(tok) -> None:
    ids = [t for t in tok.encode(TEXT) if t != tok.eos_id][:3]
    row = RowDecoder(tok, SamplingParams(min_tokens=3), budget=10)
    banned = []
    for t in ids:
        banned.append(row.ban_eos)
        assert row.push(t) == (tok.decode([t]), "") and row.finish is None
    assert banned == [True, True, True] and not row.ban_eos
    assert row.push(tok.eos_id) == ("", "") and row.finish == "stop"  # the 4th token may be EOS
    c = row.completion(0)
    assert c.token_ids == [*ids, tok.eos_id] and c.text == tok.decode(ids) and c.finish_reason == "stop"


def test_an_eos_that_slips_through_before_min_tokens_is_text(tok) -> None:
    # The samplers mask it (mask_eos); were one pushed anyway it must not end the row early.
    row = RowDecoder(tok, SamplingParams(min_tokens=2), budget=10)
    assert row.push(tok.eos_id) == ("<|endoftext|>", "") and row.finish is None


def test_min_tokens_ignores_stop_strings_ending_in_the_first_n_tokens(tok) -> None:
    ids = tok.encode(TEXT)
    k = next(i for i in range(len(ids)) if "Bob" in tok.decode(ids[: i + 1]))  # token k completes "Bob"
    # "Alice" (the first) and "Bob" end within the first k + 1 tokens; the second "Alice" ends later.
    # "apples!" only makes the window of a stop search wide: "Bob" sits inside it, yet must not match.
    row = RowDecoder(tok, SamplingParams(stop=["apples!", "Bob", "Alice"], min_tokens=k + 1), budget=100)
    pieces, n = feed(row, ids)
    want = "Alice had three apples. Bob gave "
    assert row.finish == "stop" and "".join(pieces) == want == row.completion(0).text
    assert n > k + 1 and tok.decode(ids[:n]).endswith("Alice") and not tok.decode(ids[: n - 1]).endswith("Alice")
    # Without min_tokens the first "Alice" ends the row at once.
    plain = RowDecoder(tok, SamplingParams(stop=["apples!", "Bob", "Alice"]), budget=100)
    assert feed(plain, ids)[0] == [] and plain.finish == "stop"


def test_mask_eos_acts_on_the_banned_rows_only(tok) -> None:
    rows = [RowDecoder(tok, SamplingParams(min_tokens=2), budget=5),  # banned
            RowDecoder(tok, SamplingParams(), budget=5),  # no min_tokens
            RowDecoder(tok, SamplingParams(stop_at_eos=False, min_tokens=2), budget=5),  # EOS is text anyway
            RowDecoder(tok, SamplingParams(min_tokens=1), budget=5)]  # banned until its first token
    rows[3].push(tok.encode("Alice")[0])
    logits = torch.zeros((4, tok.vocab_size))
    mask_eos(logits, rows)
    want = torch.zeros((4, tok.vocab_size))
    want[0, tok.eos_id] = -math.inf
    assert torch.equal(logits, want)


@pytest.mark.parametrize("value, why", [(-1, "integer >= 0"), (True, "integer >= 0"), (2.0, "integer >= 0"),
                                        (9, "max_new_tokens=8")])
def test_min_tokens_is_validated(value, why) -> None:
    with pytest.raises(PhibookError, match=rf"min_tokens={value!r}: .*{why}"):
        SamplingParams(max_new_tokens=8, min_tokens=value).validate()
    SamplingParams(max_new_tokens=8, min_tokens=8).validate()
