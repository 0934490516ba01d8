"""Expected errors at the console: one or two lines on stderr, what is wrong, where and the fix, exit code 2, and
the traceback only with --debug; and the ranks of a two-process run stopping when their launcher is SIGKILLed.

Every test runs the installed console scripts as subprocesses (see `tests/reliability/console.py`).
"""

from __future__ import annotations

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
from tests.conftest import free_port
from tests.reliability.console import (
    ENV,
    REPO_ROOT,
    assert_clear_error,
    make_text_setup,
    run,
    script,
    train_flags,
)
from tests.vl.test_pipeline import build_vl_fixture

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return make_text_setup(tmp_path_factory.mktemp("console"))


@pytest.fixture(scope="module")
def adapter(text, tmp_path_factory):
    """A saved DePT adapter (m=4, r=2) for the tiny T5, made in this process."""
    torch.manual_seed(0)
    model = get_dept_model(T5ForConditionalGeneration.from_pretrained(text["model"]),
                           DePTConfig(num_virtual_tokens=4, r=2, max_length=32, prompt_init="random"))
    directory = tmp_path_factory.mktemp("adapter") / "sst2"
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    return build_vl_fixture(tmp_path_factory.mktemp("console-vl"), n_images=12)


# --------------------------------------------------------------------------------------------- clear errors


def test_non_utf8_data_names_the_file_and_the_line(text, tmp_path):
    bad = tmp_path / "latin1.jsonl"
    lines = text["files"]["sst2"]["train_file"].read_bytes().splitlines(keepends=True)
    bad.write_bytes(b"".join(lines[:2]) + '{"sentence": "caf\u00e9", "label": 1}\n'.encode("latin-1"))
    finished = run("dept-train", *train_flags(text, tmp_path / "out", "--train_file", bad))
    assert_clear_error(finished, str(bad), "line 3 is not UTF-8", "iconv")


def test_a_directory_as_train_file_is_named_a_directory(text, tmp_path):
    finished = run("dept-train", *train_flags(text, tmp_path / "out", "--train_file", tmp_path))
    assert_clear_error(finished, f"{tmp_path} is a directory, not a data file")


def test_a_missing_model_directory_is_not_found_and_not_a_hub_id(text, tmp_path):
    finished = run("dept-train", *train_flags(text, tmp_path / "out", "--model_name_or_path", tmp_path / "nope"))
    assert_clear_error(finished, str(tmp_path / "nope"), "not found: no such directory, and not a hub id")


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
    finished = run("dept-train", *train_flags(text, output_dir))
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
    finished = run("dept-train", *train_flags(text, tmp_path / "out", "--peft_model_id", adapter,
                                              "--prefix_length", "7", "--r", "2"))
    assert_clear_error(finished, "--prefix_length 7 (the adapter has 4)")
    assert "--r" not in finished.stderr.splitlines()[-2].split("but")[-1]  # --r 2 agrees with the adapter


def test_corrupt_images_are_all_reported_before_training(vl, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(vl.root / "coco" / "images", images)
    broken = sorted(images.rglob("*.png"))[:2] or sorted(images.rglob("*.jpg"))[:2]
    for path in broken:
        path.write_bytes(path.read_bytes()[:40])
    finished = run("dept-train-vl", *vl.argv("vqa", tmp_path / "run", "--feature_file", "", "--image_dir", images,
                                             "--backbone", "resnet18", "--pretrained", "false", "--image_size", "64"))
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
def test_ranks_stop_when_the_launcher_is_killed(text, tmp_path):
    output_dir = tmp_path / "run"
    argv = train_flags(text, output_dir, "--max_steps", "100000", "--eval_steps", "100000", "--save_steps", "5",
                       "--do_eval", "false", "--do_predict", "false", "--load_best_model_at_end", "false",
                       "--per_device_train_batch_size", "2")
    command = [script("accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO_ROOT / "scripts" / "train_nlp.py"), *map(str, argv)]
    launcher = subprocess.Popen(command, env=ENV, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
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
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(_running(pid) for pid in ranks):
            time.sleep(0.2)
        assert not any(_running(pid) for pid in ranks), "a rank kept running after its launcher was killed"
    finally:
        launcher.kill()
        for pid in ranks:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
