"""The one error type that the command lines show as a message, not as a traceback.

Every error a user can fix (bad data, bad flags, an adapter that is damaged or made for another base, a task
that does not fit, an output directory that cannot be used) derives from `UserError`, next to the built-in type
it already was (`ConfigError` is a `UserError` and a `ValueError`). Its message says what is wrong, where, and
the fix. `dept.command_line.run_console` prints it as one line and exits with status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class UserError(Exception):
    """An expected error that the user fixes; the message names the problem, the place and the fix."""


class FlagError(UserError, ValueError):
    """A flag value, or a combination of flags, that cannot run; raised while parsing, before any work."""


class TaskMismatchError(UserError, ValueError):
    """A task whose labels (or kind of answer) differ from those the adapter was trained to produce."""


class RemoteCodeError(UserError, ValueError):
    """A model that comes with its own code (`auto_map` in its config), loaded without `trust_remote_code`:
    transformers refused it, and none of that code ran."""


@contextlib.contextmanager
def refusing_remote_code(model_name_or_path: str, how_to_allow: str) -> Iterator[None]:
    """Turn transformers' refusal of a model's own code (a ValueError that asks for `trust_remote_code=True`) into
    a `RemoteCodeError` that says the code never ran, and `how_to_allow` it."""
    try:
        yield
    except ValueError as err:
        if isinstance(err, UserError) or "trust_remote_code" not in str(err):
            raise
        raise RemoteCodeError(f"{model_name_or_path} comes with its own model code (auto_map in its config.json), "
                              f"which was not run: {how_to_allow}") from err
