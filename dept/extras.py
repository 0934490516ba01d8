"""Optional dependencies (pyproject's extras), and slow ones, imported where they are used, so that `import dept`
and every command line's `--help` stay fast and a user who only trains installs none of the extras.

    optuna = require("optuna", extra="tune")      # the module, or one line:
    # MissingExtraError: optuna is not installed (No module named 'optuna'): pip install 'dept[tune]'

A module that uses a package throughout binds it once, at the top, as a `LazyModule`: the package is imported on
the first attribute access (with the same error for an extra). The command lines show that error as one line with
exit status 2 (it is a `UserError`).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from dept.errors import UserError


class MissingExtraError(UserError, ImportError):
    """An optional package that is not installed; the message names the `pip install 'dept[extra]'` that fixes it."""


def require(module: str, extra: str | None = None) -> ModuleType:
    """`import module`; a package of an extra that is not installed raises a `MissingExtraError` naming
    `pip install 'dept[extra]'` (`extra=None`: a required package, whose ImportError stays as it is)."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if extra is None or isinstance(error, MissingExtraError):
            raise
        package = module.partition(".")[0]
        raise MissingExtraError(f"{package} is not installed ({error}): pip install 'dept[{extra}]'") from error


class LazyModule:
    """A module bound at the top of a file, `optuna = LazyModule("optuna", extra="tune")`, and imported (`require`)
    on first use: `optuna.create_study(...)`."""

    def __init__(self, module: str, extra: str | None = None):
        self._module, self._extra = module, extra

    def __getattr__(self, name: str):
        return getattr(require(self._module, self._extra), name)

    def __repr__(self) -> str:
        return f"<module {self._module!r}, imported on first use>"
