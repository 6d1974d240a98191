"""The import structure: each part of the library imports only from the parts below it, and no module
imports itself back through others (no cycles). Read from the source with ast, lazy imports included."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "asarm"

# Lowest first; a module may import from its own layer's other parts and from the layers below.
LAYERS = [
    {"asarm", "paths", "files", "seeds", "checks", "resources", "offline", "inputs", "orders", "masks"},
    {"tokenization", "templates", "backbones"},
    {"draft_head", "model", "hub"},
    {"sampling"},
    {"training"},
    {"eval"},
    {"cli"},
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The asarm modules that ``path`` imports (``from x import y`` counts y when y is a module)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "asarm"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] != "asarm":
                continue
            found.add(name)
            found |= {f"{name}.{alias.name}" for alias in node.names if _is_module(f"{name}.{alias.name}")}
    return found - {module}


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    return {_module_name(path): _imports(path) for path in PACKAGE.rglob("*.py")}


def _layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else "asarm"
    return next(i for i, names in enumerate(LAYERS) if part in names)


def test_every_part_has_a_layer():
    for module in _graph():
        _layer(module)  # StopIteration names a part missing from LAYERS


def test_no_import_runs_up_a_layer():
    upward = sorted(f"{module} imports {dep}" for module, deps in _graph().items() for dep in deps
                    if _layer(dep) > _layer(module))
    assert not upward, upward


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module, path):
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep in graph and state.get(dep) is None:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_checks_catch_an_upward_import_and_a_cycle(monkeypatch):
    """Negative control: a graph with sampling importing eval, and a two-module cycle, is rejected."""
    import pytest

    fake = {"asarm.sampling.assd": {"asarm.eval.record"}, "asarm.eval.record": {"asarm.sampling.assd"}}
    monkeypatch.setitem(globals(), "_graph", lambda: fake)
    with pytest.raises(AssertionError, match="asarm.sampling.assd imports asarm.eval.record"):
        test_no_import_runs_up_a_layer()
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycles()
