"""What a new user meets at the console: exit codes, output printed once, expected errors as one or two lines
with exit code 2 (the traceback only with --debug), a run killed at its first checkpoint, per-task local files
for dept-eval, and a launcher killed under two processes.

Every test runs the installed console scripts (`dept-train`, `dept-train-vl`, `dept-eval`, next to
sys.executable) as subprocesses, with this checkout first on PYTHONPATH.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dept.checkpointing import complete_checkpoints
from dept.testing import save_tiny_model
from dept_nlp.tasks import get_task
from tests.conftest import free_port
from tests.nlp.fixtures import hub_row, write_task_fixture
from tests.vl.test_pipeline import build_vl_fixture

pytestmark = pytest.mark.slow

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


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """A tiny T5 and sst2/rte files of different sizes (so each task's own file shows in the counts)."""
    root = tmp_path_factory.mktemp("console")
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


@pytest.fixture(scope="module")
def reference(text):
    """One finished dept-train run (PYTHONHASHSEED=1) and what it printed."""
    output_dir = text["root"] / "reference"
    finished = run("dept-train", *train_flags(text, output_dir), env={"PYTHONHASHSEED": "1"})
    return output_dir, finished


# --------------------------------------------------------------------------------------------- success


def test_dept_train_exits_0_and_prints_its_results_once_to_stdout(reference):
    output_dir, finished = reference
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = printed_results(finished.stdout)
    assert results["total_steps"] == 4 and "eval_accuracy" in results and "test_accuracy" in results
    assert "'train_loss'" not in finished.stderr  # the results dict is no longer echoed as an exit message
    assert (output_dir / "adapter_model.safetensors").is_file()


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

    compared = run("dept-eval", "--compare", tmp_path / "a", tmp_path / "a")
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert compared.stdout.count("| task | adapter (A) |") == 1 and "| task |" not in compared.stderr


def test_dept_eval_help_lists_the_data_flags_of_the_adapters_modality(reference):
    finished = run("dept-eval", "--adapter", reference[0], "--help")
    assert finished.returncode == 0, finished.stderr[-3000:]
    for flag in ("--validation_file", "--test_file", "--generation_max_length", "--model_family", "TASK=]PATH"):
        assert flag in finished.stdout, flag


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    return build_vl_fixture(tmp_path_factory.mktemp("console-vl"), n_images=12)


def test_dept_train_vl_exits_0_and_prints_its_results_once(vl, tmp_path):
    finished = run("dept-train-vl", *vl.argv("vqa", tmp_path / "run", "--max_steps", "2", "--do_predict", "false"))
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert printed_results(finished.stdout)["total_steps"] == 2
    assert "'total_steps'" not in finished.stderr


def test_prefix_length_0_trains_the_embedding_update_alone(text, tmp_path):
    finished = run("dept-train", *train_flags(text, tmp_path / "run", "--prefix_length", "0",
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


def test_auto_after_a_kill_during_the_first_checkpoint_starts_afresh_and_cleans_up(restarted, reference):
    output_dir, finished, _ = restarted
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert not [path for path in output_dir.iterdir() if ".tmp-" in path.name]
    adapter, expected = (load_file(d / "adapter_model.safetensors") for d in (output_dir, reference[0]))
    assert adapter.keys() == expected.keys()
    for name, tensor in expected.items():
        assert (adapter[name] == tensor).all(), name  # the same run as one never interrupted


def test_identical_adapters_from_two_processes_have_the_same_bytes(restarted, reference):
    # Two processes (PYTHONHASHSEED 1 and 2) that trained the same adapter write the same file.
    assert sha256(restarted[0] / "adapter_model.safetensors") == sha256(reference[0] / "adapter_model.safetensors")


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


def test_a_truncated_adapter_names_the_file_as_damaged(text, reference, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(reference[0], adapter, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    finished = run("dept-eval", "--model_name_or_path", text["model"], "--adapter", f"{adapter}:sst2",
                   "--validation_file", text["files"]["sst2"]["validation_file"])
    assert_clear_error(finished, str(weights), "is damaged")


def test_sizes_that_disagree_with_the_peft_model_id_adapter_are_refused(text, reference, tmp_path):
    finished = run("dept-train", *train_flags(text, tmp_path / "out", "--peft_model_id", reference[0],
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
