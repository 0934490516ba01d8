"""The one error type that the command lines show as a message, not as a traceback.

Every error a user can fix (bad data, bad flags, an adapter that is damaged or made for another base, a task
that does not fit, an output directory that cannot be used) derives from `UserError`, next to the built-in type
it already was (`ConfigError` is a `UserError` and a `ValueError`). Its message says what is wrong, where, and
the fix. `dept.command_line.run_console` prints it as one line and exits with status 2; `--debug` shows the traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An expected error that the user fixes; the message names the problem, the place and the fix."""


class FlagError(UserError, ValueError):
    """A flag value, or a combination of flags, that cannot run; raised while parsing, before any work."""


class TaskMismatchError(UserError, ValueError):
    """A task whose labels (or kind of answer) differ from those the adapter was trained to produce."""
