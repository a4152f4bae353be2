"""The shape of the code: layers import one way, no cycles, every pass registered, short functions.

Layers, lowest first (see CONTRIBUTING.md): a module imports only its own layer or lower ones.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "optimizer_cli"

LAYERS: list[tuple[str, ...]] = [
    ("optimizer_cli", "errors"),
    ("analysis", "model_io", "data", "runtime", "verify", "ir_compat", "outputs", "plugins"),
    ("passes",),
    ("recipe", "pipeline"),
    ("bench",),
    ("search",),
    ("report",),
    ("workflows", "api"),
    ("cli", "__main__", "examples", "large_examples", "zoo"),
]
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    """Index of the layer holding `module` ('optimizer_cli.passes.prune' -> the layer of 'passes')."""
    rest = module.split(".")[1:]
    top = rest[0] if rest else "optimizer_cli"
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and CONTRIBUTING.md")


def _targets(source: str) -> set[str]:
    """The optimizer_cli modules a module's source imports (at any depth: function-level imports count too)."""
    targets: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("optimizer_cli"):
            # `from optimizer_cli.passes import cleanup` imports the submodule when it is one
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found = (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                targets.add(sub if found else node.module)
        elif isinstance(node, ast.Import):
            targets.update(a.name for a in node.names if a.name.startswith("optimizer_cli"))
    return targets


# The package root re-exports the Python API lazily (PEP 562): its module-level __getattr__ imports
# optimizer_cli.api on the first use of an API name, never at `import optimizer_cli`, so that import is no
# dependency of the lowest layer. Only that import, in only that function of only the root, is exempt.
LAZY_REEXPORT = ("optimizer_cli", "__getattr__", "optimizer_cli.api")


def _lazy_reexports(module: str, source: str) -> set[str]:
    """The imports of `module` that LAZY_REEXPORT exempts (empty for every other module)."""
    root, function, target = LAZY_REEXPORT
    if module != root:
        return set()
    bodies = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == function]
    return {target} & set().union(*(_targets(ast.unparse(n)) for n in bodies))


def _imports() -> dict[str, set[str]]:
    """module -> the optimizer_cli modules it imports."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        source = path.read_text()
        graph[module] = _targets(source) - {module} - _lazy_reexports(module, source)
    return graph


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in graph.items()
        for target in sorted(targets)
        if _layer(target) > _layer(module)
    ]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules, the first repeated at the end), or None."""
    # A package's __init__ re-exports its modules; that is not a dependency of those modules on it.
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_every_module_imports_only_its_layer_or_lower() -> None:
    upward = _upward(_imports())
    assert not upward, "\n".join(upward)


def test_module_imports_have_no_cycles() -> None:
    cycle = _cycle(_imports())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_rules_catch_a_synthetic_upward_import_and_cycle() -> None:
    """The checkers themselves can fail: a pass that imports the benchmark layer (inside a function, in both
    import forms) is reported, and so is a cycle; the real graph with one such edge added is caught too."""
    source = (
        "import optimizer_cli.errors\n"
        "def helper():\n"
        "    from optimizer_cli.bench import accuracy\n"
        "    import optimizer_cli.report.table\n"
    )
    targets = _targets(source)
    assert targets == {"optimizer_cli.errors", "optimizer_cli.bench.accuracy", "optimizer_cli.report.table"}
    upward = _upward({"optimizer_cli.passes.prune": targets})
    assert len(upward) == 2 and all(line.startswith("optimizer_cli.passes.prune (layer 2)") for line in upward)
    assert _upward({"optimizer_cli.bench.accuracy": {"optimizer_cli.passes.prune"}}) == []

    graph = _imports()
    graph["optimizer_cli.verify"] = graph["optimizer_cli.verify"] | {"optimizer_cli.pipeline"}
    assert any(
        line.startswith("optimizer_cli.verify (layer 1) imports optimizer_cli.pipeline") for line in _upward(graph)
    )
    assert _cycle(graph) is not None, "pipeline imports verify, so verify -> pipeline closes a cycle"
    assert _cycle({"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}}) == ["a.x", "a.y", "a.z", "a.x"]
    assert _cycle({"a": {"a.x"}, "a.x": {"a"}}) is None, "a package re-exporting its module is no cycle"


def test_only_the_roots_lazy_api_reexport_is_exempt() -> None:
    """The root may import optimizer_cli.api inside __getattr__ alone: at module level, another target, another
    function or another module, the import still counts (and is reported as upward)."""
    lazy = "def __getattr__(name):\n    from optimizer_cli import api\n    return getattr(api, name)\n"
    assert _lazy_reexports("optimizer_cli", lazy) == {"optimizer_cli.api"}
    assert _lazy_reexports("optimizer_cli", "from optimizer_cli import api\n") == set()
    assert _lazy_reexports("optimizer_cli", lazy.replace("import api", "import cli")) == set()
    assert _lazy_reexports("optimizer_cli", lazy.replace("__getattr__", "helper")) == set()
    assert _lazy_reexports("optimizer_cli.errors", lazy) == set()
    upward = _upward({"optimizer_cli": _targets("from optimizer_cli import api\n")})
    assert upward == ["optimizer_cli (layer 0) imports optimizer_cli.api (layer 7)"]


def _third_party_imports(source: str) -> set[str]:
    """The top-level packages a module's source imports (at any depth)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
    return found


def test_only_the_cli_parses_and_only_report_and_cli_draw() -> None:
    """Below the CLI layer nothing imports typer (a library call never parses or exits) and only report/
    imports rich (rendering): workflows and api speak to their caller through listeners and reports."""
    cli_layer = len(LAYERS) - 1
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        if _layer(module) == cli_layer:
            continue
        imported = _third_party_imports(path.read_text())
        allowed = {"rich"} if module.startswith("optimizer_cli.report") else set()
        found += [f"{module} imports {name}" for name in sorted(imported & ({"typer", "rich"} - allowed))]
    assert not found, "\n".join(found)
    assert _third_party_imports("def f():\n    from rich.console import Console\n") == {"rich"}


def test_every_pass_module_is_registered() -> None:
    import importlib

    from optimizer_cli.passes import PASS_REGISTRY, OptimizationPass

    registered = set(PASS_REGISTRY.values())
    for path in sorted((PACKAGE / "passes").glob("*.py")):
        if path.stem.startswith("_") or path.stem == "base":
            continue
        module = importlib.import_module(f"optimizer_cli.passes.{path.stem}")
        defined = [
            cls
            for _, cls in inspect.getmembers(module, inspect.isclass)
            if issubclass(cls, OptimizationPass) and cls is not OptimizationPass and cls.__module__ == module.__name__
        ]
        assert defined, f"passes/{path.name} defines no pass (helpers go in a module starting with _)"
        for cls in defined:
            assert cls in registered, f"{cls.__name__} (passes/{path.name}) is not in optimizer_cli.passes.PASSES"
            assert PASS_REGISTRY[cls.name] is cls


def _long_functions() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_is_longer_than_80_lines() -> None:
    long = _long_functions()
    assert not long, "split into named steps:\n" + "\n".join(long)


@pytest.mark.parametrize("layer", range(len(LAYERS)))
def test_every_layer_has_modules(layer: int) -> None:
    """A layer name that matches nothing (a typo, a moved package) would silently exempt its modules."""
    modules = {m for m in _imports()}
    assert any(_layer(m) == layer for m in modules), LAYERS[layer]


# The CLI only parses, calls a workflow and hands its report to report/ (issue 23): past this, logic is creeping in.
MAX_CLI_LINES = 700


def _cli_modules() -> list[Path]:
    """The command line's modules: cli.py (or a cli/ package, should it be split) and the `python -m` entry."""
    package = PACKAGE / "cli"
    return [
        *(p for p in (PACKAGE / "cli.py", PACKAGE / "__main__.py") if p.exists()),
        *(sorted(package.rglob("*.py")) if package.is_dir() else []),
    ]


def test_the_cli_is_at_most_700_lines() -> None:
    """Parsing, calling and rendering glue fit in 700 lines; a command's work belongs in workflows/ (or lower) and
    its rendering in report/."""
    modules = _cli_modules()
    assert PACKAGE / "cli.py" in modules or PACKAGE / "cli" / "__init__.py" in modules
    counts = {str(p.relative_to(PACKAGE.parent)): len(p.read_text().splitlines()) for p in modules}
    assert sum(counts.values()) <= MAX_CLI_LINES, f"{sum(counts.values())} lines: {counts}"
