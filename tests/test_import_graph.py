"""Package boundaries, read from the source: no import circles, the service never imports the
trainer, ``schemas`` never imports torch, and only ``trainer/distributed.py`` talks to the process
group.

The graph is built from the AST of every module of ``schemas``, ``trainer`` and ``serving``, with
imports at module level and inside functions alike (a late import that dodges a circle at import
time is still a circle in the design). An edge goes to the module an import names: ``from a.b
import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``. Parent packages are not
added, because a module importing a sibling through its package's ``__init__`` is how packages
work, not a circle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "trainer", "serving")

# torch.distributed names that only ask about the process group (no communication); the
# reader uses them for its rank defaults.
_DIST_QUERIES = frozenset({"is_available", "is_initialized", "get_rank", "get_world_size"})


def module_files(root: Path = REPO, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of ``packages`` under ``root``."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def imported_names(path: Path, module: str) -> Iterator[tuple[tuple[str, ...], int]]:
    """Every import of ``path`` as the module names it may mean, most specific first, with its
    line: ``import a.b`` gives ``("a.b",)``, ``from a import b`` gives ``("a.b", "a")`` (``b``
    is a submodule or a name defined in ``a``). Relative imports are resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield (alias.name,), node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                yield (f"{base}.{alias.name}", base), node.lineno


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """Module -> {imported module of ``modules``: line of the first such import}."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges: dict[str, int] = {}
        for names, line in imported_names(path, module):
            target = next((name for name in names if name in modules), None)
            if target is not None and target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as one circle
    through all of its modules where one exists, else the component's members."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(_circle(graph, sorted(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _circle(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """A path from the component's first module back to it (breadth-first, inside it)."""
    members, start = set(component), component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node]):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if target in members and target not in previous:
                    previous[target] = node
                    following.append(target)
        frontier = following
    return component


def _describe(graph: dict[str, dict[str, int]], circle: list[str]) -> str:
    return " -> ".join(
        f"{a} (line {graph[a][b]})" if b else a for a, b in zip(circle, [*circle[1:], None])
    )


def reachable(graph: dict[str, dict[str, int]], start: str) -> dict[str, str]:
    """Every module ``start`` imports, directly or not -> the module that imports it."""
    seen: dict[str, str] = {}
    frontier = [start]
    while frontier:
        node = frontier.pop()
        for target in graph.get(node, {}):
            if target not in seen and target != start:
                seen[target] = node
                frontier.append(target)
    return seen


def external_imports(modules: dict[str, Path], prefix: str) -> dict[str, list[str]]:
    """Module -> the imports of ``modules`` that name ``prefix`` or a submodule of it."""
    out: dict[str, list[str]] = {}
    for module, path in modules.items():
        for names, line in imported_names(path, module):
            name = names[-1]
            if name == prefix or name.startswith(prefix + "."):
                out.setdefault(module, []).append(f"{name} (line {line})")
    return out


# The checks on the repository ------------------------------------------------------------------


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    return module_files()


@pytest.fixture(scope="module")
def graph(modules) -> dict[str, dict[str, int]]:
    return import_graph(modules)


def test_there_are_no_import_circles(graph):
    circles = cycles(graph)
    assert not circles, "import circles:\n" + "\n".join(_describe(graph, c) for c in circles)


def test_serving_never_imports_trainer(graph, modules):
    for module in (m for m in modules if m.split(".")[0] == "serving"):
        for target, via in reachable(graph, module).items():
            assert not target.startswith("trainer"), f"{module} reaches {target} through {via}"
    assert not external_imports(
        {m: p for m, p in modules.items() if m.startswith("serving")}, "trainer"
    )


def test_schemas_never_import_torch(graph, modules):
    schemas = {m: p for m, p in modules.items() if m.split(".")[0] == "schemas"}
    for module in schemas:
        assert all(t.startswith("schemas") for t in reachable(graph, module)), module
    for banned in ("torch", "torchrec", "fbgemm_gpu"):
        assert not external_imports(schemas, banned), banned


def test_only_distributed_py_talks_to_the_process_group(modules):
    """Collectives live behind the helpers of ``trainer/distributed.py`` (DCP's own are fine)."""
    offenders = []
    for module, path in modules.items():
        if module == "trainer.distributed":
            continue
        offenders += [f"{path.relative_to(REPO)}: {use}" for use in _process_group_uses(path)]
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        offenders += [f"{path.relative_to(REPO)}: {use}" for use in _process_group_uses(path)]
    assert not offenders, "\n".join(offenders)


def _process_group_uses(path: Path) -> Iterator[str]:
    """``torch.distributed`` names used in ``path`` other than the rank queries and DCP."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "torch.distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            for alias in node.names:
                if alias.name != "checkpoint" and alias.name not in _DIST_QUERIES:
                    yield f"line {node.lineno}: from torch.distributed import {alias.name}"
    for node in ast.walk(tree):
        attribute = isinstance(node, ast.Attribute) and _dotted(node.value) in aliases
        if attribute and node.attr not in _DIST_QUERIES:
            yield f"line {node.lineno}: {_dotted(node.value)}.{node.attr}"


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


# The checks at run time: what importing the service and the schemas really loads -------------


def test_importing_the_service_loads_no_trainer_and_no_torchrec():
    code = (
        "import sys, serving.main, serving.__main__\n"
        "bad = sorted(m for m in sys.modules if m == 'trainer' or "
        "m.startswith(('trainer.', 'torchrec', 'fbgemm')))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_importing_the_schemas_loads_no_torch(modules):
    every = ", ".join(m for m in modules if m.split(".")[0] == "schemas")
    code = f"import sys, {every}\nassert 'torch' not in sys.modules and 'numpy' in sys.modules\n"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


# The checker itself, on made-up packages --------------------------------------------------------


def _package(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return module_files(root, ("pkg",))


def test_a_function_level_import_circle_is_found_and_named(tmp_path):
    modules = _package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg.b import thing\n",
            "pkg/b.py": "def thing():\n    from pkg import c\n    return c\n",
            "pkg/c.py": "import pkg.a\n",
            "pkg/d.py": "from pkg import a, b\n",  # imports the circle, is not part of it
        },
    )
    graph = import_graph(modules)
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    assert "pkg.b (line 2) -> pkg.c" in _describe(graph, cycles(graph)[0])


def test_a_package_importing_its_submodules_is_no_circle(tmp_path):
    modules = _package(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.a import A\nfrom pkg.b import B\n",
            "pkg/a.py": "A = 1\n",
            "pkg/b.py": "from pkg.a import A\nfrom . import a\nB = A\n",
        },
    )
    graph = import_graph(modules)
    assert graph["pkg.b"] == {"pkg.a": 1}
    assert cycles(graph) == []
    assert reachable(graph, "pkg") == {"pkg.a": "pkg", "pkg.b": "pkg"}


def test_process_group_calls_are_found(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(
        "import torch.distributed as dist\n"
        "from torch.distributed import barrier\n"
        "import torch.distributed.checkpoint as dcp\n"
        "rank = dist.get_rank() if dist.is_initialized() else 0\n"
        "dist.all_reduce(x)\n"
        "dcp.save({}, checkpoint_id='x')\n"
    )
    assert list(_process_group_uses(path)) == [
        "line 2: from torch.distributed import barrier",
        "line 5: dist.all_reduce",
    ]
