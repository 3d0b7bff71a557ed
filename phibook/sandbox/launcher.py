"""The sandbox's child side: two processes per program, and the verdict only in the one the program never runs in.

Started twice per program, each in a jail of its own (standard library only: no phibook import):

    python -I -S launcher.py program JOB_FD     the model-written program
    python -I -S launcher.py harness JOB_FD     the benchmark's tests (trusted code only)

The parent connects the two by a pair of pipes and reads the verdict from the harness alone,
on a private pipe, as lines carrying a random nonce:

    <nonce> ready            the harness is set up
    <nonce> pass             the tests ran to their last line
    <nonce> done <kind> <v>  the called function returned (kind: its type's name; v: a literal or None)
    <nonce> fail <reason>    the program raised, exited or died, or a test failed
    <nonce> setup-error …    the jail or the job is broken

**The boundary.** The program's process executes the program (on its main thread, as any script
runs) and exposes its top-level names. The harness's process runs the tests; each name of the
program is a ``Remote`` there: calling it sends the arguments across and returns the decoded
result. Only data crosses, as length-prefixed ``marshal`` of built-in data (dicts, lists,
strings, bytes, numbers, None) with type tags (``encode``/``decode``; anything else marshal
could build, a code object, is refused by ``decode``, never run):
None, bools, ints, floats (NaN, inf too), str, bytes, bytearray, complex, lists, tuples
(namedtuples as tuples), dicts, sets, frozensets, range, Fraction, Decimal, Counter,
OrderedDict, defaultdict (without its factory), numpy scalars and arrays of numbers and strings,
exhausted iterators (as an iterator over a list), exceptions (as the nearest built-in type, its
message and the program's traceback text). Anything else the program holds (its classes, their
instances, closures) crosses as a handle, a number naming the object in its owner's process:
the harness may call it, read and set its attributes (each a request answered with data), and it
compares by identity. Callables the tests pass (lambdas) cross the other way as handles the
program may call back. After a call, lists, dicts, sets and bytearrays passed as arguments take
the values the program left in them (in-place mutation is seen as in the reference harnesses).

Decoding builds values with the standard types' constructors and never runs anything the
program wrote: its classes, hashes, comparisons, finalizers and threads all stay in its own
process, and the harness compares plain values with ``==``. The tests run with the harness's
builtins; a top-level name of the program that is a builtin's name is left out of the tests'
globals unless it is the function under test.
"""

import builtins
import marshal
import os
import sys

PRISTINE = frozenset(dir(builtins))
MAX_FRAME = 64 << 20  # bytes in one message
MAX_DEPTH = 200
MAX_ITEMS = 1_000_000  # items drained from an iterator the program returns
MAX_VALUE_CHARS = 10_000
MAX_REPORT_BYTES = 256 << 10  # one verdict line (the harness's introspection is the long one)
NUMPY_KINDS = "biufcUS"


class Ended(Exception):
    """The other process closed its end (it exited, crashed or was killed)."""


class Refused(Exception):
    """A request this side does not serve."""


# --------------------------------------------------------------------------- the wire


def read_exact(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise Ended("the other side closed the channel")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv(fd: int) -> dict:
    """One message: marshal of built-in data only (no code object survives ``decode``; marshal
    builds values, it never runs them). An unreadable message is the other side's end."""
    size = int.from_bytes(read_exact(fd, 4), "big")
    if size > MAX_FRAME:
        raise Ended(f"a message of {size} bytes (more than {MAX_FRAME})")
    try:
        msg = marshal.loads(read_exact(fd, size))
    except (ValueError, EOFError, TypeError) as exc:
        raise Ended(f"an unreadable message ({exc})") from None
    if type(msg) is not dict:
        raise Ended("a message that is not a dict")
    return msg


def send(fd: int, msg: dict) -> None:
    data = marshal.dumps(msg)
    data = len(data).to_bytes(4, "big") + data
    while data:
        data = data[os.write(fd, data):]


def builtin_exception(exc: BaseException) -> str:
    """The name of the nearest built-in exception class of ``exc``."""
    for klass in type(exc).__mro__:
        if getattr(builtins, klass.__name__, None) is klass:
            return klass.__name__
    return "RuntimeError"


# --------------------------------------------------------------------------- the peer


class Remote:
    """An object of the other process's, named by a number: calls, attribute reads and writes go
    across as requests; == and hash are by identity."""

    __slots__ = ("_peer", "_id")

    def __init__(self, peer: "Peer", ident: int) -> None:
        object.__setattr__(self, "_peer", peer)
        object.__setattr__(self, "_id", ident)

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self._peer.request({"k": "call", "h": self._id}, args, kwargs)

    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._peer.request({"k": "get", "h": self._id, "name": name}, (), {})

    def __setattr__(self, name: str, value: object) -> None:
        self._peer.request({"k": "set", "h": self._id, "name": name}, (value,), {})

    def __eq__(self, other: object) -> bool:
        return type(other) is Remote and other._peer is self._peer and other._id == self._id

    def __hash__(self) -> int:
        return hash(("remote", self._id))

    def __repr__(self) -> str:
        return f"<object {self._id} of the program>"


class Peer:
    """One end of the channel: sends requests and serves the other side's while it waits."""

    def __init__(self, rfd: int, wfd: int, serve_all: bool) -> None:
        self.rfd, self.wfd = rfd, wfd
        self.serve_all = serve_all  # the program's side serves attributes too; the harness only calls
        self.exported: list = []
        self.next_id = 0
        self.numpy = None

    # -- values

    def export(self, value: object) -> int:
        self.exported.append(value)
        return len(self.exported) - 1

    def encode(self, value: object, depth: int = 0, path: frozenset = frozenset()) -> object:
        """``value`` as tagged built-in data (see the module docstring); what cannot go by value
        goes as a handle."""
        t = type(value)
        if value is None or t is bool or t is str:
            return value
        if t is int:
            return value if -(1 << 53) < value < (1 << 53) else ["I", format(value, "x")]
        if t is float:
            return value if value - value == 0 else ["x", repr(value)]
        if depth > MAX_DEPTH:
            raise ValueError("the value is nested too deeply to send")
        if id(value) in path:
            raise ValueError("the value contains itself")
        inner = path | {id(value)}

        def items(values):
            return [self.encode(v, depth + 1, inner) for v in values]

        def pairs(mapping):
            return [[self.encode(k, depth + 1, inner), self.encode(v, depth + 1, inner)]
                    for k, v in dict.items(mapping)]

        if t is Remote:
            if value._peer is not self:
                raise ValueError("a handle of another channel")
            return ["r", value._id]
        if isinstance(value, bool):
            return bool(value)
        if isinstance(value, int):
            return self.encode(int.__index__(value), depth)
        if isinstance(value, float):
            return self.encode(float.__float__(value), depth)
        if isinstance(value, str):
            return str.__str__(value)
        if isinstance(value, tuple):  # namedtuples too: they compare as tuples
            return ["t", *items(tuple.__iter__(value))]
        if isinstance(value, list):
            return ["l", *items(list.__iter__(value))]
        if isinstance(value, dict):
            module = sys.modules.get("collections")
            for tag, name in (("C", "Counter"), ("O", "OrderedDict"), ("dd", "defaultdict")):
                if module is not None and isinstance(value, getattr(module, name)):
                    return [tag, *pairs(value)]
            return ["d", *pairs(value)]
        if isinstance(value, (set, frozenset)):
            return ["s" if isinstance(value, set) else "f", *items(value)]
        if isinstance(value, bytes):
            return ["b", bytes(value)]
        if isinstance(value, bytearray):
            return ["B", bytes(value)]
        if isinstance(value, complex):
            return ["c", self.encode(value.real, depth), self.encode(value.imag, depth)]
        if t is range:
            return ["R", value.start, value.stop, value.step]
        module = getattr(t, "__module__", "")
        if module == "fractions" and t.__name__ == "Fraction":
            return ["F", self.encode(int(value.numerator)), self.encode(int(value.denominator))]
        if module in ("decimal", "_decimal", "_pydecimal") and t.__name__ == "Decimal":
            return ["D", str(value)]
        np = sys.modules.get("numpy")
        if np is not None and isinstance(value, (np.ndarray, np.generic)) and value.dtype.kind in NUMPY_KINDS:
            if isinstance(value, np.ndarray):
                return ["N", value.dtype.str, list(value.shape), self.encode(value.tolist(), depth + 1, inner)]
            return ["n", value.dtype.str, self.encode(value.item(), depth + 1, inner)]
        if t.__name__ in ("dict_keys", "dict_values", "dict_items") or (
                hasattr(t, "__next__") and hasattr(t, "__iter__") and not callable(getattr(value, "send", None))
                or t.__name__ == "generator"):
            drained = []
            for item in value:
                drained.append(item)
                if len(drained) > MAX_ITEMS:
                    raise ValueError("the iterator yields too many items to send")
            return ["it", *items(drained)]
        return ["h", self.export(value)]

    def decode(self, data: object, depth: int = 0) -> object:
        """Tagged data back to a value, built with the standard types' constructors only."""
        t = type(data)
        if data is None or t is bool or t is str or t is int or t is float:
            return data
        if t is not list or not data or type(data[0]) is not str or depth > MAX_DEPTH:
            raise ValueError("a malformed value")
        tag, rest = data[0], data[1:]

        def items():
            return [self.decode(v, depth + 1) for v in rest]

        def pairs():
            out = []
            for pair in rest:
                if type(pair) is not list or len(pair) != 2:
                    raise ValueError("a malformed mapping")
                out.append((self.decode(pair[0], depth + 1), self.decode(pair[1], depth + 1)))
            return out

        if tag == "I":
            return int(str(rest[0]), 16)
        if tag == "x":
            return float(str(rest[0]))
        if tag == "l":
            return items()
        if tag == "t":
            return tuple(items())
        if tag == "s":
            return set(items())
        if tag == "f":
            return frozenset(items())
        if tag == "it":
            return iter(items())
        if tag == "d":
            return dict(pairs())
        if tag in ("C", "O", "dd"):
            import collections

            if tag == "dd":
                return collections.defaultdict(None, pairs())
            return (collections.Counter if tag == "C" else collections.OrderedDict)(dict(pairs()))
        if tag == "b" or tag == "B":
            if type(rest[0]) is not bytes:
                raise ValueError("malformed bytes")
            return rest[0] if tag == "b" else bytearray(rest[0])
        if tag == "c":
            return complex(float(self.decode(rest[0], depth + 1)), float(self.decode(rest[1], depth + 1)))
        if tag == "R":
            return range(*[int(v) for v in rest if type(v) is int])
        if tag == "F":
            import fractions

            num, den = (self.decode(v, depth + 1) for v in rest)
            if type(num) is not int or type(den) is not int:
                raise ValueError("a malformed Fraction")
            return fractions.Fraction(num, den)
        if tag == "D":
            import decimal

            return decimal.Decimal(str(rest[0]))
        if tag in ("N", "n"):
            np = self.load_numpy()
            dtype = np.dtype(self.numpy_dtype(rest[0]))
            if tag == "n":
                return dtype.type(self.decode(rest[1], depth + 1))
            shape = tuple(int(d) for d in rest[1] if type(d) is int)
            return np.array(self.decode(rest[2], depth + 1), dtype=dtype).reshape(shape)
        if tag == "h":
            if type(rest[0]) is not int:
                raise ValueError("a malformed handle")
            return Remote(self, rest[0])
        if tag == "r":
            if type(rest[0]) is not int or not 0 <= rest[0] < len(self.exported):
                raise ValueError("a handle this side never gave out")
            return self.exported[rest[0]]
        raise ValueError(f"an unknown value tag {tag[:20]!r}")

    def load_numpy(self) -> object:
        if self.numpy is None:
            import numpy

            self.numpy = numpy
        return self.numpy

    @staticmethod
    def numpy_dtype(text: object) -> str:
        text = str(text)
        if len(text) > 12 or text[:1] not in "<>|=" or text[1:2] not in NUMPY_KINDS or not text[2:].isdigit():
            raise ValueError("a malformed numpy dtype")
        return text

    # -- requests

    def request(self, msg: dict, args: tuple, kwargs: dict) -> object:
        """Send a request, serve the other side's until its answer comes, return the decoded value."""
        self.next_id += 1
        ident = self.next_id
        enc_args = [self.encode(a) for a in args]
        send(self.wfd, dict(msg, id=ident, args=enc_args, kw={k: self.encode(v) for k, v in kwargs.items()}))
        while True:
            reply = recv(self.rfd)
            if reply.get("k") in ("call", "get", "set"):
                self.serve(reply)
                continue
            if reply.get("id") != ident:
                raise Ended("an answer out of order")
            if reply.get("k") == "ret":
                for index, value in reply.get("mut") or []:
                    if type(index) is int and 0 <= index < len(args):
                        write_back(args[index], self.decode(value))
                return self.decode(reply.get("v"))
            if reply.get("k") == "raise":
                raise remote_exception(reply)
            raise Ended("an unknown answer")

    def serve(self, msg: dict) -> None:
        """Answer one request of the other side's with ``ret`` or ``raise``."""
        ident = msg.get("id")
        try:
            target = self.decode(["r", msg.get("h")])
            args = [self.decode(a) for a in msg.get("args") or []]
            kwargs = {str(k): self.decode(v) for k, v in (msg.get("kw") or {}).items()}
            kind = msg.get("k")
            if kind != "call" and not self.serve_all:
                raise Refused("the tests' objects answer calls only")
            if kind == "call":
                if not callable(target):
                    raise TypeError(f"'{type(target).__name__}' object is not callable")
                before = list(msg.get("args") or [])
                value = target(*args, **kwargs)
                mut = []
                for i, a in enumerate(args):
                    if isinstance(a, (list, dict, set, bytearray)):
                        enc = self.encode(a)
                        if enc != before[i]:  # encoded data: plain lists, str, numbers
                            mut.append([i, enc])
                reply = {"k": "ret", "id": ident, "v": self.encode(value), "mut": mut}
            elif kind == "get":
                reply = {"k": "ret", "id": ident, "v": self.encode(getattr(target, str(msg.get("name"))))}
            else:
                setattr(target, str(msg.get("name")), args[0])
                reply = {"k": "ret", "id": ident, "v": None}
        except Ended:
            raise
        except BaseException as exc:  # noqa: BLE001 - the other side gets it as data
            reply = {"k": "raise", "id": ident, "type": builtin_exception(exc), "msg": safe_str(exc),
                     "trace": trace_text(exc)}
        send(self.wfd, reply)


def write_back(original: object, new: object) -> None:
    """In-place mutation by the other side, applied to the argument we passed."""
    if type(original) is list and type(new) is list:
        original[:] = new
    elif type(original) is dict and isinstance(new, dict):
        original.clear()
        original.update(new)
    elif type(original) is set and isinstance(new, set):
        original.clear()
        original.update(new)
    elif type(original) is bytearray and isinstance(new, bytearray):
        original[:] = new


def remote_exception(reply: dict) -> BaseException:
    name, msg = str(reply.get("type")), str(reply.get("msg"))[:MAX_VALUE_CHARS]
    klass = getattr(builtins, name, None) if name in PRISTINE else None
    if name in ("SystemExit", "KeyboardInterrupt", "GeneratorExit"):
        exc = ProgramExit(f"{name}: {msg}" if msg else name)
    elif type(klass) is type and issubclass(klass, Exception):
        try:
            exc = klass(msg)
        except Exception:  # noqa: BLE001 - a class that wants other arguments
            exc = RuntimeError(f"{name}: {msg}")
    else:
        exc = RuntimeError(f"{name}: {msg}")
    exc.phibook_trace = str(reply.get("trace") or "")[:MAX_FRAME]
    return exc


class ProgramExit(Exception):
    """The program's top level raised or exited, or it exited inside a call: the tests fail."""


def safe_str(exc: BaseException) -> str:
    try:
        text = str(exc)
    except BaseException:  # noqa: BLE001
        text = ""
    return text[:MAX_VALUE_CHARS]


def trace_text(exc: BaseException) -> str:
    """The traceback from the program's own frames on (main.py), as text."""
    try:
        import traceback

        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != "main.py":
            tb = tb.tb_next
        return "".join(traceback.format_exception(type(exc), exc, tb))[-20_000:]
    except BaseException:  # noqa: BLE001
        return ""


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


def read_job(fd: int) -> dict:
    with os.fdopen(fd, "rb") as f:
        return marshal.loads(f.read())


def setup(job: dict) -> None:
    if job.get("drop_to"):
        drop_privileges(*job["drop_to"])
    set_limits(job)
    sys.dont_write_bytecode = True
    for path in job.get("extra_paths") or ():
        sys.path.append(path)  # numpy's folder, bound read-only into the jail


# --------------------------------------------------------------------------- the program's process


def program_main(job: dict) -> None:
    """Run the program on the main thread, expose its names, answer the harness's requests."""
    rfd, wfd = job["from_harness"], job["to_harness"]
    for fd in (rfd, wfd):
        os.set_inheritable(fd, False)
    try:
        setup(job)
    except BaseException as exc:  # noqa: BLE001 - the jail is broken: the harness reports it
        sys.stderr.write(f"phibook-sandbox: the program's process could not be set up: {exc!r}\n")
        flush()
        os._exit(3)
    send(wfd, {"k": "started"})  # from here on, whatever happens is the program's doing
    peer = Peer(rfd, wfd, serve_all=True)
    module_name = job["module"]
    main_module = type(sys)(module_name)
    main_module.__file__ = "main.py"
    main_module.__builtins__ = builtins
    sys.modules["__main__"] = sys.modules[module_name] = main_module
    sys.argv = ["main.py"]
    builtins.exit = builtins.quit = sys.exit  # site is not loaded (-S)
    sys.addaudithook(refuse_spawning)
    try:
        exec(compile(job["program"], "main.py", "exec"), main_module.__dict__)
    except BaseException as exc:  # noqa: BLE001 - reported to the harness as data
        trace = trace_text(exc)
        sys.stderr.write(trace if not isinstance(exc, SystemExit) else
                         f"SystemExit: {exc.code!r} (the program exited before it finished)\n")
        flush()
        send(wfd, {"k": "error", "type": builtin_exception(exc), "msg": safe_str(exc),
                   "code": repr(exc.code)[:200] if isinstance(exc, SystemExit) else None})
        os._exit(1)
    names = {}
    for name, value in list(main_module.__dict__.items()):
        if type(name) is not str or name.startswith("__") or type(value) is type(sys):
            continue
        try:
            # Callables and iterators stay here (a top-level itertools.count() the program's
            # functions use must not be drained); other values go across as copies.
            live = callable(value) or hasattr(type(value), "__next__")
            names[name] = ["h", peer.export(value)] if live else peer.encode(value)
        except BaseException:  # noqa: BLE001 - left out of the tests' reach
            continue
    flush()
    send(wfd, {"k": "loaded", "names": names})
    while True:
        try:
            msg = recv(rfd)
        except Ended:
            flush()
            os._exit(2)
        if msg.get("k") == "end":
            flush()
            os._exit(0)
        peer.serve(msg)
        flush()


SPAWN_EVENTS = frozenset({"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
                          "subprocess.Popen"})


def refuse_spawning(event: str, args: tuple) -> None:
    """Spawning fails with PermissionError (the jail's seccomp filter refuses it anyway; this
    makes os.system fail loudly instead of returning -1). Importing subprocess is fine."""
    if event in SPAWN_EVENTS:
        raise PermissionError(f"{event}: the sandbox runs no other programs")


def flush() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001, S110 - a stream the program replaced or closed
            pass


# --------------------------------------------------------------------------- the harness's process


def harness_main(job: dict) -> None:
    verdict_fd = job["verdict"]
    nonce = job["nonce"].encode("ascii")

    def say(line: str) -> None:
        data = nonce + b" " + line.encode("utf-8", "replace")[:MAX_REPORT_BYTES] + b"\n"
        while data:
            data = data[os.write(verdict_fd, data):]

    try:
        setup(job)
        peer = Peer(job["from_program"], job["to_program"], serve_all=False)
        tail = compile(job["tests"], "tests.py", "exec") if job.get("tests") is not None else None
    except BaseException as exc:  # noqa: BLE001 - the jail or the job is broken, not the program
        say("setup-error " + repr(exc)[:2000])
        os._exit(3)
    say("ready")
    state = {"before": introspect()} if job.get("introspect") else None
    try:
        first = recv(peer.rfd)
    except Ended:
        first = {}
    if first.get("k") != "started":  # no program code had run yet: the jail failed, not the program
        say("setup-error the program's process did not start")
        os._exit(3)
    try:
        msg = recv(peer.rfd)
        if msg.get("k") == "error":
            name, text = str(msg.get("type")), str(msg.get("msg"))[:MAX_VALUE_CHARS]
            if name == "SystemExit":
                raise ProgramExit(f"SystemExit: {msg.get('code')} (the program exited before it finished)")
            raise ProgramExit(f"{name}: {text}" if text else name)
        if msg.get("k") != "loaded" or type(msg.get("names")) is not dict:
            raise Ended("the program did not say it loaded")
        allowed = set(job.get("entry") or ())
        names = {}
        for name, value in msg["names"].items():
            if name.isidentifier() and (name not in PRISTINE or name in allowed):
                try:
                    names[name] = peer.decode(value)
                except (ValueError, TypeError):
                    continue
        if tail is not None:
            namespace = {"__builtins__": builtins, "__name__": "tests"}
            namespace.update(names)
            exec(tail, namespace)
            line = "pass"
        elif job.get("call"):
            fn = names.get(job["call"])
            if fn is None:
                raise NameError(f"name {job['call']!r} is not defined")
            line = "done " + reportable(fn())
        else:
            line = "done  None"  # nothing called: no type
        if state is not None:
            state["after"] = introspect()
            say("introspect " + __import__("json").dumps(state))
        send(peer.wfd, {"k": "end"})
    except BaseException as exc:  # noqa: BLE001 - any way out before the end is a failure
        if state is not None:
            state["after"] = introspect()
            say("introspect " + __import__("json").dumps(state))
        say("fail " + failure_reason(exc).replace("\n", " "))
        trace = getattr(exc, "phibook_trace", "")
        if trace:
            sys.stderr.write(trace)
        elif type(exc) is not Ended and type(exc) is not ProgramExit:
            import traceback

            tb = exc.__traceback__
            while tb is not None and tb.tb_frame.f_code.co_filename != "tests.py":
                tb = tb.tb_next
            sys.stderr.write("".join(traceback.format_exception(type(exc), exc, tb)))
        flush()
        os._exit(1)
    say(line)
    flush()
    os._exit(0)


def failure_reason(exc: BaseException) -> str:
    if type(exc) is Ended:
        return "the program ended before it finished"
    if type(exc) is ProgramExit:
        return str(exc)
    text = safe_str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def reportable(value: object) -> str:
    """'<type> <literal>' for the parent: numbers (Fraction, Decimal and numpy ones as int or
    float), strings, bools and None as literals; anything else as its type and None."""
    import decimal
    import fractions
    import math

    kind = type(value).__name__
    np = sys.modules.get("numpy")
    if type(value) is fractions.Fraction or type(value) is decimal.Decimal or (
            np is not None and isinstance(value, np.generic) and value.dtype.kind in "iuf"):
        try:
            value = int(value) if value == int(value) else float(value)
        except (ValueError, OverflowError, ArithmeticError):
            value = float("nan")
    if type(value) is float and not math.isfinite(value):
        return f"{kind} None"
    if type(value) in (int, float, str, bool) or value is None:
        text = repr(value)
        return f"{kind} {text if len(text) <= MAX_VALUE_CHARS else 'None'}"
    return f"{kind} None"


def introspect() -> dict:
    """What the harness's process holds: its modules (and their files), its threads, and the
    files every function object here was compiled from."""
    import gc
    import threading

    files = set()
    for obj in gc.get_objects():
        code = getattr(obj, "__code__", None) if type(obj).__name__ == "function" else None
        if code is not None:
            # exec'd code (namedtuple's __new__) is named by the module that made it
            files.add(code.co_filename if not code.co_filename.startswith("<string")
                      else f"{code.co_filename} {getattr(obj, '__module__', None)}")
    modules = {name: getattr(module, "__file__", None) for name, module in list(sys.modules.items())}
    return {"modules": modules, "threads": [t.name for t in threading.enumerate()], "code_files": sorted(files)}


def main() -> None:
    mode, job_fd = sys.argv[1], int(sys.argv[2])
    job = read_job(job_fd)
    if mode == "program":
        program_main(job)
    else:
        harness_main(job)


if __name__ == "__main__":
    main()
