"""The package's shape: no module imports its caller, and the console entry points all live in cli.py."""

from __future__ import annotations

import ast
from importlib.metadata import entry_points
from pathlib import Path

import metareward

PACKAGE = Path(metareward.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports, at any depth of its code (lazy imports included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from metareward.store import records` imports the module metareward.store.records.
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target != "metareward":
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules (first = last), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = "open", stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node], _ = "done", stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "metareward.loop.run" in graph["metareward.cli"]  # the walk sees imports
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_nothing_below_the_cli_imports_it():
    importers = [name for name, imported in import_graph().items() if "metareward.cli" in imported]
    assert importers == []


def test_every_console_script_lives_in_the_cli_module():
    scripts = {
        e.name: e.value for e in entry_points(group="console_scripts") if e.name.startswith("metareward")
    }
    assert set(scripts) >= {"metareward", "metareward-pairs", "metareward-inspect", "metareward-report"}
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert module == "metareward.cli", f"{name} -> {target}"
        assert function in {
            n.name for n in ast.parse((PACKAGE / "cli.py").read_text()).body if hasattr(n, "name")
        }


def _third_party_imports(path: Path) -> set[str]:
    """The top-level names of everything ``path`` imports, lazily or not."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.partition(".")[0])
    return names


def test_heavy_optional_engines_are_imported_by_their_own_module_only():
    owners = {
        "ray": {"metareward.engines.cluster"},
        "vllm": {"metareward.generation.vllm"},
        "trl": {"metareward.training"},
    }
    for library, allowed in owners.items():
        importers = {_module_name(p) for p in PACKAGE.rglob("*.py") if library in _third_party_imports(p)}
        assert importers == allowed, library


# What each part of the package may import (besides itself): imports point down this list, never up.
# The README's architecture picture shows the same.
ALLOWED_IMPORTS = {
    "store": set(),
    "config": {"store"},
    "compute": {"store", "config"},
    "generation": {"store", "config", "compute"},
    "data": {"store", "config", "generation"},
    "judging": {"store", "config", "compute", "generation", "data"},
    "parsing": {"judging"},
    "report": {"store", "config"},
    "training": {"store", "config", "compute", "report"},
    "align": {"store", "config", "compute", "generation", "judging", "data", "training"},
    "engines": {"store", "config", "compute", "generation", "align", "training"},
    "loop": {
        "store",
        "config",
        "compute",
        "generation",
        "data",
        "judging",
        "report",
        "training",
        "align",
        "engines",
    },
    "cli": {
        "store",
        "config",
        "compute",
        "generation",
        "data",
        "judging",
        "report",
        "align",
        "engines",
        "loop",
    },
}


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of ``graph`` from one part of the package into a part it may not import."""
    return sorted(
        f"{name} -> {target}"
        for name, imported in graph.items()
        for target in imported
        if name != "metareward"
        and _part(target) != _part(name)
        and _part(target) not in ALLOWED_IMPORTS[_part(name)]
    )


def test_imports_point_down_the_layers():
    graph = import_graph()
    parts = {_part(name) for name in graph if name != "metareward"} - {"conf"}
    assert parts == set(ALLOWED_IMPORTS), "a new part of the package needs its place in ALLOWED_IMPORTS"
    assert upward_imports(graph) == []


def test_the_layer_check_finds_an_upward_import():
    graph = {
        "metareward.generation.hf": {"metareward.judging.prompts", "metareward.generation.base"},
        "metareward.loop.run": {"metareward.judging.prompts"},
        "metareward.judging.evaluation": {"metareward.loop.stages"},
    }
    assert upward_imports(graph) == [
        "metareward.generation.hf -> metareward.judging.prompts",
        "metareward.judging.evaluation -> metareward.loop.stages",
    ]
