"""Topics, prompt templates and the plan of documents to generate.

A job's N documents are planned up front as ``DocSpec``s, each a pure function
of (seed, index): which topic, genre, audience, style and web sample. That is
what makes a killed job resumable and a ``--shard i/N`` split exact: the same
index always means the same document, and its id hashes the spec.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
import tomllib
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from phibook import documents
from phibook.errors import PhibookError

PLACEHOLDERS = {"topic", "subject", "audience", "style", "web_sample"}
AUDIENCES = [
    "young children", "middle school students", "high school students",
    "college students", "adults learning on their own", "curious teenagers",
]
STYLES = ["friendly", "formal", "playful", "concise", "detailed", "conversational"]


@dataclass(frozen=True)
class Topic:
    subject: str
    kind: str  # math | science | daily | mind | coding | knowledge
    name: str


@dataclass(frozen=True)
class Template:
    name: str
    description: str
    prompt: str
    kinds: tuple[str, ...]


@dataclass(frozen=True)
class DocSpec:
    index: int
    seed: int
    topic: str
    subject: str
    subject_kind: str
    genre: str
    audience: str
    style: str
    web_sample_id: str | None = None
    web_sample: str | None = None

    def to_meta(self) -> dict[str, Any]:
        meta = asdict(self)
        meta.pop("web_sample")
        return meta


def _data_file(name: str) -> Path:
    return Path(str(resources.files(__package__) / name))


def load_topics(path: str | Path | None = None) -> list[Topic]:
    """Read a topic file: '## Subject [kind]' headers, then one topic a line.

    A plain list (no headers) is accepted too; its topics get subject 'General'.
    """
    path = Path(path) if path else _data_file("seed_topics.txt")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise PhibookError(f"cannot read topic file {path}: {exc}") from exc
    subject, kind, topics = "General", "knowledge", []
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or (line.startswith("#") and not line.startswith("##")):
            continue
        if line.startswith("##"):
            head = line[2:].strip()
            if head.endswith("]") and "[" in head:
                head, kind = head[:-1].split("[", 1)
                kind = kind.strip()
            subject = head.strip()
            if not subject:
                raise PhibookError(f"{path}:{lineno}: empty subject header")
            continue
        topics.append(Topic(subject, kind, line))
    if not topics:
        raise PhibookError(f"topic file {path} holds no topics (one topic a line, '## Subject [kind]' headers)")
    return topics


def load_templates(path: str | Path | None = None) -> dict[str, Template]:
    """Read prompt templates (TOML, one table per genre) and check their placeholders."""
    path = Path(path) if path else _data_file("templates.toml")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PhibookError(f"cannot read template file {path}: {exc}") from exc
    templates = {}
    for name, table in data.items():
        if not isinstance(table, dict) or "prompt" not in table:
            raise PhibookError(f"{path}: template [{name}] needs a 'prompt' string")
        fields = {f for _, f, _, _ in string.Formatter().parse(table["prompt"]) if f is not None}
        unknown = fields - PLACEHOLDERS
        if unknown:
            raise PhibookError(
                f"{path}: template [{name}] uses unknown placeholder(s) {sorted(unknown)}; "
                f"allowed: {sorted(PLACEHOLDERS)}"
            )
        templates[name] = Template(
            name, table.get("description", ""), table["prompt"], tuple(table.get("kinds", ["arithmetic"]))
        )
    if not templates:
        raise PhibookError(f"template file {path} defines no templates")
    return templates


def render_prompt(template: Template, spec: DocSpec) -> str:
    web = ""
    if spec.web_sample:
        web = f"For inspiration (do not copy it), here is an unrelated text sample:\n{spec.web_sample}"
    text = template.prompt.format(
        topic=spec.topic, subject=spec.subject, audience=spec.audience, style=spec.style, web_sample=web
    )
    return text.strip() + "\n"


def load_web_samples(path: str | Path, max_chars: int = 1000) -> list[tuple[str, str]]:
    """(id, excerpt) pairs from a document JSONL file, for prompt diversity."""
    path = Path(path)
    samples = []
    try:
        for line in documents.read_lines(path):
            if line.doc is not None:
                samples.append((documents.doc_id(line.doc), line.doc["text"][:max_chars]))
    except OSError as exc:
        raise PhibookError(f"cannot read web samples {path}: {exc}") from exc
    if not samples:
        raise PhibookError(f"web sample file {path} holds no documents")
    return samples


def plan(
    index: int,
    seed: int,
    topics: list[Topic],
    templates: dict[str, Template],
    web_samples: list[tuple[str, str]] | None = None,
) -> DocSpec:
    """The spec of document ``index``: a pure function of its arguments."""
    rng = random.Random(f"{seed}:{index}")
    topic = rng.choice(topics)
    genre = rng.choice(sorted(templates))
    sample_id = sample = None
    if web_samples:
        sample_id, sample = rng.choice(web_samples)
    return DocSpec(
        index=index,
        seed=seed,
        topic=topic.name,
        subject=topic.subject,
        subject_kind=topic.kind,
        genre=genre,
        audience=rng.choice(AUDIENCES),
        style=rng.choice(STYLES),
        web_sample_id=sample_id,
        web_sample=sample,
    )


def doc_id(spec: DocSpec, teacher_fingerprint: str) -> str:
    """Stable id: what produced the document (spec + teacher), hashed."""
    payload = json.dumps({"spec": spec.to_meta(), "teacher": teacher_fingerprint}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]
