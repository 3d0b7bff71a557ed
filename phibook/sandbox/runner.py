"""Run model-written Python where it can neither forge its verdict nor see the host.

Each program runs in a fresh bubblewrap jail (phibook.sandbox.jail: namespaces, a bare read-only
root, seccomp, uid 65534, rlimits, a size-capped tmpfs) through a small launcher
(phibook/sandbox/launcher.py). Its tests run in a second jail, the harness's process, which
holds no program code: it calls the program's functions across a pipe, where only tagged data
crosses, and compares the answers itself. The parent trusts one thing only: a line on the
harness's private pipe carrying a random nonce. A crash, a signal, a limit, a timeout or a
missing line is a failure with its reason; exit statuses and output never decide a verdict.

The jail is required. When it cannot be built, ``require_sandbox`` (and every run) raises
``JailUnavailable`` with what is missing and how to install it; only ``unsafe=True``
(``phibook eval --unsafe-no-sandbox``) runs programs without it, and ``describe()`` records that.
"""

from __future__ import annotations

import ast
import json
import marshal
import math
import os
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phibook.errors import PhibookError
from phibook.sandbox import jail

LAUNCHER = str(Path(__file__).with_name("launcher.py"))
MAX_OUTPUT_BYTES = 1 << 20  # stdout/stderr kept per program; the rest is read and discarded
MAX_VERDICT_BYTES = 1 << 20  # the harness's lines (its introspection when asked for)
SETUP_ATTEMPTS = 2  # a jail that fails to start is retried once before the run stops
_CAPS: dict[str, Any] | None = None
_BWRAP: jail.Bwrap | None = None


class SandboxError(PhibookError):
    """The jail or the launcher failed before the program started (never the program's doing)."""


JailUnavailable = jail.JailUnavailable


@dataclass
class SandboxResult:
    """How one program ended. ``status``: "ok" (ran to its end and the launcher said so), "error"
    (raised, exited or was refused before its end), "timeout" (wall clock or CPU limit), "oom"
    (MemoryError under the memory limit) or "killed" (a signal). ``reason`` says why in words;
    ``value`` is what the called function returned (see ``run_python``) and ``value_type`` the
    name of its type ("NoneType" when it returned None; "" when nothing was called).
    ``harness_state`` (only when asked for) lists the harness process's modules, threads and
    code files before and after the tests."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    reason: str = ""
    value: Any = None
    value_type: str = ""
    harness_state: dict | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class CheckOutcome:
    """pass/fail of a program against its tests, with the run that decided it."""

    passed: bool
    result: SandboxResult = field(repr=False)

    @property
    def status(self) -> str:
        return self.result.status

    @property
    def reason(self) -> str:
        return "passed" if self.passed else self.result.reason

    def __bool__(self) -> bool:
        return self.passed


# --------------------------------------------------------------------------- policy


def require_sandbox() -> dict[str, Any]:
    """The verified capabilities, or JailUnavailable naming what failed; call before a long run."""
    caps = capabilities()
    failed = [k for k, v in caps["verified"].items() if not v]
    if failed:
        raise JailUnavailable(f"the code sandbox was built, but these checks failed inside it: {', '.join(failed)}; "
                              "phibook will not run model-written code in a jail it could not verify; "
                              f"{jail.INSTALL_HINT}")
    return caps


def bwrap() -> jail.Bwrap:
    """The bubblewrap this process uses (found and checked once)."""
    global _BWRAP
    if _BWRAP is None:
        _BWRAP = jail.find_bwrap()
    return _BWRAP


def describe(unsafe: bool = False) -> dict[str, Any]:
    """What the results JSON records about how programs ran."""
    if unsafe:
        return {"mode": "unsafe-no-sandbox", "note": "programs ran unconfined (--unsafe-no-sandbox): rlimits "
                "and the two-process verdict only; no namespaces, no seccomp"}
    caps = capabilities()
    return {"mode": "bubblewrap", "tool": caps["tool"], "verified": caps["verified"]}


# --------------------------------------------------------------------------- running


def run_python(
    code: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    cpu_s: float | None = None,
    stdin: str = "",
    max_file_mb: int = 64,
    call: str | None = None,
    unsafe: bool = False,
) -> SandboxResult:
    """Run ``code`` as a module in the sandbox and report how it ended.

    "ok" means its top level ran to the end (and, with ``call``, that ``call()`` returned too:
    ``value`` is then its result when that is a number, string, bool or None; Fraction, Decimal
    and numpy numbers come as int or float; ``value_type`` names the type it returned). ``timeout_s`` is
    the program's CPU time (``cpu_s`` overrides it), so a verdict does not depend on how busy the
    machine is; a program that waits instead of computing is stopped by the wall clock at
    ``wall_limit(timeout_s)``. Either ends it as "timeout";
    ``max_file_mb`` caps the whole work directory (its tmpfs) and each file. ``unsafe`` runs it
    without the jail (``phibook eval --unsafe-no-sandbox``): rlimits and the verdict channel only;
    no namespaces, no seccomp, the host's files and network in reach.
    """
    return _run({"program": code, "call": call}, timeout_s, memory_mb, cpu_s, stdin, max_file_mb, unsafe)


def check_program(program: str, tests: str, *, entry: list[str] | None = None, timeout_s: float = 10.0,
                  memory_mb: int = 512, unsafe: bool = False, report_harness: bool = False) -> CheckOutcome:
    """HumanEval/MBPP check: passed means ``tests`` ran to their end in the harness's process,
    calling the program's functions in the program's process (see launcher.py for what
    crosses). The program runs as module "solution", so an ``if __name__ == "__main__":`` block
    in it does not run. The tests see the builtins; a name of the program's that is a builtin's
    name reaches them only when listed in ``entry`` (the function under test, as MBPP's ``sum``).
    ``report_harness`` fills ``result.harness_state`` (see SandboxResult)."""
    result = _run({"program": program, "tests": tests, "entry": entry or [], "introspect": report_harness},
                  timeout_s, memory_mb, None, "", 64, unsafe)
    return CheckOutcome(result.ok and result.value == "pass", result)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def check_many(pairs: list[tuple[str, str]] | list[tuple[str, str, list[str]]], *, workers: int | None = None,
               **limits: Any) -> list[CheckOutcome]:
    """``check_program`` over many (program, tests) or (program, tests, entry) tuples in parallel;
    outcomes in input order."""
    from concurrent.futures import ThreadPoolExecutor

    def one(p: tuple) -> CheckOutcome:
        return check_program(p[0], p[1], entry=list(p[2]) if len(p) > 2 else None, **limits)

    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        return list(pool.map(one, pairs))


# A time limit is CPU seconds, not wall seconds: on a shared machine a program waits for a core,
# and a wall-clock limit then fails correct code (MBPP 123's reference solution needs ~5 CPU s
# of its 10 s and took 12 s of wall time at load 5). The wall clock is only the backstop for a
# program that sleeps or blocks: WALL_FACTOR times the limit, plus the jail's start-up slack.
WALL_FACTOR = 3.0
WALL_SLACK_S = 5.0


def wall_limit(timeout_s: float) -> float:
    """Wall seconds after which a program with a ``timeout_s`` CPU limit is stopped anyway."""
    return WALL_FACTOR * timeout_s + WALL_SLACK_S


def _run(job: dict, timeout_s: float, memory_mb: int, cpu_s: float | None, stdin: str,
         max_file_mb: int, unsafe: bool) -> SandboxResult:
    # RLIMIT_CPU counts whole seconds; at least one.
    cpu = max(1, int(math.ceil(cpu_s if cpu_s is not None else timeout_s)))
    job = dict(job, memory_bytes=int(memory_mb) << 20, fsize_bytes=int(max_file_mb) << 20, cpu_s=cpu)
    why = ""
    for _ in range(SETUP_ATTEMPTS):
        result, why = _run_once(job, wall_limit(max(timeout_s, cpu)), stdin, int(max_file_mb) << 20, unsafe)
        if why is None:
            return result
    raise SandboxError(f"the code sandbox could not start a program: {why}")


def _launch_argv(mode: str, job_fd: int, disk_bytes: int, unsafe: bool,
                 work: jail.CappedWork | None = None) -> tuple[list[str], list[int]]:
    """(argv, extra fds to pass) for one of the two processes, in its jail or (unsafe) bare."""
    if unsafe:
        return [os.path.realpath(sys.executable), "-I", "-S", LAUNCHER, mode, str(job_fd)], []
    tool, program = bwrap(), jail.seccomp_filter()  # either may raise JailUnavailable: before any fd
    seccomp_r, seccomp_w = os.pipe()
    try:
        os.write(seccomp_w, program)  # a few hundred bytes: fits the pipe
    finally:
        os.close(seccomp_w)
    argv = jail.jail_argv(tool, launcher=LAUNCHER, seccomp_fd=seccomp_r, disk_bytes=disk_bytes,
                          as_root=os.geteuid() == 0, launcher_args=[mode, str(job_fd)],
                          work_source=work.path if work else None)
    return (work.wrap(argv) if work else argv), [seccomp_r]


def _run_once(job: dict, timeout_s: float, stdin: str, disk_bytes: int,
              unsafe: bool) -> tuple[SandboxResult, str | None]:
    """One launch of the program's process and the harness's: (result, None), or (_, why) when the
    harness failed before it was ready (no "ready" line with the nonce): never the program's doing."""
    nonce = secrets.token_hex(16)
    work = tempfile.mkdtemp(prefix="phibook-unsafe-") if unsafe else None
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    if work:
        env.update(HOME=work, TMPDIR=work, PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1", **jail.PROGRAM_ENV)
    drop = (jail.NOBODY, jail.NOBODY) if not unsafe and os.geteuid() == 0 else None
    limits = {k: job[k] for k in ("memory_bytes", "fsize_bytes", "cpu_s")}
    # Each fd is closed exactly once (threads run many of these at a time: a second close could
    # hit another run's newly opened fd): whoever closes one takes it out of its set.
    p2h_r, p2h_w = os.pipe()  # program -> harness
    h2p_r, h2p_w = os.pipe()  # harness -> program
    pjob_r, pjob_w = os.pipe()
    hjob_r, hjob_w = os.pipe()
    verdict_r, verdict_w = os.pipe()
    paths = [] if unsafe else jail.numpy_path()
    program_job = marshal.dumps(dict(
        limits, program=job["program"], module="solution" if job.get("tests") is not None else "__main__",
        from_harness=h2p_r, to_harness=p2h_w, drop_to=drop, extra_paths=paths))
    harness_job = marshal.dumps(dict(
        limits, tests=job.get("tests"), call=job.get("call"), entry=list(job.get("entry") or []),
        introspect=bool(job.get("introspect")), nonce=nonce, verdict=verdict_w, from_program=p2h_r,
        to_program=h2p_w, drop_to=drop, extra_paths=paths))
    parent_fds = {pjob_w, hjob_w, verdict_r}
    child_fds = {p2h_r, p2h_w, h2p_r, h2p_w, pjob_r, hjob_r, verdict_w}
    procs: list[subprocess.Popen] = []
    # Run as root, the program's /work also caps its inodes (jail.CappedWork); the harness writes
    # no files and keeps bwrap's tmpfs.
    capped = jail.CappedWork(disk_bytes) if not unsafe and jail.CappedWork.available() else None
    try:
        p_argv, p_extra = _launch_argv("program", pjob_r, disk_bytes, unsafe, capped)
        child_fds.update(p_extra)
        h_argv, h_extra = _launch_argv("harness", hjob_r, disk_bytes, unsafe)
        child_fds.update(h_extra)
        start = time.monotonic()
        try:
            procs.append(subprocess.Popen(
                p_argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, pass_fds=[pjob_r, h2p_r, p2h_w, *p_extra], env=env, cwd=work or "/",
                start_new_session=True))
        except (OSError, subprocess.SubprocessError) as exc:  # bwrap missing, or the work tmpfs
            return SandboxResult("error", None, "", "", 0.0), f"could not start the program's jail: {exc}"
        procs.append(subprocess.Popen(
            h_argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=[hjob_r, p2h_r, h2p_w, verdict_w, *h_extra], env=env, cwd="/", start_new_session=True))
        for fd in list(child_fds):
            child_fds.discard(fd)
            _close(fd)
        out = _collect(procs, {pjob_w: program_job, hjob_w: harness_job}, stdin.encode("utf-8"), verdict_r,
                       start + timeout_s, parent_fds)
        duration = time.monotonic() - start
    finally:
        if len(procs) == 1:  # the harness never started
            _kill(procs[0])
            procs[0].wait()
        for fd in [*parent_fds, *child_fds]:
            _close(fd)
        if work is not None:
            remove_tree(work)
        if capped is not None:
            capped.close()
    program, harness = procs
    lines = _verdict_lines(out["verdict"], nonce)
    if "ready" not in lines or "setup-error" in lines:
        why = lines.get("setup-error") or (out["harness_stderr"].strip().splitlines() or [
            f"the harness ended with status {harness.returncode}"])[-1]
        if "ready" in lines:  # the program's jail failed to start: say what it said
            why += f" ({(out['stderr'].strip().splitlines() or [f'status {program.returncode}'])[-1]})"
        if out["timed_out"]:
            why = f"no start within {timeout_s:g} s ({why})"
        return SandboxResult("error", program.returncode, out["stdout"], out["stderr"], duration), why
    return _classify(program.returncode, harness.returncode, duration, lines, out, timeout_s, unsafe), None


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


# After the harness has ended, the program's process gets this long to exit before it is killed.
PROGRAM_GRACE_S = 2.0


def _collect(procs: list[subprocess.Popen], jobs: dict[int, bytes], stdin: bytes, verdict_r: int,
             deadline: float, owned: set[int]) -> dict[str, Any]:
    """Feed the jobs (and stdin), read both processes' output up to their caps (the rest is read
    and discarded, as the reference harnesses discard output) and the verdict, enforce the
    deadline. Job pipes are closed (and taken out of ``owned``) once written."""
    program, harness = procs
    readers = {program.stdout.fileno(): "stdout", program.stderr.fileno(): "stderr",
               harness.stdout.fileno(): "harness_stdout", harness.stderr.fileno(): "harness_stderr",
               verdict_r: "verdict"}
    writers = {fd: memoryview(data) for fd, data in jobs.items()}
    if program.stdin is not None:
        writers[program.stdin.fileno()] = memoryview(stdin)
    caps = {"stdout": MAX_OUTPUT_BYTES, "stderr": MAX_OUTPUT_BYTES, "harness_stdout": MAX_OUTPUT_BYTES,
            "harness_stderr": MAX_OUTPUT_BYTES, "verdict": MAX_VERDICT_BYTES}
    bufs = {name: bytearray() for name in caps}
    dropped = dict.fromkeys(caps, 0)
    harness_fds = {harness.stdout.fileno(), harness.stderr.fileno(), verdict_r}
    timed_out = False
    with selectors.DefaultSelector() as sel:
        for fd in readers:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        for fd in writers:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_WRITE)
        while readers or writers:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = not harness_fds.isdisjoint(readers)  # the harness had not ended
                break
            for key, _ in sel.select(left):
                fd = key.fd
                if fd in writers:
                    try:
                        writers[fd] = writers[fd][os.write(fd, writers[fd][:65536]):]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        writers[fd] = writers[fd][:0]  # the reader is gone: nothing more to send
                    if not writers[fd]:
                        sel.unregister(fd)
                        del writers[fd]
                        if fd in jobs:
                            owned.discard(fd)
                            _close(fd)
                        else:
                            program.stdin.close()
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(fd)
                    del readers[fd]
                    if harness_fds.isdisjoint(readers):
                        deadline = min(deadline, time.monotonic() + PROGRAM_GRACE_S)
                    continue
                name = readers[fd]
                room = caps[name] - len(bufs[name])
                bufs[name] += chunk[:max(0, room)]
                dropped[name] += max(0, len(chunk) - max(0, room))
    for proc in procs:
        if proc.poll() is None and (timed_out or readers):
            _kill(proc)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _kill(proc)
            proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None and not f.closed:
                try:
                    f.close()
                except OSError:
                    pass
    harness_out = _text(bufs["harness_stdout"], dropped["harness_stdout"])
    stderr = _text(bufs["stderr"], dropped["stderr"]) + _text(bufs["harness_stderr"], dropped["harness_stderr"])
    return {"stdout": _text(bufs["stdout"], dropped["stdout"]),
            "stderr": stderr + (f"\n[the tests printed]\n{harness_out}" if harness_out else ""),
            "harness_stderr": _text(bufs["harness_stderr"], 0),
            "verdict": bytes(bufs["verdict"]), "timed_out": timed_out}


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL bwrap's (or the launcher's) process group; bwrap's --die-with-parent and the PID
    namespace take everything inside the jail with it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _text(data: bytearray, dropped: int) -> str:
    text = bytes(data).decode("utf-8", errors="replace")
    return text + (f"\n[{dropped} more bytes of output discarded]" if dropped else "")


def _verdict_lines(data: bytes, nonce: str) -> dict[str, str]:
    """{kind: rest} for the lines that carry the nonce; anything else on the channel is ignored
    (only the program could have written it, and without the nonce it says nothing)."""
    lines: dict[str, str] = {}
    prefix = nonce + " "
    for raw in data.decode("utf-8", errors="replace").split("\n"):
        if raw.startswith(prefix):
            kind, _, rest = raw[len(prefix):].partition(" ")
            lines.setdefault(kind, rest)
    return lines


def _classify(rc: int | None, harness_rc: int | None, duration: float, lines: dict[str, str], out: dict[str, Any],
              timeout_s: float, unsafe: bool) -> SandboxResult:
    """The result from the harness's verdict lines, and how the two processes ended."""
    stdout, stderr = out["stdout"], out["stderr"]

    def result(status: str, reason: str = "", value: Any = None, value_type: str = "") -> SandboxResult:
        return SandboxResult(status, rc, stdout, stderr, duration, reason, value, value_type,
                             _harness_state(lines.get("introspect")))

    sig = _signal_of(rc, bwrap_status=not unsafe)
    harness_sig = _signal_of(harness_rc, bwrap_status=not unsafe)
    if out["timed_out"]:
        return result("timeout", f"ran past the {timeout_s:g} s wall-clock time limit (waiting, not computing)")
    if signal.SIGXCPU in (sig, harness_sig) and "pass" not in lines and "done" not in lines:
        return result("timeout", "ran past its CPU time limit")
    if harness_rc == 0 and "pass" in lines:
        return result("ok", "", "pass")
    if harness_rc == 0 and "done" in lines:
        kind, _, text = lines["done"].partition(" ")
        return result("ok", "", _literal(text), kind)
    reason = lines.get("fail", "")
    if reason.startswith("MemoryError"):
        return result("oom", "ran out of memory (MemoryError)")
    if reason == "the program ended before it finished" or not reason:
        if sig is not None:
            return result("killed", f"killed by {_signal_name(sig)}")
        if harness_sig is not None:
            return result("killed", f"the tests were killed by {_signal_name(harness_sig)}")
        last = (out["stderr"].strip().splitlines() or [""])[-1]
        if last.startswith("MemoryError"):
            return result("oom", "ran out of memory (MemoryError)")
        return result("error", f"exited (status {rc}) before it finished")
    return result("error", reason)


def _harness_state(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _signal_of(rc: int | None, bwrap_status: bool) -> int | None:
    """The signal that ended the program: a negative status from Popen, or bwrap's 128 + n."""
    if rc is None:
        return None
    if rc < 0:
        return -rc
    if bwrap_status and 128 < rc < 128 + 65:
        return rc - 128
    return None


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None


# --------------------------------------------------------------------------- cleanup


def remove_tree(path: str) -> None:
    """Delete a directory tree of any depth (no recursion, no long paths), whatever the modes.

    Used for --unsafe-no-sandbox work dirs (the jail's work dir is a tmpfs that vanishes with it).
    Deep subfolders are renamed up to the top as they are met, so the walk stays shallow.
    """
    try:
        top = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    counter = 0
    try:
        while True:
            emptied = True
            for entry in list(os.scandir(top)):
                if entry.is_dir(follow_symlinks=False):
                    emptied = False
                    counter += 1
                    _hoist_children(top, entry.name, f".phibook-rm-{counter}")
                    try:
                        os.rmdir(entry.name, dir_fd=top)
                    except OSError:
                        pass
                else:
                    os.unlink(entry.name, dir_fd=top)
            if emptied:
                break
    finally:
        os.close(top)
    os.rmdir(path)


def _hoist_children(top: int, name: str, tag: str) -> None:
    """Move the subfolders of top/name up into top (renamed ``tag-N``) and delete its files."""
    os.chmod(name, 0o700, dir_fd=top, follow_symlinks=False)
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=top)
    try:
        for i, entry in enumerate(list(os.scandir(fd))):
            if entry.is_dir(follow_symlinks=False):
                os.rename(entry.name, f"{tag}-{i}", src_dir_fd=fd, dst_dir_fd=top)
            else:
                os.unlink(entry.name, dir_fd=fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- verification

# Runs as the jail's program directly (no launcher, no audit hook: it may use ctypes), so what it
# finds is what the jail itself allows. It prints repr({check: passed}).
PROBE = r"""
import ctypes, os, socket, sys
if len(sys.argv) > 1:
    os.setgroups([]); os.setresgid(int(sys.argv[1]), int(sys.argv[1]), int(sys.argv[1]))
    os.setresuid(int(sys.argv[1]), int(sys.argv[1]), int(sys.argv[1]))
libc = ctypes.CDLL(None, use_errno=True)
facts = {}
def refused(name, fn):
    try:
        fn()
        facts[name] = False
    except Exception:
        facts[name] = True
facts["unprivileged_uid"] = os.getuid() != 0 and os.geteuid() != 0
facts["pid_namespace"] = os.getpid() < 10
facts["uts_namespace"] = socket.gethostname() == "sandbox"
facts["host_filesystem_hidden"] = not any(os.path.exists(p) for p in ("/etc", "/home", "/proc", "/sys", "/var"))
refused("host_root_unlisted", lambda: os.listdir("/root"))
refused("host_files_unreadable", lambda: open(HOST_FILE).read())
refused("read_only_root", lambda: open("/probe", "w"))
refused("no_child_processes", os.fork)
refused("no_memfd", lambda: os.memfd_create("probe"))
refused("no_vsock_sockets", lambda: socket.socket(40, socket.SOCK_STREAM))  # AF_VSOCK
refused("no_netlink_sockets", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 15))  # uevents
refused("no_packet_sockets", lambda: socket.socket(17, socket.SOCK_RAW))  # AF_PACKET
def no_userns():
    if libc.unshare(0x10000000) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
refused("no_new_namespaces", no_userns)
def tcp():
    socket.create_connection(("127.0.0.1", TCP_PORT), timeout=2).sendall(b"probe")
refused("network_tcp_blocked", tcp)
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for host in ("127.0.0.1", HOST_IP):
        s.sendto(b"probe", (host, UDP_PORT))
refused("network_udp_blocked", udp)
refused("host_unix_sockets_blocked", lambda: socket.socket(socket.AF_UNIX).connect(UNIX_PATH))
refused("abstract_unix_sockets_blocked", lambda: socket.socket(socket.AF_UNIX).connect(ABSTRACT))
libc.shmget.restype = ctypes.c_int
facts["ipc_namespace"] = libc.shmget(SHM_KEY, 0, 0) == -1
facts["ipc_left_behind"] = libc.shmget(SHM_KEY + 1, 4096, 0o1600) != -1  # made here: must die with the jail
print(repr(facts))
"""


def _run_raw(script: str, args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """Run our own ``script`` as the jail's program (for verification only)."""
    with tempfile.TemporaryDirectory(prefix="phibook-probe-") as tmp:
        path = Path(tmp) / "probe.py"
        path.write_text(script)
        path.chmod(0o644)
        os.chmod(tmp, 0o755)
        seccomp_r, seccomp_w = os.pipe()
        os.write(seccomp_w, jail.seccomp_filter())
        os.close(seccomp_w)
        try:
            argv = jail.jail_argv(bwrap(), launcher=str(path), seccomp_fd=seccomp_r, disk_bytes=16 << 20,
                                  as_root=os.geteuid() == 0)
            return subprocess.run(argv + args, pass_fds=[seccomp_r], capture_output=True, text=True,
                                  timeout=timeout_s, env={"PATH": "/usr/bin:/bin"}, start_new_session=True)
        finally:
            os.close(seccomp_r)


def capabilities(refresh: bool = False) -> dict[str, Any]:
    """What this machine's jail was verified to do: a probe runs inside it while the host listens
    on TCP, UDP, a 0777 unix socket and an abstract one, holds a 0600 file and a SysV shared
    memory segment, and checks afterwards that nothing arrived and nothing was left behind.
    Returns {"tool", "verified": {check: bool}}; raises JailUnavailable when no jail can be built.
    Cached per process."""
    global _CAPS
    if _CAPS is not None and not refresh:
        return _CAPS
    import ctypes
    import socket
    import threading

    tool = bwrap()
    libc = ctypes.CDLL(None, use_errno=True)
    shm_key = 0x50480000 | secrets.randbits(15) << 1
    shm_id = libc.shmget(shm_key, 4096, 0o1600)  # IPC_CREAT | 0600, on the host
    listeners, arrived, stop = [], [], threading.Event()
    with tempfile.TemporaryDirectory(prefix="phibook-probe-") as tmp:
        secret = Path(tmp) / "host-secret.txt"
        secret.write_text("host secret")
        secret.chmod(0o600)
        tcp = socket.create_server(("127.0.0.1", 0))
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("0.0.0.0", 0))
        unix_path = str(Path(tmp) / "probe.sock")
        unix = socket.socket(socket.AF_UNIX)
        unix.bind(unix_path)
        os.chmod(unix_path, 0o777)
        abstract_name = f"\0phibook-probe-{secrets.token_hex(6)}"
        abstract = socket.socket(socket.AF_UNIX)
        abstract.bind(abstract_name)
        for sock, name in ((tcp, "network_tcp_blocked"), (udp, "network_udp_blocked"),
                           (unix, "host_unix_sockets_blocked"), (abstract, "abstract_unix_sockets_blocked")):
            if sock.type == socket.SOCK_STREAM:
                sock.listen(4)
            sock.settimeout(0.1)
            listeners.append((sock, name))

        def watch(sock, name):
            while not stop.is_set():
                try:
                    if sock.type == socket.SOCK_STREAM:
                        sock.accept()[0].close()
                    else:
                        sock.recvfrom(64)
                    arrived.append(name)
                except OSError:
                    continue

        threads = [threading.Thread(target=watch, args=pair, daemon=True) for pair in listeners]
        for t in threads:
            t.start()
        code = (PROBE.replace("HOST_FILE", repr(str(secret))).replace("TCP_PORT", str(tcp.getsockname()[1]))
                .replace("UDP_PORT", str(udp.getsockname()[1])).replace("HOST_IP", repr(_host_ip()))
                .replace("UNIX_PATH", repr(unix_path)).replace("ABSTRACT", repr(abstract_name))
                .replace("SHM_KEY", str(shm_key)))
        try:
            proc = _run_raw(code, [str(jail.NOBODY)] if os.geteuid() == 0 else [], timeout_s=60)
        finally:
            time.sleep(0.3)  # let anything that did get out arrive before we look
            stop.set()
            for t in threads:
                t.join()
            for sock, _ in listeners:
                sock.close()
            if shm_id != -1:
                libc.shmctl(shm_id, 0, None)  # IPC_RMID
    try:
        facts = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    except (ValueError, SyntaxError, IndexError):
        raise JailUnavailable(f"the code sandbox could not run a probe in the jail (status {proc.returncode}: "
                              f"{proc.stderr.strip()[-500:]}); {jail.INSTALL_HINT}") from None
    left = libc.shmget(shm_key + 1, 0, 0)
    if left != -1:
        libc.shmctl(left, 0, None)
    facts["ipc_objects_die_with_the_jail"] = left == -1 and facts.pop("ipc_left_behind")
    facts["ipc_namespace"] = facts["ipc_namespace"] and shm_id != -1
    for name in arrived:
        facts[name] = False  # the probe's attempt failed for it, but the host saw it arrive
    _CAPS = {"tool": f"{tool.version} ({tool.path})", "verified": dict(sorted(facts.items()))}
    return _CAPS


def _host_ip() -> str:
    """A non-loopback address of this host, if any (a UDP probe to it must not arrive either)."""
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"
