"""The shared runner of the console scripts (`dept-train`, `dept-train-vl`, `dept-eval`).

    def main(argv=None) -> int:
        return run_console("dept-train", train, argv)

Exit status 0 on success. An expected error (`dept.errors.UserError`, or a path that does not exist or already
exists) is printed to stderr as `PROG: error: MESSAGE` with exit status 2 and no traceback; `--debug` anywhere on
the command line shows the traceback instead. Anything else is a bug and keeps Python's traceback (status 1).

Under a launcher (`accelerate launch`, `torchrun`), each rank also stops when the launcher is gone: the launcher
forwards SIGTERM and Ctrl-C to the ranks itself, but it starts them in their own sessions, so a launcher killed
with SIGKILL (or by the OOM killer) would leave them running.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence

from .errors import UserError

EXPECTED_ERRORS = (UserError, FileNotFoundError, FileExistsError)
DEBUG_FLAG = "--debug"
USAGE_ERROR_STATUS = 2  # argparse's status for a bad command line


def run_console(prog: str, command: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> int:
    """Run `command(argv)` (argv without `--debug`) and return the exit status for `sys.exit`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a rank started by torch's elastic launcher (accelerate uses it)
        stop_when_the_launcher_dies()
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


def stop_when_the_launcher_dies(poll_seconds: float = 1.0) -> None:
    """Send this process SIGTERM once its parent (the launcher) has exited, from a daemon thread."""
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_seconds)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="stop-with-launcher", daemon=True).start()
