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

How the program is kept from forging a line or bending the tests:

- Two kinds of thread. The harness (this file's main, the tests) runs on the main thread; every
  piece of the program's code (its top level, each call the tests make) runs on a fresh worker
  thread, so no frame the program can walk to (sys._getframe, f_back, tracebacks) belongs to the
  harness or the tests. Values cross back as plain copies (numbers, strings, bytes, None, lists,
  tuples, dicts, sets, and instances of the program's own classes that override nothing);
  exceptions cross as the nearest built-in exception. Automatic garbage collection is off (a
  finalizer of the program's would otherwise run on whatever thread allocates).
- The nonce lives only in the closure of an audit hook (PEP 578; hooks cannot be removed) whose
  functions have globals of their own, referenced by nothing the program can reach. The hook
  writes the verdict itself, from an audit event raised on the last line of a "tail" code object
  (the tests followed by that line, or a call of the requested function followed by it); it
  accepts the event only from a frame running that code object, which only the harness may exec,
  once. Then it ends the process at once, so nothing of the program runs after the verdict.
- The hook ends the program on the routes to raw memory or to other objects: gc object walks,
  tracing and profiling, more audit hooks, ctypes and other native-memory modules, code objects
  built by hand (code.__new__, marshal.loads of anything but the installed .pyc files), other
  threads' frames, and /proc (the jail has none). The jail's seccomp filter refuses new processes
  and signal handlers.
- The tests see pristine builtins and freshly imported modules, so monkeypatching cannot bend
  them, and plain values only, so an always-equal object cannot pass a comparison.
"""

import builtins
import marshal
import os
import sys

# Every function below is created with this copy as its builtins (CPython takes a function's
# builtins from its module's __builtins__ when the function is made): the program can change
# the real builtins module, not what the harness's code looks up. main() also takes this module
# out of sys.modules, so the program finds neither.
__builtins__ = dict(builtins.__dict__)

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
REPORTED_TYPES = (int, float, str, bool, type(None))
# What a class of the program's may hold for its instances to reach the tests: data, slots and
# __init__ (which runs on a worker thread). No methods, properties or dunders that change ==,
# ordering, truth, arithmetic, iteration, hashing, attribute access or finalization.
INERT_DUNDERS = frozenset({"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__init__",
                           "__slots__", "__firstlineno__", "__static_attributes__"})
MAX_DEPTH = 200
MAX_VALUE_CHARS = 10_000
ModuleType = type(sys)
FunctionType = type(lambda: None)


def install_guard(verdict_fd, nonce, tail_code, runner_code, done_event, prefix, names):
    """Add the audit hook that holds the nonce, refuses the dangerous events, and writes the verdict
    when ``tail_code`` reaches its last line; writes "ready". Called through ``isolated`` so that
    its functions' globals are a dict of their own (``names``), not this module's."""
    import _thread
    import gc
    import os
    import sys

    write, exit_now, getframe, thread_id = os.write, os._exit, sys._getframe, _thread.get_ident
    denied_events, denied_imports, reported, max_chars = names
    busy = set()  # threads inside the hook: its own file reads and attribute reads raise events too
    state = {"tail_started": False, "last_pyc": None}

    def die(why):
        write(2, f"\nsandbox: {why}; the program was stopped\n".encode("utf-8", "replace"))
        exit_now(101)

    def trusted_bytecode(data):
        # marshal.loads is how imports read .pyc files; anything else could be hand-made bytecode.
        path, state["last_pyc"] = state["last_pyc"], None
        if path is None or not (type(data) is bytes or type(data) is memoryview):
            return False
        with open(path, "rb") as f:
            return f.read()[16:] == bytes(data)

    def verdict(args):
        if getframe(3).f_code is not tail_code:  # 0 verdict, 1 check, 2 hook, 3 who raised the event
            die("only the harness may report a verdict")
        if not args:
            line = b"pass"
        else:
            value = args[0]
            text = repr(value) if any(type(value) is t for t in reported) else "None"
            line = b"done " + (text if len(text) <= max_chars else "None").encode("utf-8", "replace")
        write(verdict_fd, nonce + b" " + line + b"\n")
        exit_now(0)

    def check(event, args):
        if event in denied_events:
            die(f"{event} is not allowed")
        if event == "import":
            name = args[0]
            if type(name) is not str:  # a str subclass could lie about its value
                die("import of a module name that is not a str")
            if name.partition(".")[0] in denied_imports or name == "gc" and thread_id() != main_thread:
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
                # getframe: 0 check, 1 hook, 2 the caller of exec (the harness's runner)
                if (event == "exec" and not state["tail_started"] and thread_id() == main_thread
                        and getframe(2).f_code is runner_code):
                    state["tail_started"] = True
                else:
                    die("the tests may run once, from the harness")
        elif event == done_event:
            if thread_id() != main_thread:
                die("only the harness may report a verdict")
            verdict(args)

    def hook(event, args):
        me = thread_id()
        if me in busy:
            return
        busy.add(me)
        try:
            check(event, args)
        except BaseException as exc:  # noqa: BLE001 - never let a traceback through this frame
            die(f"sandbox error on {type(exc).__name__}")
        finally:
            busy.discard(me)

    main_thread = thread_id()
    gc.disable()
    sys.addaudithook(hook)
    write(verdict_fd, nonce + b" ready\n")


def isolated(fn):
    """``fn`` re-made with a globals dict of its own (a copy of builtins only): the functions it
    defines cannot be changed through this module's globals, nor change them."""
    return FunctionType(fn.__code__, {"__builtins__": dict(builtins.__dict__)}, fn.__name__, fn.__defaults__,
                        fn.__closure__)


# --------------------------------------------------------------------------- values


class _Slotted:
    __slots__ = ("slot",)


MEMBER_DESCRIPTOR = type(_Slotted.__dict__["slot"])
GETSET_DESCRIPTOR = type(type("_WithDict", (), {}).__dict__["__dict__"])
BUILTIN_EXCEPTIONS = tuple(v for v in vars(builtins).values() if type(v) is type and issubclass(v, BaseException))
CONTAINERS = (list, tuple, dict, set, frozenset)


class Copier:
    """Copies values between the program's threads and the harness's, so that neither ever holds
    an object the other made: plain built-in values are rebuilt with the built-in types' own
    methods (none of the program's code runs), and instances of the program's inert classes are
    re-created field by field. Everything else (callables, subclasses of built-ins, objects that
    override ==) is refused with TypeError. Originals of the program's are kept alive in
    ``graveyard`` until the process ends, so that no finalizer of the program's ever runs on the
    harness's thread."""

    def __init__(self, trusted_dicts) -> None:
        # collections' originals, captured before the program ran: they compare like dicts.
        self.trusted_dicts = trusted_dicts
        self.graveyard: list = []

    def copy(self, value, depth=0, memo=None):
        kind = type(value)
        # Identity tests throughout: `kind in (...)` would call ==, which a metaclass can answer.
        if any(kind is t for t in PLAIN_SCALARS):
            return value
        self.graveyard.append(value)
        if depth > MAX_DEPTH:
            raise TypeError("the value is nested too deeply to compare")
        memo = {} if memo is None else memo
        if id(value) in memo:
            if memo[id(value)] is None:
                raise TypeError("the value contains itself")
            return memo[id(value)]
        if kind is list or kind is tuple:
            memo[id(value)] = None
            items = [self.copy(v, depth + 1, memo)
                     for v in (list.__iter__(value) if kind is list else tuple.__iter__(value))]
            out = items if kind is list else tuple(items)
        elif kind is dict or any(kind is t for t in self.trusted_dicts):
            memo[id(value)] = None
            out = {self.copy(k, depth + 1, memo): self.copy(v, depth + 1, memo) for k, v in dict.items(value)}
        elif kind is set or kind is frozenset:
            memo[id(value)] = None
            items = [self.copy(v, depth + 1, memo)
                     for v in (set.__iter__(value) if kind is set else frozenset.__iter__(value))]
            out = set(items) if kind is set else frozenset(items)
        elif self.inert_class(kind):
            out = object.__new__(kind)
            memo[id(value)] = out  # trees may point back up
            fields = self.fields(kind, value)
            self.graveyard.append(fields)
            for name, field_value in fields:
                self.set_field(kind, out, name, self.copy(field_value, depth + 1, memo))
            return out
        else:
            raise TypeError(f"a {kind.__module__}.{kind.__qualname__}: the checker passes and compares only plain "
                            "values (numbers, strings, bytes, None, lists, tuples, dicts, sets) and instances of "
                            "the program's classes that override nothing")
        memo[id(value)] = out
        return out

    @staticmethod
    def inert_class(kind) -> bool:
        """A plain class of the program's that overrides nothing: data, slots and a plain __init__
        only, so its instances compare by identity and support no arithmetic (a tree node)."""
        if type(kind) is not type or any(kind is t for t in CONTAINERS) or kind.__mro__[-1] is not object:
            return False
        for klass in kind.__mro__[:-1]:
            if type(klass) is not type:
                return False
            for name, attr in dict.items(klass.__dict__.copy()):
                if type(name) is not str:
                    return False
                if name.startswith("__") and name.endswith("__"):
                    if name not in INERT_DUNDERS:
                        return False
                    if name in ("__dict__", "__weakref__") and type(attr) is not GETSET_DESCRIPTOR:
                        return False
                    if name == "__init__" and type(attr) is not FunctionType:
                        return False
                elif not any(type(attr) is t for t in PLAIN_SCALARS) and type(attr) is not MEMBER_DESCRIPTOR:
                    return False
        return True

    @staticmethod
    def fields(kind, value) -> list:
        """(name, value) of an inert instance: its __dict__ and its slots, read with C descriptors."""
        out = []
        try:
            attrs = object.__getattribute__(value, "__dict__")
        except AttributeError:
            attrs = {}
        if type(attrs) is dict:
            out.extend(dict.items(attrs))
        for klass in kind.__mro__[:-1]:
            for name, attr in dict.items(klass.__dict__.copy()):
                if type(attr) is MEMBER_DESCRIPTOR:
                    try:
                        out.append((name, attr.__get__(value, kind)))
                    except AttributeError:
                        pass
        return out

    @staticmethod
    def set_field(kind, obj, name, value) -> None:
        for klass in kind.__mro__[:-1]:
            attr = klass.__dict__.get(name)
            if type(attr) is MEMBER_DESCRIPTOR:
                attr.__set__(obj, value)
                return
        object.__getattribute__(obj, "__dict__")[name] = value

    def exception(self, exc) -> BaseException:
        """The program's exception as the nearest built-in one, its arguments kept only if plain."""
        self.graveyard.append(exc)
        kind = type(exc)
        base = RuntimeError
        if type(kind) is type:
            for klass in kind.__mro__:
                if any(klass is b for b in BUILTIN_EXCEPTIONS):
                    base = klass
                    break
        try:
            args = self.copy(BaseException.__dict__["args"].__get__(exc))
            return base(*args)
        except BaseException:  # noqa: BLE001 - not plain, or a base that wants other arguments
            return base("(an exception of the program's)")


def make_worker(fn, args, kwargs, box, done):
    """The body of a worker thread. Made through ``isolated`` per call: the program can walk up to
    this frame, and all it finds there is its own function, copies of the arguments and the box."""
    def work():
        try:
            box.append((True, fn(*args, **kwargs), None))
        except BaseException as exc:  # noqa: BLE001 - delivered to the harness's thread
            try:
                import traceback

                tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
                text = "".join(traceback.format_exception(type(exc), exc, tb))
            except BaseException:  # noqa: BLE001
                text = None
            box.append((False, exc, text))
        finally:
            done.release()
    return work


class Harness:
    """The main thread's side: runs the program's code on worker threads, copies values across."""

    def __init__(self, copier: Copier) -> None:
        import _thread

        self.start_thread, self.lock, self.copier = _thread.start_new_thread, _thread.allocate_lock, copier

    def call(self, fn, args=(), kwargs=None, copy_args=True):
        """``fn(*args, **kwargs)`` on a fresh worker thread: the value copied back, or the exception
        as the nearest built-in one (with the program's traceback text on ``__notes__``-like
        ``phibook_trace``)."""
        if copy_args:
            args = self.copier.copy(tuple(args))
            kwargs = self.copier.copy(dict(kwargs or {}))
        box, done = [], self.lock()
        self.copier.graveyard.append(box)
        done.acquire()
        self.start_thread(isolated(make_worker)(fn, args, kwargs or {}, box, done), ())
        done.acquire()
        entry = list.__getitem__(box, 0) if list.__len__(box) else None
        if type(entry) is not tuple or tuple.__len__(entry) != 3:
            raise RuntimeError("the program's thread ended without a result")
        ok, value, trace = entry
        if ok is True:
            return self.copier.copy(value)
        exc = self.copier.exception(value)
        if type(trace) is str:
            exc.phibook_trace = trace
        raise exc

    def guarded(self, fn):
        """``fn`` as the tests see it (see ``call``)."""
        def call(*args, **kwargs):
            return self.call(fn, args, kwargs)
        return call


# --------------------------------------------------------------------------- setup


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


def tail_source(job: dict, done_event: str) -> str:
    """The code that runs after the program: the tests, or the call, then the verdict line."""
    end = f"_phibook_flush()\n__import__('sys').audit({done_event!r}"
    if job.get("tests") is not None:
        return f"{job['tests']}\n\n{end})\n"
    if job.get("call"):
        return f"_phibook_value = {job['call']}()\n{end}, _phibook_value)\n"
    return f"{end}, None)\n"


def make_runner(tail_code, namespace, import_state, pristine_builtins, harness, flush):
    """The one function that may exec the tail: beside the program's names, with builtins and the
    import system as they were before it ran (what it imported or replaced is imported afresh),
    its callables running on worker threads and its other values copied (or left out)."""
    def run_tail() -> None:
        restore_imports(import_state, harness.copier.graveyard)
        tail_ns = {"__builtins__": pristine_builtins, "__name__": "tests", "_phibook_flush": flush}
        items = list(dict.items(namespace))
        harness.copier.graveyard.append(items)
        for name, value in items:
            if type(name) is not str or name.startswith("__") or type(value) is ModuleType:
                continue  # the tests import what they use, afresh
            if callable(value):
                tail_ns[name] = harness.guarded(value)
            else:
                try:
                    tail_ns[name] = harness.copier.copy(value)
                except TypeError:
                    pass  # not a plain value: out of the tests' reach
        exec(tail_code, tail_ns)
    return run_tail


def save_imports() -> tuple:
    """sys.modules, the import hooks and the import machinery's own globals, before the program."""
    machinery = [sys.modules[name] for name in ("_frozen_importlib", "_frozen_importlib_external")]
    return (sys.modules, dict(sys.modules), list(sys.meta_path), list(sys.path_hooks), list(sys.path),
            [(module, dict(module.__dict__)) for module in machinery])


def restore_imports(state: tuple, graveyard: list) -> None:
    """Undo what the program did to the import system, so that the tests' imports run stdlib code
    only: modules it imported or replaced are dropped (imported afresh), finders and importlib's
    functions put back. What is taken out goes to ``graveyard`` (see Copier)."""
    modules, before, meta_path, path_hooks, path, saved = state
    for name in list(modules):
        if before.get(name) is not modules[name]:
            graveyard.append(modules[name])
            del modules[name]
    modules.update(before)
    graveyard.extend([sys.modules, sys.meta_path, sys.path_hooks, sys.path, sys.path_importer_cache])
    # New plain objects, not the program's (a list subclass could run code when assigned into).
    sys.modules, sys.meta_path, sys.path_hooks, sys.path = modules, list(meta_path), list(path_hooks), list(path)
    sys.path_importer_cache = {}
    for module, namespace in saved:
        graveyard.append(dict(module.__dict__))
        module.__dict__.clear()
        module.__dict__.update(namespace)


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
        sys.dont_write_bytecode = True
        import collections

        # Captured before the program runs: it may replace collections.Counter, not these.
        harness = Harness(Copier((collections.Counter, collections.OrderedDict, collections.defaultdict)))
        done_event = "phibook.verdict." + os.urandom(8).hex()
        tail_code = compile(tail_source(job, done_event), "tests.py", "exec")
        # Checked programs run as module "solution", as in the reference harnesses (whose exec
        # gives no __name__): an `if __name__ == "__main__":` block there does not run. Either way
        # the program's module takes this launcher's place as sys.modules["__main__"].
        module_name = "solution" if job.get("tests") is not None else "__main__"
        main_module = ModuleType(module_name)
        main_module.__file__ = "main.py"
        main_module.__builtins__ = builtins  # the real module, as any program has
        modules["__main__"] = main_module
        namespace = main_module.__dict__
        builtins.exit = builtins.quit = sys.exit  # site is not loaded (-S); a C function: nothing of ours leaks
        stdout, stderr = sys.stdout, sys.stderr

        def flush() -> None:  # the original streams: the program may have replaced sys.stdout
            for stream in (stdout, stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass

        modules[module_name] = main_module
        sys.argv = ["main.py"]
        import gc

        modules["gc"] = gc_for_programs(gc)
        run_tail = make_runner(tail_code, namespace, save_imports(), dict(builtins.__dict__), harness, flush)
        isolated(install_guard)(
            verdict_fd, nonce, tail_code, run_tail.__code__, done_event, sys.prefix.rstrip("/") + "/",
            (DENIED_EVENTS, DENIED_IMPORTS, REPORTED_TYPES, MAX_VALUE_CHARS))
    except BaseException as exc:  # noqa: BLE001 - the jail or the job is broken, not the program
        write(verdict_fd, nonce + b" setup-error " + repr(exc).encode("utf-8", "replace")[:2000] + b"\n")
        exit_now(3)
    del nonce  # from here on only the hook holds it
    try:
        harness.call(exec, (compile(job["program"], "main.py", "exec"), namespace), copy_args=False)
        run_tail()
        raise RuntimeError("the tests ended without reaching the verdict line")
    except BaseException as exc:  # noqa: BLE001 - any way out before the verdict is a failure
        close(verdict_fd)
        report_failure(exc)
        exit_now(1)


def gc_for_programs(gc) -> ModuleType:
    """The gc module as programs see it: collection stays manual (a collection the program asks
    for runs its finalizers on its own thread), and the object walks end the program (audit)."""
    shown = ModuleType("gc")
    shown.__dict__.update({k: v for k, v in gc.__dict__.items() if k not in ("enable", "isenabled")})
    shown.enable, shown.isenabled = int, bool  # C callables: enable() does nothing, isenabled() is False
    return shown


def report_failure(exc: BaseException) -> None:
    """Why the program failed, on stderr: the traceback from its own code on."""
    import traceback

    try:
        trace = getattr(exc, "phibook_trace", None)
        if isinstance(exc, SystemExit):
            sys.stderr.write(f"SystemExit: {exc.code!r} (the program exited before it finished)\n")
        elif type(trace) is str:
            sys.stderr.write(trace)
        else:
            tb = exc.__traceback__
            while tb is not None and tb.tb_frame.f_code.co_filename not in ("main.py", "tests.py"):
                tb = tb.tb_next
            traceback.print_exception(type(exc), exc, tb)
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001, S110 - a hostile exception cannot make us report more
        pass


if __name__ == "__main__":
    main()
