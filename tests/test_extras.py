"""Optional packages (pyproject's extras) are imported where they are used (`dept.extras`). A missing one is a
one-line `MissingExtraError`, a `UserError` and an `ImportError`, that names the `pip install 'dept[extra]'` which
installs it; a command line shows it as one line with exit status 2. A missing package is simulated as Python
blocks an import: `sys.modules[name] = None` (for a package and its submodules already imported)."""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata

import pytest

from dept.errors import UserError
from dept.extras import LazyModule, MissingExtraError, require

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from tests.conftest import REPO_ROOT

EXTRAS = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def block(monkeypatch, package: str) -> None:
    """Make `import package` (and of its submodules) fail as if it were not installed."""
    for name in [name for name in sys.modules if name == package or name.startswith(package + ".")] + [package]:
        monkeypatch.setitem(sys.modules, name, None)


def one_line_naming(extra: str, package: str) -> str:
    return rf"^{package} is not installed \([^\n]*\): pip install 'dept\[{extra}\]'$"


def test_require_names_the_pip_install_of_the_extra_in_one_line(monkeypatch):
    block(monkeypatch, "optuna")
    with pytest.raises(MissingExtraError, match=one_line_naming("tune", "optuna")) as error:
        require("optuna", extra="tune")
    assert isinstance(error.value, UserError) and isinstance(error.value, ImportError)
    assert "optuna" in EXTRAS["tune"][0]


def test_a_submodule_of_a_missing_package_names_the_package(monkeypatch):
    block(monkeypatch, "matplotlib")
    with pytest.raises(MissingExtraError, match=one_line_naming("tune", "matplotlib")):
        require("matplotlib.pyplot", extra="tune")


def test_a_missing_required_package_keeps_its_own_import_error(monkeypatch):
    block(monkeypatch, "datasets")
    with pytest.raises(ModuleNotFoundError) as error:
        require("datasets")
    assert not isinstance(error.value, MissingExtraError)


def test_a_lazy_module_is_imported_on_first_attribute_access(tmp_path, monkeypatch):
    (tmp_path / "dept_extras_probe.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "dept_extras_probe", raising=False)
    probe = LazyModule("dept_extras_probe", extra="tune")
    assert "dept_extras_probe" not in sys.modules
    assert probe.VALUE == 42
    assert sys.modules["dept_extras_probe"].VALUE == 42
    monkeypatch.delitem(sys.modules, "dept_extras_probe")


def test_a_lazy_module_of_a_missing_extra_raises_on_first_use_not_when_bound(monkeypatch):
    block(monkeypatch, "optuna")
    optuna = LazyModule("optuna", extra="tune")
    with pytest.raises(MissingExtraError, match=one_line_naming("tune", "optuna")):
        optuna.create_study()


def test_the_lora_baseline_without_peft_names_the_peers_extra(monkeypatch, t5_model):
    from dept.methods import prepare_model

    block(monkeypatch, "peft")
    with pytest.raises(MissingExtraError, match=one_line_naming("peers", "peft")):
        prepare_model(t5_model, "LORA")


def test_dept_sft_trainer_without_trl_names_the_peers_extra(monkeypatch):
    import dept

    block(monkeypatch, "trl")
    monkeypatch.delitem(sys.modules, "dept.trl_trainer", raising=False)
    with pytest.raises(MissingExtraError, match=one_line_naming("peers", "trl")):
        dept.DePTSFTTrainer  # noqa: B018 (the lazy attribute imports dept.trl_trainer)


def test_an_h5_feature_file_without_h5py_names_the_vl_extra(monkeypatch, tmp_path):
    from dept_vl.features import FeatureStore

    path = tmp_path / "features.h5"
    path.write_bytes(b"")
    store = FeatureStore(path)  # opening is lazy: the store is made without h5py
    block(monkeypatch, "h5py")
    with pytest.raises(MissingExtraError, match=one_line_naming("vl", "h5py")):
        store.image_ids()


def test_dept_tune_without_optuna_exits_2_with_one_line(monkeypatch, capsys, tmp_path):
    from dept_tune.cli import main

    block(monkeypatch, "optuna")
    status = main(["--config", str(tmp_path / "recipe.yaml"), "--output_dir", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("dept-tune: error: optuna is not installed")
    assert "pip install 'dept[tune]'" in captured.err


def test_the_tune_report_plots_without_matplotlib_name_the_tune_extra(monkeypatch, tmp_path):
    import optuna

    from dept_tune.report import draw_plots

    study = optuna.create_study()
    block(monkeypatch, "matplotlib")
    with pytest.raises(MissingExtraError, match=one_line_naming("tune", "matplotlib")):
        draw_plots(study, tmp_path)


def distribution_names(requirements) -> set[str]:
    return {re.split(r"[\s;<>=!~\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")
            for requirement in requirements or () if "extra ==" not in requirement}


def installed_by(extra: str) -> set[str]:
    """The distributions an extra installs: those it lists and their own requirements."""
    listed = distribution_names(EXTRAS[extra])
    return listed.union(*(distribution_names(metadata.requires(name)) for name in listed))


@pytest.mark.parametrize("package", ["dept", "dept_nlp", "dept_vl", "dept_eval", "dept_serve", "dept_tune"])
def test_every_extra_the_code_names_installs_the_package(package):
    """Each `require(...)` and `LazyModule(...)` with an extra names an extra of pyproject.toml that installs the
    package (by its distribution's name: sklearn is scikit-learn)."""
    distributions = metadata.packages_distributions()
    checked = 0
    for path in sorted((REPO_ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("require", "LazyModule")):
                continue
            extra = next((keyword.value.value for keyword in node.keywords if keyword.arg == "extra"), None)
            if extra is None:
                continue
            top = node.args[0].value.partition(".")[0]
            names = {name.lower().replace("_", "-") for name in distributions.get(top, [top])}
            assert names & installed_by(extra), f"{path.name}:{node.lineno}: extra {extra!r} does not install {top}"
            checked += 1
    assert checked or package in ("dept_nlp", "dept_eval")
