"""The package's shape: imports point down the layers of docs/architecture.md, with no cycle;
every module has a row there; every third-party import is declared in pyproject.toml."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "automl_tl"

#: docs/architecture.md's layers, bottom (1) to top (4)
LAYERS = {
    1: {"config", "weightsource", "paths", "trials", "registry", "components", "plugins"}
    | {"hookspecs", "errors", "_util", "adapters", "tasks"},
    2: {"budget", "storage", "samplers", "portfolio", "space", "train", "features", "weights"}
    | {"recipe"}
    | {"data", "catalog", "default_plugins", "scores", "latency", "prior"},
    3: {"search", "workers", "retrain", "leaderboard", "report", "progress", "pretrain"}
    | {"export", "testing", "selection", "scaffold", "bench", "clean"},
    4: {"cli", "study", "transfer"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def _layer(module: str) -> int | None:
    top = module.split(".")[0]
    return next((n for n, names in LAYERS.items() if top in names), None)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> modules of the package it imports (at any depth of the file, functions too)."""
    modules = {_module_name(p): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        is_init = path.name == "__init__.py"
        here = module.split(".") if module else []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level:
                base = here if is_init else here[:-1]
                base = base[: len(base) - node.level + 1]
                prefix = ".".join([*base, *([node.module] if node.module else [])])
                for alias in node.names:
                    full = f"{prefix}.{alias.name}".strip(".")
                    targets.append(full if full in modules else prefix)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("automl_tl"):
                targets.append(node.module.removeprefix("automl_tl").strip("."))
            elif isinstance(node, ast.Import):
                targets += [
                    a.name.removeprefix("automl_tl").strip(".")
                    for a in node.names
                    if a.name.split(".")[0] == "automl_tl"
                ]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected sets of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_import_graph_has_no_cycle():
    assert find_cycles(import_graph()) == []


def test_find_cycles_finds_one():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_has_a_layer_and_imports_only_down():
    upward = []
    for module, targets in import_graph().items():
        if module == "":  # the package's __init__: the public API re-exports any layer
            continue
        layer = _layer(module)
        assert layer is not None, f"{module} has no layer in LAYERS (docs/architecture.md)"
        for target in targets:
            if _layer(target) > layer:
                upward.append(f"{module} (layer {layer}) imports {target} (layer {_layer(target)})")
    assert upward == []


def test_every_module_has_a_row_in_the_architecture_doc():
    doc = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `([\w/.]+)` \|", doc, flags=re.MULTILINE))
    missing = [
        p.relative_to(PACKAGE).as_posix()
        for p in sorted(PACKAGE.glob("*.py"))
        if p.name not in rows
    ]
    assert "default_plugins/" in rows
    assert missing == [], f"add a row to docs/architecture.md's module table for {missing}"


def _declared() -> set[str]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return {
        re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements
    }


def test_third_party_imports_are_declared():
    """Each third-party module the package imports comes from a distribution pyproject.toml
    names (a dependency or an extra) — not one that happens to come along with another."""
    distributions = importlib.metadata.packages_distributions()
    imported: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {
        m for m in imported if m not in sys.stdlib_module_names and m not in ("automl_tl", "tomli")
    }
    declared = _declared()
    undeclared = []
    for module in sorted(third_party):
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not names & declared:
            undeclared.append(f"{module} (from {', '.join(sorted(names))})")
    assert undeclared == [], f"declare in pyproject.toml: {undeclared}"


@pytest.mark.parametrize("shim", ["study", "transfer"])
def test_the_old_modules_still_re_export_their_names(shim):
    import importlib

    module = importlib.import_module(f"automl_tl.{shim}")
    for name in module.__all__:
        assert getattr(module, name) is not None
