"""The shared runner of the console scripts (`dept-train`, `dept-train-vl`, `dept-eval`).

    def main(argv=None) -> int:
        return run_console("dept-train", train, argv)

Exit status 0 on success. An expected error (`dept.errors.UserError`, or a path that does not exist or already
exists) is printed to stderr as `PROG: error: MESSAGE` with exit status 2 and no traceback; `--debug` anywhere on
the command line shows the traceback instead. Anything else is a bug and keeps Python's traceback (status 1).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from .errors import UserError

EXPECTED_ERRORS = (UserError, FileNotFoundError, FileExistsError)
DEBUG_FLAG = "--debug"
USAGE_ERROR_STATUS = 2  # argparse's status for a bad command line


def run_console(prog: str, command: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> int:
    """Run `command(argv)` (argv without `--debug`) and return the exit status for `sys.exit`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [word for word in argv if word != DEBUG_FLAG]
    try:
        command(argv)
    except EXPECTED_ERRORS as err:
        if debug:
            raise
        message = " ".join(str(err).split("\n"))  # one line, whatever the message holds
        print(f"{prog}: error: {message}", file=sys.stderr)
        print(f"{prog}: (pass {DEBUG_FLAG} to see the traceback)", file=sys.stderr)
        return USAGE_ERROR_STATUS
    return 0
