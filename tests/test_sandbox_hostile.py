"""Hostile programs, scored the way `phibook eval` scores them (the tasks' process_results).

Each program is a completion a cheating or careless model could write. Each test asserts the
verdict (a wrong answer never passes) and the host afterwards: the files it must not read were
not read (the cheat only works if they were), listeners saw nothing, no IPC object or process is
left, and the evaluator carries on. Where a cheat needs host data to pass, "pass@1 == 0" is the
proof that the data stayed out of reach.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from phibook.eval.generative import GSM8K, MBPP, HumanEval
from phibook.sandbox import runner as sandbox

pytestmark = pytest.mark.usefixtures("jail")

ADD_DOC = {
    "task_id": "Test/add", "entry_point": "add", "canonical_solution": "    return a + b\n",
    "prompt": 'def add(a, b):\n    """Return a + b."""\n',
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
            "    assert abs(candidate(0.5, 0.25) - 0.75) < 1e-9\n",
}
WRONG = "    return a - b\n"
MBPP_DOC = {"task_id": 1, "text": "Add two numbers.", "code": "def add(a, b):\n    return a + b\n",
            "test_setup_code": "import math", "test_list": ["assert add(2, 3) == 5", "assert math.isclose(add(1, 1), 2)"]}
GSM_DOC = {"question": "What is 6 times 3?", "answer": "6 * 3 = 18\n#### 18", "gold": 18.0}


def humaneval(completion: str, doc: dict = ADD_DOC, unsafe: bool = False) -> float:
    task = HumanEval()
    task.unsafe_sandbox = unsafe
    return task.process_results(doc, [completion])["pass@1"]


def mbpp(completion: str) -> float:
    return MBPP().process_results(MBPP_DOC, [completion])["pass@1"]


def gsm8k(completion: str) -> float:
    return GSM8K().process_results(GSM_DOC, [completion])["acc"]


def sandbox_processes() -> list[str]:
    """Command lines of live processes that belong to a sandbox run."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "sandbox_launcher" in cmd or "/sandbox/launcher.py" in cmd:
            found.append(cmd)
    return found


def sysv_ipc_objects() -> set[str]:
    out = set()
    for kind in ("shm", "msg", "sem"):
        rows = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]
        out.update(f"{kind}:{row.split()[1]}" for row in rows if row.split())
    return out


@pytest.fixture(autouse=True)
def host_is_clean_after():
    ipc_before = sysv_ipc_objects()
    yield
    assert sandbox_processes() == [], "a sandboxed process outlived its run"
    assert sysv_ipc_objects() <= ipc_before, "a SysV IPC object outlived its run"


def test_controls_pass():
    assert humaneval(ADD_DOC["canonical_solution"]) == 1.0
    assert mbpp(MBPP_DOC["code"]) == 1.0
    assert gsm8k("    return 6 * 3\n") == 1.0


# --------------------------------------------------------------------------- forged passes

EXIT_TRICKS = {
    "os._exit": "import os\nos._exit(0)\n",
    "sys.exit": "import sys\nsys.exit()\n",
    "SystemExit": "raise SystemExit(0)\n",
    "quit": "quit()\n",
    "exit": "exit(0)\n",
    "atexit": "import atexit, os\natexit.register(os._exit, 0)\n",
    "signal handler": "import os, signal\nsignal.signal(signal.SIGALRM, lambda *a: os._exit(0))\nsignal.alarm(1)\n"
                      "import time\ntime.sleep(3)\n",
    "swallowed sys.exit": "import sys\nsys.exit = lambda *a: None\nraise SystemExit(0)\n",
    "sys.exit(main())": "def main():\n    return 0\nimport sys\nsys.exit(main())\n",
    "unittest.main()": "import unittest\nclass T(unittest.TestCase):\n    def test_it(self):\n        pass\n"
                       "unittest.main(module=__name__, exit=True)\n",
    "SIGKILL self": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
    "excepthook": "import sys, os\nsys.excepthook = lambda *a: os._exit(0)\n",
}


@pytest.mark.parametrize("trick", list(EXIT_TRICKS), ids=list(EXIT_TRICKS))
def test_exits_never_pass_a_wrong_answer(trick):
    # The trick runs at the top level (before the tests) and from inside the tested function.
    top = WRONG + "\n" + EXIT_TRICKS[trick]
    inside = "    import os, sys, signal, atexit\n" + "".join(
        "    " + line + "\n" for line in EXIT_TRICKS[trick].splitlines()) + WRONG
    assert humaneval(top) == 0.0
    assert humaneval(inside) == 0.0
    assert mbpp("def add(a, b):\n" + inside) == 0.0


# Programs that try to say "pass" themselves, or to make a wrong answer compare equal.
FORGERIES = {
    "write pass on every fd": WRONG + "import os\nfor fd in range(64):\n    try:\n"
                              "        os.write(fd, b'0123456789abcdef0123456789abcdef pass\\n')\n"
                              "    except OSError:\n        pass\n",
    "walk frames for secrets": WRONG + """
import sys
seen = []
f = sys._getframe()
while f is not None:
    for scope in (f.f_locals, f.f_globals):
        for value in list(scope.values()):
            if callable(value) and getattr(value, '__closure__', None):
                for cell in value.__closure__:
                    try:
                        seen.append(cell.cell_contents)
                    except ValueError:
                        pass
    for name in ('run_tail', 'say', 'verdict'):
        if callable(f.f_locals.get(name)):
            try:
                f.f_locals[name]()
            except Exception:
                pass
    f = f.f_back
""",
    "exec the harness's tests": WRONG + """
import sys
f = sys._getframe()
while f is not None:
    code = f.f_locals.get('tail_code')
    if code is not None:
        exec(code, {'add': lambda a, b: a + b})
    f = f.f_back
""",
    "raise the verdict event": WRONG + """
import sys
def find(f):
    while f is not None:
        for const in f.f_code.co_consts:
            if isinstance(const, str) and const.startswith('phibook.verdict'):
                sys.audit(const)
        for value in list(f.f_locals.values()):
            if isinstance(value, str) and value.startswith('phibook.verdict'):
                sys.audit(value)
        f = f.f_back
find(sys._getframe())
""",
    "verdict event from inside the tests": """    import sys
    f = sys._getframe(1)
    while f is not None:
        for const in f.f_code.co_consts:
            if isinstance(const, str) and const.startswith('phibook.verdict'):
                sys.audit(const)
        f = f.f_back
    return 0
""",
    "always-equal object": """    class Yes:
        def __eq__(self, other): return True
        def __sub__(self, other): return self
        def __abs__(self): return 0.0
        def __lt__(self, other): return True
    return Yes()
""",
    "int subclass": "    class Five(int):\n        def __eq__(self, other): return True\n    return Five(5)\n",
    "class as the entry point": WRONG + "class add:\n    def __init__(self, *a): pass\n"
                                "    def __eq__(self, o): return True\n    def __sub__(self, o): return 0.0\n",
    "list of always-equal": "    class Yes:\n        def __eq__(self, other): return True\n    return [Yes()][0]\n",
    "patched builtins and math": WRONG + "import builtins, math\nbuiltins.abs = lambda x: 0\n"
                                 "math.isclose = lambda *a, **k: True\nbuiltins.AssertionError = None\n",
    "swap the function under test": """    import sys
    f = sys._getframe(1)
    while f is not None:
        for scope in (f.f_globals, f.f_locals):
            for name in ('add', 'candidate'):
                if name in scope:
                    scope[name] = lambda a, b: a + b
        f = f.f_back
    return a - b
""",
    "patch the harness's builtins": WRONG + """
import builtins
class Yes:
    def __eq__(self, other): return True
builtins.type = lambda x: int
builtins.any = lambda x: True
builtins.isinstance = lambda *a: True
def add(a, b):
    return Yes()
""",
    "import hook in the tests' thread": WRONG + """
import sys
class Finder:
    def find_spec(self, name, path=None, target=None):
        f = sys._getframe(1)
        while f is not None:
            if 'add' in f.f_globals:
                f.f_globals['add'] = lambda a, b: a + b
            f = f.f_back
sys.meta_path.insert(0, Finder())
sys.modules.pop('math', None)
""",
    # Issue 22: every frame in reach is now the program's own; patching its own module would
    # make it a correct program, so the spy looks for anyone else's globals (the tests').
    "thread watching the harness": WRONG + """
import sys, threading, time
def spy():
    for _ in range(200):
        for frame in getattr(sys, '_current_frames', lambda: {})().values():
            if frame.f_globals is not globals():
                frame.f_globals['add'] = lambda a, b: a + b
        time.sleep(0.005)
threading.Thread(target=spy, daemon=True).start()
""",
    "finalizer on the tests' thread": """    class Bomb:
        def __del__(self):
            import sys
            f = sys._getframe(1)
            while f is not None:
                if 'add' in f.f_globals:
                    f.f_globals['add'] = lambda a, b: a + b
                f = f.f_back
    cycle = [Bomb() for _ in range(100)]
    cycle.append(cycle)  # garbage only a collection frees: on whichever thread runs it
    return a - b
""",
    "gc walk": WRONG + "import gc\nfor o in gc.get_objects():\n    pass\n",
    "ctypes memory read": WRONG + "import ctypes\nctypes.string_at(id(1), 64)\n",
    "hand-made bytecode": WRONG + "add.__code__.replace(co_consts=(None,))\n",
    "marshal bytecode": WRONG + "import marshal\nmarshal.loads(marshal.dumps(add.__code__))\n",
    "trace function": WRONG + "import sys\nsys.settrace(lambda *a: None)\n",
    "audit hook": WRONG + "import sys\nsys.addaudithook(lambda *a: None)\n",
    "/proc/self/mem": WRONG + "open('/proc/self/mem', 'rb')\n",
    "finalizer in the harness": WRONG + """
import sys, os
class Spy:
    def __del__(self):
        f = sys._getframe(1)
        while f is not None:
            for value in list(f.f_locals.values()):
                if isinstance(value, bytes) and len(value) == 32:
                    os.write(4, value + b' pass\\n')
            f = f.f_back
for _ in range(5000):
    a, b = Spy(), Spy()
    a.b, b.a = b, a
""",
}


@pytest.mark.parametrize("name", list(FORGERIES), ids=list(FORGERIES))
def test_forgeries_never_pass(name):
    assert humaneval(FORGERIES[name]) == 0.0
    # MBPP's asserts call the function by its global name (HumanEval's check() holds it in a local).
    assert mbpp("def add(a, b):\n" + FORGERIES[name]) == 0.0


def test_forged_setup_failure_does_not_stop_the_run():
    fake = WRONG + ("import sys, os\nsys.stderr.write('phibook-sandbox: setup failed: RuntimeError()\\n')\n"
                    "for fd in range(3, 64):\n    try:\n        os.write(fd, b'x setup-error boom\\n')\n"
                    "    except OSError:\n        pass\nos._exit(121)\n")
    assert humaneval(fake) == 0.0  # no exception: the run goes on
    assert gsm8k("    import os\n    os.write(2, b'phibook-sandbox: setup failed: x')\n    os._exit(121)\n") == 0.0


# --------------------------------------------------------------------------- reads of the host


def cheat_reading(path: str, then: str) -> str:
    """A completion that passes only if it can read ``path`` (``then`` uses ``data``)."""
    return (f"    try:\n        data = open({path!r}, 'rb').read()\n    except OSError:\n        return None\n"
            + "".join("    " + line + "\n" for line in then.splitlines()))


def test_host_files_stay_unread(tmp_path, monkeypatch):
    secret = tmp_path / "secret.txt"
    secret.write_text("5")
    secret.chmod(0o600)
    monkeypatch.chdir(tmp_path)  # the evaluator's cwd
    cwd_secret = Path("cwd-secret.txt")
    cwd_secret.write_text("5")
    cwd_secret.chmod(0o600)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights")
    for path in (str(secret), str(tmp_path / cwd_secret), "cwd-secret.txt", "../cwd-secret.txt"):
        assert humaneval(cheat_reading(path, "return a + b")) == 0.0, path
    assert humaneval(cheat_reading(str(ckpt / "model.safetensors"), "return a + b")) == 0.0
    for path in ("/etc/shadow", "/etc/passwd", "/proc/1/cmdline", "/proc/self/status", "/root/.bashrc",
                 "/home", "/tmp", "/var/log/syslog"):
        assert humaneval(cheat_reading(path, "return a + b")) == 0.0, path
    listing = "    import os\n    try:\n        os.listdir('/root')\n    except OSError:\n        return None\n" \
              "    return a + b\n"
    assert humaneval(listing) == 0.0


def test_benchmark_files_stay_unread(tmp_path, shared_dir):
    """The canonical solution and the gold answer are in files on the host: a cheat that reads
    them would pass. Stand-ins made by the test, and the real ../shared files."""
    stand_in = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(stand_in, "wt") as f:
        f.write(json.dumps({"task_id": ADD_DOC["task_id"], "canonical_solution": ADD_DOC["canonical_solution"]}) + "\n")
    gold = tmp_path / "test.jsonl"
    gold.write_text(json.dumps({"question": GSM_DOC["question"], "answer": GSM_DOC["answer"]}) + "\n")
    real_he = shared_dir / "benchmarks" / "humaneval" / "HumanEval.jsonl.gz"
    real_gsm = shared_dir / "benchmarks" / "gsm8k" / "test.jsonl"
    for path in (stand_in, real_he):
        cheat = cheat_reading(str(path), "import gzip, json\nrow = json.loads(gzip.decompress(data).splitlines()[0])\n"
                                         "return a + b")
        assert humaneval(cheat) == 0.0, path
    real_doc = HumanEval().load_docs(shared_dir / "benchmarks", 1)[0]
    cheat = (f"    import gzip, json\n    rows = [json.loads(l) for l in gzip.open({str(real_he)!r})]\n"
             "    ns = {}\n    exec(rows[0]['prompt'] + rows[0]['canonical_solution'], ns)\n"
             "    return ns[rows[0]['entry_point']](numbers, threshold)\n")
    assert humaneval(cheat, real_doc) == 0.0
    for path in (gold, real_gsm):
        cheat = (f"    import json\n    line = open({str(path)!r}).readline()\n"
                 "    return json.loads(line)['answer'].split('####')[-1].strip()\n")
        assert gsm8k(cheat) == 0.0, path


def test_another_samples_program_stays_unread():
    """Two samples of one problem run at the same time; the second hunts the filesystem for the
    first's program (whose text holds a marker) and passes only if it finds it."""
    task = HumanEval(samples=2, temperature=0.8)
    victim = "    # MARKER-7f3a\n    import time\n    time.sleep(2)\n    return a - b\n"
    hunter = """    import os, time
    deadline = time.time() + 2
    while time.time() < deadline:
        for root, dirs, files in os.walk('/'):
            for name in files:
                try:
                    if b'MARKER-7f3a' in open(os.path.join(root, name), 'rb').read():
                        return a + b
                except OSError:
                    pass
    return None
"""
    assert task.process_results(ADD_DOC, [victim, hunter])["pass@1"] == 0.0


# --------------------------------------------------------------------------- shared state


def test_ipc_objects_neither_leak_nor_pass_between_programs():
    posix = "    from multiprocessing import shared_memory\n" \
            "    shared_memory.SharedMemory(name='phibook-leak', create=True, size=16)\n    return a + b\n"
    assert humaneval(posix) == 0.0
    sysv = WRONG + "import ctypes\nlib = ctypes.CDLL(None)\nlib.shmget(0x5048, 4096, 0o1666)\n"
    assert humaneval(sysv) == 0.0
    assert not Path("/dev/shm/phibook-leak").exists()
    # The IPC namespace holds even for native code that got past the launcher: the capability
    # probe creates a SysV segment inside the jail and checks the host never sees it.
    assert sandbox.capabilities()["verified"]["ipc_objects_die_with_the_jail"]


# --------------------------------------------------------------------------- sockets of the host


def serve(sock: socket.socket, secret: bytes, seen: list, stop: threading.Event) -> threading.Thread:
    def loop():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                if sock.type == socket.SOCK_STREAM:
                    conn, _ = sock.accept()
                    seen.append("connection")
                    conn.sendall(secret)
                    conn.close()
                else:
                    sock.recvfrom(64)
                    seen.append("datagram")
            except OSError:
                continue

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


def test_host_sockets_are_out_of_reach(tmp_path):
    """A 0777 unix socket in /tmp, an abstract one, TCP and UDP on loopback and on the host's
    address: each hands out (or wants) a secret; the cheat passes only if it gets through."""
    seen: list[str] = []
    path = f"/tmp/phibook-test-{os.getpid()}.sock"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(path)
    os.chmod(path, 0o777)
    abstract = socket.socket(socket.AF_UNIX)
    abstract_name = f"\0phibook-test-{os.getpid()}"
    abstract.bind(abstract_name)
    tcp = socket.create_server(("0.0.0.0", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", 0))
    for s in (unix, abstract):
        s.listen(4)
    stop = threading.Event()
    threads = [serve(s, b"5", seen, stop) for s in (unix, abstract, tcp, udp)]
    host_ip = sandbox._host_ip()
    try:
        for target in (repr(path), repr(abstract_name)):
            cheat = (f"    import socket\n    s = socket.socket(socket.AF_UNIX)\n    s.settimeout(2)\n"
                     f"    try:\n        s.connect({target})\n        return int(s.recv(8))\n"
                     "    except OSError:\n        return None\n")
            assert humaneval(cheat) == 0.0
        for host in ("127.0.0.1", host_ip):
            cheat = (f"    import socket\n    try:\n        s = socket.create_connection(({host!r}, "
                     f"{tcp.getsockname()[1]}), timeout=2)\n        return int(s.recv(8))\n"
                     "    except OSError:\n        return None\n")
            assert humaneval(cheat) == 0.0
            leak = (f"    import socket\n    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n    try:\n"
                    f"        s.sendto(b'leak', ({host!r}, {udp.getsockname()[1]}))\n    except OSError:\n"
                    "        pass\n    return a - b\n")
            assert humaneval(leak) == 0.0
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
        for s in (unix, abstract, tcp, udp):
            s.close()
        os.unlink(path)
    assert seen == [], f"the host saw {seen}"


# --------------------------------------------------------------------------- resources


def test_memfd_disk_and_output_abuse_are_refused_and_the_evaluator_carries_on():
    memfd = WRONG + "import os\nfd = os.memfd_create('x')\nos.ftruncate(fd, 4 << 30)\n"
    assert humaneval(memfd) == 0.0
    disk = ("    f = open('fill', 'wb')\n    for _ in range(600):\n        f.write(b'x' * 2**20)\n"
            "    f.flush()\n    return a + b\n")
    assert humaneval(disk) == 0.0  # the 64 MB work dir fills up long before 600 MB
    flood = "    import sys\n    while True:\n        sys.stdout.write('x' * 65536)\n"
    assert humaneval(flood) == 0.0
    bomb = WRONG + "import os\nwhile True:\n    os.fork()\n"
    assert humaneval(bomb) == 0.0
    assert humaneval(ADD_DOC["canonical_solution"]) == 1.0  # and the next program runs as usual


@pytest.mark.parametrize("unsafe", [False, True], ids=["jail", "unsafe-no-sandbox"])
def test_deep_directory_tree_neither_crashes_nor_stays(unsafe, monkeypatch, tmp_path):
    """3,000 nested folders (past the recursion limit and PATH_MAX), the last one mode 000: a
    correct answer still passes, and nothing is left on the host."""
    import tempfile

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where --unsafe-no-sandbox makes its work dirs
    monkeypatch.setattr(tempfile, "tempdir", None)
    deep = (ADD_DOC["canonical_solution"] + "import os\nfor _ in range(3000):\n    os.mkdir('d')\n"
            "    os.chdir('d')\nos.chmod('.', 0)\n")
    assert humaneval(deep, unsafe=unsafe) == 1.0
    assert list(tmp_path.iterdir()) == []


def test_nothing_outside_the_jail_can_be_signalled():
    """A process of the jail's own uid (65534) outside it survives a program that kills every pid."""
    if os.geteuid() != 0:
        pytest.skip("needs root to start a process as uid 65534")
    sentinel = subprocess.Popen(["sleep", "60"], user=65534, group=65534)
    try:
        killer = WRONG + ("import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass\n"
                          f"for pid in range(1, {sentinel.pid + 100}):\n    try:\n"
                          "        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n")
        assert humaneval(killer) == 0.0
        assert sentinel.poll() is None
    finally:
        sentinel.send_signal(signal.SIGKILL)
        sentinel.wait()


# --------------------------------------------------------------------------- GSM8K answers


def test_gsm8k_answers_are_read_strictly():
    assert gsm8k("    return 18\n") == 1.0
    assert gsm8k("    return '18'\n") == 1.0
    assert gsm8k("    print(18)\n") == 1.0  # printed, returned nothing: the last number printed
    assert gsm8k("    print(18)\n    raise ValueError('after the answer')\n") == 0.0
    assert gsm8k("    print(18)\n    import os\n    os._exit(0)\n") == 0.0
    assert gsm8k("    print(18)\n    import sys\n    sys.exit(0)\n") == 0.0
    assert gsm8k("    return '1,8'\n") == 0.0
    assert gsm8k("    print('1,8')\n") == 0.0
    assert gsm8k("    return True\n") == 0.0
    assert gsm8k("    print('__PHIBOOK_RESULT__ 18')\n    return 17\n") == 0.0
