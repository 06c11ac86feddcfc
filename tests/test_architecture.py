"""The architecture of the package, checked on its source (ast) and by importing it.

* (a) no import cycles among the modules of :mod:`subriemann`, counting imports inside
  functions and ignoring ``if TYPE_CHECKING:`` blocks;
* (b) outside ``subriemann/app`` no module imports matplotlib or tqdm at module level
  (the core stays importable without the application's plotting and progress bars);
* (c) no private name crosses a module boundary: no ``from subriemann.x import _name``
  and no ``obj._attr`` reaching a private attribute that another module defines;
* (d) no function has more than :data:`MAX_LINES` lines of code (docstring, blank and
  comment-only lines excluded);
* (e) nothing below ``subriemann/app`` imports ``subriemann.app``;
* (f) the old module names of ``subriemann/_compat.py`` still import, and give the very
  module objects of their new homes.
"""

from __future__ import annotations

import ast
import functools
import importlib
import warnings
from pathlib import Path

import pytest

from subriemann._compat import MOVED
from tests.helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "subriemann"
#: Longest function allowed (lines of code, docstring excluded).
MAX_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
RELPATHS = {name: p.relative_to(REPO_ROOT).as_posix() for name, p in FILES.items()}


@functools.cache
def _tree(name: str) -> ast.Module:
    return ast.parse(FILES[name].read_text(), filename=str(FILES[name]))


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of every node inside an ``if TYPE_CHECKING:`` block."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _absolute(name: str, node: ast.ImportFrom, package: bool) -> str:
    """The absolute module of ``from ... import`` in module ``name`` (relative imports too).

    ``package``: ``name`` is a package (its ``__init__.py``).
    """
    if not node.level:
        return node.module or ""
    base = name.split(".")
    if not package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imported(name: str, node: ast.AST, package: bool) -> list[str]:
    """Full names that an import statement of module ``name`` loads (any package)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        mod = _absolute(name, node, package)
        subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in FILES]
        return subs if len(subs) == len(node.names) else [mod, *subs]
    return []


def _owner(dotted: str) -> str | None:
    """The subriemann module that defines ``dotted`` (its longest module prefix)."""
    while dotted and dotted not in FILES:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def module_imports(name: str, tree: ast.Module, package: bool = False) -> set[str]:
    """The subriemann modules that module ``name`` imports, at module level or in functions."""
    skip = _type_checking_nodes(tree)
    edges: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        for target in _imported(name, node, package):
            owner = _owner(target) if target.startswith("subriemann") else None
            if owner is not None and owner != name:
                edges.add(owner)
    return edges


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """Module -> the subriemann modules it imports."""
    return {
        name: module_imports(name, _tree(name), FILES[name].name == "__init__.py")
        for name in FILES
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = stack[stack.index(v) :]
            del stack[stack.index(v) :]
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# -- (a) no import cycles -----------------------------------------------------------------
def test_cycle_finder_finds_a_cycle():
    """The checker itself: a three-module cycle and a self-contained chain."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_import_finder_counts_local_imports_and_skips_type_checking():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "from subriemann.linalg.state import PointState\n"
        "from . import events\n"
        "if TYPE_CHECKING:\n    from subriemann.space import ParameterSpace\n"
        "def f():\n    import subriemann.metrics.interpolated as b\n    from ..app import cli\n"
    )
    assert module_imports("subriemann.flow.batch", tree) == {
        "subriemann.linalg.state",
        "subriemann.flow.events",
        "subriemann.metrics.interpolated",
        "subriemann.app.cli",
    }


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) == len(FILES) > 40
    assert cycles(graph) == []


# -- (b) no plotting or progress bars at module level in the core -------------------------
def _module_level_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, name) of every import not inside a function (nor under TYPE_CHECKING)."""
    skip = _type_checking_nodes(tree)
    out: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if id(child) not in skip and isinstance(child, ast.Import):
                out.extend((child.lineno, a.name) for a in child.names)
            elif id(child) not in skip and isinstance(child, ast.ImportFrom) and child.module:
                out.append((child.lineno, child.module))
            visit(child)

    visit(tree)
    return out


CORE = [name for name in FILES if not name.startswith("subriemann.app")]


@pytest.mark.parametrize("name", CORE)
def test_core_does_not_import_matplotlib_or_tqdm_at_module_level(name):
    heavy = [
        f"{RELPATHS[name]}:{line}: {mod}"
        for line, mod in _module_level_imports(_tree(name))
        if mod.split(".")[0] in ("matplotlib", "tqdm")
    ]
    assert not heavy


def test_module_level_import_finder():
    tree = ast.parse(
        "import matplotlib\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import tqdm\n"
        "try:\n    from tqdm.auto import tqdm as bar\nexcept ImportError:\n    pass\n"
        "def f():\n    import matplotlib.pyplot\n"
        "class A:\n    import json\n"
    )
    names = [m for _, m in _module_level_imports(tree)]
    assert names == ["matplotlib", "typing", "tqdm.auto", "json"]


# -- (c) private names stay in their module ------------------------------------------------
#: Private attributes of other libraries that the package may use (named, not guessed).
ALLOWED_PRIVATE = {
    "_replace": "namedtuple's public API (underscored so as not to clash with fields)",
    "_asdict": "namedtuple's public API",
    "_fields": "namedtuple's public API",
    "_version": "torch.Tensor's in-place version counter (cache keys)",
    "_modules": "torch.nn.Module's child registry",
    "_C": "torch's C extension (torch._C._functorch)",
    "_functorch": "torch._C._functorch: is a tensor wrapped by a torch.func transform",
    "_NormBase": "torch.nn.modules.batchnorm._NormBase: every batch/instance norm",
    "_DropoutNd": "torch.nn.modules.dropout._DropoutNd: every dropout layer",
}


def _own_names(tree: ast.Module) -> set[str]:
    """Names the module defines: module-level, class bodies, and ``self.x``/``cls.x`` stores."""
    own: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
        ):
            own.add(node.attr)
        elif isinstance(node, ast.arg):
            own.add(node.arg)
    return own


def _is_private(attr: str) -> bool:
    return attr.startswith("_") and not attr.endswith("__")


def private_offences(name: str, tree: ast.Module | None = None) -> set[str]:
    """``from m import _x`` across modules, and ``obj._x`` not defined in this module."""
    package = name in FILES and FILES[name].name == "__init__.py"
    tree = _tree(name) if tree is None else tree
    own = _own_names(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = _absolute(name, node, package)
            if not mod.startswith("subriemann"):
                continue
            for alias in node.names:
                private_module = f"{mod}.{alias.name}" in FILES  # e.g. subriemann._compat
                if _is_private(alias.name) and not private_module:
                    found.add(f"from {mod} import {alias.name}")
        elif isinstance(node, ast.Attribute) and _is_private(node.attr):
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if node.attr in own or node.attr in ALLOWED_PRIVATE:
                continue
            found.add(ast.unparse(node))
    return found


def check_offences(name: str, found: set[str], what: str) -> None:
    """Fail, naming the module and every offence found in it."""
    assert not found, f"{RELPATHS[name]}: {what}: {sorted(found)}"


@pytest.mark.parametrize("name", FILES)
def test_no_private_access_across_modules(name):
    check_offences(name, private_offences(name), "private names of other modules")


def test_private_access_finder():
    """The heuristic on a tiny module: what it flags and what it lets through."""
    source = (
        "from subriemann.linalg.spectral import _rounding, rank_threshold\n"
        "from subriemann import _compat\n"
        "class A:\n"
        "    def __init__(self, other):\n"
        "        self._x = 1\n"
        "        other._x, other._y = 2, 3\n"
        "        self._space._check_vec(0)\n"
        "        t = other._replace(a=1)._version\n"
        "        return other.__dict__\n"
    )
    found = private_offences("subriemann.probe", ast.parse(source))
    assert found == {
        "from subriemann.linalg.spectral import _rounding",
        "other._y",
        "self._space._check_vec",
    }


# -- (d) short functions -------------------------------------------------------------------
def code_lines(func: ast.FunctionDef | ast.AsyncFunctionDef, source: list[str]) -> int:
    """Lines of ``func`` from ``def`` to its end, without docstring, blank or comment lines."""
    assert func.end_lineno is not None
    lines = set(range(func.lineno, func.end_lineno + 1))
    body = func.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        if isinstance(body[0].value.value, str):
            assert body[0].end_lineno is not None
            lines -= set(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(
        1 for i in lines if source[i - 1].strip() and not source[i - 1].strip().startswith("#")
    )


def long_functions(name: str) -> dict[str, int]:
    """Qualified name -> lines of code, for every function over :data:`MAX_LINES`."""
    source = FILES[name].read_text().splitlines()
    out: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = code_lines(child, source)
                if n > MAX_LINES:
                    out[prefix + child.name] = n
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(_tree(name), "")
    return out


@pytest.mark.parametrize("name", FILES)
def test_functions_are_at_most_80_lines_of_code(name):
    lines = long_functions(name)
    check_offences(name, set(lines), f"over {MAX_LINES} lines of code ({lines})")


def test_code_line_counter():
    source = (
        "def f(a):\n"
        '    """Doc\n\n    more doc.\n    """\n'
        "    # a comment\n"
        "\n"
        "    x = a\n"
        "    return (x,\n"
        "            a)\n"
    )
    func = ast.parse(source).body[0]
    assert isinstance(func, ast.FunctionDef)
    assert code_lines(func, source.splitlines()) == 4  # def, x =, return, a)


# -- (e) the application is the top layer --------------------------------------------------
#: Modules outside subriemann/app that may import it: the ``python -m subriemann`` entry point.
APP_USERS = {"subriemann.__main__"}


def test_nothing_below_app_imports_app():
    graph = import_graph()
    upward = {
        RELPATHS[name]: sorted(t for t in targets if t.startswith("subriemann.app"))
        for name, targets in graph.items()
        if not name.startswith("subriemann.app") and name not in APP_USERS
    }
    assert {k: v for k, v in upward.items() if v} == {}
    assert graph["subriemann.__main__"] == {"subriemann.app.cli"}


# -- (f) old module names -------------------------------------------------------------------
@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_names_are_the_new_modules(old):
    new = importlib.import_module(MOVED[old])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert importlib.import_module(old) is new


def test_old_names_of_submodules_follow_their_package():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = importlib.import_module("subriemann.sweep.cells")
    assert old is importlib.import_module("subriemann.app.sweep.cells")
