"""One worker of a DePT hyperparameter study: take a planned trial, train it, report it, until none is left.

The study is planned when it is created: `n_trials` trials are queued (Optuna's `enqueue_trial`), empty for
TPE and random search, or one per point for the grid. A worker pops a queued trial atomically, so any number
of workers, on one machine or many, run each planned trial exactly once and the study ends with exactly
`n_trials` of them. A trial whose worker died (killed, machine lost) is failed and queued again with the same
parameters and output dir; the retry resumes from that trial's latest checkpoint.

A study is one setup: its metric, search space, sampler and training flags are stored with it, and a worker
(or a resume) with other ones is refused, so that no study mixes two setups.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dept.checkpoint import ADAPTER_FILES, CHECKPOINT_PREFIX, write_text_atomically
from dept.extras import LazyModule
from dept.train_loss import NonFiniteLossError
from dept_tune.pipelines import Pipeline
from dept_tune.space import BUDGET_PARAMETERS, Budget, ParamSpec, budget_choices, grid_points, suggest

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

optuna = LazyModule("optuna", extra="tune")

logger = logging.getLogger("dept_tune")

NOT_SCORES = ("runtime", "samples", "samples_per_second", "steps_per_second")  # result-file bookkeeping
WORKER_ATTR, OUTPUT_ATTR, RETRY_ATTR = "worker", "output_dir", "retry_of"
PLAN_ATTR, FLAGS_ATTR = "planned_trials", "training_flags"
PRUNED_NAME = "pruned.json"  # a pruned trial's marker, next to the trainer_state.json of its evaluations
# Training flags that do not change what a trial computes, so a worker may set them its own way.
NOT_SETUP_FLAGS = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint", "do_train", "do_eval",
                   "report_to", "logging_steps", "dataloader_num_workers")


class StudyMismatchError(ValueError):
    """An existing study was started with another metric, search space, sampler or training flags than this
    command asks for."""


@dataclass
class StudySettings:
    """Everything a worker needs, fixed before the first trial (see `dept_tune.cli` for each flag)."""

    pipeline: Pipeline
    argv: list[str]  # the pipeline's flags, without the searched ones (with --metric as --metric_for_best_model)
    base: tuple  # those flags parsed: (model_args, data_args, method_args, training_args, ...)
    specs: dict[str, ParamSpec]
    metric: str  # without the eval_ prefix
    direction: str  # "maximize" or "minimize": the direction that also picks each trial's best checkpoint
    n_trials: int
    sampler: str
    keep_all: bool = False
    budget_pairs: list[tuple[int, int]] | None = None
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    @property
    def root(self) -> Path:
        return Path(self.base[3].output_dir)

    @property
    def task_label(self) -> str:
        return self.pipeline.task_label(self.base)


def make_settings(pipeline: Pipeline, argv: list[str], specs: dict[str, ParamSpec], *, metric: str | None,
                  n_trials: int | None, sampler: str, keep_all: bool) -> StudySettings:
    """Parse and check the pipeline's flags and the search space together: every error comes before training.

    The metric is `metric` (dept-tune's --metric), else the run's --metric_for_best_model (on the command line or
    in its recipe), else the task's main metric; its direction is the trainer's (`best_model_criterion`), so the
    study and each trial's best checkpoint agree.
    """
    if metric is not None and any(word.partition("=")[0] == "--metric_for_best_model" for word in argv):
        raise ValueError("--metric and --metric_for_best_model both name the metric: give only --metric.")
    metric_flags = [] if metric is None else ["--metric_for_best_model", metric.removeprefix("eval_")]
    base = pipeline.parse([*argv, "--do_train", "true", "--do_eval", "true", *metric_flags])
    # Every evaluator of the two pipelines maximises its main metric.
    name, greater_is_better = base[3].best_model_criterion(pipeline.main_metric(base), True)
    metric, direction = name.removeprefix("eval_"), "maximize" if greater_is_better else "minimize"
    budget_pairs = None
    budget_specs = [spec for name, spec in specs.items() if name in BUDGET_PARAMETERS]
    if budget_specs:
        method_args, data_args = base[2], base[1]
        budget = Budget(method_args.prefix_length, method_args.r, data_args.max_seq_length,
                        pipeline.hidden_size(base))
        budget_pairs = budget_choices(budget_specs[0], budget)
    if sampler == "grid":
        points = len(grid_points(specs))
        if n_trials is not None and n_trials != points:
            raise ValueError(f"--sampler grid runs every grid point once: {points} trials, but --n_trials is "
                             f"{n_trials}. Drop --n_trials, or change the grid.")
        n_trials = points
    n_trials = 20 if n_trials is None else n_trials
    if n_trials < 1:
        raise ValueError(f"--n_trials must be >= 1, got {n_trials}.")
    return StudySettings(pipeline, [*argv, *metric_flags], base, specs, metric, direction, n_trials, sampler, keep_all,
                         budget_pairs)


# ------------------------------------------------------------------------------------------- the study


def describe_space(settings: StudySettings) -> dict:
    """What the study searches, stored with it so that a resume with another space is refused."""
    return {name: {"low": s.low, "high": s.high, "choices": s.choices} for name, s in settings.specs.items()}


def training_flags(settings: StudySettings) -> dict:
    """Every training flag's value after the recipe is read, except the searched ones and `NOT_SETUP_FLAGS`: the
    setup every trial of the study shares, stored with it so that a resume with another setup is refused."""
    values = {}
    for arguments in settings.base:
        values.update(dataclasses.asdict(arguments))
    searched = set(settings.specs)
    kept = {name: value for name, value in values.items() if name not in searched and name not in NOT_SETUP_FLAGS}
    return json.loads(json.dumps(kept, sort_keys=True, default=str))


def create_or_load_study(settings: StudySettings, storage, study_name: str, sampler, pruner,
                         load_sampler=None) -> optuna.Study:
    """Create and plan the study (the first worker, with `sampler`), or load it (every later worker and a resume,
    with `load_sampler`, by default `sampler`)."""
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, direction=settings.direction,
                                    sampler=sampler, pruner=pruner)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=study_name, sampler=load_sampler or sampler,
                                  pruner=pruner)
        _check_same_study(study, settings)
        _extend_plan(study, settings)
        return study
    study.set_user_attr("metric", settings.metric)
    study.set_user_attr("search_space", describe_space(settings))
    study.set_user_attr("sampler", settings.sampler)
    study.set_user_attr(FLAGS_ATTR, training_flags(settings))
    points = grid_points(settings.specs) if settings.sampler == "grid" else [{}] * settings.n_trials
    for point in points:
        study.enqueue_trial(point, skip_if_exists=False)
    study.set_user_attr(PLAN_ATTR, len(points))  # last: other workers wait for it
    return study


def _check_same_study(study: optuna.Study, settings: StudySettings, wait_s: float = 60.0) -> None:
    deadline = time.monotonic() + wait_s
    while PLAN_ATTR not in study.user_attrs:  # its creator is still queueing the planned trials
        if time.monotonic() > deadline:
            raise StudyMismatchError(f"Study {study.study_name!r} exists but was never planned (its creator died "
                                     "while creating it): choose another --study_name.")
        time.sleep(0.2)
    attrs = study.user_attrs
    expected = json.loads(json.dumps(describe_space(settings)))
    for name, value, wanted in (("metric", attrs.get("metric"), settings.metric),
                                ("direction", study.direction.name.lower(), settings.direction),
                                ("search space", attrs.get("search_space"), expected),
                                ("sampler", attrs.get("sampler"), settings.sampler)):
        if value != wanted:
            raise StudyMismatchError(
                f"Study {study.study_name!r} was started with {name} {value}, but this command asks for {wanted}. "
                "Resume it with the same settings, or start a new study with another --study_name."
            )
    if FLAGS_ATTR not in attrs:  # made by a dept-tune that did not store them
        logger.warning("Study %r does not record its training flags: this worker cannot check that it trains "
                       "the same setup.", study.study_name)
        return
    started, now = attrs[FLAGS_ATTR], training_flags(settings)
    changed = [f"--{name} {_flag_value(started, name)} (now {_flag_value(now, name)})"
               for name in sorted(started.keys() | now.keys()) if started.get(name) != now.get(name)]
    if changed:
        raise StudyMismatchError(
            f"Study {study.study_name!r} was started with other training flags: {', '.join(changed)}. A study "
            "compares trials of one setup: resume it with the flags it was started with, or start a new study for "
            "the new setup with another --study_name (or another --output_dir, which holds the default journal)."
        )


def _flag_value(flags: dict, name: str) -> str:
    return "(unset)" if name not in flags else json.dumps(flags[name])


def _extend_plan(study: optuna.Study, settings: StudySettings) -> None:
    planned = study.user_attrs[PLAN_ATTR]
    if settings.n_trials > planned and settings.sampler != "grid":
        for _ in range(settings.n_trials - planned):
            study.enqueue_trial({}, skip_if_exists=False)
        study.set_user_attr(PLAN_ATTR, settings.n_trials)
        logger.info("Study %r: %d more trials planned (%d in all).", study.study_name,
                    settings.n_trials - planned, settings.n_trials)
    elif settings.n_trials < planned:
        logger.warning("Study %r plans %d trials; --n_trials %d does not remove any.", study.study_name, planned,
                       settings.n_trials)


def retry_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a failed trial again with its parameters and output dir, so that its run resumes."""
    user_attrs = {RETRY_ATTR: trial.number}
    if OUTPUT_ATTR in trial.user_attrs:
        user_attrs[OUTPUT_ATTR] = trial.user_attrs[OUTPUT_ATTR]
    study.enqueue_trial(trial.params, user_attrs=user_attrs, skip_if_exists=False)
    logger.warning("Trial %d's worker stopped before it finished: queued again with the same parameters.",
                   trial.number)


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def recover_dead_trials(study: optuna.Study, storage) -> int:
    """Fail and queue again the running trials of this machine whose worker process is gone; return how many.

    Trials of other machines are left to the RDB heartbeat (`optuna.storages.fail_stale_trials`).
    """
    host = socket.gethostname()
    recovered = 0
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker_host, _, pid = str(trial.user_attrs.get(WORKER_ATTR, "")).rpartition(":")
        if worker_host != host or not pid.isdigit() or _process_is_alive(int(pid)):
            continue
        try:
            if not storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        retry_trial(study, trial)
        recovered += 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # RDB heartbeats: trials of dead workers anywhere
    return recovered


def pop_planned_trial(study: optuna.Study, storage, worker: str) -> optuna.Trial | None:
    """The next queued trial, now running in this worker; None when the plan is used up.

    Unlike `Study.ask`, this never creates an unplanned trial when another worker took the last queued one.
    """
    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        try:
            if not storage.set_trial_state_values(frozen._trial_id, state=optuna.trial.TrialState.RUNNING):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        if heartbeat_interval(storage):  # at once: a worker that dies before its heartbeat thread starts is seen
            storage.record_heartbeat(frozen._trial_id)
        storage.set_trial_user_attr(frozen._trial_id, WORKER_ATTR, worker)
        return optuna.Trial(study, frozen._trial_id)
    return None


def heartbeat_interval(storage) -> int | None:
    """Seconds between a running trial's heartbeats; None for a storage without heartbeats (a journal file)."""
    return storage.get_heartbeat_interval() if isinstance(storage, optuna.storages.RDBStorage) else None


@contextmanager
def heartbeat(storage, trial_id: int):
    """Send the RDB heartbeat of a running trial from a thread, as `Study.optimize` does."""
    interval = heartbeat_interval(storage)
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            storage.record_heartbeat(trial_id)
            stop.wait(interval)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ------------------------------------------------------------------------------------------- one trial


def format_rate(value: float) -> str:
    """A learning rate as scripts/sweep.sh's run names spell it: 0.3 -> 3e-1, 0.0005 -> 5e-4, 0.00123 -> 1.23e-3."""
    mantissa, exponent = f"{value:.2e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def run_name(task: str, values: dict) -> str:
    """scripts/sweep.sh's (and the official README's) directory name of a run."""
    return (f"{task}_lr{format_rate(values['learning_rate'])}_loralr{format_rate(values['lora_embedding_lr'])}"
            f"_pl{values['prefix_length']}_r{values['r']}_st{values['max_steps']}")


def claim_output_dir(settings: StudySettings, trial: optuna.Trial, values: dict) -> Path:
    """The trial's own directory: its retry's, or a new one named as sweep.sh names runs (created atomically,
    so two workers never share one; a taken name gets `_trial<number>`)."""
    if OUTPUT_ATTR in trial.user_attrs:
        path = settings.root / trial.user_attrs[OUTPUT_ATTR]
        path.mkdir(parents=True, exist_ok=True)
        return path
    settings.root.mkdir(parents=True, exist_ok=True)
    path = settings.root / run_name(settings.task_label, values)
    try:
        path.mkdir()
    except FileExistsError:
        path = path.with_name(f"{path.name}_trial{trial.number}")
        path.mkdir(exist_ok=True)
    trial.set_user_attr(OUTPUT_ATTR, path.name)
    return path


def trial_values(settings: StudySettings, trial: optuna.Trial) -> dict:
    """The searched values of this trial, completed with the recipe's for what is not searched."""
    method_args, training_args = settings.base[2:4]
    values = {"learning_rate": training_args.learning_rate, "lora_embedding_lr": training_args.lora_embedding_lr,
              "prefix_length": method_args.prefix_length, "r": method_args.r,
              "max_steps": training_args.max_steps, "warmup_steps": training_args.warmup_steps}
    values.update(suggest(trial, settings.specs, settings.budget_pairs))
    return values


def scores(results: dict, prefix: str) -> dict[str, float]:
    return {key: value for key, value in results.items()
            if key.startswith(f"{prefix}_") and not key.removeprefix(f"{prefix}_").endswith(NOT_SCORES)}


def run_trial(settings: StudySettings, study: optuna.Study, trial: optuna.Trial) -> FrozenTrial:
    """Train one trial through the pipeline, report each evaluation to the pruner, and tell the study."""
    values = trial_values(settings, trial)
    output_dir = claim_output_dir(settings, trial, values)
    flags = [*settings.argv, "--do_train", "true", "--do_eval", "true", "--output_dir", str(output_dir),
             "--resume_from_checkpoint", "auto", "--overwrite_output_dir", "true"]
    for name, value in values.items():
        flags += [f"--{name}", str(value)]
    parsed = settings.pipeline.parse(flags)
    eval_key = f"eval_{settings.metric}"

    reported: dict[int, float] = {}

    def on_evaluate(step: int, metrics: dict[str, float]) -> None:
        trial.report(metrics[eval_key], step)
        reported[step] = metrics[eval_key]
        if trial.should_prune():
            write_pruned_marker(output_dir, trial.number, step, metrics, reported)
            raise optuna.TrialPruned(f"{eval_key}={metrics[eval_key]:.4g} at step {step}")

    logger.info("trial %d: %s -> %s", trial.number, _short(values, settings), output_dir)
    try:
        results = settings.pipeline.run(*parsed, on_evaluate=on_evaluate)
    except optuna.TrialPruned as pruned:
        logger.info("trial %d pruned: %s (its evaluations: %s)", trial.number, pruned, output_dir / PRUNED_NAME)
        return study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    except NonFiniteLossError as error:  # a learning rate too high for this run: a result, not a crash
        trial.set_user_attr("error", str(error).split(". ")[0])
        logger.warning("trial %d failed: %s", trial.number, error)
        return study.tell(trial, state=optuna.trial.TrialState.FAIL)
    except BaseException:  # interrupted or broken: queue it again so that a resumed study runs it
        frozen = study.tell(trial, state=optuna.trial.TrialState.FAIL)
        retry_trial(study, frozen)
        raise
    trial.set_user_attr("validation", scores(results, "eval"))
    trial.set_user_attr("test", scores(results, "test"))
    return study.tell(trial, results[eval_key])


def write_pruned_marker(output_dir: Path, trial_number: int, step: int, metrics: dict[str, float],
                        objective: dict[int, float]) -> None:
    """`pruned.json`: the trial was pruned at `step`, with that evaluation's metrics and the objective at each of
    its evaluations; the trainer leaves `trainer_state.json` beside it, its whole log up to the prune."""
    marker = {"trial": trial_number, "pruned_at_step": step, "metrics": metrics,
              "objective": {str(s): value for s, value in sorted(objective.items())}}
    write_text_atomically(output_dir / PRUNED_NAME, json.dumps(marker, indent=2) + "\n")


def _short(values: dict, settings: StudySettings) -> str:
    shown = [name for name in values if name in settings.specs or (name == "prefix_length" and "r" in settings.specs)
             or (name == "r" and "prefix_length" in settings.specs)]
    return ", ".join(f"{name}={values[name]:.4g}" if isinstance(values[name], float) else f"{name}={values[name]}"
                     for name in shown)


# ------------------------------------------------------------------------------------------- outputs


def counted_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's trials that count towards its plan: all but the failed ones that were queued again."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs[RETRY_ATTR] for t in trials if RETRY_ATTR in t.user_attrs}
    return [t for t in trials if not (t.state == optuna.trial.TrialState.FAIL and t.number in retried)]


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no complete trial yet
        return None


def tidy_outputs(study: optuna.Study, root: Path, keep_all: bool) -> None:
    """Drop what only a resume needs: the checkpoints of finished trials, and the adapters of every trial but the
    best one. With `keep_all`, nothing is deleted."""
    if keep_all:
        return
    best = best_trial(study)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)):
        if OUTPUT_ATTR not in trial.user_attrs:
            continue
        path = root / trial.user_attrs[OUTPUT_ATTR]
        if not path.is_dir():
            continue
        for checkpoint in path.glob(f"{CHECKPOINT_PREFIX}*"):
            shutil.rmtree(checkpoint, ignore_errors=True)
        if best is None or trial.number != best.number:
            for name in ADAPTER_FILES:
                (path / name).unlink(missing_ok=True)


def work(settings: StudySettings, study: optuna.Study, storage,
         on_trial_end: Callable[[FrozenTrial], None] | None = None) -> list[int]:
    """Run planned trials until none is left; return the numbers of the trials this worker finished."""
    finished = []
    while True:
        recover_dead_trials(study, storage)
        trial = pop_planned_trial(study, storage, settings.worker)
        if trial is None:
            break
        with heartbeat(storage, trial._trial_id):
            frozen = run_trial(settings, study, trial)
        finished.append(frozen.number)
        tidy_outputs(study, settings.root, settings.keep_all)
        if on_trial_end is not None:
            on_trial_end(frozen)
    return finished
