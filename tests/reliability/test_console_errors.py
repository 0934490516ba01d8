"""Expected errors at the console, in all six CLIs: one line on stderr, what is wrong, where and the fix (the
--debug hint folded in), exit code 2, nothing on stdout, and the traceback only with --debug; and the ranks of a
two-process run stopping at once, with one line each, when their launcher is SIGKILLed.

Each CLI has an error test that runs its installed console script as a subprocess (`run`, see conftest.py), and
--debug's traceback and the killed launcher need real processes too. The other errors, all found before any work,
call the same entry point in this process (`run_in_process`): the status and the line come from the same
`run_console`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from transformers import T5ForConditionalGeneration

from dept import DePTConfig, get_dept_model
from dept.checkpoint import complete_checkpoints
from tests.conftest import REPO_ROOT, VISION_MODEL_FLAGS, free_port, save_tiny_model
from tests.reliability.conftest import (
    ENV,
    assert_clear_error,
    launch_two_processes,
    run,
    run_in_process,
    train_flags,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapter(text, tmp_path_factory):
    """A saved DePT adapter (m=4, r=2) for the tiny T5, made in this process."""
    torch.manual_seed(0)
    model = get_dept_model(T5ForConditionalGeneration.from_pretrained(text["model"]),
                           DePTConfig(num_virtual_tokens=4, r=2, max_length=32, prompt_init="random"))
    directory = tmp_path_factory.mktemp("adapter") / "sst2"
    model.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------------------------- clear errors


def test_non_utf8_data_names_the_file_and_the_line(text, tmp_path):
    bad = tmp_path / "latin1.jsonl"
    lines = text["files"]["sst2"]["train_file"].read_bytes().splitlines(keepends=True)
    bad.write_bytes(b"".join(lines[:2]) + '{"sentence": "caf\u00e9", "label": 1}\n'.encode("latin-1"))
    finished = run_in_process("dept-train", *train_flags(text, tmp_path / "out", "--train_file", bad))
    assert_clear_error(finished, str(bad), "line 3 is not UTF-8", "iconv")


def test_a_directory_as_train_file_is_named_a_directory(text, tmp_path):
    finished = run_in_process("dept-train", *train_flags(text, tmp_path / "out", "--train_file", tmp_path))
    assert_clear_error(finished, f"{tmp_path} is a directory, not a data file")


def test_a_missing_model_directory_is_not_found_and_not_a_hub_id(text, tmp_path):
    finished = run("dept-train", *train_flags(text, tmp_path / "out", "--model_name_or_path", tmp_path / "nope"))
    assert_clear_error(finished, str(tmp_path / "nope"), "not found: no such directory, and not a hub id")


def test_an_unknown_task_name_is_one_line_in_dept_train_and_dept_eval(text, adapter, tmp_path):
    finished = run_in_process("dept-train", *train_flags(text, tmp_path / "out", "--task_name", "sst3"))
    assert_clear_error(finished, "Unknown task 'sst3'. Did you mean 'sst2'?")
    finished = run_in_process("dept-eval", "--model_name_or_path", text["model"], "--adapter", f"{adapter}:sst3",
                              "--validation_file", text["files"]["sst2"]["validation_file"])
    assert_clear_error(finished, "Unknown task 'sst3'. Did you mean 'sst2'?")


def test_a_model_with_its_own_code_is_refused_without_running_it(text, adapter, tmp_path):
    model = tmp_path / "custom"
    shutil.copytree(text["model"], model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="custom_t5", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (model / "config.json").write_text(json.dumps(config))
    ran = tmp_path / "the model's code ran"
    (model / "configuration_custom.py").write_text(f"open({str(ran)!r}, 'w').close()\n"
                                                   "from transformers import T5Config as CustomConfig\n")
    finished = run_in_process("dept-train", *train_flags(text, tmp_path / "out", "--model_name_or_path", model))
    assert_clear_error(finished, f"{model} comes with its own model code", "which was not run",
                       "pass --trust_remote_code")
    finished = run_in_process("dept-serve", "--model_name_or_path", model, "--adapter", f"sst2={adapter}")
    assert_clear_error(finished, f"{model} comes with its own model code", "dept-serve never run")
    assert not ran.exists()


def test_dept_serve_command_line_errors_are_one_line_printed_once(text, adapter, tmp_path):
    finished = run("dept-serve", "--model_name_or_path", tmp_path / "nope", "--adapter", f"sst2={adapter}")
    assert_clear_error(finished, str(tmp_path / "nope"), "not found: no such directory, and not a hub id")
    finished = run_in_process("dept-serve", "--model_name_or_path", text["model"], "--max_batch_size", "0")
    assert_clear_error(finished, "--max_batch_size must be >= 1")
    finished = run_in_process("dept-serve", "--model_name_or_path", text["model"], "--adapter",
                              f"sst2={tmp_path / 'none'}")
    assert_clear_error(finished, f"{tmp_path / 'none'} does not exist")


def test_dept_tune_errors_are_one_line_before_anything_trains(tiny_task, tmp_path):
    argv = [*tiny_task, "--output_dir", tmp_path / "study"]
    assert_clear_error(run("dept-tune", *argv, "--search", "dropout=0.1:0.2"), "unknown parameter 'dropout'")
    assert_clear_error(run_in_process("dept-tune", *argv, "--peft_type", "PROMPT_TUNING"),
                       "--peft_type PROMPT_TUNING does not use --r")  # the recipe's flags, in a trial's run
    assert not (tmp_path / "study").exists()


def test_dept_train_vision_refuses_a_flag_its_method_ignores(tmp_path):
    finished = run("dept-train-vision", *VISION_MODEL_FLAGS, "--data_dir", tmp_path, "--output_dir", tmp_path / "o",
                   "--do_train", "--peft_type", "PROMPT_TUNING", "--r", "4")
    assert_clear_error(finished, "--peft_type PROMPT_TUNING does not use --r")


def test_a_yaml_typo_names_the_file_and_the_nearest_key(vl_fixture, tmp_path):
    recipe = tmp_path / "vqa.yaml"
    recipe.write_text("tasks: vqa\nmax_stpes: 2\n")
    finished = run("dept-train-vl", "--config", recipe, *vl_fixture.argv("vqa", tmp_path / "run"))
    assert_clear_error(finished, f"--config {recipe}: unknown key 'max_stpes'. Did you mean 'max_steps'?")


@pytest.mark.parametrize("kind", ["cls", "causal"])  # BERT's learned positions, LLaMA's max_position_embeddings
def test_a_prompt_beyond_the_models_positions_is_refused_in_one_line(text, tmp_path, kind):
    model = save_tiny_model(kind, tmp_path / kind, ["sentence : a b c", "0 1"], max_position_embeddings=64)
    finished = run_in_process("dept-train", *train_flags(text, tmp_path / "out", "--model_name_or_path", model,
                                                         "--prefix_length", "10000"))
    assert_clear_error(finished, "10032", "positions")
    assert not (tmp_path / "out" / "checkpoint-2").exists()


def test_debug_shows_the_traceback(text, tmp_path):
    finished = run("dept-train", *train_flags(text, tmp_path / "out", "--model_name_or_path", tmp_path / "nope"),
                   "--debug")
    assert finished.returncode == 1 and "Traceback" in finished.stderr
    assert "FlagError: --model_name_or_path" in finished.stderr


@pytest.mark.parametrize("kind", ["a file", "not writable"])
def test_an_unusable_output_dir_is_refused_before_any_training(text, tmp_path, kind):
    if kind == "a file":
        output_dir = tmp_path / "results.txt"
        output_dir.write_text("not a directory")
        expected = f"--output_dir {output_dir} is a file"
    else:
        output_dir = Path("/proc/dept-test-output")  # not writable, not even by root
        expected = "/proc is not writable"
    finished = run_in_process("dept-train", *train_flags(text, output_dir))
    assert_clear_error(finished, expected)
    assert "Training " not in finished.stderr and "Loading " not in finished.stderr  # refused at parse time


def test_a_truncated_adapter_names_the_file_as_damaged(text, adapter, tmp_path):
    damaged = tmp_path / "adapter"
    shutil.copytree(adapter, damaged)
    weights = damaged / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    finished = run("dept-eval", "--model_name_or_path", text["model"], "--adapter", f"{damaged}:sst2",
                   "--validation_file", text["files"]["sst2"]["validation_file"])
    assert_clear_error(finished, str(weights), "is damaged")


def test_sizes_that_disagree_with_the_peft_model_id_adapter_are_refused(text, adapter, tmp_path):
    finished = run_in_process("dept-train", *train_flags(text, tmp_path / "out", "--peft_model_id", adapter,
                                                         "--prefix_length", "7", "--r", "2"))
    assert_clear_error(finished, "--prefix_length 7 (the adapter has 4)")
    assert "--r" not in finished.stderr.splitlines()[-1].split("but")[-1]  # --r 2 agrees with the adapter


def test_corrupt_images_are_all_reported_before_training(vl_fixture, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(vl_fixture.root / "coco" / "images", images)
    broken = sorted(images.rglob("*.png"))[:2] or sorted(images.rglob("*.jpg"))[:2]
    for path in broken:
        path.write_bytes(path.read_bytes()[:40])
    finished = run_in_process("dept-train-vl", *vl_fixture.argv("vqa", tmp_path / "run", "--feature_file", "",
                                                                "--image_dir", images, "--backbone", "resnet18",
                                                                "--pretrained", "false", "--image_size", "64"))
    message = assert_clear_error(finished, "2 of the", "images the data refers to cannot be loaded")
    for path in broken:
        assert str(path) in message
    assert not (tmp_path / "run" / "checkpoint-2").exists()


# --------------------------------------------------------------------------------------------- two processes


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.multiprocess
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process parents from /proc")
def test_ranks_stop_at_once_with_one_line_when_the_launcher_is_killed(text, tmp_path):
    output_dir = tmp_path / "run"
    argv = train_flags(text, output_dir, "--max_steps", "100000", "--eval_steps", "100000", "--save_steps", "5",
                       "--do_eval", "false", "--do_predict", "false", "--load_best_model_at_end", "false",
                       "--per_device_train_batch_size", "2")
    command = [*launch_two_processes(free_port()), str(REPO_ROOT / "scripts" / "train_nlp.py"), *map(str, argv)]
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr:  # the ranks inherit it, and keep it after the launcher is gone
        launcher = subprocess.Popen(command, env=ENV, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and launcher.poll() is None and not complete_checkpoints(output_dir):
            ranks = _children(launcher.pid) or ranks
            time.sleep(0.2)
        ranks = _children(launcher.pid) or ranks
        assert len(ranks) == 2 and launcher.poll() is None, "the two ranks did not start training"
        launcher.send_signal(signal.SIGKILL)  # it cannot forward this one: the ranks must notice by themselves
        launcher.wait()
        killed = time.monotonic()
        while time.monotonic() < killed + 60 and any(_running(pid) for pid in ranks):
            time.sleep(0.05)
        waited = time.monotonic() - killed
        assert not any(_running(pid) for pid in ranks), "a rank kept running after its launcher was killed"
    finally:
        launcher.kill()
        for pid in ranks:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
    lines = [line for line in log.read_text().splitlines() if ": error: " in line]
    assert sorted(lines) == [f"dept-train: error: rank {rank} stopped: its launcher (pid {launcher.pid}) is gone. "
                             "Continue with --resume_from_checkpoint auto." for rank in (0, 1)], lines
    assert "Traceback" not in log.read_text()  # not the backend's error of the rank that noticed last
    assert waited < 10, waited  # polled 5 times a second: well under a second on a quiet machine
