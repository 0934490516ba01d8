"""`dept/` is the core: it imports none of the packages built on it, not even by a string name (import_module,
a plugin table, a lazy import in a function)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "dept"
OUTSIDE_THE_CORE = ("dept_nlp", "dept_vl", "dept_eval", "benchmarks", "dept_serve", "dept_tune")


def names_outside_the_core(source: str) -> list[tuple[int, str]]:
    """(line, name) of every import of, and every string naming, a package outside the core."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value]
        else:
            continue
        found += [(node.lineno, name) for name in names
                  if any(package in name for package in OUTSIDE_THE_CORE)]
    return found


@pytest.mark.parametrize("path", sorted(CORE.rglob("*.py")), ids=lambda path: str(path.relative_to(CORE)))
def test_the_core_neither_imports_nor_names_a_package_built_on_it(path):
    assert names_outside_the_core(path.read_text()) == []


def test_the_check_sees_imports_strings_and_lazy_imports():
    source = '''
import dept_nlp
from dept_vl.evaluate import VLEvaluator
PLUGINS = {"text": "dept_eval.cli"}

def load():
    import benchmarks.throughput
    return importlib.import_module("dept_serve")
'''
    assert sorted(line for line, _ in names_outside_the_core(source)) == [2, 3, 4, 7, 8]
    assert names_outside_the_core("import dept.config\nfrom dept.model import DePTModel\n") == []
