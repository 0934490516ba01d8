"""dept-tune end to end on a tiny T5: pruning, the seed's grid, a SIGKILLed study resumed, parallel workers on a
journal file and on a real PostgreSQL server, and bad input refused before training."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState
from safetensors.torch import load_file

from dept.checkpoint import complete_checkpoints
from dept_tune.cli import main, tune
from dept_tune.space import SEED_GRID, Budget
from dept_tune.storage import StorageError, open_storage
from dept_tune.study import counted_trials, format_rate
from tests.conftest import REPO_ROOT, TUNE_TASK

POSTGRES_URL_VAR = "DEPT_TEST_POSTGRES_URL"


def _argv(tiny_task: list[str], output_dir: Path, *extra: str) -> list[str]:
    return [*tiny_task, "--output_dir", str(output_dir), *extra]


def _load(storage: str, study_name: str) -> optuna.Study:
    return optuna.load_study(study_name=study_name, storage=open_storage(storage))


def _run_dirs(root: Path) -> list[Path]:
    return sorted(path for path in root.iterdir() if path.is_dir() and path.name.startswith(f"{TUNE_TASK}_"))


def _worker(argv: list[str], log: Path, hostname: str | None = None) -> subprocess.Popen:
    """A dept-tune worker process; with `hostname`, one that runs as if on another machine (or container)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    command = ["-m", "dept_tune.cli"]
    if hostname is not None:
        command = ["-c", f"import socket, sys; socket.gethostname = lambda: {hostname!r}; "
                         "from dept_tune.cli import main; sys.exit(main(sys.argv[1:]))"]
    return subprocess.Popen([sys.executable, *command, *argv], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=env)


def _kill_mid_trial(worker: subprocess.Popen, storage: str, study_name: str, root: Path, log: Path):
    """SIGKILL `worker` once a trial of its has written a checkpoint; return that trial as it was."""
    deadline = time.monotonic() + 240
    victim = None
    while victim is None and time.monotonic() < deadline and worker.poll() is None:
        time.sleep(0.2)
        try:
            trials = _load(storage, study_name).get_trials()
        except (KeyError, ValueError, StorageError):  # the study is not created yet
            continue
        running = [t for t in trials if t.state == TrialState.RUNNING and "output_dir" in t.user_attrs]
        if running and complete_checkpoints(root / running[0].user_attrs["output_dir"]):
            victim = running[0]
    assert victim is not None, log.read_text()[-3000:]
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    return victim


@pytest.mark.slow
def test_six_trials_with_pruning_keep_the_best_adapter_and_report(tiny_task, tmp_path):
    root = tmp_path / "study"
    report = tune(_argv(tiny_task, root, "--n_trials", "6", "--metric", "loss", "--n_startup_trials", "2",
                        "--search", "learning_rate=1e-3:1", "--search", "lora_embedding_lr=1e-4:1e-1"))
    study = _load(str(root / "optuna_journal.log"), "study")
    trials = study.get_trials()
    states = [t.state for t in trials]
    assert len(trials) == 6 and set(states) <= {TrialState.COMPLETE, TrialState.PRUNED}
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert pruned, "the median pruner stopped no trial"
    for trial in pruned:  # stopped at an evaluation before the last step (8)
        assert max(trial.intermediate_values) < 8
    values = [t.value for t in complete]
    best = study.best_trial
    assert best.value == min(values) < max(values)  # eval_loss: lower is better, and the best beats the worst
    # Each trial's reported evaluations are the ones its trainer logged.
    state = json.loads((root / best.user_attrs["output_dir"] / "trainer_state.json").read_text())
    logged = {entry["step"]: entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry}
    assert logged == best.intermediate_values
    # Only the best trial keeps its adapter; every trial that finished keeps its result files, no checkpoint stays.
    with_adapter = [p.name for p in _run_dirs(root) if (p / "adapter_model.safetensors").is_file()]
    assert with_adapter == [best.user_attrs["output_dir"]]
    assert not list(root.glob("*/checkpoint-*"))
    assert all((root / t.user_attrs["output_dir"] / "eval_results.json").is_file() for t in complete)
    # A pruned trial keeps its log up to the prune (the trainer's trainer_state.json) and a marker saying so.
    for trial in pruned:
        path = root / trial.user_attrs["output_dir"]
        state = json.loads((path / "trainer_state.json").read_text())
        logged = {entry["step"]: entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry}
        assert logged == trial.intermediate_values and state["global_step"] == max(logged)
        marker = json.loads((path / "pruned.json").read_text())
        assert marker["trial"] == trial.number and marker["pruned_at_step"] == max(logged)
        assert marker["metrics"]["eval_loss"] == logged[max(logged)] and "eval_accuracy" in marker["metrics"]
        assert marker["objective"] == {str(step): value for step, value in sorted(logged.items())}
        assert not (path / "eval_results.json").exists()  # scripts/summarize_sweep.py counts finished runs only
    # The report: best parameters with validation and test metrics, a table of trials, and the plots.
    assert report["best"]["params"] == best.params and report["best"]["validation"]["eval_loss"] == best.value
    assert "test_accuracy" in report["best"]["test"]
    table = (root / "tune_report.md").read_text()
    assert all(f"| {t.number} | {t.state.name.lower()} |" in table for t in trials)
    for name in ("optimization_history", "param_importances", "contour_learning_rate_lora_embedding_lr"):
        assert (root / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.slow
def test_grid_sampler_runs_exactly_the_seed_grid_in_sweep_sh_directories(tiny_task, tmp_path):
    root = tmp_path / "grid"
    argv = _argv(tiny_task, root, "--sampler", "grid", "--pruner", "none", "--max_steps", "2")
    tune(argv)
    report = tune(argv)  # the same command on a finished study trains nothing more
    assert report["counts"] == {"COMPLETE": 6} and tune([*argv, "--report_only"])["trials"] == report["trials"]
    study = _load(str(root / "optuna_journal.log"), "grid")
    assert len(study.trials) == 6
    points = sorted((t.params["lora_embedding_lr"], t.params["learning_rate"]) for t in study.get_trials())
    assert points == sorted(itertools.product(SEED_GRID["lora_embedding_lr"], SEED_GRID["learning_rate"]))
    assert all(t.state == TrialState.COMPLETE for t in study.get_trials())
    # The directories are the ones scripts/sweep.sh (the official README's loop) would use for the same runs.
    dry_run = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "sweep.sh")], capture_output=True, text=True,
                             env={**os.environ, "DRY_RUN": "1", "TASKS": TUNE_TASK, "ROOT": str(tmp_path / "sweep"), "PREFIX_LENGTH": "4",
                                  "R": "2", "MAX_STEPS": "2"}, check=True)
    expected = sorted(Path(d).name for d in re.findall(r"--output_dir (\S+)", dry_run.stdout))
    assert len(expected) == 6 and [p.name for p in _run_dirs(root)] == expected


@pytest.mark.slow
@pytest.mark.multiprocess
def test_study_killed_mid_trial_resumes_without_losing_or_repeating_a_trial(tiny_task, tmp_path):
    root = tmp_path / "killed"
    argv = _argv(tiny_task, root, "--n_trials", "4", "--pruner", "none", "--keep_all",
                 "--search", "learning_rate=1e-2:1", "--search", "lora_embedding_lr=1e-4:1e-1")
    storage = str(root / "optuna_journal.log")
    worker = _worker(argv, tmp_path / "first.log")
    deadline = time.monotonic() + 240
    victim = None
    while victim is None and time.monotonic() < deadline and worker.poll() is None:
        time.sleep(0.2)
        if not Path(storage).is_file():
            continue
        trials = _load(storage, "killed").get_trials()
        running = [t for t in trials if t.state == TrialState.RUNNING and "output_dir" in t.user_attrs]
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        if done and running and complete_checkpoints(root / running[0].user_attrs["output_dir"]):
            victim = running[0]
    assert victim is not None, (tmp_path / "first.log").read_text()[-3000:]
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    checkpoint = complete_checkpoints(root / victim.user_attrs["output_dir"])[-1]
    resumed_at = int(checkpoint.name.removeprefix("checkpoint-"))
    before = {t.number: t for t in _load(storage, "killed").get_trials() if t.state == TrialState.COMPLETE}

    tune(argv)  # the same command again resumes the study

    study = _load(storage, "killed")
    counted = counted_trials(study)
    assert len(counted) == 4 and all(t.state == TrialState.COMPLETE for t in counted)
    after = {t.number: t for t in counted}
    for number, trial in before.items():  # finished trials are kept as they were, not run again
        assert after[number].value == trial.value and after[number].params == trial.params
    retries = [t for t in counted if t.user_attrs.get("retry_of") == victim.number]
    assert len(retries) == 1  # the killed trial runs again exactly once, with its parameters and directory
    retry = retries[0]
    assert retry.params == victim.params and retry.user_attrs["output_dir"] == victim.user_attrs["output_dir"]
    # It resumed from the checkpoint the killed run left: only the later evaluations (every 2 steps) were run.
    assert sorted(retry.intermediate_values) == list(range(resumed_at + 2, 9, 2))
    assert len({tuple(sorted(t.params.items())) for t in counted}) == 4


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_dead_workers_trial_on_sqlite_runs_again_after_the_grace_period(tiny_task, tmp_path):
    # A worker in another container (another host name, another process namespace) dies: no process id tells this
    # machine so, only the missing heartbeat does.
    root = tmp_path / "sqlite"
    url = f"sqlite:///{tmp_path / 'study.db'}"
    argv = _argv(tiny_task, root, "--n_trials", "2", "--pruner", "none", "--keep_all", "--storage", url,
                 "--study_name", "shared", "--heartbeat_interval", "1", "--grace_period", "2",
                 "--search", "learning_rate=1e-2:1", "--search", "lora_embedding_lr=1e-4:1e-1")
    open_storage(url)  # Optuna's tables, before two processes race to create them
    log = tmp_path / "other-machine.log"
    victim = _kill_mid_trial(_worker(argv, log, hostname="other-machine"), url, "shared", root, log)
    assert victim.user_attrs["worker"].startswith("other-machine:")
    resumed_at = int(complete_checkpoints(root / victim.user_attrs["output_dir"])[-1].name.split("-")[1])
    time.sleep(4)  # past the grace period (SQLite's clock counts whole seconds)

    tune(argv)  # a worker of this machine

    study = _load(url, "shared")
    counted = counted_trials(study)
    assert len(counted) == 2 and all(t.state == TrialState.COMPLETE for t in counted), [t.state for t in counted]
    assert study.trials[victim.number].state == TrialState.FAIL
    retry = next(t for t in counted if t.user_attrs.get("retry_of") == victim.number)
    assert retry.params == victim.params and retry.user_attrs["output_dir"] == victim.user_attrs["output_dir"]
    assert sorted(retry.intermediate_values) == list(range(resumed_at + 2, 9, 2))  # resumed from its checkpoint


def _database_contents(url: str) -> tuple[list[str], list[str]]:
    """The tables of a database, and the studies in them."""
    engine = sqlalchemy.create_engine(url)
    try:
        tables = sorted(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    return tables, sorted(optuna.get_all_study_names(open_storage(url))) if "studies" in tables else []


@pytest.mark.parametrize("storage", ["default", "journal", "sqlite", "sqlite_without_tables", "other_study",
                                     pytest.param("postgresql", marks=pytest.mark.skipif(
                                         POSTGRES_URL_VAR not in os.environ, reason=f"no {POSTGRES_URL_VAR}"))])
def test_report_only_on_a_missing_study_is_refused_and_creates_nothing(tiny_task, tmp_path, capsys, storage):
    root = tmp_path / "reported"
    url = {"default": None, "journal": str(tmp_path / "elsewhere.log"), "sqlite": f"sqlite:///{tmp_path / 'x.db'}",
           "sqlite_without_tables": f"sqlite:///{tmp_path / 'empty.db'}",
           "other_study": str(tmp_path / "other.log"), "postgresql": os.environ.get(POSTGRES_URL_VAR)}[storage]
    database_before = _database_contents(url) if storage == "postgresql" else None
    if storage == "sqlite_without_tables":
        sqlite3.connect(tmp_path / "empty.db").close()
    if storage == "other_study":
        optuna.create_study(study_name="another", storage=open_storage(url))
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    flags = ["--report_only"] + ([] if url is None else ["--storage", url])
    assert main(_argv(tiny_task, root, *flags)) == 2  # the console contract: one line, exit status 2
    error = capsys.readouterr().err.strip()
    where = re.sub(r"(//[^:/@]+):[^@]*@", r"\1:***@", url) if url else str(root / "optuna_journal.log")  # no password
    assert error == (f"dept-tune: error: There is no study 'reported' in {where}: nothing to report. Check "
                     "--storage, --study_name and --output_dir, or run without --report_only to start the study. "
                     "(--help lists the flags; --debug shows the traceback)")  # the console contract's one line
    after = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    assert after == before and not root.exists()  # no file, table, study or trial was created
    if storage == "other_study":
        assert optuna.get_all_study_names(open_storage(url)) == ["another"]
    if storage == "postgresql":
        assert _database_contents(url) == database_before


@pytest.mark.slow
def test_resuming_with_other_training_flags_is_refused_and_with_the_same_flags_resumes(tiny_task, tmp_path, capsys):
    root = tmp_path / "resumed"
    first = _argv(tiny_task, root, "--n_trials", "1", "--pruner", "none", "--max_steps", "2")
    assert tune(first)["counts"] == {"COMPLETE": 1}
    assert main(_argv(tiny_task, root, "--n_trials", "2", "--pruner", "none", "--max_steps", "4", "--seed", "1")) == 2  # the console contract: one line, exit status 2
    error = capsys.readouterr().err
    assert "Study 'resumed' was started with other training flags: --max_steps 2 (now 4), --seed 0 (now 1)." in error
    assert "start a new study for the new setup with another --study_name" in error
    study = _load(str(root / "optuna_journal.log"), "resumed")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]  # nothing was planned or trained
    # The same training flags resume it (here with one more trial planned).
    report = tune(_argv(tiny_task, root, "--n_trials", "2", "--pruner", "none", "--max_steps", "2"))
    assert report["counts"] == {"COMPLETE": 2}


def _two_workers(argv: list[str], storage: str, study_name: str, tmp_path: Path) -> None:
    """A worker process, and this test process as the second worker once the first one runs a trial."""
    worker = _worker(argv, tmp_path / "worker.log")
    deadline = time.monotonic() + 240
    while worker.poll() is None and time.monotonic() < deadline:
        try:
            if _load(storage, study_name).get_trials(states=(TrialState.RUNNING,)):
                break
        except (KeyError, ValueError, StorageError):  # the study (or its directory) is not created yet
            pass
        time.sleep(0.2)
    tune(argv)
    assert worker.wait(timeout=240) == 0, (tmp_path / "worker.log").read_text()[-3000:]


def _assert_shared_fairly(study: optuna.Study, n_trials: int) -> None:
    trials = study.get_trials()
    assert len(trials) == n_trials and all(t.state == TrialState.COMPLETE for t in trials)
    by_worker = Counter(t.user_attrs["worker"] for t in trials)
    assert len(by_worker) == 2 and sum(by_worker.values()) == n_trials, by_worker  # both ran trials, none twice
    assert len({tuple(sorted(t.params.items())) for t in trials}) == n_trials  # no duplicate parameters
    assert len({t.user_attrs["output_dir"] for t in trials}) == n_trials


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_workers_on_one_journal_file_share_the_trials(tiny_task, tmp_path):
    root = tmp_path / "parallel"
    argv = _argv(tiny_task, root, "--n_trials", "6", "--pruner", "none", "--max_steps", "2")
    storage = str(root / "optuna_journal.log")
    _two_workers(argv, storage, "parallel", tmp_path)
    _assert_shared_fairly(_load(storage, "parallel"), 6)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_workers_on_one_sqlite_file_share_the_trials_while_sending_heartbeats(tiny_task, tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    argv = _argv(tiny_task, tmp_path / "parallel", "--n_trials", "4", "--pruner", "none", "--max_steps", "2",
                 "--storage", url, "--heartbeat_interval", "1", "--grace_period", "30")
    open_storage(url)  # Optuna's tables, before two processes race to create them
    _two_workers(argv, url, "parallel", tmp_path)
    _assert_shared_fairly(_load(url, "parallel"), 4)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(POSTGRES_URL_VAR not in os.environ,
                    reason=f"{POSTGRES_URL_VAR} names no PostgreSQL server (.ci/run starts one)")
def test_two_workers_share_a_study_on_postgresql(tiny_task, tmp_path):
    url = os.environ[POSTGRES_URL_VAR]
    study_name = f"dept-test-{os.getpid()}-{time.time_ns()}"
    argv = _argv(tiny_task, tmp_path / "pg", "--n_trials", "4", "--pruner", "none", "--max_steps", "2",
                 "--storage", url, "--study_name", study_name, "--heartbeat_interval", "5", "--grace_period", "30")
    _two_workers(argv, url, study_name, tmp_path)
    _assert_shared_fairly(_load(url, study_name), 4)
    optuna.delete_study(study_name=study_name, storage=url)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--search", "dropout=0.1:0.2"], "unknown parameter 'dropout'"),
        (["--search", "learning_rate=4e-1:3e-1"], "is an empty range"),
        (["--search", "r=100:200"], "nothing to search"),
        (["--storage", "postgresql://dept:secret@127.0.0.1:1/optuna"], "Cannot reach the study storage"),
        (["--sampler", "grid", "--n_trials", "5"], "runs every grid point once: 6 trials"),
        (["--metric", "loss", "--metric_for_best_model", "accuracy"], "both name the metric: give only --metric"),
    ],
)
def test_bad_search_or_storage_is_refused_before_any_training(tiny_task, tmp_path, capsys, extra, message):
    root = tmp_path / "refused"
    assert main(_argv(tiny_task, root, "--n_trials", "2", *extra)) == 2  # the console entry: one line, status 2
    error = capsys.readouterr().err
    assert message in error and "secret" not in error, error
    assert not root.exists() or not _run_dirs(root)


def test_budget_pairs_are_the_papers_equal_budget_configurations():
    # DESIGN.md: t5-base (d = 768) with s = 256 spends 76,800 parameters at (m, r) = (60, 30), (40, 45) and as
    # PT with l = 100; the official MRQA runs use (60, 24) at s = 512, the same budget.
    pairs = Budget(prefix_length=60, r=30, max_length=256, hidden_size=768).pairs()
    assert Budget(60, 30, 256, 768).total == 76_800
    assert {(100, 0), (60, 30), (40, 45), (80, 15)} <= set(pairs)
    assert all(m * 768 + r * (256 + 768) == 76_800 for m, r in pairs)
    assert (60, 24) in Budget(60, 24, 512, 768).pairs() and Budget(60, 24, 512, 768).total == 76_800


@pytest.mark.parametrize(("value", "name"), [(0.3, "3e-1"), (4e-1, "4e-1"), (5e-3, "5e-3"), (5e-4, "5e-4"),
                                             (1.2345e-3, "1.23e-3"), (1.0, "1e0")])
def test_learning_rates_are_spelled_as_in_the_official_run_names(value, name):
    assert format_rate(value) == name


@pytest.mark.slow
def test_searching_r_keeps_the_parameter_budget_and_max_steps_sets_the_steps(tiny_task, tmp_path):
    # The tiny task: m = 4, r = 2, s = 32, d = 32, so 4·32 + 2·(32 + 32) = 256 trainable parameters.
    root = tmp_path / "budget"
    tune(_argv(tiny_task, root, "--sampler", "grid", "--search", "r=1,3", "--search", "max_steps=2,4",
               "--search", "learning_rate=3e-1", "--pruner", "none", "--keep_all"))
    sizes = {}
    for path in _run_dirs(root):
        adapter = load_file(path / "adapter_model.safetensors")
        config = json.loads((path / "adapter_config.json").read_text())
        steps = json.loads((path / "trainer_state.json").read_text())["global_step"]
        assert path.name.endswith(f"_pl{config['num_virtual_tokens']}_r{config['r']}_st{steps}")
        sizes[(config["num_virtual_tokens"], config["r"], steps)] = sum(t.numel() for t in adapter.values())
    assert sizes == {(6, 1, 2): 256, (6, 1, 4): 256, (2, 3, 2): 256, (2, 3, 4): 256}
