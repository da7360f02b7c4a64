"""The import structure the architecture promises (DESIGN.md): no import cycle inside xaicli/, the
graph package independent of the Model, and plugins that never import one another."""
from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"xaicli": ROOT / "xaicli", "xaicli_plugins": ROOT / "plugins"}


@dataclass(frozen=True)
class Import:
    target: str  # a module of PACKAGES
    lazy: bool  # inside a function (runs when called, not when the module is imported)
    line: int


def modules() -> dict[str, Path]:
    """Every module of PACKAGES by dotted name (packages by their own name)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = modules()


def imports(name: str) -> list[Import]:
    """The imports of module `name` that name modules of PACKAGES (`from pkg import sub` names
    the submodule when there is one, else the package)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    lazy_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f)}
    guarded = {id(n) for g in ast.walk(tree) if isinstance(g, ast.If) and "TYPE_CHECKING" in ast.unparse(g.test)
               for n in ast.walk(g)}  # annotations only: never run
    found = []
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import xaicli.graph.convert as c` -> that module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.append(Import(target, id(node) in lazy_nodes, node.lineno))
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def graph(lazy: bool) -> dict[str, set[str]]:
    """Module -> modules it imports: at import time only, or also inside functions (`lazy`)."""
    return {name: {i.target for i in imports(name) if lazy or not i.lazy} for name in MODULES}


def plugin_modules() -> set[str]:
    """The modules registered as built-in plugins (entry points of the group "xaicli")."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return {v for v in project["project"]["entry-points"]["xaicli"].values() if v.startswith("xaicli_plugins.")}


def test_the_walker_sees_the_imports_it_must():
    """Guards the walker itself: relative, absolute, submodule and function-level imports."""
    by_target = {i.target: i for i in imports("xaicli.model")}
    assert by_target["xaicli.errors"].lazy is False
    assert by_target["xaicli.graph"].lazy is True  # Model.graph() builds the graph on first use
    assert "xaicli.model" in {i.target for i in imports("xaicli_plugins.loaders.onnx")}
    assert "xaicli_plugins.loaders.modelfile" in {i.target for i in imports("xaicli_plugins.loaders.timm")}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_xaicli():
    xaicli = {k: {t for t in v if t.startswith("xaicli.") or t == "xaicli"} for k, v in graph(lazy=False).items()
              if k.startswith("xaicli")}
    assert cycles(xaicli) == []


def test_graph_package_does_not_import_the_model():
    """The model -> graph direction only: xaicli.graph receives a graph source and a forward
    function, so Model.graph() may import it lazily without a cycle, at any depth."""
    everything = graph(lazy=True)
    reach, todo = set(), [m for m in MODULES if m == "xaicli.graph" or m.startswith("xaicli.graph.")]
    while todo:
        module = todo.pop()
        if module not in reach:
            reach.add(module)
            todo.extend(everything[module])
    assert "xaicli.model" not in reach
    assert not [c for c in cycles(everything) if "xaicli.model" in c]


def test_no_plugin_imports_another_plugin():
    """A plugin module may use helper modules of its own family folder (loaders/modelfile.py),
    never another plugin, directly or through a helper, and no helper of another family."""
    plugins = plugin_modules()
    assert plugins and plugins <= set(MODULES)
    everything = graph(lazy=True)
    problems = []
    for plugin in sorted(plugins):
        family = plugin.rpartition(".")[0]
        reach, todo = set(), list(everything[plugin])
        while todo:
            module = todo.pop()
            if module.startswith("xaicli_plugins") and module not in reach:
                reach.add(module)
                todo.extend(everything[module])
        problems += [f"{plugin} -> {m}" for m in sorted(reach)
                     if m in plugins or m.rpartition(".")[0] != family and m != family]
    assert problems == []
