"""`phibook synth run`: plan N documents, ask a teacher for each, append to JSONL.

Resumable by construction: document ``i`` always has the same spec and id, the
output is append-only with one flushed line per document, and a rerun reads
the ids already written (dropping a half-written last line left by a kill)
and asks only for the rest. ``--shard i/N`` takes the indices congruent to i.
A rerun also removes what a kill left of the side files: the stats file's
temporary copy and a torn last line of the failures log. Tests kill a job at
a chosen document with the fault points ``synth.record_done`` and
``synth.record_write`` (phibook.faults).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phibook import documents, faults, io
from phibook.data.synth.prompts import DocSpec, Template, Topic, doc_id, plan, render_prompt
from phibook.data.synth.teachers import Teacher, TeacherFailure
from phibook.errors import PhibookError


@dataclass
class SynthStats:
    planned: int = 0
    already_done: int = 0
    written: int = 0
    failed: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    failures: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        rate = self.written / self.seconds if self.seconds else 0.0
        return (
            f"{self.written} written, {self.already_done} already there, {self.failed} failed, "
            f"{self.retries} retries, {self.completion_tokens} completion tokens, "
            f"{rate:.1f} docs/s over {self.seconds:.1f}s"
        )


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise PhibookError(f"--shard must look like i/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise PhibookError(f"--shard {text}: need 0 <= i < N")
    return i, n


def drop_torn_tail(path: Path) -> bytes:
    """Cut a half-written last line (from a kill) off ``path``; returns the whole lines kept."""
    with path.open("rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            f.truncate(end)
    return data[:end]


def remove_partial_files(out: Path) -> list[Path]:
    """Delete the stats file's temporary copies (``_write_stats``) a killed run left beside ``out``
    and cut a torn line off the end of its failures log."""
    stale = io.sweep(out.parent, names=[_stats_path(out).name])
    if _failures_path(out).exists():
        drop_torn_tail(_failures_path(out))
    return stale


def existing_ids(path: Path) -> set[str]:
    """Ids already in the output; a torn last line (from a kill) is cut off first, so its document
    is redone. A line that is not a document stops the run with its ``file:line``."""
    if not path.exists():
        return set()
    drop_torn_tail(path)
    hint = " (the output of an earlier run; fix or remove that line, or write to a new file)"
    return {str(line.doc["id"]) for line in documents.read_lines(path, fill_id=True, bad_hint=hint)
            if line.doc is not None}


async def _run(
    specs: list[tuple[DocSpec, str]],
    teacher: Teacher,
    templates: dict[str, Template],
    out: Path,
    concurrency: int,
    stats: SynthStats,
    progress: bool,
) -> None:
    from tqdm import tqdm

    sem = asyncio.Semaphore(concurrency)
    start = time.perf_counter()
    bar = tqdm(total=len(specs), desc="synth", unit="doc", disable=not progress, file=sys.stderr)
    info = teacher.describe()

    with out.open("a", encoding="utf-8") as sink:

        async def one(spec: DocSpec, did: str) -> None:
            template = templates[spec.genre]
            prompt = render_prompt(template, spec)
            async with sem:
                try:
                    reply = await teacher.generate(spec, prompt)
                except TeacherFailure as exc:
                    stats.failed += 1
                    stats.retries += exc.attempts - 1
                    stats.failures.append({"index": spec.index, "id": did, "error": str(exc), "attempts": exc.attempts})
                    bar.set_postfix(failed=stats.failed, refresh=False)
                    bar.update(1)
                    return
            stats.retries += reply.attempts - 1
            stats.prompt_tokens += reply.prompt_tokens
            stats.completion_tokens += reply.completion_tokens
            doc = {
                "id": did,
                "text": reply.text,
                "source": "synthetic",
                "meta": {**spec.to_meta(), "template": template.name, **info, **reply.meta},
            }
            # One write + flush per document: a kill loses at most this line.
            line = json.dumps(doc, ensure_ascii=False) + "\n"
            if faults.armed("synth.record_write", stats.written + 1):  # test hook: leave a torn line
                sink.write(line[: len(line) // 2])
                sink.flush()
                faults.kill()
            sink.write(line)
            sink.flush()
            stats.written += 1
            faults.point("synth.record_done", stats.written)
            elapsed = time.perf_counter() - start
            bar.set_postfix(
                docs_s=f"{stats.written / elapsed:.1f}", tok_s=f"{stats.completion_tokens / elapsed:.0f}",
                failed=stats.failed, refresh=False,
            )
            bar.update(1)

        await teacher.start()
        try:
            await asyncio.gather(*(one(spec, did) for spec, did in specs))
        finally:
            await teacher.close()
            bar.close()


def run_synth(
    out: str | Path,
    num_docs: int,
    teacher: Teacher,
    topics: list[Topic],
    templates: dict[str, Template],
    web_samples: list[tuple[str, str]] | None = None,
    seed: int = 0,
    shard: tuple[int, int] = (0, 1),
    concurrency: int = 8,
    progress: bool = True,
) -> SynthStats:
    if num_docs < 0:
        raise PhibookError(f"--num-docs must be >= 0, got {num_docs}")
    if concurrency < 1:
        raise PhibookError(f"--concurrency must be >= 1, got {concurrency}")
    if not topics:
        raise PhibookError("the topic list is empty")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_partial_files(out)
    done = existing_ids(out)
    stats = SynthStats()
    todo = []
    fp = teacher.fingerprint()
    for index in range(shard[0], num_docs, shard[1]):
        spec = plan(index, seed, topics, templates, web_samples)
        did = doc_id(spec, fp)
        stats.planned += 1
        if did in done:
            stats.already_done += 1
        else:
            todo.append((spec, did))
    start = time.perf_counter()
    if todo:
        asyncio.run(_run(todo, teacher, templates, out, concurrency, stats, progress))
    stats.seconds = time.perf_counter() - start
    if stats.failures:
        with _failures_path(out).open("a", encoding="utf-8") as f:
            for rec in stats.failures:
                f.write(json.dumps(rec) + "\n")
    _write_stats(out, stats)
    return stats


def _stats_path(out: Path) -> Path:
    return out.with_suffix(out.suffix + ".stats.json")


def _failures_path(out: Path) -> Path:
    return out.with_suffix(out.suffix + ".failures.jsonl")


def _write_stats(out: Path, stats: SynthStats) -> None:
    path = _stats_path(out)
    io.write_json(path, {k: v for k, v in stats.__dict__.items() if k != "failures"})
