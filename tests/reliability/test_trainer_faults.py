"""The training loop under faults: SIGKILL and resume, crashes, partial checkpoints, full disks, NaN losses,
existing outputs, and two processes."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dept.checkpoint import (
    OPTIMIZER_NAME,
    TRAINABLE_PARAMETERS_NAME,
    CheckpointWriteError,
    EpochSampler,
    OutputDirExistsError,
    complete_checkpoints,
    is_complete_checkpoint,
    latest_checkpoint,
    read_checkpoint,
)
from dept.train_loss import NonFiniteLossError
from tests.conftest import REPO_ROOT
from tests.dept._toy import TRAIN_SIZE, ToyAdapterModel, expected_log_losses, make_dataset, toy_args, toy_trainer
from tests.reliability.conftest import assert_clear_error, printed_results, run_in_process

LAUNCHER = REPO_ROOT / "tests" / "dept" / "launch_toy_training.py"
CHILD_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def train_and_evaluate(output_dir: Path, model: ToyAdapterModel | None = None, **overrides) -> dict:
    trainer = toy_trainer(toy_args(output_dir, **overrides), model)
    return {**trainer.train(), **trainer.evaluate()}


def assert_same_outcome(run: Path, reference: Path, run_metrics: dict, reference_metrics: dict) -> None:
    """Same adapter tensors bit for bit, same metrics, same best checkpoint."""
    adapter, expected = (load_file(str(d / "adapter_model.safetensors")) for d in (run, reference))
    assert adapter.keys() == expected.keys()
    for name in expected:
        assert torch.equal(adapter[name], expected[name]), name
    for key in ("train_loss", "eval_accuracy", "eval_loss", "epoch", "total_steps"):
        assert run_metrics[key] == reference_metrics[key], key
    state, expected_state = (json.loads((d / "trainer_state.json").read_text()) for d in (run, reference))
    assert state["best_metric"] == expected_state["best_metric"]
    assert Path(state["best_model_checkpoint"]).name == Path(expected_state["best_model_checkpoint"]).name


# Mid-epoch checkpoints (10 batches per epoch, 2 per step: checkpoint-6 is 2 batches into epoch 1),
# length-grouped batches and dropout: every piece of state a resume has to restore.
KILL_RUN = dict(max_steps=20, save_steps=6, eval_steps=3, gradient_accumulation_steps=2, group_by_length=True)


def test_sigkilled_run_resumes_to_the_same_adapter_and_metrics(tmp_path):
    reference_metrics = train_and_evaluate(tmp_path / "reference", **KILL_RUN)

    run = tmp_path / "killed"
    child = subprocess.Popen(
        [sys.executable, str(LAUNCHER), str(run), "--step_delay", "0.05", "--args", json.dumps(KILL_RUN)],
        env=CHILD_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not complete_checkpoints(run) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert complete_checkpoints(run), "the child wrote no checkpoint"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not (run / "train_results.json").exists(), "the child finished before it was killed"

    resumed_metrics = train_and_evaluate(run, resume_from_checkpoint="auto", **KILL_RUN)
    assert_same_outcome(run, tmp_path / "reference", resumed_metrics, reference_metrics)


class CrashingModel(ToyAdapterModel):
    """Raises, like a dying machine would stop, at its `crash_at`-th training forward."""

    def __init__(self, crash_at: int):
        super().__init__()
        self.crash_at, self.calls = crash_at, 0

    def forward(self, features, labels=None):
        if self.training:
            self.calls += 1
            if self.calls == self.crash_at:
                raise RuntimeError("simulated crash")
        return super().forward(features, labels)


@pytest.mark.parametrize(
    "settings, crash_step, resume_from",
    [
        # checkpoints at epoch ends, written after the end-of-epoch evaluation
        (dict(max_steps=25, eval_strategy="epoch", save_strategy="epoch"), 14, "checkpoint-10"),
        # checkpoints by steps that land on the epoch's last batch, before its end-of-epoch work
        (dict(max_steps=12, eval_steps=5, save_steps=5, gradient_accumulation_steps=2), 7, "checkpoint-5"),
    ],
)
def test_crashed_run_resumes_from_an_explicit_checkpoint_bit_identically(tmp_path, settings, crash_step, resume_from):
    reference_metrics = train_and_evaluate(tmp_path / "reference", **settings)
    run = tmp_path / "crashed"
    first_forward_of_crash_step = (crash_step - 1) * settings.get("gradient_accumulation_steps", 1) + 1
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_and_evaluate(run, CrashingModel(crash_at=first_forward_of_crash_step), **settings)
    assert latest_checkpoint(run) == run / resume_from
    assert (run / resume_from).is_dir() and not (run / "train_results.json").exists()

    resumed_metrics = train_and_evaluate(run, resume_from_checkpoint=str(run / resume_from), **settings)
    assert_same_outcome(run, tmp_path / "reference", resumed_metrics, reference_metrics)


def test_auto_resume_ignores_partial_and_temporary_checkpoints(tmp_path):
    settings = dict(max_steps=12, save_steps=4, eval_steps=4, save_total_limit=None)
    reference = tmp_path / "reference"
    reference_metrics = train_and_evaluate(reference, **settings)

    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint-4", "checkpoint-8"):
        shutil.copytree(reference / name, run / name)
    partial = run / "checkpoint-12"  # killed after its first file, under the final name (e.g. by another tool)
    partial.mkdir()
    shutil.copy(reference / "checkpoint-12" / TRAINABLE_PARAMETERS_NAME, partial)
    temporary = run / "checkpoint-40.tmp-12345"  # complete files, but never renamed
    shutil.copytree(reference / "checkpoint-12", temporary)

    assert latest_checkpoint(run) == run / "checkpoint-8"
    resumed_metrics = train_and_evaluate(run, resume_from_checkpoint="auto", **settings)
    assert_same_outcome(run, reference, resumed_metrics, reference_metrics)
    assert is_complete_checkpoint(run / "checkpoint-12")  # rewritten in full by the resumed run


def test_full_disk_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    settings = dict(max_steps=12, save_steps=4, eval_steps=4, save_total_limit=None)
    reference = tmp_path / "reference"
    reference_metrics = train_and_evaluate(reference, **settings)

    torch_save = torch.save  # accelerate's save_state writes the optimizer shard with it

    def disk_full_at_step_8(obj, path, *args, **kwargs):
        if Path(path).parent.name.startswith("checkpoint-8") and Path(path).name == OPTIMIZER_NAME:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return torch_save(obj, path, *args, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(torch, "save", disk_full_at_step_8)
    with pytest.raises(CheckpointWriteError) as failure:
        train_and_evaluate(run, **settings)
    message = str(failure.value)
    for expected in ("checkpoint-8", OPTIMIZER_NAME, "No space left on device", str(run / "checkpoint-4"), "resume"):
        assert expected in message
    assert [path.name for path in run.iterdir() if path.name.startswith("checkpoint-")] == ["checkpoint-4"]
    kept, expected = read_checkpoint(run / "checkpoint-4"), read_checkpoint(reference / "checkpoint-4")
    for name, tensor in expected.trainable_parameters.items():
        assert torch.equal(kept.trainable_parameters[name], tensor)

    monkeypatch.setattr(torch, "save", torch_save)  # space freed
    resumed_metrics = train_and_evaluate(run, resume_from_checkpoint="auto", **settings)
    assert_same_outcome(run, reference, resumed_metrics, reference_metrics)


@contextlib.contextmanager
def small_file_system(path: Path, size: str = "8m"):
    """A tmpfs of `size` mounted at `path`, so that a test can fill a disk for real (needs root and mount rights)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip() or 'mount is missing'}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_file_system(filler: Path) -> None:
    """Write `filler` until the file system under it has no byte left."""
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (b"\0" * 65536, b"\0" * 4096, b"\0"):
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as err:
                    assert err.errno == errno.ENOSPC, err
                    break
    finally:
        os.close(fd)


def test_really_full_disk_is_named_with_the_checkpoint_path_and_the_run_resumes(tmp_path):
    # No stand-in for torch.save: the disk really fills, and torch reports it in its own terms ("[enforce fail at
    # inline_container.cc:672] . unexpected pos ..."), which the message must translate.
    settings = dict(max_steps=12, save_steps=4, eval_steps=4, save_total_limit=None)
    reference = tmp_path / "reference"
    reference_metrics = train_and_evaluate(reference, **settings)

    with small_file_system(tmp_path / "disk") as disk:
        run, filler = disk / "run", disk / "filler"

        def fill_before_checkpoint_8(step, metrics):  # step 8 is evaluated, then saved
            if step == 8:
                fill_file_system(filler)

        with pytest.raises(CheckpointWriteError) as failure:
            toy_trainer(toy_args(run, **settings), on_evaluate=fill_before_checkpoint_8).train()
        message = str(failure.value)
        for expected in ("No space left on device", str(run / "checkpoint-8"), str(run / "checkpoint-4"), "resume"):
            assert expected in message, (expected, message)
        assert "enforce fail" not in message and "inline_container" not in message, message
        assert [path.name for path in run.iterdir() if path.name.startswith("checkpoint-")] == ["checkpoint-4"]

        filler.unlink()  # space freed
        resumed_metrics = train_and_evaluate(run, resume_from_checkpoint="auto", **settings)
        assert_same_outcome(run, reference, resumed_metrics, reference_metrics)


def poisoned_step_dataset(step: int, seed: int, batch_size: int = 4) -> list[dict]:
    """The training set with NaN features in the example that the first epoch's `step`-th batch starts with."""
    order = list(EpochSampler(TRAIN_SIZE, seed))
    return make_dataset(TRAIN_SIZE, seed=1, poison_index=order[(step - 1) * batch_size])


def test_nan_loss_stops_naming_the_step_and_learning_rates_and_keeps_the_last_good_checkpoint(tmp_path):
    args = toy_args(tmp_path, max_steps=10, save_steps=1, eval_steps=1, save_total_limit=None)
    trainer = toy_trainer(args, train_dataset=poisoned_step_dataset(4, args.seed))
    with pytest.raises(NonFiniteLossError) as failure:
        trainer.train()
    message = str(failure.value)
    for expected in ("nan", "optimizer step 4", "prompt=", "lora_embedding=", "checkpoint-3", "skip_nan_steps"):
        assert expected in message
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    assert not (tmp_path / "checkpoint-4").exists()
    for tensor in read_checkpoint(tmp_path / "checkpoint-3").trainable_parameters.values():
        assert torch.isfinite(tensor).all()


def test_skip_nan_steps_skips_and_counts_each_poisoned_step(tmp_path):
    args = toy_args(tmp_path, max_steps=20, save_steps=20, eval_steps=20, skip_nan_steps=True)
    trainer = toy_trainer(args, train_dataset=poisoned_step_dataset(4, args.seed))
    metrics = trainer.train()

    assert metrics["nan_steps_skipped"] == 2  # the poisoned example comes once in each of the two epochs
    assert json.loads((tmp_path / "train_results.json").read_text())["nan_steps_skipped"] == 2
    for tensor in trainer.model.parameters():
        assert torch.isfinite(tensor).all()
    optimizer_state = read_checkpoint(tmp_path / "checkpoint-20").optimizer["state"]
    assert {float(state["step"]) for state in optimizer_state.values()} == {18.0}  # 20 steps, 2 skipped


def test_existing_output_dir_is_refused_and_left_untouched(tmp_path):
    train_and_evaluate(tmp_path, max_steps=4, save_steps=4, eval_steps=4)
    before = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*")}
    with pytest.raises(OutputDirExistsError, match="overwrite_output_dir=True.*resume_from_checkpoint='auto'"):
        toy_trainer(toy_args(tmp_path, max_steps=4, save_steps=4, eval_steps=4)).train()
    assert {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*")} == before


def test_overwrite_output_dir_replaces_the_old_checkpoints(tmp_path):
    train_and_evaluate(tmp_path, max_steps=8, save_steps=4, eval_steps=4)
    toy_trainer(toy_args(tmp_path, max_steps=4, save_steps=2, eval_steps=2, overwrite_output_dir=True)).train()
    assert [path.name for path in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    assert json.loads((tmp_path / "trainer_state.json").read_text())["global_step"] == 4


@pytest.mark.multiprocess
def test_two_processes_train_report_the_single_process_eval_metric_and_resume_bit_identically(tmp_path):
    settings = dict(max_steps=6, save_steps=3, eval_steps=3)
    run, report, resumed = tmp_path / "two_processes", tmp_path / "report", tmp_path / "resumed"
    resumed.mkdir()
    # The same two processes then resume a copy of the run cut back to checkpoint-3 (see the launcher).
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(LAUNCHER), str(run), "--report", str(report), "--args", json.dumps(settings),
               "--resume_copy", str(resumed)]  # fmt: skip
    finished = subprocess.run(command, env=CHILD_ENV, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]

    reports = [json.loads((report / f"process_{i}.json").read_text()) for i in range(2)]
    assert [r["num_processes"] for r in reports] == [2, 2]
    assert reports[0]["eval"]["eval_accuracy"] == reports[1]["eval"]["eval_accuracy"]
    # Each logged loss is the mean over both processes and the steps since the previous entry, the loss having
    # stayed on the device in between.
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    logged = [entry["loss"] for entry in history if "loss" in entry]
    expected = expected_log_losses([r["micro_batch_losses"] for r in reports], accumulation=1, logging_steps=2)
    assert len(logged) == 3 and logged == pytest.approx(expected, rel=1e-9)
    assert [path.name for path in complete_checkpoints(run)] == ["checkpoint-3", "checkpoint-6"]

    # The same adapter, evaluated by one process on the same data, scores the same.
    model = ToyAdapterModel()
    model.load_adapter(run)
    single = toy_trainer(toy_args(tmp_path / "single"), model).evaluate()
    two = json.loads((run / "eval_results.json").read_text())
    assert two["eval_samples"] == single["eval_samples"] == 21
    assert two["eval_accuracy"] == single["eval_accuracy"]
    # (eval_loss is not compared: as in HF's Trainer, the last batch of a process is padded with wrap-around
    # examples to keep batches even, and their loss is part of that batch's mean.)
    two_predictions = (run / "predictions_eval.jsonl").read_text().splitlines()
    assert two_predictions == (tmp_path / "single" / "predictions_eval.jsonl").read_text().splitlines()

    # The copy cut back to checkpoint-3 (as if killed after it) resumed under 2 processes through load_state, with
    # each process's RNG, to the same adapter bit for bit.
    assert (resumed / "checkpoint-3" / "random_states_1.pkl").is_file()  # accelerate's save_state, per process
    for name, tensor in load_file(str(run / "adapter_model.safetensors")).items():
        assert torch.equal(load_file(str(resumed / "adapter_model.safetensors"))[name], tensor), name
    assert json.loads((resumed / "eval_results.json").read_text())["eval_accuracy"] == two["eval_accuracy"]


def test_resume_with_a_different_batch_size_is_refused(tmp_path):
    train_and_evaluate(tmp_path, max_steps=4, save_steps=4, eval_steps=4)
    trainer = toy_trainer(toy_args(tmp_path, max_steps=8, save_steps=4, eval_steps=4, per_device_train_batch_size=2,
                                   resume_from_checkpoint="auto"))  # fmt: skip
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        trainer.train()


# --------------------------------------------------------------------------------------------- through dept-train


def train_only_flags(text, output_dir: Path, *extra) -> list:
    """A plain `--do_train` on a local training file, with no validation file."""
    return ["--model_name_or_path", text["model"], "--task_name", "sst2", "--output_dir", output_dir,
            "--train_file", text["files"]["sst2"]["train_file"], "--do_train", "--prefix_length", "4", "--r", "2",
            "--max_seq_length", "32", "--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "4",
            "--report_to", "none", "--seed", "7", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def train_only_run(text, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("train-only") / "out"
    return run_in_process("dept-train", *train_only_flags(text, output_dir)), output_dir


@pytest.mark.slow
@pytest.mark.xdist_group("train_only_run")  # one run for both (--dist loadgroup)
def test_plain_do_train_without_validation_data_trains_and_saves_the_last_adapter(train_only_run):
    finished, output_dir = train_only_run
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert printed_results(finished.stdout)["total_steps"] == 4
    assert "No evaluation data: this run evaluates nothing and saves the adapter of its last step" in finished.stderr
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] is None and not any("eval_loss" in entry for entry in state["log_history"])
    # The adapter is the last step's trainable weights, as checkpoint-4 holds them.
    last = read_checkpoint(output_dir / "checkpoint-4").trainable_parameters
    adapter = load_file(str(output_dir / "adapter_model.safetensors"))
    assert len(adapter) == len(last) == 3
    for name, tensor in adapter.items():
        (match,) = [weights for key, weights in last.items() if key.endswith(name)]
        assert torch.equal(tensor, match), name


@pytest.mark.slow
def test_explicit_load_best_model_at_end_without_validation_data_is_a_clear_error(text, tmp_path):
    finished = run_in_process("dept-train", *train_only_flags(text, tmp_path / "out", "--eval_steps", "2",
                                                              "--load_best_model_at_end"))
    assert_clear_error(finished, "--load_best_model_at_end", "no evaluation data", "--validation_file")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.xdist_group("train_only_run")  # one run for both (--dist loadgroup)
def test_existing_output_dir_is_refused_at_the_console_naming_the_flags(text, train_only_run):
    _, output_dir = train_only_run
    before = {path: path.stat().st_mtime_ns for path in output_dir.rglob("*")}
    finished = run_in_process("dept-train", *train_only_flags(text, output_dir))
    assert_clear_error(finished, str(output_dir), "--overwrite_output_dir", "--resume_from_checkpoint auto",
                       "--output_dir")  # fmt: skip
    assert "overwrite_output_dir=True" not in finished.stderr.split("--overwrite_output_dir")[0]  # the flag first
    assert {path: path.stat().st_mtime_ns for path in output_dir.rglob("*")} == before
