"""Helpers of the console-script tests: run the installed scripts (`dept-train`, `dept-train-vl`, `dept-eval`,
next to sys.executable) as subprocesses with this checkout first on PYTHONPATH, and the tiny text setup."""

from __future__ import annotations

import hashlib
import json
import os
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


def script(name: str) -> str:
    path = SCRIPTS / name
    assert path.is_file(), f"{name} is not installed next to {sys.executable}"
    return str(path)


def run(name: str, *argv, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([script(name), *map(str, argv)], env={**ENV, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO_ROOT)


def assert_clear_error(finished: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit code 2, no traceback, at most two lines on stderr after the logs, naming every `expected` text."""
    assert finished.returncode == 2, finished.stderr[-3000:]
    assert "Traceback" not in finished.stderr, finished.stderr[-3000:]
    lines = [line for line in finished.stderr.splitlines() if ": error: " in line or "--debug" in line]
    assert len(lines) == 2 and lines[0].split(":")[0] in ("dept-train", "dept-train-vl", "dept-eval"), lines
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def printed_results(stdout: str) -> dict:
    """The results JSON a training CLI prints (after any library warnings on stdout), which must be printed once."""
    lines = stdout.splitlines()
    assert lines.count("{") == 1, stdout[-3000:]
    return json.loads("\n".join(lines[lines.index("{"):]))


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


