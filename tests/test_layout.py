"""The package layout stays true: imports point down the layers, never in a cycle.

docs/architecture.md draws the map. Every import of a phibook module counts,
wherever it sits (module top, inside a function, under TYPE_CHECKING), because
each one is a dependency a reader has to follow. Imports built from strings at
run time (the CLI's verb table, the facade's lazy names) are not seen here; the
facade test below checks those resolve.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "phibook"

# Layers, lowest first. A module may import its own package freely (no cycles), and
# a package of a strictly lower layer; packages of one layer never import each other.
LAYERS: list[list[str]] = [
    ["phibook.version", "phibook.errors", "phibook.faults", "phibook.cpu_features", "phibook.options"],
    ["phibook.io", "phibook.documents"],  # base too, one step up: io calls phibook.faults (its io.write point)
    ["phibook.model", "phibook.sandbox"],
    ["phibook.weights"],
    ["phibook.inference"],
    ["phibook.data"],
    ["phibook.train", "phibook.eval", "phibook.serve", "phibook.pipeline"],
    ["phibook.demo"],
    ["phibook.commands", "phibook.cli"],
    ["phibook"],  # the facade (phibook/__init__.py): nothing imports it
]

# What rendering a report must never reach: code that loads, trains or runs a model.
RUNS_A_MODEL = ["phibook.weights", "phibook.inference", "phibook.model.model", "phibook.train",
                "phibook.eval.runner", "phibook.demo.samples", "phibook.demo.run"]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_source(node: ast.ImportFrom, mod: str, is_pkg: bool) -> str:
    """The absolute module a ``from ... import`` in module ``mod`` reads from (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(root: Path) -> dict[str, dict[str, int]]:
    """{module: {imported module: line}} for imports of modules under ``root`` (a package dir)."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    top = root.name
    graph: dict[str, dict[str, int]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                src = import_source(node, mod, is_pkg)
                # `from pkg import name` imports pkg.name when that is a module, else pkg itself
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in files else src for a in node.names]
            for t in targets:
                if t == top or t.startswith(top + "."):
                    while t not in files and "." in t:  # `import a.b.c` of a name inside a module
                        t = t.rsplit(".", 1)[0]
                    if t != mod:
                        edges.setdefault(t, node.lineno)
        graph[mod] = edges
    return graph


def layer_of(mod: str, layers: list[list[str]]) -> tuple[int, str] | None:
    """(rank, package prefix) of the longest prefix that holds ``mod``."""
    best = None
    for rank, prefixes in enumerate(layers):
        for prefix in prefixes:
            # the top package's own prefix holds only its __init__ (the facade), not every module
            holds = mod == prefix or ("." in prefix and mod.startswith(prefix + "."))
            if holds and (best is None or len(prefix) > len(best[1])):
                best = (rank, prefix)
    return best


def layering_errors(graph: dict[str, dict[str, int]], layers: list[list[str]], root: Path) -> list[str]:
    errors = []
    for mod in sorted(graph):
        here = layer_of(mod, layers)
        if here is None:
            errors.append(f"{module_file(mod, root)}: {mod} is in no layer; add its package to LAYERS (tests/test_layout.py) "
                          "and to docs/architecture.md")
            continue
        for dep, line in sorted(graph[mod].items()):
            there = layer_of(dep, layers)
            if there is None or there[1] == here[1] or there[0] < here[0]:
                continue
            how = "a peer of the same layer" if there[0] == here[0] else "a higher layer"
            where = module_file(mod, root)
            errors.append(f"{where}:{line}: {mod} imports {dep}, {how} ({there[1]} above or beside {here[1]})")
    return errors


def module_file(mod: str, root: Path) -> str:
    rel = Path(*mod.split(".")[1:])
    path = root / rel / "__init__.py" if (root / rel).is_dir() else root / rel.with_suffix(".py")
    return str(path.relative_to(root.parent))


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the package is small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, sorted(comp)) for comp in components]


def _cycle_in(graph: dict[str, dict[str, int]], comp: list[str]) -> list[str]:
    """A closed path a -> ... -> a inside one strongly connected component (breadth-first, shortest)."""
    members, start = set(comp), comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in graph[v]:
                if w not in members:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def package_of(mod: str) -> str:
    """The top-level phibook package holding ``mod`` (phibook.inference.generate -> phibook.inference);
    a base module (phibook.errors) or the facade is its own package."""
    return ".".join(mod.split(".")[:2])


def private_imports(root: Path) -> list[tuple[str, int, str, str]]:
    """(module, line, source module, name) for every ``from X import _name`` where X lies in
    another top-level package than the importing module: a private name used across a joint.

    Dunder names (``__version__``) are public by convention and not counted.
    """
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    top = root.name
    found = []
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            src = import_source(node, mod, is_pkg)
            if not (src == top or src.startswith(top + ".")) or package_of(src) == package_of(mod):
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append((mod, node.lineno, src, alias.name))
    return found


# Private names still imported across packages, known and to be removed. None today (the
# pipeline's tokenize block calls tokenize's public phases); add none: make the name public where
# it is defined instead.
KNOWN_PRIVATE_IMPORTS: set[tuple[str, str, str]] = set()


def reachable(graph: dict[str, dict[str, int]], start: str) -> dict[str, str]:
    """{module: the module that first imported it} for everything ``start`` imports, transitively."""
    seen: dict[str, str] = {}
    todo = [start]
    while todo:
        v = todo.pop()
        for w in graph.get(v, {}):
            if w not in seen and w != start:
                seen[w] = v
                todo.append(w)
    return seen


# --------------------------------------------------------------------------- the real package


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    return import_graph(PACKAGE_DIR)


def test_imports_point_down_the_layers(graph):
    errors = layering_errors(graph, LAYERS, PACKAGE_DIR)
    assert not errors, "imports against the layer order (docs/architecture.md):\n" + "\n".join(errors)


def test_no_import_cycles(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_name_imported_across_packages():
    found = private_imports(PACKAGE_DIR)
    new = [f"{module_file(m, PACKAGE_DIR)}:{line}: {m} imports {name} from {src}"
           for m, line, src, name in found if (m, src, name) not in KNOWN_PRIVATE_IMPORTS]
    assert not new, ("private names imported from another package (make them public where they are "
                     "defined):\n" + "\n".join(new))
    gone = KNOWN_PRIVATE_IMPORTS - {(m, src, name) for m, _, src, name in found}
    assert not gone, f"KNOWN_PRIVATE_IMPORTS lists imports that are gone; delete them: {sorted(gone)}"


def test_report_renderer_never_reaches_model_code(graph):
    reached = reachable(graph, "phibook.demo.report")
    bad = sorted(m for m in reached if any(m == p or m.startswith(p + ".") for p in RUNS_A_MODEL))
    chains = []
    for m in bad:
        chain = [m]
        while chain[-1] in reached:
            chain.append(reached[chain[-1]])
        chains.append(" <- ".join(chain))
    assert not bad, "the report renderer reaches code that runs a model:\n" + "\n".join(chains)


def test_public_names_import_from_the_package_lazily():
    code = textwrap.dedent("""
        import sys
        import phibook
        assert "torch" not in sys.modules, "import phibook pulled in torch"
        from phibook import (Generator, PhiConfig, PhiModel, SamplingParams, Tokenizer, load_model,
                             save_checkpoint)
        from phibook.inference.generate import Generator as G
        from phibook.model.model import PhiModel as M
        assert Generator is G and PhiModel is M
        assert sorted(phibook.__all__) == sorted([*phibook._PUBLIC, "__version__"])
        for name in phibook.__all__:
            getattr(phibook, name)
        try:
            phibook.NoSuchName
        except AttributeError as exc:
            assert "NoSuchName" in str(exc)
        else:
            raise AssertionError("unknown attribute did not raise")
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=PACKAGE_DIR.parent)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# --------------------------------------------------------------------------- the checker itself


def _fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in {"__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


FAKE_LAYERS = [["pkg.low"], ["pkg.mid_a", "pkg.mid_b"], ["pkg.high"], ["pkg"]]


def test_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    root = _fake_package(tmp_path, {
        "low/__init__.py": "",
        "low/a.py": "from pkg.low.b import thing\n",
        "low/b.py": "def f():\n    from pkg.low import c\n",
        "low/c.py": "from . import a\n",
        "low/d.py": "from pkg.low.a import x\n",  # imports into the cycle, not part of it
    })
    cycles = find_cycles(import_graph(root))
    assert cycles == [["pkg.low.a", "pkg.low.b", "pkg.low.c", "pkg.low.a"]]


def test_checker_finds_upward_and_peer_imports(tmp_path):
    root = _fake_package(tmp_path, {
        "low.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.high import H\n",
        "mid_a.py": "import pkg.mid_b\nfrom pkg import low\n",
        "mid_b.py": "from pkg.low import x\n",
        "high.py": "from pkg.mid_a import y\nfrom pkg.low import z\n",
        "stray.py": "",
    })
    errors = layering_errors(import_graph(root), FAKE_LAYERS, root)
    assert len(errors) == 3, errors
    assert errors[0].startswith("pkg/low.py:3: pkg.low imports pkg.high, a higher layer")
    assert errors[1].startswith("pkg/mid_a.py:1: pkg.mid_a imports pkg.mid_b, a peer of the same layer")
    assert errors[2].startswith("pkg/stray.py: pkg.stray is in no layer")


def test_checker_passes_a_clean_package(tmp_path):
    root = _fake_package(tmp_path, {
        "low.py": "import os\n",
        "mid_a.py": "from pkg.low import x\n",
        "high.py": "from pkg import mid_a, low\nfrom .mid_b import q\n",
        "mid_b.py": "",
    })
    g = import_graph(root)
    assert g["pkg.high"] == {"pkg.mid_a": 1, "pkg.low": 1, "pkg.mid_b": 2}
    assert layering_errors(g, FAKE_LAYERS, root) == [] and find_cycles(g) == []


def test_checker_finds_private_names_imported_across_packages(tmp_path):
    root = _fake_package(tmp_path, {
        "low/__init__.py": "",
        "low/a.py": "_hidden = 1\n__version__ = '1'\n",
        "low/b.py": "from pkg.low.a import _hidden\nfrom .a import _hidden as h\n",  # same package: fine
        "high/__init__.py": "",
        "high/c.py": "from pkg.low.a import __version__\ndef f():\n    from pkg.low.a import x, _hidden\n",
        "high/d.py": "from ..low import _b\n",
    })
    assert private_imports(root) == [
        ("pkg.high.c", 3, "pkg.low.a", "_hidden"),
        ("pkg.high.d", 1, "pkg.low", "_b"),
    ]


# --------------------------------------------------------------------------- docs name what exists


DOC_FILES = ["README.md", "BENCHMARKS.md", *(f"docs/{p.name}" for p in sorted((PACKAGE_DIR.parent / "docs").glob("*.md")))]


def _top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def missing_references(text: str, repo: Path) -> list[str]:
    """phibook/... file paths and phibook.a.b dotted names in ``text`` that name nothing in ``repo``."""
    import re

    missing = []
    for m in re.finditer(r"(?<![\w./-])phibook/[\w/.-]*\w", text):
        if not (repo / m.group(0)).exists():
            missing.append(m.group(0))
    for m in re.finditer(r"(?<![\w./-])phibook(?:\.\w+)+", text):
        parts = m.group(0).split(".")
        k = len(parts)
        while k > 1 and not ((repo / Path(*parts[:k])).is_dir() or (repo / Path(*parts[:k])).with_suffix(".py").is_file()):
            k -= 1
        if k == 1:
            missing.append(m.group(0))
            continue
        if k < len(parts):  # module.attribute: the attribute must be defined at the module's top level
            mod = repo / Path(*parts[:k])
            path = mod / "__init__.py" if mod.is_dir() else mod.with_suffix(".py")
            if parts[k] not in _top_level_names(path) and parts[k] not in {"py", "toml", "md"}:
                missing.append(m.group(0))
    return missing


def test_docs_name_only_modules_and_files_that_exist():
    repo = PACKAGE_DIR.parent
    bad = []
    for rel in DOC_FILES:
        for ref in missing_references((repo / rel).read_text(encoding="utf-8"), repo):
            bad.append(f"{rel}: {ref}")
    assert not bad, "docs name modules or files that do not exist:\n" + "\n".join(bad)


def test_docs_check_catches_a_gone_path(tmp_path):
    (tmp_path / "phibook").mkdir()
    (tmp_path / "phibook" / "a.py").write_text("X = 1\n")
    text = "phibook/a.py phibook.a.X phibook/gone.py phibook.a.nothing phibook.gone `phibook eval`"
    assert missing_references(text, tmp_path) == ["phibook/gone.py", "phibook.a.nothing", "phibook.gone"]


def test_eval_task_modules_are_listed_eval_modules() -> None:
    """The task registry imports its families by name (they import it back): each listed name is a
    module of phibook.eval, and every module that registers a task is listed."""
    from phibook.eval.task import TASK_MODULES

    eval_dir = PACKAGE_DIR / "eval"
    registering = {f"phibook.eval.{p.stem}" for p in eval_dir.glob("*.py")
                   if p.stem != "task" and "@register" in p.read_text(encoding="utf-8")}
    assert all(name.startswith("phibook.eval.") and (eval_dir / f"{name.rsplit('.', 1)[1]}.py").is_file()
               for name in TASK_MODULES), TASK_MODULES
    assert registering == set(TASK_MODULES)
