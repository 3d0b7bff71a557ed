"""Run model-written Python in a throw-away, locked-down process.

Each program gets its own process, started through this very file as a small launcher
(`python -I sandbox.py CONFIG`). The launcher applies the limits to itself, then runs the
program in-process (one interpreter start per program keeps the overhead low):

- a fresh temporary working directory, removed afterwards; a scrubbed environment;
- wall-clock timeout (the parent kills the whole process group) plus RLIMIT_CPU;
- RLIMIT_AS (memory), RLIMIT_FSIZE (file and output size), RLIMIT_NOFILE, no core files;
- no child processes or threads: RLIMIT_NPROC = 0. Root ignores RLIMIT_NPROC, so when the
  parent is root the launcher switches to the unprivileged uid/gid 65534 ("nobody") and keeps
  only CAP_DAC_READ_SEARCH (read-only access, so the interpreter and its stdlib stay readable
  wherever they are installed; it grants no write, kill or fork rights);
- writes confined to the working directory with Linux Landlock (kernel >= 5.13); Landlock
  ABI >= 4 also refuses TCP bind/connect and ABI >= 6 refuses signals to processes outside
  the sandbox (the parent and other sandboxes);
- no network: a fresh, empty network namespace (unshare(CLONE_NEWNET); as root directly,
  otherwise inside a new user namespace when the kernel allows unprivileged ones).

`capabilities()` reports which of these layers the running system provides; the ones the OS
refuses are skipped (best effort) rather than failing every program.

This module must stay importable with only the standard library (the launcher runs with
`python -I`, before phibook's own imports are needed), so phibook imports are inside functions.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass, field

# The launcher (`python -I sandbox.py`) runs this module's top level for every program, so the
# parent-only modules (subprocess, tempfile, shutil, concurrent.futures: ~10 ms of imports per
# program) are imported inside the functions that use them.

NOBODY = 65534
MAX_OUTPUT_BYTES = 1 << 20  # stdout/stderr kept per program; the rest is dropped
SETUP_FAILED_RC = 121  # launcher exit code when a sandbox layer it needs could not be set up
SETUP_MARK = "phibook-sandbox: setup failed: "

# Linux constants (include/uapi/linux/{sched,prctl,capability,landlock}.h); the landlock syscall
# numbers are the same on every architecture (generic syscall table).
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
CAP_DAC_READ_SEARCH = 2
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
# Filesystem rights that modify something. Reading and executing stay unrestricted.
FS_WRITE_FILE = 1 << 1
FS_REMOVE_DIR, FS_REMOVE_FILE = 1 << 4, 1 << 5
FS_MAKE_ALL = sum(1 << b for b in range(6, 13))  # char, dir, reg, sock, fifo, block, sym
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX, SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6


@dataclass
class SandboxResult:
    """What happened to one program. `status` is "ok" (exit 0), "error" (non-zero exit),
    "timeout" (wall clock or CPU limit), "oom" (MemoryError under the memory limit) or
    "killed" (ended by another signal, e.g. the file-size limit)."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float

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

    def __bool__(self) -> bool:
        return self.passed


# ---------------------------------------------------------------------------------------------
# Parent side


def run_python(
    code: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    cpu_s: float | None = None,
    stdin: str = "",
    max_file_mb: int = 64,
) -> SandboxResult:
    """Run `code` as `__main__` in a sandboxed child process and report how it ended.

    A timeout (wall clock `timeout_s`, or CPU time `cpu_s`, default ceil(timeout_s) + 1) is a
    failure with status "timeout"; the whole process group is killed.
    """
    import subprocess
    import tempfile

    cpu = int(math.ceil(cpu_s if cpu_s is not None else timeout_s + 1))
    root = os.geteuid() == 0
    base = tempfile.mkdtemp(prefix="phibook-sbx-")  # 0700, ours: holds the I/O files
    try:
        work = os.path.join(base, "work")
        os.mkdir(work, 0o700)
        if root:
            os.chown(work, NOBODY, NOBODY)
        with open(os.path.join(work, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        if root:
            os.chown(os.path.join(work, "main.py"), NOBODY, NOBODY)
        config = {
            "work": work,
            "memory_bytes": int(memory_mb) << 20,
            "cpu_s": cpu,
            "fsize_bytes": int(max_file_mb) << 20,
            "drop_to_nobody": root,
        }
        paths = {name: os.path.join(base, name) for name in ("stdin", "stdout", "stderr")}
        with open(paths["stdin"], "w", encoding="utf-8") as f:
            f.write(stdin)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": work,
               "TMPDIR": work, "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
               "OMP_NUM_THREADS": "1"}
        argv = [sys.executable, "-I", os.path.abspath(__file__), json.dumps(config)]
        with (open(paths["stdin"], "rb") as fin, open(paths["stdout"], "wb") as fout,
              open(paths["stderr"], "wb") as ferr):
            start = time.monotonic()
            proc = subprocess.Popen(argv, stdin=fin, stdout=fout, stderr=ferr, cwd=work, env=env,
                                    close_fds=True, start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)
                proc.wait()
            duration = time.monotonic() - start
        out, err = _read_capped(paths["stdout"]), _read_capped(paths["stderr"])
    finally:
        _remove_tree(base)
    rc = proc.returncode
    if rc == SETUP_FAILED_RC and SETUP_MARK in err:
        from phibook.errors import PhibookError

        raise PhibookError("the code sandbox could not be set up: " + err.split(SETUP_MARK, 1)[1].strip())
    return SandboxResult(_classify(rc, err, timed_out), rc, out, err, duration)


def _classify(rc: int | None, stderr: str, timed_out: bool) -> str:
    if timed_out or rc == -signal.SIGXCPU:
        return "timeout"
    if rc == 0:
        return "ok"
    lines = stderr.strip().splitlines()
    if lines and lines[-1].startswith("MemoryError"):
        return "oom"
    if rc is not None and rc < 0:
        return "killed"
    return "error"


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # start_new_session made pgid == pid
    except ProcessLookupError:
        pass


def _read_capped(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read(MAX_OUTPUT_BYTES + 1)
    text = data[:MAX_OUTPUT_BYTES].decode("utf-8", errors="replace")
    return text + ("\n[output truncated]" if len(data) > MAX_OUTPUT_BYTES else "")


def _remove_tree(path: str) -> None:
    def make_writable_and_retry(func, p, _exc):  # a program may chmod its own files to 000
        os.chmod(os.path.dirname(p), 0o700)
        if os.path.isdir(p) and not os.path.islink(p):
            os.chmod(p, 0o700)
        func(p)

    import shutil

    shutil.rmtree(path, onerror=make_writable_and_retry)


def check_program(program: str, tests: str, *, timeout_s: float = 10.0, memory_mb: int = 512) -> CheckOutcome:
    """HumanEval/MBPP style check: run `program` followed by `tests` (asserts, and for HumanEval
    `check(entry_point)`); passed means the combined program exited 0 within the limits."""
    result = run_python(program + "\n\n" + tests + "\n", timeout_s=timeout_s, memory_mb=memory_mb)
    return CheckOutcome(result.ok, result)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def run_many(codes: list[str], *, workers: int | None = None, **limits) -> list[SandboxResult]:
    """`run_python` over many programs, `workers` at a time (default: the usable CPU cores);
    results in input order. Threads only wait on child processes, so no GIL contention."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        return list(pool.map(lambda c: run_python(c, **limits), codes))


def check_many(pairs: list[tuple[str, str]], *, workers: int | None = None, **limits) -> list[CheckOutcome]:
    """`check_program` over many (program, tests) pairs in parallel; outcomes in input order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        return list(pool.map(lambda p: check_program(p[0], p[1], **limits), pairs))


_CAPS: dict | None = None


def capabilities() -> dict:
    """Which isolation layers this system gives the sandbox, probed once by running a real
    sandboxed program: {"landlock_abi", "no_child_processes", "write_confinement",
    "network_isolation", "signal_isolation", "uid"}."""
    global _CAPS
    if _CAPS is None:
        result = run_python("import json, os\nprint(json.dumps(__sandbox_layers__ | {'uid': os.getuid()}))",
                            timeout_s=30)
        if not result.ok:
            raise RuntimeError(f"sandbox probe failed: {result.status}: {result.stderr[-2000:]}")
        _CAPS = json.loads(result.stdout)
    return dict(_CAPS)


# ---------------------------------------------------------------------------------------------
# Launcher side (runs in the child, as `python -I sandbox.py CONFIG`)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _isolate_network(libc: ctypes.CDLL, as_root: bool) -> bool:
    """A new network namespace has only a loopback device, and it is down: nothing is reachable."""
    if as_root:
        return libc.unshare(CLONE_NEWNET) == 0
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        return False
    # Map our own ids into the new user namespace, else file creation fails with EOVERFLOW.
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                       ("/proc/self/gid_map", f"{gid} {gid} 1")):
        with open(path, "w") as f:
            f.write(text)
    return True


def _drop_to_nobody(libc: ctypes.CDLL) -> None:
    """uid/gid 65534 with CAP_DAC_READ_SEARCH as the only (ambient) capability, so the program,
    run after exec or in-process, can still read the interpreter wherever it is installed."""
    last_cap = int(open("/proc/sys/kernel/cap_last_cap").read())
    for cap in range(last_cap + 1):
        if cap != CAP_DAC_READ_SEARCH:
            _check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap} from the bounding set")
    _check(libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    keep = 1 << CAP_DAC_READ_SEARCH
    data = (Data * 2)(Data(keep, keep, keep), Data(0, 0, 0))
    _check(libc.capset(ctypes.byref(Header(0x20080522, 0)), data), "capset")  # _LINUX_CAPABILITY_VERSION_3
    _check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_DAC_READ_SEARCH, 0, 0), "raise ambient cap")


def _landlock(libc: ctypes.CDLL, work: str) -> dict:
    """Confine writes to `work` (and /dev/null); with ABI >= 4 refuse TCP bind/connect, with
    ABI >= 6 refuse signals and abstract unix sockets outside this sandbox."""
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 1:
        return {"landlock_abi": 0}
    fs = FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_ALL
    fs |= (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0)
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL if abi >= 6 else 0
    attr = (ctypes.c_uint64 * 3)(fs, net, scoped)
    size = 8 * (3 if abi >= 6 else 2 if abi >= 4 else 1)
    ruleset = _check(libc.syscall(SYS_LANDLOCK_CREATE_RULESET, attr, size, 0), "landlock_create_ruleset")

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    for path, access in ((work, fs), ("/dev/null", FS_WRITE_FILE | (FS_TRUNCATE if abi >= 3 else 0))):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = PathBeneath(access, fd)
        _check(libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0),
               f"landlock_add_rule({path})")
        os.close(fd)
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    _check(libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    os.close(ruleset)
    return {"landlock_abi": int(abi), "tcp_blocked": abi >= 4, "signal_isolation": abi >= 6}


def _launch(config: dict) -> dict:
    """Apply every limit to this process; returns which isolation layers are in force."""
    libc = _libc()
    as_root = bool(config["drop_to_nobody"])
    layers = {"network_isolation": _isolate_network(libc, as_root)}
    for limit, value in ((resource.RLIMIT_AS, config["memory_bytes"]),
                         (resource.RLIMIT_FSIZE, config["fsize_bytes"]),
                         (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    # SIGXCPU at the soft limit (reported as "timeout"), SIGKILL one second later.
    resource.setrlimit(resource.RLIMIT_CPU, (config["cpu_s"], config["cpu_s"] + 1))
    layers.update(_landlock(libc, config["work"]))
    if as_root:
        _drop_to_nobody(libc)
    # After the uid switch: set_user() would otherwise mark us over the limit at setuid time.
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    layers["write_confinement"] = layers["landlock_abi"] >= 1
    layers["network_isolation"] = layers["network_isolation"] or layers.get("tcp_blocked", False)
    layers["signal_isolation"] = layers.get("signal_isolation", False) or as_root
    layers["no_child_processes"] = True  # RLIMIT_NPROC = 0 as a non-root uid
    layers.pop("tcp_blocked", None)
    return layers


def _run_main(layers: dict) -> None:
    """Execute ./main.py as the __main__ module of this (now restricted) interpreter."""
    import types

    with open("main.py", encoding="utf-8") as f:
        source = f.read()
    code = compile(source, "main.py", "exec")
    main = types.ModuleType("__main__")
    main.__file__ = "main.py"
    main.__builtins__ = __builtins__
    main.__sandbox_layers__ = layers
    sys.modules["__main__"] = main
    sys.argv = ["main.py"]
    try:
        exec(code, main.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:  # print the traceback from main.py on, without the launcher's frames
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        sys.exit(1)


if __name__ == "__main__":
    try:
        _layers = _launch(json.loads(sys.argv[1]))
    except Exception as exc:  # reported to the parent, which raises PhibookError
        sys.stderr.write(SETUP_MARK + repr(exc) + "\n")
        sys.exit(SETUP_FAILED_RC)
    _run_main(_layers)
