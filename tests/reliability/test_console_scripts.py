"""What a new user meets at the console when things go right, or a run is killed: exit code 0 and stdout that is
the results alone, printed once (`json.loads(stdout)` for the five CLIs that print JSON, the table for dept-eval,
nothing for dept-serve), also under a two-process launch; logs on stderr with no INFO line of another library and
no terminal escape codes; a run SIGKILLed at its first checkpoint restarted with `auto`, byte-identical adapters
from two processes, one local file per task in dept-eval, its --help, and --prefix_length 0.

The tests run the installed console scripts as subprocesses (`run`, see conftest.py): stdout kept clean of
what imports print, and other libraries' log lines, show only in a fresh process. The three checks on files and
--help alone (--prefix_length 0, dept-eval --compare and --help) call the same entry point in this process
(`run_in_process`). The expected errors are in test_console_errors.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from safetensors.torch import load_file

from dept.checkpoint import complete_checkpoints
from dept_serve.client import wait_until_healthy
from tests.conftest import REPO_ROOT, VISION_MODEL_FLAGS, free_port, write_image_folder
from tests.reliability.conftest import (
    ENV,
    ESCAPE,
    TABLE_HEADER,
    foreign_info_lines,
    launch_two_processes,
    log_lines,
    printed_results,
    run,
    run_in_process,
    script,
    sha256,
    train_flags,
)

pytestmark = pytest.mark.slow
# The tests of the `reference` run (and of the run restarted after a kill) run on one worker (--dist loadgroup).
REFERENCE_RUN = pytest.mark.xdist_group("console_reference")


@pytest.fixture(scope="module")
def reference(text):
    """One finished dept-train run (PYTHONHASHSEED=1) and what it printed."""
    output_dir = text["root"] / "reference"
    finished = run("dept-train", *train_flags(text, output_dir), env={"PYTHONHASHSEED": "1"})
    return output_dir, finished


# --------------------------------------------------------------------------------------------- success


@REFERENCE_RUN
def test_dept_train_exits_0_and_prints_its_results_once_to_stdout(reference):
    output_dir, finished = reference
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = printed_results(finished.stdout)  # stdout is the JSON alone: DeepSpeed's warning went to stderr
    assert results["total_steps"] == 4 and "eval_accuracy" in results and "test_accuracy" in results
    assert "'train_loss'" not in finished.stderr  # the results dict is no longer echoed as an exit message
    assert (output_dir / "adapter_model.safetensors").is_file()


@REFERENCE_RUN
def test_only_our_loggers_log_at_info_and_stderr_holds_no_escape_codes(reference):
    stderr = reference[1].stderr  # a pipe, not a terminal: the nested evaluation bar stays off
    assert foreign_info_lines(stderr) == []  # accelerate's five lines per checkpoint are gone
    ours = [name for name, _ in log_lines(stderr, "INFO")]
    assert "dept.trainer" in ours and "dept_nlp.pipeline" in ours
    assert ESCAPE not in stderr


def test_log_level_warning_leaves_no_info_line_at_all(text, tmp_path):
    finished = run("dept-train", *train_flags(text, tmp_path / "run", "--do_predict", "false"), "--log_level",
                   "warning")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert log_lines(finished.stderr, "INFO") == [] and printed_results(finished.stdout)["total_steps"] == 4


@pytest.mark.multiprocess
def test_two_processes_print_the_results_once(text, tmp_path):
    argv = train_flags(text, tmp_path / "run", "--per_device_train_batch_size", "2", "--do_predict", "false")
    finished = subprocess.run([*launch_two_processes(free_port()), str(REPO_ROOT / "scripts" / "train_nlp.py"),
                               *map(str, argv)], env=ENV, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=400)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert printed_results(finished.stdout)["total_steps"] == 4  # rank 0 printed, rank 1 did not
    assert finished.stderr.count("Running sst2 with PROMPT_TUNING_LORA on 2 process(es).") == 2
    assert foreign_info_lines(finished.stderr) == []


def test_dept_train_vision_prints_its_results_once_as_json(tmp_path):
    images = write_image_folder(tmp_path / "images", {"train": 4, "validation": 2}, size=32)
    finished = run("dept-train-vision", *VISION_MODEL_FLAGS, "--data_dir", images, "--output_dir", tmp_path / "run",
                   "--do_train", "--do_eval", "--prefix_length", "2", "--r", "2", "--max_steps", "2",
                   "--per_device_train_batch_size", "4", "--eval_strategy", "no", "--save_strategy", "no",
                   "--load_best_model_at_end", "false", "--report_to", "none")
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = printed_results(finished.stdout)
    assert results["total_steps"] == 2 and "eval_accuracy" in results
    assert foreign_info_lines(finished.stderr) == [] and ESCAPE not in finished.stderr


def test_dept_tune_prints_its_report_once_as_json_and_one_line_per_trial_to_stderr(tiny_task, tmp_path):
    argv = [*tiny_task, "--output_dir", tmp_path / "study", "--n_trials", "1",
            "--max_steps", "2", "--eval_steps", "2", "--save_steps", "2", "--do_predict", "false"]
    finished = run("dept-tune", *argv)
    assert finished.returncode == 0, finished.stderr[-3000:]
    report = printed_results(finished.stdout)
    assert report["counts"] == {"COMPLETE": 1} and report["best"]["number"] == 0
    assert "[dept-tune] report:" in finished.stderr and foreign_info_lines(finished.stderr) == []


@REFERENCE_RUN
def test_dept_serve_keeps_stdout_empty_and_logs_to_stderr(text, reference):
    port = free_port()
    server = subprocess.Popen([script("dept-serve"), "--model_name_or_path", str(text["model"]), "--adapter",
                               f"sst2={reference[0]}", "--port", str(port), "--device", "cpu"], env=ENV,
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", timeout_s=120, process=server)
    finally:
        server.terminate()
        stdout, stderr = server.communicate(timeout=60)
    assert stdout == "", stdout[-3000:]  # a server has no results to print; uvicorn's access log goes to stderr
    assert f"Uvicorn running on http://127.0.0.1:{port}" in stderr and '"GET /healthz HTTP/1.1" 200' in stderr
    assert foreign_info_lines(stderr) == []


@REFERENCE_RUN
def test_dept_eval_takes_one_local_file_per_task_and_prints_its_table_once(text, reference, tmp_path):
    adapter = reference[0]
    files = text["files"]
    finished = run("dept-eval", "--model_name_or_path", text["model"], "--adapter", f"{adapter}:sst2",
                   "--adapter", f"{adapter}:rte", "--validation_file", f"sst2={files['sst2']['validation_file']}",
                   "--validation_file", f"rte={files['rte']['validation_file']}", "--generation_max_length", "3",
                   "--output_dir", tmp_path / "a")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count(TABLE_HEADER) == 1 and finished.stderr.count(TABLE_HEADER) == 0
    report = json.loads((tmp_path / "a" / "dept_eval_validation.json").read_text())
    assert [(r["task"], r["num_examples"]) for r in report["results"]] == [("sst2", 4), ("rte", 6)]

    compared = run_in_process("dept-eval", "--compare", tmp_path / "a", tmp_path / "a")
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert compared.stdout.count("| task | adapter (A) |") == 1 and "| task |" not in compared.stderr


@REFERENCE_RUN
def test_dept_eval_help_lists_the_data_flags_of_the_adapters_modality(reference):
    finished = run_in_process("dept-eval", "--adapter", reference[0], "--help")
    assert finished.returncode == 0, finished.stderr[-3000:]
    for flag in ("--validation_file", "--test_file", "--generation_max_length", "--task_type", "TASK=]PATH"):
        assert flag in finished.stdout, flag


def test_dept_train_vl_exits_0_and_prints_its_results_once(vl_fixture, tmp_path):
    argv = vl_fixture.argv("vqa", tmp_path / "run", "--max_steps", "2", "--do_predict", "false")
    finished = run("dept-train-vl", *argv)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert printed_results(finished.stdout)["total_steps"] == 2
    assert "'total_steps'" not in finished.stderr


def test_prefix_length_0_trains_the_embedding_update_alone(text, tmp_path):
    finished = run_in_process("dept-train", *train_flags(text, tmp_path / "run", "--prefix_length", "0",
                                                         "--lora_embedding_lr", "0.05"))
    assert finished.returncode == 0, finished.stderr[-3000:]
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert (config["num_virtual_tokens"], config["r"]) == (0, 2)
    tensors = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert tuple(tensors["prompt_embeddings"].shape) == (0, 32)
    assert tensors["lora_embedding_B"].abs().sum() > 0  # B starts at zero: A·B really trained


# --------------------------------------------------------------------------------------------- killed at the first checkpoint


@pytest.fixture(scope="module")
def restarted(text, tmp_path_factory):
    """A run SIGKILLed the moment its first checkpoint-*.tmp-* appears, then run again with `auto`."""
    output_dir = tmp_path_factory.mktemp("killed") / "run"
    argv = train_flags(text, output_dir, "--save_steps", "1", "--eval_steps", "1")
    child = subprocess.Popen([script("dept-train"), *map(str, argv)], env=ENV, cwd=REPO_ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while child.poll() is None and time.monotonic() < deadline:
            if output_dir.is_dir() and any(".tmp-" in entry.name for entry in os.scandir(output_dir)):
                break
            time.sleep(0.001)
    finally:
        child.kill()
        child.wait()
    left = sorted(path.name for path in output_dir.iterdir())
    assert any(".tmp-" in name for name in left) and not complete_checkpoints(output_dir), left
    finished = run("dept-train", *train_flags(text, output_dir, "--resume_from_checkpoint", "auto"),
                   env={"PYTHONHASHSEED": "2"})
    return output_dir, finished, left


@REFERENCE_RUN
def test_auto_after_a_kill_during_the_first_checkpoint_starts_afresh_and_cleans_up(restarted, reference):
    output_dir, finished, _ = restarted
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert not [path for path in output_dir.iterdir() if ".tmp-" in path.name]
    adapter, expected = (load_file(d / "adapter_model.safetensors") for d in (output_dir, reference[0]))
    assert adapter.keys() == expected.keys()
    for name, tensor in expected.items():
        assert (adapter[name] == tensor).all(), name  # the same run as one never interrupted


@REFERENCE_RUN
def test_identical_adapters_from_two_processes_have_the_same_bytes(restarted, reference):
    # Two processes (PYTHONHASHSEED 1 and 2) that trained the same adapter write the same file.
    assert sha256(restarted[0] / "adapter_model.safetensors") == sha256(reference[0] / "adapter_model.safetensors")


