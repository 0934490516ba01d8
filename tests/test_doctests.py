"""The examples in the packages' docstrings run: `make test` collects them, and the package example works."""

from __future__ import annotations

import doctest

import dept
from tests.conftest import REPO_ROOT


def test_make_test_collects_the_doctests_of_every_package():
    lines = (REPO_ROOT / "Makefile").read_text().splitlines()
    test_line = lines[lines.index("test: install") + 1].split()
    assert "--doctest-modules" in test_line
    assert {"tests", "dept", "dept_nlp", "dept_vl"} <= set(test_line)


def test_the_package_example_runs_and_counts_the_dept_budget():
    result = doctest.testmod(dept, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 6 and result.failed == 0
