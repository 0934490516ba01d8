"""What the distribution ships beside the code: the MIT license pyproject names, and a PEP 561 `py.typed` marker in
every installed package, listed in the package data so that setuptools puts it into the wheel."""

from __future__ import annotations

from pathlib import Path

from setuptools import find_packages

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def installed_top_level_packages() -> list[str]:
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted({name.split(".")[0] for name in find_packages(str(ROOT), include=include)})


def test_the_license_file_is_the_mit_license_pyproject_names():
    assert PYPROJECT["project"]["license"] == {"text": "MIT"}
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n") and "Copyright (c)" in text and "the dept authors" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in text


def test_every_installed_package_ships_a_py_typed_marker():
    packages = installed_top_level_packages()
    assert {"dept", "dept_nlp", "dept_vl", "dept_eval", "dept_serve", "dept_tune"} <= set(packages)
    package_data = PYPROJECT["tool"]["setuptools"]["package-data"]
    for package in packages:
        assert (ROOT / package / "py.typed").is_file(), package
        assert "py.typed" in package_data.get(package, []), f"{package}'s package-data lacks py.typed"
