"""Every module of m2dist and kernels imports in a fresh interpreter, and the project's own modules
import each other without a cycle (top-level `import` / `from` statements, read from the source)."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import kernels
import m2dist

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("m2dist", "kernels")


def project_modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the project's packages."""
    modules = {}
    for package in (m2dist, kernels):
        modules[package.__name__] = Path(package.__file__)
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            spec = info.module_finder.find_spec(info.name)
            modules[info.name] = Path(spec.origin)
    return modules


def imported_names(node: ast.AST) -> list[str]:
    """The dotted names an absolute import statement imports (`a.b` for `from a import b`); [] for
    any other node."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [f"{node.module}.{alias.name}" for alias in node.names]
    return []


def top_level_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that `path` imports at module level (not under `if TYPE_CHECKING:`),
    with the packages that importing them runs first."""

    def owner(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    imported = set()
    for node in ast.parse(path.read_text()).body:
        for name in imported_names(node):
            if name.split(".")[0] in PACKAGES:
                module = owner(name)
                parts = module.split(".")
                imported.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return imported


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of `graph` as [a, b, ..., a], or [] when there is none (depth-first search)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str]:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return []
        path.append(node)
        for successor in sorted(graph.get(node, ())):
            cycle = visit(successor)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return []

    for node in sorted(graph):
        cycle = visit(node)
        if cycle:
            return cycle
    return []


def test_no_import_cycle_among_the_project_modules():
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        # A module's own packages run before it, not because of it.
        parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = top_level_imports(path, modules) - parents - {name}
    assert find_cycle(graph) == []


def test_config_imports_no_other_project_module_than_errors():
    modules = project_modules()
    assert top_level_imports(modules["m2dist.config"], modules) == {"m2dist", "m2dist.errors"}


def test_checkpoint_formats_sit_below_the_engine():
    """m2dist.checkpoint imports nothing of m2dist.engine, at module level or inside a function:
    the engine saves and loads through the checkpoint layout, never the other way round."""
    modules = project_modules()
    found = []
    for name, path in modules.items():
        if name != "m2dist.checkpoint" and not name.startswith("m2dist.checkpoint."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            found += [f"{name}: {module}" for module in imported_names(node) if module.split(".")[:2] == ["m2dist", "engine"]]
    assert found == []


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(project_modules())
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", script, *names], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
