"""Issue 22: the verdict is decided in a process where no program code runs.

Three parts, all through the tasks' own ``process_results`` (as ``phibook eval`` scores):

- hostile programs, one test per route class the issue lists (each a program of ours, in a few
  variants): each must score 0;
- the harness's process, listed before and after the tests: no module, thread or function of
  the program's is ever in it;
- honest programs in the style models write (stdlib modules the old jail broke, threads,
  ``signal.alarm``, numpy, debug output, Fraction/Decimal/namedtuple/Counter/numpy returns) over
  real HumanEval, MBPP and GSM8K items: the jail passes exactly what a plain unjailed run (as
  OpenAI's human-eval ``execution.py`` runs a program: ``exec`` of program + tests) passes.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from phibook.eval.generative import GSM8K, MBPP, HumanEval, answers_match, last_number
from phibook.sandbox import jail
from phibook.sandbox.runner import check_program

pytestmark = pytest.mark.usefixtures("jail")

# A task whose tests lean on builtins and stdlib modules a program could try to bend.
DOC = {
    "task_id": "Test/add", "entry_point": "add", "prompt": 'def add(a, b):\n    """Return a + b."""\n',
    "canonical_solution": "    return a + b\n",
    "test": "def check(candidate):\n    import math, operator, json, collections\n"
            "    assert candidate(2, 3) == 5\n    assert operator.eq(candidate(-1, 1), 0)\n"
            "    assert abs(candidate(0.5, 0.25) - 0.75) < 1e-9\n    assert sorted([candidate(1, 1), 1]) == [1, 2]\n"
            "    assert math.isclose(candidate(1, 2), 3)\n    assert set([candidate(1, 1)]) == {2}\n"
            "    assert tuple([candidate(0, 0)]) == (0,)\n    assert json.loads(json.dumps(candidate(2, 2))) == 4\n",
}
MBPP_DOC = {"task_id": 1, "text": "Add two numbers.", "code": "def add(a, b):\n    return a + b\n",
            "test_setup_code": "import math\nimport operator",
            "test_list": ["assert add(2, 3) == 5", "assert operator.eq(add(1, 1), 2)",
                          "assert math.isclose(abs(add(-3, 1)), 2)", "assert sorted([add(1, 1), 1]) == [1, 2]"]}
GSM_DOC = {"question": "What is 6 times 3?", "answer": "6 * 3 = 18\n#### 18", "gold": 18.0}
WRONG = "def add(a, b):\n    return a - b\n"


def scores(program: str) -> tuple[float, float]:
    """(HumanEval pass@1, MBPP pass@1) of ``program``, a whole module defining add()."""
    he = HumanEval().process_results(dict(DOC, prompt=""), [program])["pass@1"]
    mb = MBPP().process_results(dict(MBPP_DOC, text="Add."), [program])["pass@1"]
    return he, mb


def test_controls_pass():
    assert scores("def add(a, b):\n    return a + b\n") == (1.0, 1.0)


# --------------------------------------------------------------------------- routes, one class each

ROUTES = {
    # 1. __hash__/__eq__ of an object the program controls, where harness code would hash it.
    "hash and eq of the program's objects": [
        WRONG.replace("return a - b", "return Yes()") + """
import sys, builtins
class Key(str):
    def __hash__(self):
        builtins.AssertionError = KeyError
        return 7
    def __eq__(self, other):
        return True
class Yes:
    def __eq__(self, other): return True
    def __hash__(self): return hash(5)
    def __sub__(self, other): return 0.0
    def __lt__(self, other): return False
sys.modules[Key('math')] = sys
Yes.__dict__  # noqa
""",
        WRONG + """
import sys
class Poison:
    def __hash__(self):
        import builtins
        builtins.abs = lambda x: 0
        return 1
    def __eq__(self, other):
        return True
result_store = {Poison(): 1}
sys.modules['solution'].__dict__[Poison()] = 1
""",
    ],
    # 2. a method of an import-machinery class, run when the tests import a module afresh.
    "patched import machinery": [
        WRONG + """
import sys, builtins
import importlib._bootstrap_external as ext, importlib._bootstrap as bs
orig = ext.SourceFileLoader.exec_module
def exec_module(self, module):
    orig(self, module)
    builtins.AssertionError = KeyError
    module.isclose = lambda *a, **k: True
ext.SourceFileLoader.exec_module = exec_module
bs.BuiltinImporter.create_module = classmethod(lambda cls, spec: sys)
for name in ('math', 'operator', 'json', 'collections'):
    sys.modules.pop(name, None)
""",
        WRONG + """
import sys
class Finder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        import builtins
        builtins.sorted = lambda xs: [1, 2]
        return None
sys.meta_path.insert(0, Finder)
sys.path_hooks.insert(0, lambda p: Finder)
sys.path_importer_cache.clear()
""",
    ],
    # 3. a thread still running while values are checked and copied (check-then-use).
    "a thread that changes a class after the check": [
        """import threading, time
class Result:
    pass
def flip():
    time.sleep(0.02)
    Result.__eq__ = lambda self, other: True
    Result.__hash__ = lambda self: 0
    Result.__sub__ = lambda self, other: 0.0
    Result.__lt__ = lambda self, other: False
threading.Thread(target=flip, daemon=True).start()
def add(a, b):
    time.sleep(0.05)
    return Result()
""",
        """import threading
class Box(list):
    pass
box = Box([0])
def mutate():
    while True:
        box[:] = [5]
        box[:] = [0]
threading.Thread(target=mutate, daemon=True).start()
def add(a, b):
    return box
""",
    ],
    # 4. functions or attributes of modules loaded before the program.
    "patched preloaded modules": [
        WRONG + """
import operator, sys, posix, builtins, math
operator.eq = lambda a, b: True
operator.sub = lambda a, b: 0.0
sys.warnoptions.append('ignore')
posix.stat = lambda *a, **k: None
math.isclose = lambda *a, **k: True
builtins.abs = lambda x: 0
builtins.sorted = lambda xs: [1, 2]
builtins.set = lambda xs: {2}
""",
        WRONG + """
import json, collections, builtins
json.loads = lambda s: 4
builtins.AssertionError = ValueError
builtins.tuple = lambda xs: (0,)
""",
    ],
    # 5. denied modules loaded anyway (dotted names, subinterpreters, ctypes) to forge a verdict.
    "native code and subinterpreters": [
        WRONG + """
import ctypes, os
libc = ctypes.CDLL(None)
line = b'0123456789abcdef0123456789abcdef pass\\n'
for fd in range(0, 64):
    libc.write(fd, line, len(line))
try:
    import _xxsubinterpreters as interp
    iid = interp.create()
    interp.run_string(iid, "import os\\nfor fd in range(64):\\n    try:\\n        os.write(fd, b'x pass\\\\n')\\n"
                           "    except OSError:\\n        pass\\n")
except Exception:
    pass
""",
        WRONG + """
import ctypes, sys
# Reach into the interpreter: nothing of the tests is in this process to overwrite.
for obj in list(sys.modules.values()):
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))
import os
os.write(1, b'pass\\n')
os.write(2, b'pass\\n')
""",
    ],
    # 6. the real gc rebuilt, automatic collection on, a finalizer firing.
    "gc rebuilt and a finalizer": [
        WRONG + """
import _imp, importlib.machinery, builtins
gc = _imp.create_builtin(importlib.machinery.ModuleSpec('gc', None))
gc.enable()
gc.set_threshold(1, 1, 1)
class Bomb:
    def __del__(self):
        builtins.AssertionError = KeyError
        builtins.abs = lambda x: 0
for _ in range(2000):
    bomb = Bomb()
    bomb.self = bomb
del bomb
""",
        WRONG.replace("return a - b", "Bomb().me = None\n    return a - b") + """
import gc
gc.enable()
class Bomb:
    def __init__(self):
        self.me = self
    def __del__(self):
        import sys
        for mod in list(sys.modules.values()):
            if hasattr(mod, 'isclose'):
                mod.isclose = lambda *a, **k: True
""",
    ],
    # 7. top-level names that shadow the builtins the tests call.
    "names that shadow builtins": [
        WRONG + """
def abs(x):
    return 0
def sorted(xs, key=None, reverse=False):
    return [1, 2]
def set(xs=()):
    return {2}
def tuple(xs=()):
    return (0,)
class AssertionError(Exception):
    pass
""",
        WRONG + "len = lambda x: 0\nisinstance = lambda *a: True\nall = any = lambda *a: True\n"
                "float = int = str = lambda *a: 5\nround = lambda *a, **k: 5\n",
    ],
}


@pytest.mark.parametrize("route", list(ROUTES), ids=list(ROUTES))
def test_route_scores_zero(route):
    for program in ROUTES[route]:
        assert scores(program) == (0.0, 0.0), program
    # GSM8K: the same cheats after a wrong solution() (the answer is 18).
    for program in ROUTES[route]:
        assert GSM8K().process_results(GSM_DOC, ["    return 17\n\n" + program])["acc"] == 0.0


def test_gsm8k_unusable_returns_are_wrong_not_the_printed_number():
    for value in ("float('nan')", "float('inf')", "'9' * 20000", "[18]", "{18}", "object()"):
        body = f"    print(18)\n    return {value}\n"
        assert GSM8K().process_results(GSM_DOC, [body])["acc"] == 0.0, value
    for value in ("__import__('decimal').Decimal(18)", "__import__('fractions').Fraction(36, 2)",
                  "__import__('numpy').int64(18)", "__import__('numpy').float32(18.0)"):
        assert GSM8K().process_results(GSM_DOC, [f"    return {value}\n"])["acc"] == 1.0, value


# --------------------------------------------------------------------------- the harness holds no program code


def test_the_harness_process_holds_no_program_code():
    program = """import sys, types, threading, time, collections
evil = types.ModuleType('evil_module_7f3a')
evil.code = lambda: 0
sys.modules['evil_module_7f3a'] = evil
class Point(collections.namedtuple('Point', 'x y')):
    def __eq__(self, other):
        return True
threading.Thread(target=time.sleep, args=(30,), name='program-thread-7f3a', daemon=True).start()
def make(x, y):
    return Point(x, y)
def apply(fn, xs):
    return [fn(x) for x in xs]
def add(a, b):
    return a + b
"""
    tests = ("import json, fractions\nassert add(1, 2) == 3\nassert make(1, 2) == (1, 2)\n"
             "assert make(1, 2) != (2, 1)\nassert apply(lambda v: v * 2, [1, 2]) == [2, 4]\n"
             "assert json.loads('[1]') == [1] and fractions.Fraction(1, 2) == 0.5\n")
    out = check_program(program, tests, report_harness=True)
    assert out.passed, out.result.stderr
    state = out.result.harness_state
    assert state and set(state) == {"before", "after"}
    prefix = jail.interpreter()[1].rstrip("/") + "/"
    for when in ("before", "after"):
        snap = state[when]
        assert snap["threads"] == ["MainThread"], (when, snap["threads"])
        assert "evil_module_7f3a" not in snap["modules"] and "solution" not in snap["modules"], when
        assert snap["modules"]["__main__"] == jail.LAUNCHER_IN_JAIL
        for name, path in snap["modules"].items():
            assert path is None or path == jail.LAUNCHER_IN_JAIL or path.startswith(prefix), (when, name, path)
        for path in snap["code_files"]:
            if path.startswith("<string> "):  # exec'd by a stdlib module: which one
                maker = path.split()[1]
                assert maker != "namedtuple_Point", (when, path)  # the program's class
                if maker.startswith("namedtuple_"):  # collections.namedtuple's __new__
                    continue
                module = snap["modules"].get(maker)
                assert module and module.startswith(prefix), (when, path)
                continue
            assert path in (jail.LAUNCHER_IN_JAIL, "tests.py") or path.startswith(prefix) or \
                path.startswith("<frozen "), (when, path)
        assert "main.py" not in snap["code_files"]
    # What the tests imported came from the installed standard library, nothing else.
    added = set(state["after"]["modules"]) - set(state["before"]["modules"])
    assert "fractions" in added and not any(name.startswith("evil") for name in added)
    assert "tests.py" in state["after"]["code_files"]


# --------------------------------------------------------------------------- honest programs

HEADER = ("import zlib, binascii, base64, gzip, secrets, bz2, lzma, hashlib, sqlite3, ssl\n"
          "import subprocess, asyncio, signal, os, tempfile, collections, fractions, decimal\n"
          "import numpy as np\nfrom concurrent.futures import ThreadPoolExecutor\n")
# Wrappers that keep the function correct but change how it runs or what type it returns.
STYLES = {
    "numpy scalars and namedtuples": """
def _convert(r):
    if type(r) is int and abs(r) < 2 ** 62:
        return np.int64(r)
    if type(r) is float:
        return np.float64(r)
    if type(r) is tuple:
        return collections.namedtuple('Result', ['f%d' % i for i in range(len(r))])(*r)
    if type(r) is dict:
        return collections.Counter(r) if all(type(v) is int for v in r.values()) else collections.OrderedDict(r)
    return r
""",
    "Fraction and Decimal": """
def _convert(r):
    if type(r) is int:
        return fractions.Fraction(r) if r % 2 else decimal.Decimal(r)
    if type(r) is list and r and all(type(v) is int for v in r):
        return [fractions.Fraction(v) for v in r]
    if type(r) is dict:
        return collections.defaultdict(int, r)
    return r
""",
    "16 threads": """
_POOL = ThreadPoolExecutor(16)
list(_POOL.map(lambda i: hashlib.sha256(bytes([i])).hexdigest(), range(64)))
def _convert(r):
    return _POOL.submit(lambda: r).result()
""",
    "signal.alarm guard": """
def _on_alarm(signum, frame):
    raise TimeoutError('too slow')
signal.signal(signal.SIGALRM, _on_alarm)
def _convert(r):
    signal.alarm(20)
    try:
        return r
    finally:
        signal.alarm(0)
""",
    "debug output and files": """
print('debug: loading', base64.b64encode(zlib.compress(b'x' * 100)).decode())
def _convert(r):
    print('debug:', repr(r)[:200])
    with open(os.devnull, 'w') as null, tempfile.NamedTemporaryFile('w') as tmp:
        null.write(repr(r))
        tmp.write(repr(r)[:1000])
    return r
""",
    "asyncio and a helper named like a builtin": """
def sum_of(xs):
    return sum(xs)
async def _wrap(r):
    return r
def _convert(r):
    return asyncio.run(_wrap(r))
""",
}
BIG_OUTPUT = "\nfor _i in range(40000):\n    print('debug line', _i, 'x' * 24)\n"  # ~1.6 MB


def honest(source: str, entry: str, style: str) -> str:
    """``source`` (a correct solution defining ``entry``) made to run and return in ``style``."""
    return (HEADER + source + "\n" + STYLES[style]
            + f"\n_impl_{entry} = {entry}\n\ndef {entry}(*args, **kwargs):\n"
            f"    return _convert(_impl_{entry}(*args, **kwargs))\n")


def plain_run(program: str, tests: str, timeout_s: float = 20.0) -> bool:
    """As human-eval's execution.py: program and tests exec'd together, unjailed; passed if no error."""
    code = program + "\n" + tests + "\n"
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=timeout_s).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def gsm8k_plain(program: str, gold: float) -> bool:
    code = program + "\nimport math as _m\n_r = solution()\nprint('\\n__PLAIN__', 'None' if _r is None else float(_r))\n"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return False
    if out.returncode != 0:
        return False
    head, _, tail = out.stdout.rpartition("\n__PLAIN__ ")
    pred = last_number(head) if tail.strip() == "None" else float(tail)
    return pred is not None and math.isfinite(pred) and answers_match(pred, gold)


def test_honest_programs_pass_in_the_jail_as_they_do_unjailed(shared_dir):
    bench = shared_dir / "benchmarks"
    he_task, mbpp_task, gsm_task = HumanEval(timeout_s=20), MBPP(timeout_s=20), GSM8K()
    styles = list(STYLES)
    cases = []  # (name, program, tests, entry, None) or, for GSM8K, (name, program, None, body, doc)
    for i, doc in enumerate(he_task.load_docs(bench, None)[::3]):  # 55 HumanEval items
        program, tests = he_task.program(doc, doc["canonical_solution"])
        style = styles[i % len(styles)]
        source = honest(program, doc["entry_point"], style) + (BIG_OUTPUT if i in (5, 30) else "")
        cases.append((f"{doc['task_id']} [{style}]", source, tests, he_task.entry(doc), None))
    for i, doc in enumerate(mbpp_task.load_docs(bench, None)[::12]):  # 42 MBPP items
        program, tests = mbpp_task.program(doc, doc["code"])
        style = styles[(i + 2) % len(styles)]
        entry = mbpp_task.entry(doc)
        cases.append((f"MBPP/{doc['task_id']} [{style}]", honest(program, entry[0], style), tests, entry, None))
    returns = ["decimal.Decimal(str(value))", "fractions.Fraction(value).limit_denominator()", "np.float64(value)",
               "round(value)", "print(value)"]
    gsm_docs = [d for d in gsm_task.load_docs(bench, 200) if re.findall(r"<<([^=>]+)=", d["answer"])]
    picked = 0
    for doc in gsm_docs:
        expr = re.findall(r"<<([^=>]+)=", doc["answer"])[-1]
        try:
            value = eval(expr, {"__builtins__": {}})  # noqa: S307 - the benchmark's own arithmetic
        except Exception:  # noqa: BLE001
            continue
        if not answers_match(float(value), doc["gold"]):
            continue
        ret = returns[picked % len(returns)]
        body = (f"    import decimal, fractions\n    import numpy as np\n    value = {expr}\n"
                + (f"    {ret}\n" if ret.startswith("print") else f"    return {ret}\n"))
        cases.append((f"GSM8K/{picked} [{ret}]", gsm_task.program(doc, body), None, body, doc))
        picked += 1
        if picked == 20:
            break
    assert len(cases) >= 100

    def jailed(case) -> bool:
        name, program, tests, entry, doc = case
        if tests is None:  # GSM8K: scored as phibook eval scores it
            return gsm_task.process_results(doc, [entry])["acc"] == 1.0
        return check_program(program, tests, entry=entry, timeout_s=20).passed

    def plain(case) -> bool:
        name, program, tests, entry, doc = case
        return gsm8k_plain(program, doc["gold"]) if tests is None else plain_run(program, tests)

    with ThreadPoolExecutor(2) as pool:
        in_jail = list(pool.map(jailed, cases))
        unjailed = list(pool.map(plain, cases))
    differ = [(c[0], j, u) for c, j, u in zip(cases, in_jail, unjailed) if j != u]
    for name, j, u in differ:
        print(f"DIFFERS: {name}: jail {'pass' if j else 'fail'}, plain {'pass' if u else 'fail'}")
    print(f"honest programs: {len(cases)}; jail passes {sum(in_jail)}, plain run passes {sum(unjailed)}")
    assert differ == []
    assert sum(in_jail) >= 0.9 * len(cases)


def test_calls_cross_with_mutation_callbacks_and_handles():
    """The semantics across the boundary: in-place mutation of list/dict/set arguments is seen,
    lambdas from the tests can be called back, the program's objects are handles whose
    attributes can be read and set (MBPP 367 builds a tree this way), and exceptions arrive as
    the nearest built-in type."""
    program = """class Node:
    def __init__(self, v):
        self.v, self.left = v, None
def depth(n):
    return 0 if n is None else 1 + depth(n.left)
def sort_in_place(xs):
    xs.sort()
def fill(d, s):
    d['k'] = 1
    s.add(2)
def apply(fn, xs):
    return [fn(x) for x in xs]
class Custom(KeyError):
    pass
def boom():
    raise Custom('missing')
import itertools
ids = itertools.count(1)
def next_id():
    return next(ids)
"""
    tests = """a = [3, 1, 2]
sort_in_place(a)
assert a == [1, 2, 3]
d, s = {}, {1}
fill(d, s)
assert d == {'k': 1} and s == {1, 2}
assert apply(lambda v: v * 2, [1, 2]) == [2, 4]
root = Node(1)
root.left = Node(2)
assert root.v == 1 and root.left.v == 2 and depth(root) == 2
try:
    boom()
    raise AssertionError('no exception')
except KeyError as exc:
    assert 'missing' in str(exc)
assert next_id() == 1 and next_id() == 2
"""
    out = check_program(program, tests)
    assert out.passed, (out.reason, out.result.stderr)


def test_only_numpy_of_the_environment_and_read_only():
    from phibook.sandbox.runner import run_python

    r = run_python("import numpy, os\nprint(numpy.__version__)\ntry:\n    open(os.path.join(os.path.dirname("
                   "numpy.__file__), 'x.py'), 'w')\nexcept OSError as e:\n    print('read-only', e.errno)\n"
                   "for name in ('torch', 'pytest', 'phibook'):\n    try:\n        __import__(name)\n"
                   "        print('imported', name)\n    except ImportError:\n        pass\n")
    assert r.ok and "read-only" in r.stdout and "imported" not in r.stdout, (r.stdout, r.stderr)


def test_forged_and_malformed_messages_score_zero():
    """The program owns its end of the pipe: what it writes there is only data. Code objects,
    garbage, a forged "loaded" message and answers out of turn fail the check."""
    forge = WRONG + """
import marshal, os
def frame(msg):
    data = marshal.dumps(msg)
    return len(data).to_bytes(4, 'big') + data
code = compile('import builtins; builtins.AssertionError = KeyError', 'x', 'exec')
for fd in range(3, 64):
    for msg in ({'k': 'loaded', 'names': {'add': code, 'check': code}}, {'k': 'ret', 'id': 1, 'v': code},
                {'k': 'ret', 'id': 1, 'v': 5, 'mut': [[0, code]]}, code):
        try:
            os.write(fd, frame(msg))
        except OSError:
            pass
    try:
        os.write(fd, b'\\xff\\xff\\xff\\xff garbage')
    except OSError:
        pass
"""
    assert scores(forge) == (0.0, 0.0)


def test_values_cross_by_value_and_compare_with_eq():
    program = "import collections, fractions, decimal\nimport numpy as np\ndef echo(x):\n    return x\n" \
              "def typed():\n    P = collections.namedtuple('P', 'a b')\n" \
              "    return [fractions.Fraction(1, 3), decimal.Decimal('1.5'), P(1, 2), collections.Counter('aab'),\n" \
              "            collections.OrderedDict(a=1), collections.defaultdict(int, b=2), np.int64(7), np.arange(3)]\n"
    tests = """import math, fractions, decimal
import numpy as np
for v in (b'ab', bytearray(b'x'), 2 ** 200, -2 ** 70, 1 + 2j, range(3), frozenset({1}), {1: [2, (3,)]}, 'é\\x00', None):
    assert echo(v) == v, v
assert math.isnan(echo(float('nan'))) and echo(float('-inf')) == float('-inf')
assert (echo(np.arange(4).reshape(2, 2)) == np.arange(4).reshape(2, 2)).all()
f, d, p, c, o, dd, i, a = typed()
assert f == fractions.Fraction(1, 3) and d == decimal.Decimal('1.5') and p == (1, 2)
assert c == {'a': 2, 'b': 1} and o == {'a': 1} and dd == {'b': 2} and i == 7 and list(a) == [0, 1, 2]
"""
    out = check_program(program, tests)
    assert out.passed, (out.reason, out.result.stderr)
