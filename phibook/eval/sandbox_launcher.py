"""The sandbox's child side: runs one model-written program and, only if it runs to its end, says so.

Started inside the jail as ``python -I -S sandbox_launcher.py JOB_FD VERDICT_FD`` (standard
library only: no phibook import, no site-packages). The job (the program, optional tests or a
function to call, the limits and a fresh random nonce) is read from JOB_FD and closed before any
untrusted code runs. VERDICT_FD is a pipe to the parent, the only thing the parent trusts:

    <nonce> ready          setup done; the program starts now
    <nonce> pass           the tests ran to their last line
    <nonce> done <value>   the program (and the called function) ran to the end
    <nonce> setup-error …  the jail or the job is broken (the program never ran)

Every other ending (an exit of any kind, a crash, a signal, a limit, a timeout) leaves no verdict,
so it is a failure whatever the exit status or the output say.

How the program is kept from forging a line:

- The nonce lives only in the closure of an audit hook (PEP 578; hooks cannot be removed). No
  frame or object the program can reach refers to that hook, and program code never runs while
  the hook runs (no tracing, no threads, no signal handlers, gc paused), so neither frame walks
  nor tracebacks lead to it. The launcher's own frames hold no secret.
- The verdict is written by the hook itself, from an audit event raised on the last line of a
  "tail" code object: the tests followed by that line (or, to run a program, a call of the
  requested function followed by it). The hook accepts the event only from a frame running that
  code object, which only the launcher's runner may exec, once. The line is reached only when
  every test before it passed; then the hook writes the line and ends the process at once.
- Routes to the nonce's bytes are closed: the hook ends the program on gc object walks, tracing
  and profiling, more audit hooks, ctypes and other native-memory modules, code objects built by
  hand (code.__new__, marshal.loads of anything but the installed .pyc files), and /proc (the
  jail has none). The jail's seccomp filter refuses threads and signal handlers.
- The tests see pristine builtins, freshly imported modules, and, from each callable the program
  left, only plain values (numbers, strings, bytes, None, lists, tuples, dicts, sets), so
  monkeypatching and always-equal objects cannot make a wrong answer pass.
"""

import builtins
import marshal
import os
import sys

# Module roots the program may not import: native memory access and interpreter internals.
DENIED_IMPORTS = frozenset({"ctypes", "_ctypes", "_testcapi", "_testinternalcapi", "_testmultiphase",
                            "_testsinglephase", "_xxsubinterpreters", "_xxinterpchannels", "_interpreters",
                            "_interpchannels", "_interpqueues", "_posixsubprocess"})
# Audit events that end the program: they reach other objects' memory or run code inside the hook.
DENIED_EVENTS = frozenset({
    "sys.settrace", "sys.setprofile", "sys.addaudithook", "sys.monitoring.register_callback",
    "sys._current_frames", "sys._current_exceptions", "sys.remote_exec",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents", "code.__new__",
    "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.fork", "os.forkpty", "subprocess.Popen",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.addressof", "ctypes.string_at", "ctypes.wstring_at",
    "ctypes.cdata", "ctypes.cdata/buffer", "ctypes.call_function", "ctypes.create_string_buffer",
    "ctypes.create_unicode_buffer", "ctypes.set_errno", "ctypes.get_errno",
})
PLAIN_SCALARS = (int, float, complex, str, bytes, bool, type(None), range)
# What an instance of the program's own class may define and still be handed to the tests: nothing
# that changes ==, ordering, truth, arithmetic, iteration, hashing or attribute lookup.
INERT_CLASS_ATTRIBUTES = frozenset({"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__init__",
                                    "__slots__", "__annotations__", "__repr__", "__str__", "__firstlineno__",
                                    "__static_attributes__", "__orig_bases__", "__parameters__"})
REPORTED_TYPES = (int, float, str, bool, type(None))
MAX_DEPTH = 200
MAX_VALUE_CHARS = 10_000
ModuleType = type(sys)


def install_guard(verdict_fd: int, nonce: bytes, tail_code, runner_code, done_event: str) -> None:
    """Add the audit hook that holds the nonce, refuses the dangerous events, and writes the
    verdict when ``tail_code`` reaches its last line. Writes "ready" before it returns."""
    write, exit_now, getframe = os.write, os._exit, sys._getframe
    import gc

    gc_enabled, gc_disable, gc_enable = gc.isenabled, gc.disable, gc.enable
    prefix = sys.prefix.rstrip("/") + "/"
    state = {"busy": False, "tail_started": False, "last_pyc": None}

    def die(why: str) -> None:
        write(2, f"\nsandbox: {why}; the program was stopped\n".encode("utf-8", "replace"))
        exit_now(101)

    def trusted_bytecode(data) -> bool:
        """marshal.loads is how imports load .pyc files; anything else could be hand-made bytecode.
        Allowed only for the exact contents of the .pyc just opened from the read-only prefix."""
        path, state["last_pyc"] = state["last_pyc"], None
        if path is None or not (type(data) is bytes or type(data) is memoryview):
            return False
        with open(path, "rb") as f:
            return f.read()[16:] == bytes(data)

    def verdict(args) -> None:
        caller = getframe(3)  # 0: verdict, 1: check, 2: hook, 3: the frame that raised the event
        if caller.f_code is not tail_code:
            die("only the harness may report a verdict")
        if not args:
            line = b"pass"
        else:
            value = args[0]
            kind = type(value)
            text = repr(value) if any(kind is t for t in REPORTED_TYPES) else "None"
            line = b"done " + (text if len(text) <= MAX_VALUE_CHARS else "None").encode("utf-8", "replace")
        write(verdict_fd, nonce + b" " + line + b"\n")
        exit_now(0)

    def check(event: str, args) -> None:
        if event in DENIED_EVENTS:
            die(f"{event} is not allowed")
        if event == "import":
            name = args[0]
            if type(name) is not str:  # a str subclass could lie about its value
                die("import of a module name that is not a str")
            if name.partition(".")[0] in DENIED_IMPORTS:
                die(f"import of {name} is not allowed")
        elif event == "open":
            path = args[0]
            if type(path) is str or type(path) is bytes:
                # The jail has no /proc; outside one (--unsafe-no-sandbox) /proc/self/mem would
                # hand out this process's memory.
                text = path if type(path) is str else path.decode("utf-8", "replace")
                if "proc/" in text or text.startswith("/dev/fd"):
                    die(f"opening {text} is not allowed")
                state["last_pyc"] = text if text.endswith(".pyc") and text.startswith(prefix) else None
            elif type(path) is int:
                if path == verdict_fd:
                    die("the verdict channel is not the program's")
            else:
                die("open of an unusual path object")
        elif event == "marshal.loads":
            if not trusted_bytecode(args[0]):
                die("marshal.loads of anything but an installed .pyc is not allowed")
        elif event == "exec" or event == "function.__new__":
            if args and args[0] is tail_code:
                # getframe: 0 check, 1 hook, 2 the caller of exec
                if event == "exec" and not state["tail_started"] and getframe(2).f_code is runner_code:
                    state["tail_started"] = True
                else:
                    die("the tests may run once, from the harness")
        elif event == done_event:
            verdict(args)

    def hook(event, args):
        if state["busy"]:
            return
        state["busy"] = True
        was_enabled = gc_enabled()
        gc_disable()  # no finalizer of the program may run inside this frame
        try:
            check(event, args)
        except BaseException as exc:  # noqa: BLE001 - never let a traceback through this frame
            die(f"sandbox error on {type(exc).__name__}")
        finally:
            state["busy"] = False
            if was_enabled:
                gc_enable()

    sys.addaudithook(hook)
    write(verdict_fd, nonce + b" ready\n")


def inert_instance(value) -> bool:
    """An instance of a plain class of the program's that overrides no behaviour (a tree node
    built for the tests, say): it compares by identity and supports no arithmetic, so it cannot
    pass a check by itself."""
    mro = type(value).__mro__
    if mro[-1] is not object:
        return False
    for klass in mro[:-1]:
        if type(klass) is not type:
            return False
        for name in klass.__dict__:
            if type(name) is not str or (name.startswith("__") and name.endswith("__")
                                         and name not in INERT_CLASS_ATTRIBUTES):
                return False
    return True


def plain(value, trusted_dicts=(), depth=0, seen=None):
    """A copy of ``value`` made only of plain built-in values (and inert instances), or TypeError.

    Exact types only (a subclass could override ==); containers are walked with the built-in
    types' own methods. The dict subclasses in ``trusted_dicts`` (collections' originals, captured
    before the program ran) become plain dicts, as they compare equal to them.
    """
    kind = type(value)
    # Identity tests throughout: `kind in (...)` would call ==, which a metaclass can answer.
    if any(kind is t for t in PLAIN_SCALARS):
        return value
    if type(kind) is type and inert_instance(value):
        return value
    if depth > MAX_DEPTH:
        raise TypeError("the returned value is nested too deeply to compare")
    seen = set() if seen is None else seen
    if id(value) in seen:
        raise TypeError("the returned value contains itself")
    seen.add(id(value))
    try:
        if kind is list or kind is tuple:
            items = [plain(v, trusted_dicts, depth + 1, seen)
                     for v in (list.__iter__(value) if kind is list else tuple.__iter__(value))]
            return items if kind is list else tuple(items)
        if kind is dict or any(kind is t for t in trusted_dicts):
            return {plain(k, trusted_dicts, depth + 1, seen): plain(v, trusted_dicts, depth + 1, seen)
                    for k, v in dict.items(value)}
        if kind is set or kind is frozenset:
            items = [plain(v, trusted_dicts, depth + 1, seen)
                     for v in (set.__iter__(value) if kind is set else frozenset.__iter__(value))]
            return set(items) if kind is set else frozenset(items)
    finally:
        seen.discard(id(value))
    raise TypeError(f"returned a {kind.__module__}.{kind.__qualname__}; the checker compares only plain values "
                    "(numbers, strings, bytes, None, lists, tuples, dicts, sets)")


def guarded(fn, trusted_dicts):
    """``fn`` as the tests see it: its results copied into plain values (see ``plain``)."""
    def call(*args, **kwargs):
        return plain(fn(*args, **kwargs), trusted_dicts)
    return call


def needs_guard(value) -> bool:
    """Every callable the program left behind but modules: functions, lambdas, functools
    wrappers, objects with __call__, and classes too (an instance of the program's class could
    answer == with True)."""
    return callable(value) and type(value) is not ModuleType


class Quitter:
    def __repr__(self) -> str:
        return "Use exit() or Ctrl-D (i.e. EOF) to exit"

    def __call__(self, code=None):
        raise SystemExit(code)


def drop_privileges(uid: int, gid: int) -> None:
    """Become uid/gid (the jail starts as root with only CAP_SETUID/CAP_SETGID for this)."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError("could not drop privileges")


def set_limits(job: dict) -> None:
    import resource

    limits = [(resource.RLIMIT_AS, job["memory_bytes"]), (resource.RLIMIT_FSIZE, job["fsize_bytes"]),
              (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)]
    for limit, value in limits:
        resource.setrlimit(limit, (value, value))
    # SIGXCPU at the soft limit, SIGKILL one second later; both are "timeout" to the parent.
    resource.setrlimit(resource.RLIMIT_CPU, (job["cpu_s"], job["cpu_s"] + 1))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))


def tail_source(job: dict, done_event: str) -> str:
    """The code that runs after the program: the tests, or the call, then the verdict line."""
    flush = ("for _s in (__import__('sys').stdout, __import__('sys').stderr):\n"
             "    try:\n        _s.flush()\n    except BaseException:\n        pass\n")
    if job.get("tests") is not None:
        return f"{job['tests']}\n\n{flush}__import__('sys').audit({done_event!r})\n"
    if job.get("call"):
        return f"_phibook_value = {job['call']}()\n{flush}__import__('sys').audit({done_event!r}, _phibook_value)\n"
    return f"{flush}__import__('sys').audit({done_event!r}, None)\n"


def make_runner(tail_code, namespace: dict, modules, modules_before: dict, pristine_builtins: dict, trusted_dicts,
                guard: bool):
    """The one function that may exec the tail: beside the program's names, but with builtins and
    sys.modules as they were before it ran (what it imported or replaced is imported afresh),
    and, for tests, its callables returning plain values only."""
    def run_tail() -> None:
        for name, module in list(modules.items()):
            if modules_before.get(name) is not module:
                del modules[name]
        modules.update(modules_before)
        tail_ns = dict(namespace)
        tail_ns["__builtins__"] = pristine_builtins
        if guard:
            for name, value in namespace.items():
                if needs_guard(value):
                    tail_ns[name] = guarded(value, trusted_dicts)
        exec(tail_code, tail_ns)
    return run_tail


def main() -> None:
    write, close, exit_now, modules = os.write, os.close, os._exit, sys.modules
    job_fd, verdict_fd = int(sys.argv[1]), int(sys.argv[2])
    os.set_inheritable(verdict_fd, False)  # an exec'd image never holds the channel
    with os.fdopen(job_fd, "rb") as f:
        job = marshal.loads(f.read())
    nonce = job.pop("nonce").encode("ascii")
    try:
        if job.get("drop_to"):
            drop_privileges(*job["drop_to"])
        set_limits(job)
        import collections

        # Captured before the program runs: it may replace collections.Counter, not these.
        trusted_dicts = (collections.Counter, collections.OrderedDict, collections.defaultdict)
        done_event = "phibook.verdict." + os.urandom(8).hex()
        tail_code = compile(tail_source(job, done_event), "tests.py", "exec")
        # Checked programs run as module "solution", as in the reference harnesses (whose exec
        # gives no __name__): an `if __name__ == "__main__":` block there does not run.
        module_name = "solution" if job.get("tests") is not None else "__main__"
        main_module = ModuleType(module_name)
        main_module.__file__ = "main.py"
        namespace = main_module.__dict__
        # site is not loaded (-S), so exit() and quit() are added as site would: they raise SystemExit.
        builtins.exit = builtins.quit = Quitter()
        run_tail = make_runner(tail_code, namespace, modules, dict(modules), dict(builtins.__dict__), trusted_dicts,
                               guard=job.get("tests") is not None)
        modules[module_name] = main_module
        sys.argv = ["main.py"]
        install_guard(verdict_fd, nonce, tail_code, run_tail.__code__, done_event)
    except BaseException as exc:  # noqa: BLE001 - the jail or the job is broken, not the program
        write(verdict_fd, nonce + b" setup-error " + repr(exc).encode("utf-8", "replace")[:2000] + b"\n")
        exit_now(3)
    del nonce  # from here on only the hook holds it
    try:
        exec(compile(job["program"], "main.py", "exec"), namespace)
        run_tail()
        raise RuntimeError("the tests ended without reaching the verdict line")
    except BaseException as exc:  # noqa: BLE001 - any way out before the verdict is a failure
        close(verdict_fd)
        report_failure(exc)
        exit_now(1)


def report_failure(exc: BaseException) -> None:
    """The program's traceback (from its own frames on) on stderr, for the failure's reason."""
    import traceback

    try:
        if isinstance(exc, SystemExit):
            sys.stderr.write(f"SystemExit: {exc.code!r} (the program exited before it finished)\n")
        else:
            tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
            traceback.print_exception(type(exc), exc, tb)
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001, S110 - a hostile exception cannot make us report more
        pass


if __name__ == "__main__":
    main()
