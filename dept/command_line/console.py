"""The console contract every CLI keeps (`dept-train`, `dept-train-vl`, `dept-train-vision`, `dept-eval`,
`dept-serve`, `dept-tune`). Each console script is

    def main(argv=None) -> int:
        return run_console("dept-train", train, argv)

- stdout holds the results only, printed once, by the main process: `command(argv)` returns them (a dict is
  printed as JSON, a str as it is, None prints nothing). Whatever else writes to stdout meanwhile (a library's
  print or logger, C code) goes to stderr.
- Logs go to stderr: this project's loggers at `--log_level` (default info), every other library's at warning.
- An expected error (`dept.errors.UserError`, or a path that does not exist or already exists) is one line on
  stderr, `PROG: error: MESSAGE (--debug shows the traceback)`, with exit status 2; `--debug` anywhere on the
  command line shows the traceback instead. Anything else is a bug and keeps Python's traceback (status 1).
- Ctrl-C stops with one line and exit status 130. Under a launcher, each rank stops when the launcher is gone
  (`launcher_watchdog`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence

import torch

from dept.errors import FlagError, UserError

from .flags import DEBUG_FLAG, parse_arguments, pop_console_flags
from .launcher_watchdog import STOPPED_STATUS, is_launched, launcher_is_gone, report_launcher_gone, watch_launcher

EXPECTED_ERRORS = (UserError, FileNotFoundError, FileExistsError)
USAGE_ERROR_STATUS = 2  # argparse's status for a bad command line
INTERRUPTED_STATUS = 130  # what a shell reports for a process ended by Ctrl-C
CORE_LOGGER = "dept"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DEFAULT_LOG_LEVEL = "info"
HELP_FLAGS = ("-h", "--help")


def run_console(prog: str, command: Callable[[list[str]], object], argv: Sequence[str] | None = None,
                own_loggers: Sequence[str] = ()) -> int:
    """Run `command(argv)` (argv without `--debug` and `--log_level`), print what it returns to stdout (main
    process only) and return the exit status for `sys.exit`.

    The loggers of `dept`, of the command's own package and of `own_loggers` (the packages a tool runs, e.g. the
    pipelines of a tuner) log at `--log_level`; every other library's at warning."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if is_launched():
        watch_launcher(prog)
    try:
        argv, debug, log_level = pop_console_flags(argv)
    except UserError as err:
        return report_error(prog, err)
    asks_for_help = any(word in HELP_FLAGS for word in argv)  # argparse prints the help to stdout and exits
    redirect = contextlib.nullcontext() if asks_for_help else stdout_to_stderr()
    loggers = (CORE_LOGGER, (getattr(command, "__module__", None) or "").partition(".")[0], *own_loggers)
    with console_logging(log_level or DEFAULT_LOG_LEVEL, loggers), redirect:
        try:
            output = command(argv)
        except EXPECTED_ERRORS as err:
            if debug:
                raise
            return report_error(prog, err)
        except KeyboardInterrupt:
            if debug:
                raise
            print(f"{prog}: stopped by Ctrl-C (SIGINT).", file=sys.stderr, flush=True)
            return INTERRUPTED_STATUS
        except Exception:
            if launcher_is_gone():  # e.g. the backend's error when another rank stopped first: not a bug here
                report_launcher_gone(prog)
                return STOPPED_STATUS
            raise
    if is_main_process():
        print_output(output)
    return 0


def report_error(prog: str, err: BaseException) -> int:
    """`PROG: error: MESSAGE (HINT)` on one line of stderr, whatever the message holds; the exit status."""
    message = " ".join(str(err).split())
    hint = f"--help lists the flags; {DEBUG_FLAG} shows the traceback" if isinstance(err, FlagError) else \
        f"{DEBUG_FLAG} shows the traceback"
    print(f"{prog}: error: {message} ({hint})", file=sys.stderr, flush=True)
    return USAGE_ERROR_STATUS


def print_output(output: object) -> None:
    if output is None:
        return
    print(output if isinstance(output, str) else json.dumps(output, indent=2, sort_keys=True, default=str), flush=True)


def is_main_process() -> bool:
    """Rank 0 of a launch (torchrun, accelerate launch and the DeepSpeed launcher set RANK), or a process alone."""
    return os.environ.get("RANK", "0") == "0"


def run_command_line(dataclass_types, run: Callable[..., dict], argv: list[str] | None = None) -> dict:
    """Parse the flags into the dataclasses, call `run(*parsed)` and return its results (every rank gets them)."""
    results = run(*parse_arguments(dataclass_types, argv))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()  # leave no process group behind for a clean exit
    return results


@contextlib.contextmanager
def console_logging(level: str = DEFAULT_LOG_LEVEL, own_loggers: Sequence[str] = (CORE_LOGGER,)) -> Iterator[None]:
    """The loggers `own_loggers` (and their children) at `level`, every other library's at warning (or `level` when
    it is higher), all to stderr; the levels are restored afterwards (for callers in the same process, as tests)."""
    own = logging.getLevelName(level.upper())
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in dict.fromkeys(own_loggers)]
    saved = [logger.level for logger in loggers]
    root = loggers[0]
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    root.setLevel(max(logging.WARNING, own))
    for logger in loggers[1:]:
        logger.setLevel(own)
    try:
        yield
    finally:
        for logger, level_before in zip(loggers, saved, strict=True):
            logger.setLevel(level_before)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send what is written to stdout meanwhile to stderr: through `sys.stdout`, or to file descriptor 1 (by C
    code, or by a handler that kept the stream it was given at import, as DeepSpeed's logger does)."""
    sys.stdout.flush()
    saved_stdout = sys.stdout
    try:
        saved_fd = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no file descriptors 1 and 2 (an embedded interpreter): redirect sys.stdout alone
        saved_fd = None
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stdout = saved_stdout
        if saved_fd is not None:
            os.dup2(saved_fd, 1)
            os.close(saved_fd)
