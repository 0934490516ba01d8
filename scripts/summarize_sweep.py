"""Print a markdown table of the best run of each task in a sweep directory written by `scripts/sweep.sh`.

Each run is a subdirectory named as the official DePT runs, `<task>_lr<lr>_loralr<lora_lr>_pl<m>_r<r>_st<steps>`,
holding the trainer's `eval_results.json` (keys `eval_<metric>`) and, once it predicted, `test_results.json`
(keys `test_<metric>`). The best run of a task has the highest validation score on the task's main metric
(`dept_nlp.tasks.get_task(task).main_metric`; all of them are higher-is-better); its test scores are reported
next to it, so the test split never chooses the run.

    python scripts/summarize_sweep.py saved_t5-base
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dept_nlp.tasks import get_task

RUN_NAME = re.compile(r"^(?P<task>.+)_lr(?P<lr>[^_]+)_loralr(?P<lora_lr>[^_]+)_pl(?P<m>\d+)_r(?P<r>\d+)_st(?P<steps>\d+)")
# Bookkeeping keys of the result files, not scores.
NOT_SCORES = ("loss", "runtime", "samples_per_second", "steps_per_second", "epoch", "step")


@dataclass
class Run:
    """One finished (or at least evaluated) run of the sweep."""

    path: Path
    task: str
    eval_results: dict[str, float]
    test_results: dict[str, float] = field(default_factory=dict)

    @property
    def main_metric(self) -> str:
        return get_task(self.task).main_metric

    @property
    def validation_score(self) -> float:
        return self.eval_results[f"eval_{self.main_metric}"]


def find_runs(root: Path) -> tuple[list[Run], list[str]]:
    """The evaluated runs under `root`, and a note for each subdirectory that could not be used."""
    runs, skipped = [], []
    for path in sorted(p for p in root.iterdir() if p.is_dir()):
        match = RUN_NAME.match(path.name)
        if match is None:
            skipped.append(f"{path.name}: not named <task>_lr<lr>_loralr<lora_lr>_pl<m>_r<r>_st<steps>")
            continue
        task = match["task"]
        try:
            main_metric = get_task(task).main_metric
        except ValueError as error:
            skipped.append(f"{path.name}: {error}")
            continue
        eval_file = path / "eval_results.json"
        if not eval_file.is_file():
            skipped.append(f"{path.name}: no eval_results.json yet")
            continue
        eval_results = json.loads(eval_file.read_text())
        if f"eval_{main_metric}" not in eval_results:
            skipped.append(f"{path.name}: eval_results.json has no eval_{main_metric}")
            continue
        test_file = path / "test_results.json"
        test_results = json.loads(test_file.read_text()) if test_file.is_file() else {}
        runs.append(Run(path, task, eval_results, test_results))
    return runs, skipped


def best_runs(runs: list[Run]) -> dict[str, Run]:
    """Task -> its run with the highest validation main metric (the first by name on a tie)."""
    best: dict[str, Run] = {}
    for run in runs:
        if run.task not in best or run.validation_score > best[run.task].validation_score:
            best[run.task] = run
    return best


def test_scores(run: Run) -> str:
    """`name value` for every score in the run's test results, main metric first; "-" when it did not predict."""
    scores = {
        key.removeprefix("test_"): value
        for key, value in run.test_results.items()
        if key.startswith("test_") and not key.removeprefix("test_").endswith(NOT_SCORES)
    }
    if not scores:
        return "-"
    names = sorted(scores, key=lambda name: (name != run.main_metric, name))
    return ", ".join(f"{name} {scores[name]:.2f}" for name in names)


def markdown_table(runs: list[Run]) -> str:
    best = best_runs(runs)
    run_counts = {task: sum(run.task == task for run in runs) for task in best}
    lines = [
        "| task | runs | best run | main metric | validation | test |",
        "| --- | ---: | --- | --- | ---: | --- |",
    ]
    for task in sorted(best):
        run = best[task]
        lines.append(
            f"| {task} | {run_counts[task]} | {run.path.name} | {run.main_metric} | {run.validation_score:.2f} "
            f"| {test_scores(run)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="The sweep directory (sweep.sh's ROOT, e.g. saved_t5-base).")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"{args.root} is not a directory: pass the ROOT that scripts/sweep.sh wrote its runs to.")
    runs, skipped = find_runs(args.root)
    for note in skipped:
        print(f"skipped {note}", file=sys.stderr)
    if not runs:
        print(f"No evaluated runs under {args.root}.", file=sys.stderr)
        return 1
    print(markdown_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
