"""`dept-tune`: search DePT's learning rates (and optionally (m, r) and the steps) with Optuna.

    dept-tune --config configs/nlp/rte.yaml --n_trials 20                       # TPE, journal file in output_dir
    dept-tune --config configs/nlp/rte.yaml --sampler grid                      # the seed's 3 x 2 grid
    dept-tune --config configs/vl/vqa.yaml --search learning_rate=1e-1:5e-1 --search r
    dept-tune --config configs/nlp/rte.yaml --storage postgresql://user:pw@db/optuna --study_name rte  # per machine

Every flag that is not dept-tune's own goes to the training CLI (`dept-train`, or `dept-train-vl` when the run
names VL `--tasks`), so a trial is exactly the run that CLI would make with the trial's values. Start the same
command again to resume a stopped study (with the same training flags: another setup is refused), or several
times to run trials in parallel: here, or on other machines sharing a database server's `--storage`.

`main` keeps the console contract of every dept CLI (`dept.command_line.console`): the study's report as JSON on
stdout, once; one line per trial and the logs on stderr; a bad flag, search space or storage is one line with
exit status 2, before anything trains.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dept.command_line import ArgumentParser, add_console_flags, run_console
from dept.errors import FlagError, UserError
from dept.extras import LazyModule
from dept_tune.pipelines import detect_pipeline
from dept_tune.report import progress_line, write_report
from dept_tune.space import KNOWN_PARAMETERS, SearchSpaceError, parse_search
from dept_tune.storage import StorageError, default_storage, find_study, open_storage
from dept_tune.study import (
    StudyMismatchError,
    StudySettings,
    create_or_load_study,
    make_settings,
    retry_trial,
    work,
)

logger = logging.getLogger("dept_tune")
optuna = LazyModule("optuna", extra="tune")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="dept-tune", allow_abbrev=False, description=__doc__.splitlines()[0],
        epilog="Any other flag (--config FILE.yaml, --task_name, --max_steps, ...) is handed to the training CLI.",
    )
    parser.add_argument("--n_trials", type=int, default=None,
                        help="Trials of the whole study, over all workers (default 20; the grid's size with "
                             "--sampler grid). A resume with a larger number plans the extra trials.")
    parser.add_argument("--sampler", choices=["tpe", "random", "grid"], default="tpe",
                        help="tpe (default), random, or grid: every point of the --search lists, by default the "
                             "seed's LORA_LR in {5e-3, 3e-1, 5e-4} x lr in {3e-1, 4e-1}.")
    parser.add_argument("--search", action="append", metavar="NAME[=LOW:HIGH|=V1,V2,...]",
                        help=f"A searched parameter, repeatable: one of {', '.join(KNOWN_PARAMETERS)}. Learning "
                             "rates are log-uniform (default: the two rates over the official runs' ranges, "
                             "lr 3e-1:4e-1 and lora_embedding_lr 1e-4:3e-1). r or prefix_length pick among the "
                             "(m, r) pairs with the recipe's parameter budget m*d + s*r + r*d.")
    parser.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median",
                        help="Stop bad trials early from their evaluations (every --eval_steps).")
    parser.add_argument("--n_startup_trials", type=int, default=5,
                        help="Median pruner: trials that run to the end before any is pruned.")
    parser.add_argument("--n_warmup_steps", type=int, default=0,
                        help="Median pruner: training steps before a trial can be pruned.")
    parser.add_argument("--metric", default=None,
                        help="Validation metric to optimise, e.g. accuracy or loss (default: the run's "
                             "--metric_for_best_model, else the task's main metric). A loss is minimised, a task's "
                             "metric maximised, in the study and in the pick of each trial's best checkpoint alike.")
    parser.add_argument("--storage", default=None,
                        help="A journal file (*.log) or a database URL: sqlite:///f.db (workers on one machine, "
                             "like the journal) or postgresql://... (workers on several machines). Default: "
                             "<output_dir>/optuna_journal.log.")
    parser.add_argument("--study_name", default=None, help="Default: the output dir's name.")
    parser.add_argument("--sampler_seed", type=int, default=0,
                        help="Seed of the sampler of the worker that creates the study (later workers draw "
                             "fresh seeds, so that they never propose the same values).")
    parser.add_argument("--keep_all", action="store_true",
                        help="Keep every trial's adapter and checkpoints; by default only the best trial's adapter "
                             "stays. Every finished trial keeps its result files; a pruned one its trainer_state.json "
                             "(its log up to the prune) and pruned.json (the evaluation that pruned it).")
    parser.add_argument("--heartbeat_interval", type=int, default=60,
                        help="Database storages (SQLite too): seconds between a running trial's heartbeats.")
    parser.add_argument("--grace_period", type=int, default=180,
                        help="Database storages (SQLite too): a trial without heartbeat for this long is failed and "
                             "run again.")
    parser.add_argument("--report_only", action="store_true",
                        help="Write the report of an existing study and stop; reads the study, changes nothing in it.")
    add_console_flags(parser, config_file=False)  # --config goes to the training CLI
    return parser


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    # The grid's points are queued as fixed trials, so its sampler is never asked for a value.
    return optuna.samplers.TPESampler(seed=seed) if name == "tpe" else optuna.samplers.RandomSampler(seed=seed)


def make_pruner(args: argparse.Namespace, settings: StudySettings) -> optuna.pruners.BasePruner:
    if args.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=args.n_startup_trials, n_warmup_steps=args.n_warmup_steps)
    if args.pruner == "hyperband":
        training_args = settings.base[3]
        steps = settings.specs.get("max_steps")
        max_steps = training_args.max_steps
        if steps is not None:
            max_steps = int(steps.high if steps.choices is None else max(steps.choices))
        if training_args.eval_strategy != "steps" or max_steps <= 0:
            raise FlagError("--pruner hyperband counts training steps: it needs --eval_strategy steps and "
                             "--max_steps > 0. Use --pruner median instead.")
        return optuna.pruners.HyperbandPruner(min_resource=training_args.eval_steps, max_resource=max_steps,
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(args: argparse.Namespace, settings: StudySettings):
    """The study and its storage: created or resumed, or with `--report_only` only read (a missing one is an
    error, and nothing is created)."""
    storage_url = args.storage or default_storage(settings.root)
    study_name = args.study_name or settings.root.resolve().name
    if args.report_only:
        return find_study(storage_url, study_name), None  # no worker runs on it
    settings.root.mkdir(parents=True, exist_ok=True)
    storage = open_storage(storage_url, args.heartbeat_interval, args.grace_period, on_stale_trial=retry_trial)
    pruner = make_pruner(args, settings)
    # The creator seeds its sampler; a later worker draws a fresh seed, or it would repeat the creator's values.
    study = create_or_load_study(settings, storage, study_name, make_sampler(args.sampler, args.sampler_seed),
                                 pruner, load_sampler=make_sampler(args.sampler, None))
    return study, storage


def tune(argv: list[str] | None = None) -> dict:
    """Run this worker's share of the study (or only `--report_only`); return the study's report. One line per
    trial goes to stderr; a bad command line raises `FlagError` before anything trains."""
    parser = build_parser()
    args, pipeline_argv = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # dept-tune prints one line per trial itself
    try:
        pipeline = detect_pipeline(pipeline_argv)
        specs = parse_search(args.search, args.sampler)
        settings = make_settings(pipeline, pipeline_argv, specs, metric=args.metric, n_trials=args.n_trials,
                                 sampler=args.sampler, keep_all=args.keep_all)
        study, storage = open_study(args, settings)
    except UserError:
        raise
    except (SearchSpaceError, StorageError, StudyMismatchError, ValueError) as error:
        raise FlagError(str(error)) from error
    if not args.report_only:
        finished = work(settings, study, storage, on_trial_end=lambda t: _say(progress_line(study, t)))
        logger.info("This worker (%s) finished %d trial(s): %s.", settings.worker, len(finished), finished)
    report = write_report(study, settings.root)
    best = report["best"]
    if best is not None:
        _say(f"[dept-tune] best trial {best['number']}: {report['metric']}={best['value']:.4g} {best['params']} "
             f"-> {Path(settings.root) / best['output_dir']}")
    _say(f"[dept-tune] report: {settings.root / 'tune_report.md'}")
    return report


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """`dept-tune`: the study's report as JSON on stdout, exit status 0; or one line on stderr and status 2."""
    return run_console("dept-tune", tune, argv, own_loggers=("dept_nlp", "dept_vl"))


if __name__ == "__main__":
    sys.exit(main())
