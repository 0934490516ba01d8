"""A rank started by a launcher (`accelerate launch`, `torchrun`) stops when its launcher is gone.

The launcher forwards SIGTERM and Ctrl-C to the ranks itself, but it starts them in their own sessions, so a
launcher killed with SIGKILL (or by the OOM killer) would leave them running, or blocked in a collective with a
rank that has stopped.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

LAUNCHED = "TORCHELASTIC_RUN_ID"  # set in every rank started by torch's elastic launcher (accelerate uses it)
POLL_SECONDS = 0.2
STOPPED_STATUS = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM

_launcher: int | None = None


def is_launched() -> bool:
    return LAUNCHED in os.environ


def launcher_is_gone() -> bool:
    """Whether this process was started by a launcher that has exited since `watch_launcher` was called."""
    return _launcher is not None and os.getppid() != _launcher


def watch_launcher(prog: str, poll_seconds: float = POLL_SECONDS) -> None:
    """From a daemon thread, stop this process with one line on stderr once its parent (the launcher) has exited.

    It ends the process at once (`os._exit`), as SIGTERM's default action would: a rank blocked in a collective
    with a rank that has already stopped would otherwise wait there or die with the backend's traceback. Nothing
    is lost: checkpoints are written atomically, and `--resume_from_checkpoint auto` continues from the last one.
    """
    global _launcher
    _launcher = os.getppid()

    def watch() -> None:
        while not launcher_is_gone():
            time.sleep(poll_seconds)
        report_launcher_gone(prog)
        os._exit(STOPPED_STATUS)

    threading.Thread(target=watch, name="stop-with-launcher", daemon=True).start()


def report_launcher_gone(prog: str) -> None:
    """One line on stderr, written to the file descriptor: it must not wait for a lock another thread holds."""
    rank = os.environ.get("RANK", "?")
    line = (f"\n{prog}: error: rank {rank} stopped: its launcher (pid {_launcher}) is gone. Continue with "
            "--resume_from_checkpoint auto.\n")
    try:
        os.write(sys.__stderr__.fileno() if sys.__stderr__ else 2, line.encode())
    except (OSError, ValueError):  # stderr closed with the launcher's terminal: stop all the same
        pass
