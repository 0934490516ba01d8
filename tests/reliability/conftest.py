"""Helpers of the console-script tests. `run` runs an installed script (`dept-train`, `dept-train-vl`,
`dept-train-vision`, `dept-eval`, `dept-serve`, `dept-tune`, next to sys.executable) as a subprocess with this checkout
first on PYTHONPATH; `run_in_process` calls the same entry point in this process, for the checks a fresh
interpreter adds nothing to (errors found before any work, result files, --help: the exit status, stdout and the
one-line error come from `dept.command_line.run_console` either way, and our log lines reach its stderr). What
only a fresh process shows (stdout kept clean of what imports print, other libraries' log lines, Python's own
traceback, signals, launches) stays with `run`: every CLI keeps real subprocess tests, of success and of an error.
Also: what the scripts print, parsed, and the tiny text setup.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from unittest import mock

import pytest

from dept_nlp.tasks import get_task
from tests.conftest import REPO_ROOT, hub_row, save_tiny_model, write_task_fixture

SCRIPTS = Path(sys.executable).parent
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
TABLE_HEADER = "| adapter | task | metrics | examples | examples/s | trainable params |"
CLIS = ("dept-train", "dept-train-vl", "dept-train-vision", "dept-eval", "dept-serve", "dept-tune")
ESCAPE = "\x1b"


def script(name: str) -> str:
    path = SCRIPTS / name
    assert path.is_file(), f"{name} is not installed next to {sys.executable}"
    return str(path)


def run(name: str, *argv, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([script(name), *map(str, argv)], env={**ENV, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO_ROOT)


def assert_clear_error(finished: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit code 2, no traceback, nothing on stdout, and one line on stderr after the logs, `PROG: error: ...`
    with the --debug hint folded in, naming every `expected` text."""
    assert finished.returncode == 2, finished.stderr[-3000:]
    assert "Traceback" not in finished.stderr, finished.stderr[-3000:]
    assert finished.stdout == "", finished.stdout[-3000:]
    lines = [line for line in finished.stderr.splitlines() if ": error: " in line or "--debug" in line]
    assert len(lines) == 1 and lines[0].split(":")[0] in CLIS, lines
    assert lines[0].endswith("--debug shows the traceback)") and lines[0] == finished.stderr.splitlines()[-1]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def launch_two_processes(port: int) -> list[str]:
    """accelerate's launcher for two CPU processes (its --cpu starts one; on CPU the trainer joins gloo itself)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
            "--dynamo_backend", "no"]


LOG_LINE = re.compile(r"\[?\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\]? \[?(?P<level>[A-Z]+)\]? (?P<name>\S+?):? ")


def log_lines(stderr: str, level: str) -> list[tuple[str, str]]:
    """(logger name, line) of each log line at `level` in our format, or in DeepSpeed's (`[date] [LEVEL] [file]`)."""
    found = []
    for line in stderr.splitlines():
        match = LOG_LINE.search(line)  # after a progress bar's last update, on the same line
        if match and match["level"] == level:
            found.append((match["name"], line))
    return found


def foreign_info_lines(stderr: str) -> list[str]:
    """The INFO log lines of other libraries than ours (which log at warning unless --log_level is higher)."""
    return [line for name, line in log_lines(stderr, "INFO") if not name.startswith("dept")]


def printed_results(stdout: str) -> dict:
    """The results a CLI prints: stdout is one JSON document and nothing else (printed once)."""
    return json.loads(stdout)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_text_setup(root: Path) -> dict:
    """A tiny T5 and sst2/rte files of different sizes (so each task's own file shows in the counts)."""
    files = {"sst2": write_task_fixture("sst2", root / "data", n_train=8, n_val=4, n_test=4),
             "rte": write_task_fixture("rte", root / "data", n_train=8, n_val=6, n_test=4)}
    texts = []
    for task_name in files:
        for i in range(12):
            row = hub_row(task_name, i)
            texts += [str(v) for v in row.values()] + [get_task(task_name).format_example(row)[0]]
    return {"root": root, "files": files, "model": save_tiny_model("seq2seq", root / "t5", texts)}


def train_flags(text, output_dir, *extra) -> list[str]:
    files = text["files"]["sst2"]
    return ["--model_name_or_path", text["model"], "--task_name", "sst2", "--output_dir", output_dir,
            "--train_file", files["train_file"], "--validation_file", files["validation_file"],
            "--test_file", files["test_file"], "--do_train", "--do_eval", "--do_predict",
            "--prefix_length", "4", "--r", "2", "--max_seq_length", "32", "--max_steps", "4", "--eval_steps", "2",
            "--save_steps", "2", "--per_device_train_batch_size", "4", "--generation_max_length", "3",
            "--report_to", "none", "--seed", "7", *extra]


def run_in_process(name: str, *argv) -> subprocess.CompletedProcess:
    """`run`'s twin in this process: `sys.argv` set as the console script sees it, its installed entry point called
    as the script calls it (`sys.exit(main())`), and (exit status, stdout, stderr) captured at file descriptors 1
    and 2. Log records go to that stderr through the handler `run_console` installs on a root logger that has none
    (pytest's own handlers are set aside meanwhile, and restored)."""
    (entry,) = entry_points(group="console_scripts", name=name)
    main = entry.load()
    root = logging.getLogger()
    kept = root.handlers[:]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        with _captured(1, "stdout", out), _captured(2, "stderr", err), \
                mock.patch.object(sys, "argv", [script(name), *map(str, argv)]):
            root.handlers.clear()
            try:
                status = main()
            except SystemExit as exit_:  # argparse's --help
                status = exit_.code
            finally:
                root.handlers[:] = kept
        out.seek(0), err.seek(0)
        stdout, stderr = (file.read().decode("utf-8", errors="replace") for file in (out, err))
    return subprocess.CompletedProcess([name, *map(str, argv)], status or 0, stdout, stderr)


@contextlib.contextmanager
def _captured(fd: int, name: str, file) -> Iterator[None]:
    """File descriptor `fd` and `sys.<name>` both write to `file` meanwhile, in the order written."""
    getattr(sys, name).flush()
    saved_fd, saved_stream = os.dup(fd), getattr(sys, name)
    os.dup2(file.fileno(), fd)
    setattr(sys, name, io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8", write_through=True))
    try:
        yield
    finally:
        getattr(sys, name).flush()
        setattr(sys, name, saved_stream)
        os.dup2(saved_fd, fd)
        os.close(saved_fd)


@pytest.fixture(scope="session")
def text(tmp_path_factory) -> dict:
    """`make_text_setup`, once per session."""
    return make_text_setup(tmp_path_factory.mktemp("console"))
