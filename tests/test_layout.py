"""Imports only point down the data flow: every import of every module, parsed (no import run).

Every ``import`` statement counts, wherever it is: module level, inside a function (the lazy
imports that keep ``zosam --help`` fast) or under ``TYPE_CHECKING``. A module may import its
own package and any lower layer; it may not import a higher layer, nor a package of its own
layer other than its own (siblings stay independent), nor a private (``_name``) name of
another package; no two modules may import each other, directly or around a loop.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Layers, lowest first: a module of layer i imports only layers < i and its own package.
#: The keys are module prefixes (``zosam.data`` covers ``zosam/data/**``).
LAYERS: list[tuple[str, ...]] = [
    # Below everything: the boundary checks, table/statistics/plot helpers, one registry class,
    # YAML reading, where results and MLflow live, Pareto fronts. They import nothing of zosam but each other.
    ("zosam.validate", "zosam.tables", "zosam.stats", "zosam.plotting", "zosam.console", "zosam.extras"),
    ("zosam.registry", "zosam.yaml_io", "zosam.pareto", "zosam.cliargs"),
    ("zosam.storage", "zosam.tracking"),
    # The data flow.
    ("zosam.data",),
    ("zosam.models",),
    ("zosam.sparse",),
    ("zosam.optim",),
    ("zosam.recipe",),  # the DeiT training recipe's pieces (Mixup, EMA, weight-decay groups) around timm
    ("zosam.optimizer_factory",),
    ("zosam.config",),  # the typed run config: checks names against data, models, sparse, optim
    ("zosam.checkpoint",),  # the checkpoint file: name, keys, atomic write, checked read
    ("zosam.engine",),
    ("zosam.runner",),
    ("zosam.ray_train",),
    ("zosam.sweep",),
    ("zosam.compare", "zosam.bench", "zosam.demo"),  # consumers of runs and sweeps, independent of each other
    ("zosam.cli",),
    # Deployment tooling (the ``cluster`` extra): nothing of the runtime may import it.
    ("zosam_cluster",),
]
PACKAGES = ("zosam", "zosam_cluster")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    """Every module of the project's packages: dotted name -> file."""
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _owner(name: str) -> str | None:
    """The module a dotted import target lives in (``zosam.data.DataConfig`` -> ``zosam.data``)."""
    while name and name not in modules():
        name = name.rpartition(".")[0]
    return name or None


@cache
def imports() -> dict[str, list[tuple[str, str | None, int]]]:
    """module -> [(imported project module, name taken from it or None, line)], every statement."""
    out: dict[str, list[tuple[str, str | None, int]]] = {}
    for mod, path in modules().items():
        found = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(a.name, None, node.lineno) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolved against the importing module's package
                    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
                    base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
                for a in node.names:
                    sub = f"{base}.{a.name}"  # ``from zosam.data import cifar`` imports a module
                    found.append((sub, None, node.lineno) if sub in modules() else (base, a.name, node.lineno))
        out[mod] = [(owner, name, line) for target, name, line in found
                    if target.split(".")[0] in PACKAGES and (owner := _owner(target))]
    return out


def layer(mod: str) -> int:
    """Index of ``mod``'s layer in :data:`LAYERS`."""
    for i, prefixes in enumerate(LAYERS):
        if any(mod == p or mod.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{mod} is in no layer: add it to LAYERS in tests/test_layout.py")


def package(mod: str) -> str:
    """The layer entry ``mod`` belongs to (``zosam.data.config`` -> ``zosam.data``)."""
    return next(p for p in LAYERS[layer(mod)] if mod == p or mod.startswith(p + "."))


def test_every_module_has_a_layer() -> None:
    assert len(modules()) > 50
    missing = [m for m in modules() if m != "zosam" and not any(
        m == p or m.startswith(p + ".") for prefixes in LAYERS for p in prefixes)]
    assert not missing, f"modules in no layer (add them to LAYERS): {missing}"


def test_imports_point_down() -> None:
    bad = []
    for mod, targets in imports().items():
        if mod == "zosam":
            assert not targets, "the root package imports nothing (``import zosam`` stays instant)"
            continue
        for target, _, line in targets:
            if target == "zosam" or package(target) == package(mod):
                continue
            if layer(target) > layer(mod):
                bad.append(f"{modules()[mod].relative_to(ROOT)}:{line}: {mod} imports {target} (a higher layer)")
            elif layer(target) == layer(mod):
                bad.append(f"{modules()[mod].relative_to(ROOT)}:{line}: {mod} imports its sibling {target}")
    assert not bad, "imports that do not point down the data flow:\n" + "\n".join(bad)


def test_no_private_names_across_packages() -> None:
    bad = [f"{modules()[mod].relative_to(ROOT)}:{line}: {mod} imports {target}.{name}"
           for mod, targets in imports().items() for target, name, line in targets
           if name and name.startswith("_") and not name.startswith("__") and package(target) != package(mod)]
    bad += [f"{modules()[mod].relative_to(ROOT)}:{line}: {mod} imports the private module {target}"
            for mod, targets in imports().items() for target, _, line in targets
            if any(part.startswith("_") and not part.startswith("__") for part in target.split("."))
            and package(target) != package(mod)]
    assert not bad, "private names used across packages (make them public or move them):\n" + "\n".join(bad)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_find_cycles_finds_loops_and_only_loops() -> None:
    """The cycle finder itself, on a graph whose answer is known."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": set(), "f": {"f"}}
    assert sorted(find_cycles(graph)) == [["a", "b", "c"], ["f"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}}) == []


def test_no_import_cycles() -> None:
    graph = {mod: {t for t, _, _ in targets if t != mod} for mod, targets in imports().items()}
    cycles = find_cycles(graph)
    assert not cycles, "modules that import each other (directly or around a loop):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_the_parser_sees_function_level_imports() -> None:
    """What the tests above rely on: lazy imports count, and a known upward import is found."""
    # A function-level import: the engine evaluates corruptions with the data package's evaluator.
    assert ("zosam.data", "corruption_accuracy") in {(t, n) for t, n, _ in imports()["zosam.engine"]}
    # The CLI imports the sweep only inside a command, and that import is seen.
    assert "zosam.sweep" in {t for t, _, _ in imports()["zosam.cli"]}
    assert layer("zosam.sweep") > layer("zosam.engine") > layer("zosam.optim") > layer("zosam.sparse")
    assert layer("zosam.sparse") > layer("zosam.models") > layer("zosam.data") > layer("zosam.registry")
