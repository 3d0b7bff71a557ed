"""Fault injection for tests: a process SIGKILLs itself at a named point.

Every kill-and-resume test lands its kill where it chooses, not where a timer
happens to fall: it starts the command with the environment variable
``PHIBOOK_FAULT_INJECT`` set to comma-separated entries ``point@N`` (or a bare
``point``, which fires the first time the point is reached), and the process
kills itself with SIGKILL (no cleanup, no ``finally``, no atexit: exactly what
a crash or ``kill -9`` does) when the code reaches that point with that count.

The variable is read once, the first time a point is reached; when it is unset
a point costs one dictionary lookup. Child processes inherit it, so a point in
a ``spawn`` worker or in the trainer inside ``phibook demo`` fires too. When
the process that reaches the point was started by ``multiprocessing`` (a pool
worker), its parent and the parent's other children (Linux: found in /proc)
are killed first: the whole job dies as in a crash, rather than a pool waiting
forever for a task whose worker vanished, or orphaned workers waiting forever
for tasks. So a point must never fire inside the test process itself: tests
run the command they kill as a subprocess.

Points (N as each passes it):

``train.step_done@K``
    phibook.train.trainer: step K (1-based) is finished: its metrics line is
    written and flushed and, when step K saves one, its checkpoint is complete;
    step K+1 has not started.
``train.checkpoint_write@K`` (also spelled ``kill_during_checkpoint@K``, or a
bare ``kill_during_checkpoint`` for the first checkpoint)
    phibook.train.state: the checkpoint of step K has model.safetensors and
    optimizer.pt written in its temporary directory
    ``checkpoints/.step_XXXXXXXX.tmp-PID-RANDOM`` (phibook.io.temp_path) but no
    rng.pt or train_state.json, and is not renamed.
``synth.record_done@K``
    phibook.data.synth.run: the K-th document (1-based) that this process
    appends to the output is written and flushed.
``synth.record_write@K``
    phibook.data.synth.run: the first half of the K-th document's line is
    written and flushed, the rest is not (a torn last line).
``filter.chunk_done@K``
    phibook.data.filter.apply: chunk K (0-based position in the plan: all
    chunks of the first input, then of the next) has its scores and its
    done-marker written.
``filter.chunk_write@K``
    phibook.data.filter.apply: chunk K's scores are written and flushed to
    their temporary file ``.work/<name>/.chunk-NNNNN.npy.tmp-PID-RANDOM``, which is not
    yet renamed (no done-marker).
``tokenize.unit_done@K``
    phibook.data.tokenize: work unit K (0-based, the ``unit-0000K`` files) has
    its token files and its sidecar written.
``shards.train_tmp_written@K``, ``shards.val_tmp_written@K``
    phibook.data.shards.ShardWriter (``phibook tokenize``'s assembly and
    ``write_shard_set``): shard K of that split is complete and fsynced under
    its temporary name ``.train-0000K.bin.tmp-PID-RANDOM``, not yet renamed.
``shards.train_done@K``, ``shards.val_done@K``
    the same shard right after its rename to ``train-0000K.bin``.
``io.write@K``
    phibook.io: the K-th atomic commit of this process (a file or a directory,
    1-based) has its data written and fsynced under its temporary name
    ``.NAME.tmp-PID-RANDOM`` and is not yet renamed over NAME.
``pipeline.doc_written@K``
    phibook.pipeline.blocks.PhibookWriter: a task has written (and flushed) its
    K-th document (1-based) to its temporary output file; the task is unfinished.
``pipeline.task_done@R``
    phibook.pipeline: task R of a datatrove step has all its files in place but
    no completion marker yet. Both pipeline points kill the whole `phibook
    pipeline run` process tree (``kill_tree``), since datatrove's worker pools
    come from the ``multiprocess`` package (and a forkserver), not from
    ``multiprocessing``.
"""

from __future__ import annotations

import os
import signal

ENV = "PHIBOOK_FAULT_INJECT"
ANY = -1  # the count of a bare ``point`` entry: fires at the first hit
# Older spellings kept working.
ALIASES = {"kill_during_checkpoint": "train.checkpoint_write"}

_plan: dict[str, set[int]] | None = None


def parse(value: str) -> dict[str, set[int]]:
    """``"a@3, b"`` -> ``{"a": {3}, "b": {ANY}}``; raises ValueError on a count that is no integer."""
    plan: dict[str, set[int]] = {}
    for entry in value.split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, at, count = entry.partition("@")
        name = ALIASES.get(name.strip(), name.strip())
        try:
            n = int(count) if at else ANY
        except ValueError:
            raise ValueError(f"{ENV}: entry {entry!r} wants point@N with an integer N") from None
        plan.setdefault(name, set()).add(n)
    return plan


def _load() -> dict[str, set[int]]:
    global _plan
    if _plan is None:
        _plan = parse(os.environ.get(ENV, ""))
    return _plan


def reset() -> None:
    """Read the environment again at the next point (for tests that change it in-process)."""
    global _plan
    _plan = None


def armed(name: str, n: int) -> bool:
    """True when the environment asks for a kill at point ``name`` with count ``n``."""
    plan = _plan if _plan is not None else _load()
    if not plan:
        return False
    counts = plan.get(name)
    return counts is not None and (n in counts or ANY in counts)


def kill() -> None:
    """SIGKILL this process; in a multiprocessing child, first its parent and the parent's other children."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid:
        siblings = [pid for pid in _children_of(parent.pid) if pid != os.getpid()]
        for pid in [parent.pid, *siblings]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    os.kill(os.getpid(), signal.SIGKILL)


def kill_tree(root: int) -> None:
    """SIGKILL ``root`` and every process below it (Linux: found in /proc), then this process."""
    me = os.getpid()
    # List the whole tree first: once ``root`` dies its children are re-parented and no longer found under it.
    tree, frontier = [], [root]
    while frontier:
        for pid in _children_of(frontier.pop()):
            if pid not in tree:
                tree.append(pid)
                frontier.append(pid)
    for pid in [root, *tree]:  # root first, so it cannot start replacements for its workers
        if pid != me:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    os.kill(me, signal.SIGKILL)


def _children_of(ppid: int) -> list[int]:
    """Pids whose parent is ``ppid`` (empty where there is no /proc)."""
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
            if int(stat[stat.rfind(b")") + 2:].split()[1]) == ppid:
                found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


def point(name: str, n: int) -> None:
    """A named fault point: dies here when the environment names ``name@n`` (see the module docstring)."""
    if armed(name, n):
        kill()
