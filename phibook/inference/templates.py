"""The report's prompt formats (section 5), as named templates.

phi-1.5 is a base model: it was never tuned to follow a chat or instruction
format, and it does not stop by itself. Section 5 shows the formats that work
with it anyway, because its synthetic textbooks are full of exercises,
question/answer pairs and dialogues. Each template here reproduces one of those
formats exactly and carries the stop strings that end the answer where the
report's examples show the model drifting into a new turn or exercise.

    completion    PROMPT                                  (report: "Direct completion")
    step-by-step  PROMPT\nLet's think step by step.\n     (report: chain of thought)
    qa            PROMPT\nAnswer:                         (report: "[Question]\nAnswer:")
    chat          Alice: PROMPT\nBob:                     (report: "Person A: [chat]\nPerson B:")
    code          \"\"\"PROMPT\"\"\"\n                       (report: "Python coding", \"\"\"[Instructions]\"\"\")
                  or, when PROMPT starts with "def ", its first line is the signature and the
                  rest the docstring: def f(x):\n    \"\"\"REST\"\"\"\n   (phi-1 / HumanEval style)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from phibook.errors import PhibookError

# The names the chat format uses; the report's chat examples are Alice and Bob.
USER_NAME = "Alice"
BOT_NAME = "Bob"


@dataclass(frozen=True)
class Template:
    name: str
    description: str
    render: Callable[[str], str]
    stop: tuple[str, ...] = ()
    # Some formats pick their stop strings from the prompt (code: a signature
    # prompt ends at the next top-level statement, a docstring prompt does not).
    stop_for: Callable[[str], tuple[str, ...]] | None = field(default=None, compare=False)

    def format(self, prompt: str) -> str:
        """The text to feed the model for ``prompt``."""
        return self.render(prompt)

    def stops(self, prompt: str = "") -> list[str]:
        """Default stop strings for this template (and this prompt)."""
        return list(self.stop_for(prompt) if self.stop_for else self.stop)


def _step_by_step(prompt: str) -> str:
    return f"{prompt.rstrip()}\nLet's think step by step.\n"


def _qa(prompt: str) -> str:
    return f"{prompt.rstrip()}\nAnswer:"


def _chat(prompt: str) -> str:
    return f"{USER_NAME}: {prompt.strip()}\n{BOT_NAME}:"


def _is_signature(prompt: str) -> bool:
    return prompt.lstrip().startswith(("def ", "async def "))


def _code(prompt: str) -> str:
    if not _is_signature(prompt):
        return f'"""{prompt.strip()}"""\n'
    signature, _, doc = prompt.strip().partition("\n")
    signature = signature.rstrip()
    if not signature.endswith(":"):
        signature += ":"
    doc = doc.strip()
    if not doc:
        return f"{signature}\n"
    return f'{signature}\n    """{doc}"""\n'


# HumanEval's stop set: the function body ends at the next top-level statement.
_FUNCTION_END = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


def _code_stops(prompt: str) -> tuple[str, ...]:
    # After a bare docstring the model writes the whole program (imports,
    # functions, a main block), as the report's examples show: no stop there.
    return _FUNCTION_END if _is_signature(prompt) else ()


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template("completion", "the text as is; the model continues it (report: direct completion)", lambda p: p),
        Template(
            "step-by-step",
            "appends \"\\nLet's think step by step.\\n\" (report: chain-of-thought prompting)",
            _step_by_step,
        ),
        Template(
            "qa",
            'question, then "\\nAnswer:" (report: "[Question]\\nAnswer:"); stops at a new exercise or question',
            _qa,
            stop=("\nExercise:", "\nQuestion:"),
        ),
        Template(
            "chat",
            f'"{USER_NAME}: PROMPT\\n{BOT_NAME}:" (report: chat mode); stops when {USER_NAME} speaks again',
            _chat,
            stop=(f"\n{USER_NAME}:", f"{USER_NAME}:"),
        ),
        Template(
            "code",
            'wraps a description in a docstring, """PROMPT""" (report: Python coding); a prompt whose first '
            'line is "def ..." becomes that signature with the rest as its docstring, ending at the next '
            "top-level statement",
            _code,
            stop_for=_code_stops,
        ),
    )
}


def get_template(name: str) -> Template:
    """The template called ``name``; PhibookError lists the valid names otherwise."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise PhibookError(f"unknown template {name!r}; valid templates: {', '.join(TEMPLATES)}") from None


# --------------------------------------------------------------------------- chat history


def chat_transcript(turns: list[tuple[str, str]], message: str) -> str:
    """The chat prompt for ``message`` after earlier (user, bot) ``turns``, oldest first.

    Alice: first question\\nBob: first answer\\nAlice: MESSAGE\\nBob:
    """
    past = "".join(f"{USER_NAME}: {user.strip()}\n{BOT_NAME}: {bot.strip()}\n" for user, bot in turns)
    return past + _chat(message)


def fit_chat_prompt(
    turns: list[tuple[str, str]], message: str, count_tokens: Callable[[str], int], limit: int
) -> tuple[str, int]:
    """(prompt, number of oldest turns dropped) so that the prompt has at most ``limit`` tokens.

    Whole turns are dropped, oldest first; the new message is always kept, even
    when it alone is over the limit (the generator then reports the lengths).
    """
    for dropped in range(len(turns) + 1):
        prompt = chat_transcript(turns[dropped:], message)
        if count_tokens(prompt) <= limit:
            return prompt, dropped
    return prompt, len(turns)
