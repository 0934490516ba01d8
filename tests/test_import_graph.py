"""The import graph of our packages has no cycle, counting the imports inside functions too (a cycle hidden behind
a function-level import is still a cycle), and no module imports one of ours inside a function: every dependency
shows at the top of the module that has it. A module of ours bound at the top to be imported on first use,
`LazyModule("dept_vl.model")` (`dept.extras`), is an import like any other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dept", "dept_nlp", "dept_vl", "dept_eval", "dept_serve", "dept_tune")


def module_name(path: Path, root: Path = REPO_ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_modules(root: Path = REPO_ROOT, packages=PACKAGES) -> dict[str, Path]:
    return {module_name(path, root): path for package in packages for path in sorted((root / package).rglob("*.py"))}


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _is_lazy_module(node: ast.AST) -> bool:
    """`LazyModule("name", ...)`: an import on first use."""
    if not isinstance(node, ast.Call) or not node.args:
        return False
    name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
    return name == "LazyModule" and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)


def imports(tree: ast.Module):
    """(import node, whether it runs inside a function) for every import that runs, `LazyModule(...)` calls
    included: `if TYPE_CHECKING:` blocks never do."""
    def visit(node: ast.AST, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if _is_type_checking_block(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)) or _is_lazy_module(child):
                yield child, in_function
            yield from visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                     ast.Lambda)))
    yield from visit(tree, False)


def imported_modules(node: ast.Import | ast.ImportFrom | ast.Call, importer: str, is_package: bool, modules
                     ) -> set[str]:
    """Which of `modules` an import statement (or a `LazyModule` call) in module `importer` loads (not counting
    the parent packages that Python imports on the way: a package importing its own modules is no cycle)."""
    if isinstance(node, ast.Call):
        names = [node.args[0].value]
    elif isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = importer.split(".") if is_package else importer.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    found = set()
    for name in names:
        while name and name not in modules:  # `import dept.config.x` of a name inside a module: its module
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    return found


def import_graph(root: Path = REPO_ROOT, packages=PACKAGES):
    """(module -> the modules of ours it imports, [(module, line, imported) for each function-level import])."""
    modules = our_modules(root, packages)
    graph, function_level = {}, []
    for name, path in modules.items():
        graph[name] = set()
        for node, in_function in imports(ast.parse(path.read_text(), str(path))):
            targets = imported_modules(node, name, path.name == "__init__.py", modules) - {name}
            graph[name] |= targets
            if in_function and targets:
                function_level.append((name, node.lineno, sorted(targets)))
    return graph, function_level


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_our_modules_import_each_other_without_a_cycle():
    graph, _ = import_graph()
    assert len(graph) > 60 and graph["dept_vl.pipeline"] >= {"dept_vl.evaluate", "dept_vl.arguments"}
    assert "dept_vl.model" in graph["dept_vl.modeling"]  # bound with LazyModule: imported on first use
    assert cycles(graph) == []


def test_no_module_imports_one_of_ours_inside_a_function():
    assert import_graph()[1] == []


def test_the_graph_sees_function_level_relative_and_package_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .a import A\n")
    (package / "a.py").write_text("A = 1\n\ndef f():\n    from pkg.sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("from .. import a\nimport pkg.sub.c\n"
                                            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg\n")
    (package / "sub" / "c.py").write_text("import os\nfrom pkg.a import A\n")
    graph, function_level = import_graph(tmp_path, ("pkg",))
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.sub.b"}, "pkg.sub": set(), "pkg.sub.b": {"pkg.a", "pkg.sub.c"},
                     "pkg.sub.c": {"pkg.a"}}
    assert function_level == [("pkg.a", 4, ["pkg.sub.b"])]
    assert cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.sub.c"]]


@pytest.mark.parametrize(("old", "new"), [("dept_vl.evaluate", "dept_vl.pipeline")])
def test_the_former_cycle_would_be_found(old, new):
    graph, _ = import_graph()
    graph[old] = graph[old] | {new}  # what the four function-level imports of dept_vl/evaluate.py were
    assert [old, new] in [[m for m in cycle if m in (old, new)] for cycle in cycles(graph)]
