"""``phibook generate``: continue one or more prompts with a model (streaming for a single prompt)."""

from __future__ import annotations

import argparse
import sys
import textwrap

# --dtype's names, the same for every verb that loads a model (generate, chat, serve, eval; export
# for the written file). The long torch names are accepted too, unlisted, so older scripts keep working.
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
DTYPE_AUTO_HELP = ("auto: bf16 where the CPU runs it natively (AVX512-BF16 or AMX) or on CUDA, else fp32; "
                   "the choice is printed once on stderr")
QUANT_CHOICES = ("int8", "w8a8", "int4", "int4-g128")


def unescape(text: str) -> str:
    r"""Turn the shell-friendly escapes \n, \t and \\ into the characters they name."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, metavar="PATH",
        help="a phibook checkpoint, a training run directory (its newest checkpoint), or an HF phi directory "
        "(config.json + safetensors or pytorch_model.bin + tokenizer.json)",
    )
    add_dtype_arg(parser, "auto", f"weights and compute precision (default: auto). {DTYPE_AUTO_HELP}")
    parser.add_argument("--device", default="cpu", help="torch device to run on, e.g. cpu or cuda (default: cpu)")
    add_fast_arg(parser)
    add_quant_args(parser)
    add_compile_arg(parser)


def dtype_name(text: str) -> str:
    """A --dtype value in the one vocabulary (float32 -> fp32, ...); anything else unchanged, for
    argparse's choices check to refuse."""
    return DTYPE_ALIASES.get(text, text)


def add_dtype_arg(parser: argparse.ArgumentParser, default: str, help: str) -> None:
    """--dtype {auto,fp32,bf16,fp16}, the long names (float32, bfloat16, float16) accepted as aliases."""
    parser.add_argument("--dtype", type=dtype_name, choices=DTYPE_CHOICES, default=default, help=help)


def add_quant_args(parser: argparse.ArgumentParser) -> None:
    """--quant and --save-quant (generate, chat, eval, serve)."""
    parser.add_argument(
        "--quant", choices=QUANT_CHOICES, default=None,
        help="quantized linears on the CPU: int8 (weights per output channel, bf16 activations), w8a8 (the same "
        "weights run int8 x int8, activations quantized per call: faster, and a row's result depends a little "
        "on the rows batched with it), or int4 (groups of 32 input channels; int4-g128: groups of 128). Read "
        "from quant-MODE.safetensors beside the checkpoint when it matches the weights, else quantized at load "
        "(default: off)",
    )
    parser.add_argument(
        "--save-quant", action=argparse.BooleanOptionalAction, default=True,
        help="with --quant: write quant-MODE.safetensors (+ .json) beside the checkpoint after quantizing, so the "
        "next load reads it instead of quantizing again (default: on; --no-save-quant for read-only directories)",
    )


def add_compile_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=False,
        help="compile the one-token decode step with torch.compile (inductor) over a fixed-size KV cache: "
        "same tokens, one compile per cache size (tens of seconds). Default: off (see docs/performance.md for "
        "when it pays)",
    )


def add_fast_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fast", action=argparse.BooleanOptionalAction, default=None,
        help="decode through phibook.inference.fast_decode (weights prepacked for oneDNN, two fused matmuls per block; "
        "same logits to 1e-4 in fp32). Default: on for the CPU, off elsewhere",
    )


def use_fast(args: argparse.Namespace, device: str | None) -> bool:
    if args.fast is not None:
        return bool(args.fast)
    return (device or "cpu") == "cpu"


def add_sampling_args(parser: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    """The sampling flags shared by generate and chat."""
    parser.add_argument(
        "--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
        help=f"most tokens to generate per prompt; clamped to what the context leaves (default: {max_new_tokens})",
    )
    parser.add_argument(
        "--temperature", type=float, default=0.0, metavar="T",
        help="sampling temperature; 0 is greedy, always the most likely token (default: 0)",
    )
    parser.add_argument(
        "--top-k", type=int, default=0, metavar="K",
        help="sample only among the K most likely tokens; 0 turns it off (default: 0)",
    )
    parser.add_argument(
        "--top-p", type=float, default=1.0, metavar="P",
        help="nucleus sampling: the smallest set of tokens whose probability reaches P; 1 turns it off (default: 1)",
    )
    parser.add_argument(
        "--repetition-penalty", type=float, default=1.0, metavar="R",
        help="CTRL-style penalty (>1 discourages tokens already in the prompt or output); 1 turns it off (default: 1)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, metavar="S",
        help="seed for sampling, so a run with temperature > 0 can be repeated exactly (default: random)",
    )
    parser.add_argument(
        "--stop", action="append", default=[], metavar="STR",
        help=r"stop when the output contains STR (not printed); repeat the flag for several; \n, \t and \\ "
        "are understood, as in PROMPT. The template's own stop strings are always added",
    )


def register(subparsers) -> None:
    from phibook.inference.templates import TEMPLATES

    parser = subparsers.add_parser(
        "generate",
        help="continue prompts with a model (greedy or sampled), streaming to the terminal",
        description=textwrap.fill(
            "Continue each PROMPT with the model and print the continuation (not the prompt) to stdout. "
            "phi-1.5 is a base model and does not stop by itself (report, section 5): use --template for the "
            "report's prompt formats, --stop and --max-new-tokens to end the output. One prompt streams its "
            "text as it is produced; several prompts run as one batch and are printed in order, each after a "
            "'=== prompt i ===' line on stderr.",
            width=88,
        ),
        epilog=(
            "examples:\n"
            "  phibook generate --model runs/tiny 'Alice had three apples.'\n"
            "  phibook generate --model phi-1_5/ --template step-by-step --max-new-tokens 200 "
            "'Alice had 3 apples and Bob gave her 7. How many apples does Alice have?'\n"
            "  phibook generate --model phi-1_5/ --temperature 0.7 --top-p 0.95 --seed 1 --stop '\\n\\n' A B C\n"
            "  echo 'def fib(n):' | phibook generate --model phi-1_5/ -"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(parser)
    add_sampling_args(parser)
    parser.add_argument(
        "--template", default="completion", choices=list(TEMPLATES), metavar="NAME",
        help="prompt format: " + "; ".join(f"{t.name}: {t.description}" for t in TEMPLATES.values())
        + " (default: completion)",
    )
    parser.add_argument(
        "--no-stream", action="store_true",
        help="print a single prompt's continuation only when it is complete",
    )
    parser.add_argument(
        "--stats", action="store_true",
        help="print timings to stderr at the end, as llama.cpp does: load time, prefill tokens and tokens/s, "
        "decode ms/token and tokens/s",
    )
    parser.add_argument(
        "prompts", nargs="+", metavar="PROMPT",
        help=r"prompt text, where \n and \t are a newline and a tab and \\ is a backslash, as in --stop "
        "(so 'Alice: hi\nBob:' is two lines); '-' reads one prompt from stdin as it is, escapes not "
        "applied (one trailing newline removed)",
    )
    parser.set_defaults(func=run)


def sampling_params_from(args: argparse.Namespace, stop: list[str]):
    from phibook.inference.generate import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=stop,
    ).validate()


def load_generator(args: argparse.Namespace):
    from phibook.inference.generate import Generator

    return Generator.from_path(
        args.model, device=args.device, dtype=args.dtype, fast=use_fast(args, args.device),
        quant=getattr(args, "quant", None), save_quant=getattr(args, "save_quant", True),
        compile=getattr(args, "compile", False),
    )


def read_prompts(prompts: list[str]) -> list[str]:
    """Prompt arguments with the same escapes as --stop (a shell cannot easily type a newline);
    stdin is read as it is, since a file already holds real newlines."""
    out = []
    for p in prompts:
        if p == "-":
            text = sys.stdin.read()
            out.append(text[:-1] if text.endswith("\n") else text)
        else:
            out.append(unescape(p))
    return out


def run(args: argparse.Namespace) -> int:
    from phibook.inference.templates import get_template

    template = get_template(args.template)
    raw = read_prompts(args.prompts)
    prompts = [template.format(p) for p in raw]
    user_stops = [unescape(s) for s in args.stop]
    # Validate the flags before the (slow) model load.
    params = [sampling_params_from(args, template.stops(p) + user_stops) for p in raw]
    generator = load_generator(args)

    if len(prompts) == 1 and not args.no_stream:
        for piece in generator.stream(prompts[0], params[0]):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        results = generator.generate(prompts, params)
        for i, r in enumerate(results):
            sys.stdout.flush()
            print(f"=== prompt {i} ({r.completion_tokens} tokens, {r.finish_reason}) ===", file=sys.stderr, flush=True)
            sys.stdout.write(r.text + "\n")
            sys.stdout.flush()
    if args.stats and generator.last_stats is not None:
        sys.stdout.flush()
        for line in generator.last_stats.lines(generator.load_seconds):
            print(f"phibook generate: {line}", file=sys.stderr)
    return 0

