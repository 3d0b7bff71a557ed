"""Generation: batched decode against a full-forward reference, sampling, stop strings, templates."""

from __future__ import annotations

import copy
import math
import queue
import threading
from collections.abc import Iterator

import pytest
import torch

from phibook.errors import PhibookError
from phibook.inference.generate import Completion, Generator, SamplingParams, top_k_top_p_filter
from phibook.inference.sampling import StopText
from phibook.inference.templates import TEMPLATES, get_template
from phibook.model.config import PhiConfig, padded_vocab_size
from phibook.model.model import KVCache, PhiModel
from phibook.model.tokenizer import train_bpe

CORPUS = (
    "Alice had three apples. Bob gave Alice seven more apples, so Alice had ten apples.\n"
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n"
    "The weather in London is rainy in July, and Sebastien feels gloomy.\n"
    "Question: what is two plus two?\nAnswer: four.\n"
    "Let's think step by step. First we count, then we add, then we check the answer.\n"
)
PROMPTS = ["Alice had three", "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\nThe weather"]

def stream_in_thread(gen: Generator, prompt: str, params: SamplingParams) -> Iterator[str]:
    """Like ``gen.stream``, but the model runs in a worker thread (as an async server would run it)."""
    pieces: queue.Queue = queue.Queue()
    done = object()

    def work() -> None:
        try:
            gen.run([prompt], params, on_delta=lambda _i, d: pieces.put(d))
            pieces.put(done)
        except BaseException as exc:  # handed to the consumer, raised there
            pieces.put(exc)

    threading.Thread(target=work, daemon=True).start()
    while (item := pieces.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item



@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Generator:
    """A 2-layer random model over a small trained BPE, with a few padded vocab rows."""
    tmp = tmp_path_factory.mktemp("gen")
    (tmp / "corpus.txt").write_text(CORPUS * 20)
    tok = train_bpe([tmp / "corpus.txt"], vocab_size=400, out_dir=tmp / "tok")
    cfg = PhiConfig(
        n_layer=2, d_model=64, n_head=2, vocab_size=padded_vocab_size(tok.vocab_size) + 64, max_seq_len=96,
        init_std=0.3,  # peaky logits: no near-ties for argmax to flip on rounding
    )
    model = PhiModel(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    return Generator(model, tok)


def reference_greedy(gen: Generator, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy decode with a full forward per token (no cache, no padding)."""
    ids = list(prompt_ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = gen.model(torch.tensor([ids]))[0, -1]
            logits[gen.tokenizer.vocab_size :] = -math.inf
            t = int(logits.argmax())
            out.append(t)
            ids.append(t)
    return out


def test_greedy_batch_matches_uncached_argmax(tiny: Generator) -> None:
    params = SamplingParams(max_new_tokens=20, stop_at_eos=False)
    results = tiny.generate(PROMPTS, params)
    lengths = [r.prompt_tokens for r in results]
    assert lengths[0] < lengths[1]  # different lengths: row 0 is left-padded
    for prompt, r in zip(PROMPTS, results):
        assert r.token_ids == reference_greedy(tiny, tiny.tokenizer.encode(prompt), 20)
        assert r.completion_tokens == 20 and r.finish_reason == "length"
        assert r.text == tiny.tokenizer.decode(r.token_ids)


def test_batch_equals_one_at_a_time(tiny: Generator) -> None:
    prompts = [*PROMPTS, "", "Bob"]
    params = SamplingParams(max_new_tokens=12)
    batched = tiny.generate(prompts, params)
    single = [tiny.generate([p], params)[0] for p in prompts]
    assert batched == single
    assert batched[2].prompt_tokens == 1  # the empty prompt starts from EOS


def test_seeded_sampling_reproducible_and_batch_independent(tiny: Generator) -> None:
    row = SamplingParams(max_new_tokens=16, temperature=1.3, top_p=0.95, seed=7, stop_at_eos=False)
    alone = tiny.generate([PROMPTS[0]], row)[0]
    again = tiny.generate([PROMPTS[0]], row)[0]
    others = [
        SamplingParams(max_new_tokens=5, temperature=0.8, seed=1),
        SamplingParams(max_new_tokens=16, temperature=1.3, top_p=0.95, seed=7, stop_at_eos=False),
        SamplingParams(max_new_tokens=9),
    ]
    in_batch = tiny.generate([PROMPTS[1], PROMPTS[0], "Bob"], others)[1]
    assert alone.token_ids == again.token_ids == in_batch.token_ids
    # The seed matters: some other seed gives another continuation.
    variants = {
        tuple(tiny.generate([PROMPTS[0]], SamplingParams(max_new_tokens=16, temperature=1.3, seed=s))[0].token_ids)
        for s in range(8)
    }
    assert len(variants) > 1


def test_top_k_1_and_tiny_top_p_equal_greedy(tiny: Generator) -> None:
    greedy = tiny.generate(PROMPTS, SamplingParams(max_new_tokens=10))
    top_k = tiny.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=2.0, top_k=1, seed=3))
    top_p = tiny.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=2.0, top_p=1e-6, seed=3))
    assert [r.token_ids for r in greedy] == [r.token_ids for r in top_k] == [r.token_ids for r in top_p]


def test_filter_matches_transformers_warpers() -> None:
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(4, 300) * 3
    for k, p in [(0, 0.9), (20, 1.0), (50, 0.5), (5, 0.3), (0, 0.999)]:
        ours = top_k_top_p_filter(logits, torch.full((4, 1), k or 300), torch.full((4, 1), p))
        ref = logits.clone()
        if k:
            ref = TopKLogitsWarper(top_k=k)(None, ref)
        if p < 1.0:
            ref = TopPLogitsWarper(top_p=p)(None, ref)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (k, p)


def test_repetition_penalty_matches_transformers(tiny: Generator) -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    penalty = RepetitionPenaltyLogitsProcessor(1.8)
    prompt = tiny.tokenizer.encode(PROMPTS[0])
    ids, expected = list(prompt), []
    with torch.no_grad():
        for _ in range(15):
            logits = tiny.model(torch.tensor([ids]))[:, -1]
            logits[:, tiny.tokenizer.vocab_size :] = -math.inf
            t = int(penalty(torch.tensor([ids]), logits).argmax())
            expected.append(t)
            ids.append(t)
    got = tiny.generate(
        [PROMPTS[1], PROMPTS[0]],
        [SamplingParams(max_new_tokens=4), SamplingParams(max_new_tokens=15, repetition_penalty=1.8, stop_at_eos=False)],
    )
    assert got[1].token_ids == expected
    assert expected != reference_greedy(tiny, prompt, 15)  # the penalty changed something


def test_stop_string_cuts_output(tiny: Generator) -> None:
    full = tiny.generate([PROMPTS[0]], SamplingParams(max_new_tokens=30, stop_at_eos=False))[0].text
    stop = full[8:11]
    cut = full[: full.find(stop)]
    r = tiny.generate([PROMPTS[0]], SamplingParams(max_new_tokens=30, stop=["zzzz-never", stop], stop_at_eos=False))[0]
    assert r.text == cut and r.finish_reason == "stop"
    assert r.completion_tokens < 30


def test_max_new_tokens_and_context_clamp(tiny: Generator) -> None:
    r = tiny.generate([PROMPTS[0]], SamplingParams(max_new_tokens=7, stop_at_eos=False))[0]
    assert (r.completion_tokens, r.finish_reason) == (7, "length")
    r = tiny.generate([PROMPTS[0]], SamplingParams(max_new_tokens=0))[0]
    assert (r.text, r.completion_tokens, r.finish_reason) == ("", 0, "length")
    # Asking past the context clamps to it, also for a short row batched with a long one.
    long_prompt = "Alice " * 60
    rows = tiny.generate([long_prompt, "Bob"], SamplingParams(max_new_tokens=500, stop_at_eos=False))
    ctx = tiny.model.config.max_seq_len
    for r in rows:
        assert r.prompt_tokens + r.completion_tokens == ctx and r.finish_reason == "length"


def test_on_delta_pieces_concatenate_to_text(tiny: Generator) -> None:
    full = tiny.generate(PROMPTS, SamplingParams(max_new_tokens=25, stop_at_eos=False))
    stop = full[1].text[10:14]
    params = [SamplingParams(max_new_tokens=25, stop_at_eos=False), SamplingParams(max_new_tokens=25, stop=[stop])]
    pieces: dict[int, list[str]] = {0: [], 1: []}
    results = tiny.run(PROMPTS, params, on_delta=lambda i, d: pieces[i].append(d))
    for i, r in enumerate(results):
        assert "".join(pieces[i]) == r.text and all(pieces[i])
    assert results[1].finish_reason == "stop" and stop not in results[1].text
    assert "".join(tiny.stream(PROMPTS[1], params[1])) == results[1].text
    assert "".join(stream_in_thread(tiny, PROMPTS[1], params[1])) == results[1].text


def test_row_text_holds_back_possible_stop_start(tiny: Generator) -> None:
    tok = tiny.tokenizer
    row = StopText(tok, ["Alice:", "\n\n"])
    released = []
    text = "so the apples. Alicia said hi. Alice: no"
    for t in tok.encode(text):
        delta, stopped = row.push(t)
        released.append(delta)
        assert not "".join(released).endswith("Alic")  # a possible stop start is never released early
        if stopped:
            break
    assert stopped and "".join(released) == "so the apples. Alicia said hi. "


def test_truncate_left_cuts_a_long_prompt_instead_of_refusing_it(tiny: Generator) -> None:
    from phibook.inference.generate import prompt_keep

    long = "Alice had three apples. " * 40  # well past the 96-token context
    params = SamplingParams(max_new_tokens=8, stop_at_eos=False)
    with pytest.raises(PhibookError, match="context"):
        tiny.generate([long], params)
    gen = Generator(tiny.model, tiny.tokenizer, truncate="left")
    short = gen.generate([long, "Alice had"], params)
    assert short[0].prompt_tokens == prompt_keep(96, 8) and gen.n_truncated == 1
    assert [c.completion_tokens for c in short] == [8, 8]
    with pytest.raises(PhibookError, match="truncate"):
        Generator(tiny.model, tiny.tokenizer, truncate="right")


def test_padded_vocab_rows_never_produced(tiny: Generator) -> None:
    model = copy.deepcopy(tiny.model)
    with torch.no_grad():
        model.lm_head.bias[tiny.tokenizer.vocab_size :] = 1e4  # unmasked, these would always win
    gen = Generator(model, tiny.tokenizer)
    for params in (SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=8, temperature=5.0, seed=0)):
        for r in gen.generate(PROMPTS, params):
            assert r.token_ids and max(r.token_ids) < tiny.tokenizer.vocab_size


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_new_tokens", -1),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_k", -3),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("repetition_penalty", 0.0),
        ("seed", -1),
        ("stop", "Alice:"),
        ("stop", [""]),
    ],
)
def test_bad_params_raise(tiny: Generator, field: str, value) -> None:
    params = SamplingParams(**{field: value})
    with pytest.raises(PhibookError, match=field):
        tiny.generate(["hi"], params)


def test_prompt_longer_than_context_names_prompt(tiny: Generator) -> None:
    with pytest.raises(PhibookError, match=r"prompt 1 is \d+ tokens long; the model's context is 96"):
        tiny.generate(["ok", "Alice " * 200], SamplingParams(max_new_tokens=4))
    with pytest.raises(PhibookError, match="2 prompts but 1"):
        tiny.generate(["a", "b"], [SamplingParams()])


def test_completion_fields(tiny: Generator) -> None:
    r = tiny.generate([PROMPTS[0]], SamplingParams(max_new_tokens=3, stop_at_eos=False))[0]
    assert isinstance(r, Completion)
    assert r.prompt_tokens == len(tiny.tokenizer.encode(PROMPTS[0])) and len(r.token_ids) == 3


# --------------------------------------------------------------------------- templates


def test_templates_follow_the_report() -> None:
    assert set(TEMPLATES) == {"completion", "step-by-step", "qa", "chat", "code"}
    assert get_template("completion").format("Sebastien is") == "Sebastien is"
    assert get_template("step-by-step").format("How many apples?") == "How many apples?\nLet's think step by step.\n"
    assert get_template("qa").format("Why is the sky blue?") == "Why is the sky blue?\nAnswer:"
    chat = get_template("chat")
    assert chat.format("Hi there") == "Alice: Hi there\nBob:"
    assert "\nAlice:" in chat.stops()
    code = get_template("code")
    assert code.format("Ask user for an ip") == '"""Ask user for an ip"""\n'
    assert code.stops("Ask user for an ip") == []
    assert code.format("def add(a, b)\nAdd two numbers.") == 'def add(a, b):\n    """Add two numbers."""\n'
    assert "\ndef " in code.stops("def add(a, b)")
    for t in TEMPLATES.values():
        assert t.description


def test_unknown_template_lists_names() -> None:
    with pytest.raises(PhibookError, match="valid templates: completion, step-by-step, qa, chat, code"):
        get_template("poem")


def test_chunked_prefill_matches_whole(tiny: Generator) -> None:
    params = SamplingParams(max_new_tokens=10, stop_at_eos=False)
    whole = tiny.generate(PROMPTS, params)
    chunked = copy.copy(tiny)
    chunked.prefill_chunk = 3
    assert chunked.generate(PROMPTS, params) == whole
    assert chunked.generate([PROMPTS[1]], params) == tiny.generate([PROMPTS[1]], params)


def test_row_text_multibyte_characters_and_stop(tiny: Generator) -> None:
    # The small BPE saw only ASCII: each of these characters spans several byte tokens.
    row = StopText(tiny.tokenizer, ["🙂"])
    pieces = []
    for t in tiny.tokenizer.encode("naïve café 日本語 🙂 end"):
        delta, stopped = row.push(t)
        pieces.append(delta)
        if stopped:
            break
    assert stopped and "".join(pieces) == "naïve café 日本語 " == row.text
    assert not any("\ufffd" in p for p in pieces)


def test_codegen_tokenizer_with_phi_vocab_padding(codegen_tokenizer_dir) -> None:
    from phibook.model.tokenizer import Tokenizer

    tok = Tokenizer.from_file(codegen_tokenizer_dir)
    cfg = PhiConfig(n_layer=1, d_model=64, n_head=1, vocab_size=51200, max_seq_len=64)
    model = PhiModel(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.lm_head.bias[tok.vocab_size :] = 1e4  # the 905 padding rows would win if unmasked
    gen = Generator(model, tok)
    pieces: list[str] = []
    r = gen.run(["Alice: Hi\nBob:", ""], SamplingParams(max_new_tokens=6, temperature=1.0, seed=0),
                on_delta=lambda i, d: pieces.append(d) if i == 0 else None)
    assert r[1].prompt_tokens == 1  # the empty prompt is <|endoftext|> (id 50256)
    assert all(max(c.token_ids) < 50295 for c in r) and "".join(pieces) == r[0].text


def test_generator_gives_a_bf16_model_a_float32_cache_on_cpu(tiny: Generator) -> None:
    """What the Generator allocates follows attention_dtype (seen by a pre-hook that only reads
    the call), and its greedy tokens are the ones a hand loop over a float32 KVCache picks."""
    bf16 = copy.deepcopy(tiny.model).to(torch.bfloat16)
    bf16.reset_rope()
    tok = tiny.tokenizer
    prompt = "Once upon a time"
    ids = tok.encode(prompt)
    seen: list[torch.dtype] = []
    hook = bf16.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["cache"].k.dtype),
                                          with_kwargs=True)
    got = Generator(bf16, tok).run([prompt], SamplingParams(max_new_tokens=8, stop_at_eos=False))[0].token_ids
    hook.remove()
    assert seen and set(seen) == {torch.float32}
    cache = KVCache(bf16.config, 1, len(ids) + 8, dtype=torch.float32)
    with torch.no_grad():
        logits = bf16(torch.tensor([ids]), cache=cache)[:, -1]
        want = []
        for _ in range(8):
            want.append(int(logits[0, : tok.vocab_size].float().argmax()))  # padded vocab rows never win
            logits = bf16(torch.tensor([[want[-1]]]), cache=cache)[:, -1]
    assert got == want
