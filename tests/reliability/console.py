"""Helpers of the console-script tests: run the installed scripts (`dept-train`, `dept-train-vl`,
`dept-train-vision`, `dept-eval`, `dept-serve`, `dept-tune`, next to sys.executable) as subprocesses with this
checkout first on PYTHONPATH, check what they print, and the tiny text setup."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from dept_nlp.tasks import get_task
from tests.conftest import save_tiny_model
from tests.nlp.fixtures import hub_row, write_task_fixture

REPO_ROOT = Path(__file__).resolve().parents[2]
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


