"""One way through the code: no import cycle, no import from a lower layer to a higher one.

Layers, lowest first (STYLE.md, issue 10): base (``prot_lib``, ``prot_lib.utils``, ``prot_lib.compat``)
-> data, models (independent of each other) -> diagnostics -> callbacks -> training -> experiments ->
viz -> CLI (``prot_lib.__main__``). A module may import its own package and any lower layer.

The graph is read from the source with ``ast``: every ``import`` and ``from ... import``, at module level
AND inside functions (an import inside a function still runs, so moving it there cannot dodge a cycle),
except under ``if TYPE_CHECKING:``. Importing ``a.b.c`` from outside package ``a.b`` also runs
``a/b/__init__.py``: that edge is added too, which is how Python really executes it.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Tuple

ROOT = Path(__file__).resolve().parents[1] / "prot_lib"

LAYERS: List[Tuple[str, int, Tuple[str, ...]]] = [
    ("base", 0, ("prot_lib", "prot_lib.utils", "prot_lib.compat")),
    ("data", 1, ("prot_lib.data",)),
    ("models", 1, ("prot_lib.models",)),
    ("diagnostics", 2, ("prot_lib.diagnostics",)),
    ("callbacks", 3, ("prot_lib.callbacks",)),
    ("training", 4, ("prot_lib.training",)),
    ("experiments", 5, ("prot_lib.experiments",)),
    ("viz", 6, ("prot_lib.viz",)),
    ("cli", 7, ("prot_lib.__main__",)),
]

# Known exceptions, each to be deleted when the branch named in its comment is merged:
KNOWN_CYCLES: set = set()  # none: a new exception needs a comment naming the branch that removes it
KNOWN_UPWARD: set = set()


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> Iterable[ast.stmt]:
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path = ROOT) -> Dict[str, Set[str]]:
    """{module: modules of the package it imports (directly, or by running a package ``__init__``)}."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    pkg = root.name
    graph: Dict[str, Set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        here = mod if is_pkg else mod.rpartition(".")[0]
        targets: Set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
                continue
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            for a in node.names:
                sub = f"{src}.{a.name}"
                targets.add(sub if sub in files else src)
        for t in targets:
            if t != pkg and not t.startswith(pkg + "."):
                continue
            while t not in files and "." in t:  # "prot_lib.x.name" that is not a module: its package
                t = t.rpartition(".")[0]
            # running t also runs every package __init__ above it that the importer is not inside
            parts = t.split(".")
            for i in range(1, len(parts) + 1):
                anc = ".".join(parts[:i])
                if anc == t or not (mod == anc or mod.startswith(anc + ".")):
                    if anc in files and anc != mod:
                        graph[mod].add(anc)
    return graph


def layer_of(mod: str) -> Optional[Tuple[str, int]]:
    best = None
    for name, rank, prefixes in LAYERS:
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and (best is None or len(p) > best[2]):
                best = (name, rank, len(p))
    return None if best is None else best[:2]


def cycles(graph: Dict[str, Set[str]]) -> List[Set[str]]:
    """Strongly connected components with more than one module (Tarjan), plus self-imports."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[Set[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def upward_imports(graph: Dict[str, Set[str]]) -> List[Tuple[str, str]]:
    """(importer, imported) pairs that go to a higher layer, or across the two independent layers."""
    bad = []
    for mod, targets in graph.items():
        lm = layer_of(mod)
        for t in sorted(targets):
            lt = layer_of(t)
            if lm is None or lt is None or lm[0] == lt[0]:
                continue
            if lt[1] >= lm[1]:
                bad.append((mod, t))
    return bad


def test_every_module_has_a_layer():
    assert [m for m in import_graph() if layer_of(m) is None] == []


def test_no_import_cycle():
    found = [c for c in cycles(import_graph()) if frozenset(c) not in KNOWN_CYCLES]
    assert found == [], found


def test_no_upward_import():
    found = [e for e in upward_imports(import_graph()) if e not in KNOWN_UPWARD]
    assert found == [], found


def test_diagnostics_and_callbacks_know_nothing_of_the_training_layer():
    g = import_graph()
    low = [m for m in g if m.startswith(("prot_lib.diagnostics", "prot_lib.callbacks"))]
    reach = {t for m in low for t in g[m] if t.startswith("prot_lib.training")}
    assert reach <= {"prot_lib.training"} and all(
        (m, "prot_lib.training") in KNOWN_UPWARD for m in low if "prot_lib.training" in g[m])


def test_the_checker_finds_a_cycle_a_late_import_and_an_upward_import(tmp_path):
    # a fake package: a <-> b through an import inside a function, and models importing training
    pkg = tmp_path / "prot_lib"
    for d in ("", "models", "training"):
        (pkg / d).mkdir(parents=True, exist_ok=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "models" / "a.py").write_text("from . import b\n")
    (pkg / "models" / "b.py").write_text("def f():\n    from .a import x\n")
    (pkg / "models" / "c.py").write_text("from ..training.config import X\n")
    (pkg / "training" / "config.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                               "    from ..models import a\n")
    g = import_graph(pkg)
    assert cycles(g) == [{"prot_lib.models.a", "prot_lib.models.b"}]
    # importing training.config runs training/__init__ too; TYPE_CHECKING imports do not count
    assert g["prot_lib.models.c"] == {"prot_lib.training", "prot_lib.training.config"}
    assert g["prot_lib.training.config"] == set()
    assert upward_imports(g) == [("prot_lib.models.c", "prot_lib.training"),
                                 ("prot_lib.models.c", "prot_lib.training.config")]
