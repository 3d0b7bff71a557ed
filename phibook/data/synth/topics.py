"""`phibook synth topics`: expand the seed taxonomy into N distinct topics.

The report seeded generation with about 20K topics. A teacher LLM lists
subtopics of each seed topic; the built-in teacher instead crosses each seed
with a fixed set of angles (offline, deterministic). Either way the result is
deduplicated on a normalized form and written as a topic file that
`phibook synth run --topics` reads.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from phibook import io
from phibook.data.synth.prompts import DocSpec, Topic
from phibook.data.synth.teachers import Teacher, TeacherFailure
from phibook.errors import PhibookError

ANGLES = [
    "an introduction", "everyday examples", "common mistakes", "a step-by-step guide", "history",
    "questions children ask", "a hands-on activity", "why it matters", "a comparison with related ideas",
    "practice problems", "a story that explains it", "key vocabulary",
]
EXPAND_PROMPT = (
    "List {k} specific, distinct subtopics of \"{topic}\" (subject: {subject}) that a textbook could "
    "teach. One subtopic per line, no numbering, no explanations."
)


def normalize(topic: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", topic.lower()).strip()


def _clean_line(line: str) -> str:
    return re.sub(r"^\s*(?:[-*\u2022]|\d+[.)])\s*", "", line).strip().strip('"').strip()


def expand_builtin(seeds: list[Topic], num: int) -> list[Topic]:
    out: list[Topic] = []
    for angle in ANGLES:
        for t in seeds:
            out.append(Topic(t.subject, t.kind, f"{t.name}: {angle}"))
    return out[:num]


async def _expand_teacher(seeds: list[Topic], num: int, teacher: Teacher, per_seed: int) -> list[Topic]:
    await teacher.start()
    try:
        async def one(i: int, t: Topic) -> list[Topic]:
            spec = DocSpec(i, 0, t.name, t.subject, t.kind, "topics", "", "")
            prompt = EXPAND_PROMPT.format(k=per_seed, topic=t.name, subject=t.subject)
            try:
                reply = await teacher.generate(spec, prompt)
            except TeacherFailure:
                return []
            return [Topic(t.subject, t.kind, s) for s in map(_clean_line, reply.text.splitlines()) if s]

        lists = await asyncio.gather(*(one(i, t) for i, t in enumerate(seeds)))
    finally:
        await teacher.close()
    return [t for lst in lists for t in lst]


def expand_topics(seeds: list[Topic], num: int, teacher: Teacher | None = None) -> list[Topic]:
    if num < 1:
        raise PhibookError(f"--num must be >= 1, got {num}")
    if teacher is None or teacher.name == "builtin":
        candidates = list(seeds) + expand_builtin(seeds, num)
    else:
        per_seed = max(5, -(-num // max(1, len(seeds))) + 5)
        candidates = list(seeds) + asyncio.run(_expand_teacher(seeds, num, teacher, per_seed))
    seen: set[str] = set()
    unique = []
    for t in candidates:
        key = normalize(t.name)
        if key and key not in seen:
            seen.add(key)
            unique.append(t)
    return unique[:num]


def write_topics(topics: list[Topic], path: str | Path) -> None:
    """Write in the seed format (subject headers), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines, current = [], None
    for t in sorted(topics, key=lambda t: (t.subject, t.kind)):
        if (t.subject, t.kind) != current:
            current = (t.subject, t.kind)
            lines.append(f"## {t.subject} [{t.kind}]")
        lines.append(t.name)
    io.write_text(path, "\n".join(lines) + "\n")
