"""``phibook chat``: an interactive Alice/Bob conversation in the report's chat format."""

from __future__ import annotations

import argparse
import sys
import textwrap

from phibook.commands.generate import add_model_args, add_sampling_args, unescape

HELP = "commands: /reset forgets the conversation, /exit (or end of input) quits"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="talk to a model in the report's chat format (Alice: ... Bob:), keeping the history",
        description=textwrap.fill(
            "Interactive chat in the report's chat mode (section 5): each line you type becomes "
            "'Alice: LINE', the model answers as 'Bob:' and its turn ends when it starts Alice's next line "
            "(the stop strings '\\nAlice:' and 'Alice:'). The whole conversation is the prompt of every turn; "
            "when it would not leave room for --max-new-tokens in the model's context, the oldest turns are "
            "dropped. Bob's reply streams to stdout. Works with a pipe on stdin (one message per line). "
            + HELP + ".",
            width=88,
        ),
        epilog="example: phibook chat --model phi-1_5/ --temperature 0.7 --top-p 0.95",
    )
    add_model_args(parser)
    add_sampling_args(parser, max_new_tokens=200)
    parser.add_argument(
        "--show-prompt", action="store_true",
        help="print the full prompt sent to the model to stderr before each reply (for debugging)",
    )
    parser.set_defaults(func=run)


class _ReplyPrinter:
    """Streams Bob's reply without its leading space and trailing blank lines."""

    def __init__(self) -> None:
        self.started = False
        self.pending = ""  # trailing whitespace, written only if more text follows

    def __call__(self, _row: int, piece: str) -> None:
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return
            self.started = True
        text = self.pending + piece
        body = text.rstrip()
        self.pending = text[len(body) :]
        sys.stdout.write(body)
        sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    from phibook.commands.generate import load_generator, sampling_params_from
    from phibook.errors import PhibookError
    from phibook.inference.templates import BOT_NAME, USER_NAME, fit_chat_prompt, get_template

    template = get_template("chat")
    params = sampling_params_from(args, template.stops() + [unescape(s) for s in args.stop])
    generator = load_generator(args)
    tokenizer, context = generator.tokenizer, generator.context
    # Room for the reply: max_new_tokens, but never more than half the context,
    # so a long --max-new-tokens still leaves space for some history.
    limit = context - min(params.max_new_tokens, context // 2)

    interactive = sys.stdin.isatty()
    print(f"chatting with {args.model} as {USER_NAME}; the model is {BOT_NAME}. {HELP}.", file=sys.stderr)
    turns: list[tuple[str, str]] = []
    while True:
        if interactive:
            sys.stdout.write(f"{USER_NAME}: ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:  # EOF
            break
        message = line.strip()
        if not message:
            continue
        if message in ("/exit", "/quit"):
            break
        if message == "/reset":
            turns.clear()
            print("(conversation reset)", file=sys.stderr)
            continue
        if message.startswith("/"):
            print(f"unknown command {message!r}; {HELP}", file=sys.stderr)
            continue

        prompt, dropped = fit_chat_prompt(turns, message, lambda t: len(tokenizer.encode(t)), limit)
        if dropped:
            turns = turns[dropped:]
            print(f"(dropped the {dropped} oldest turn(s) to fit the {context}-token context)", file=sys.stderr)
        if args.show_prompt:
            print(f"--- prompt ---\n{prompt}\n--- end of prompt ---", file=sys.stderr)
        sys.stdout.write(f"{BOT_NAME}: ")
        sys.stdout.flush()
        try:
            result = generator.run([prompt], params, on_delta=_ReplyPrinter())[0]
        except PhibookError as exc:
            sys.stdout.write("\n")
            print(f"phibook chat: error: {exc}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        turns.append((message, result.text.strip()))
    return 0
