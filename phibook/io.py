"""Crash-safe file writing: the one place that renames a finished file into place.

Contract (docs/architecture.md, "io and documents"):

* Every write goes to a temporary name beside its target, ``.NAME.tmp-PID-RANDOM``
  (``temp_path``), is flushed and fsynced, renamed over the target with
  ``os.replace`` and then the directory is fsynced, so after a crash a reader
  sees either the old file or the new one, never half of one, and the rename
  itself survives a power loss.
* ``write_bytes`` / ``write_text`` / ``write_json`` write a whole value;
  ``open_atomic`` is the same for a streaming writer (yields the open temporary
  file; on an exception the temporary file is removed and the target is untouched).
* ``atomic_directory`` does the same for a directory: write into a temporary
  directory, swap it into place.
* ``sweep`` removes what a killed writer left: only names of the pattern above,
  and only those whose PID is no longer alive, so a temporary file that a live
  process (another worker, a concurrent run) is writing survives. A recycled PID
  keeps a stale leftover until that PID dies again; that costs disk, never data.

Fault point (phibook.faults): ``io.write@K`` -- the K-th atomic commit (file or
directory, 1-based, counted per process) has its data written and fsynced under
its temporary name and is not yet renamed.

Base layer: no torch, no numpy, nothing from phibook but ``faults``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from phibook import faults

TEMP_MARK = ".tmp-"
# ".NAME.tmp-PID-RANDOM": the leading dot hides it from globs such as "*.bin", the PID
# lets the sweeper tell a dead writer's leftover from a live one's work.
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-(?P<tag>[0-9a-f]{8})$")

_commits = 0  # atomic commits of this process: the count of the "io.write" fault point


def temp_path(target: str | os.PathLike[str]) -> Path:
    """A fresh temporary name beside ``target`` (``.NAME.tmp-PID-RANDOM``); nothing is created."""
    target = Path(target)
    return target.with_name(f".{target.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def temp_target(path: str | os.PathLike[str]) -> str | None:
    """The target name a temporary name stands for, or None when ``path`` is no temporary name."""
    m = TEMP_NAME.match(Path(path).name)
    return m.group("name") if m else None


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Persist a directory's entries (a rename is durable only once its directory is synced)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms that cannot open a directory: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def commit(tmp: str | os.PathLike[str], target: str | os.PathLike[str], *, synced: bool = False) -> None:
    """Rename a finished temporary file or directory (named by ``temp_path``) over ``target``.

    Its data is fsynced first (skip with ``synced=True`` when the writer already did),
    the directory after the rename. For writers that can only write to a path (a
    library's ``save_file``, a file that grows over many calls); everything else uses
    ``open_atomic`` / ``write_*`` / ``atomic_directory``, which call this."""
    tmp, target = Path(tmp), Path(target)
    if not synced:
        _sync(tmp)
    _fault_point()
    os.replace(tmp, target)
    fsync_dir(target.parent)


def _sync(path: Path) -> None:
    if path.is_dir():
        for f in path.rglob("*"):
            if f.is_file() and not f.is_symlink():
                _fsync_file(f)
        fsync_dir(path)
    else:
        _fsync_file(path)


def _fault_point() -> None:
    global _commits
    _commits += 1
    faults.point("io.write", _commits)  # test hook: the data is durable under its temporary name


@contextmanager
def open_atomic(path: str | os.PathLike[str], mode: str = "w", encoding: str = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for a streaming writer; it replaces ``path``
    (fsync, rename, fsync of the directory) only when the block succeeds, and is removed
    when it raises."""
    if mode not in ("w", "wb", "x", "xb"):
        raise ValueError(f"open_atomic writes a new file (mode 'w' or 'wb'), not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, mode.replace("x", "w"), **({} if "b" in mode else {"encoding": encoding})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        commit(tmp, path, synced=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    with open_atomic(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` atomically and durably."""
    with open_atomic(path, "w", encoding=encoding) as f:
        f.write(text)


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2, **json_options: Any) -> None:
    """Replace ``path`` with ``obj`` as JSON (plus a final newline) atomically and durably;
    ``json_options`` go to ``json.dumps`` (``sort_keys``, ``ensure_ascii``, ``default`` ...)."""
    write_text(path, json.dumps(obj, indent=indent, **json_options) + "\n")


def copy_file(src: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Replace ``path`` with a copy of ``src`` atomically and durably."""
    with open(src, "rb") as fin, open_atomic(path, "wb") as fout:
        shutil.copyfileobj(fin, fout)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``target`` when the block succeeds.

    On success the files are fsynced, an existing ``target`` is renamed aside to another
    temporary name (POSIX cannot rename a directory over a non-empty one), the new one
    is renamed into place and the old one deleted; a crash between the two renames
    leaves the old directory under a sweepable temporary name (the window the old
    checkpoint writers had too; POSIX offers no portable swap). On an exception the
    temporary directory is removed and ``target`` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    _sync(tmp)
    if not (target.exists() or target.is_symlink()):
        commit(tmp, target, synced=True)
        return
    _fault_point()  # before the old one moves: a kill here leaves the old directory in place
    old = temp_path(target)
    os.replace(target, old)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    _remove(old)


def pid_alive(pid: int) -> bool:
    """True when a process with this PID exists (this process counts as alive)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    # A SIGKILLed writer whose parent died too is reaped by PID 1, which in a container may do so
    # late or never: a zombie writes nothing more, so it counts as dead (Linux: its /proc state).
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")
    except FileNotFoundError:  # gone since the signal, or a system without /proc
        return not os.path.isdir("/proc/self")
    except OSError:
        return True


def sweep(directory: str | os.PathLike[str], names: Iterable[str] | None = None) -> list[Path]:
    """Remove the stale temporary files and directories in ``directory`` (not below it).

    Only names of the ``temp_path`` pattern are touched, only those whose writer's PID
    is dead, and, when ``names`` is given, only temporaries of those target names.
    Returns what was removed, sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    wanted = None if names is None else set(names)
    removed = []
    for child in directory.iterdir():
        m = TEMP_NAME.match(child.name)
        if m is None or (wanted is not None and m.group("name") not in wanted):
            continue
        if pid_alive(int(m.group("pid"))):
            continue
        _remove(child)
        removed.append(child)
    return sorted(removed)
