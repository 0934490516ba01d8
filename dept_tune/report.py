"""The study's report: a table of trials, the best parameters with their validation and test metrics, and plots.

Written to the output dir as `tune_report.md`, `tune_report.json` and PNGs drawn with
`optuna.visualization.matplotlib`: `optimization_history.png`, `param_importances.png` and
`contour_learning_rate_lora_embedding_lr.png`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from dept.extras import LazyModule, require
from dept_tune.study import OUTPUT_ATTR, RETRY_ATTR, best_trial, counted_trials

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

optuna = LazyModule("optuna", extra="tune")

REPORT_NAME = "tune_report"
CONTOUR_PARAMS = ("learning_rate", "lora_embedding_lr")


def trial_rows(study: optuna.Study) -> list[dict]:
    """One row per trial of the plan (failed trials that were run again appear once, as their retry)."""
    rows = []
    for trial in counted_trials(study):
        steps = max(trial.intermediate_values) if trial.intermediate_values else None
        rows.append({
            "number": trial.number, "state": trial.state.name, "value": trial.value, "params": trial.params,
            "last_evaluated_step": steps, "output_dir": trial.user_attrs.get(OUTPUT_ATTR),
            "retry_of": trial.user_attrs.get(RETRY_ATTR),
            "seconds": (trial.datetime_complete - trial.datetime_start).total_seconds()
            if trial.datetime_complete and trial.datetime_start else None,
        })
    return rows


def summary(study: optuna.Study) -> dict:
    trials = counted_trials(study)
    counts = {state.name: sum(t.state == state for t in trials) for state in optuna.trial.TrialState}
    best = best_trial(study)
    return {
        "study_name": study.study_name, "metric": f"eval_{study.user_attrs.get('metric')}",
        "direction": study.direction.name.lower(), "planned_trials": study.user_attrs.get("planned_trials"),
        "counts": {name: n for name, n in counts.items() if n}, "trials": trial_rows(study),
        "best": None if best is None else {
            "number": best.number, "value": best.value, "params": best.params,
            "validation": best.user_attrs.get("validation", {}), "test": best.user_attrs.get("test", {}),
            "output_dir": best.user_attrs.get(OUTPUT_ATTR),
        },
    }


def markdown(report: dict) -> str:
    names = sorted({name for row in report["trials"] for name in row["params"]})
    counts = ", ".join(f"{n} {state.lower()}" for state, n in report["counts"].items())
    lines = [f"# Study {report['study_name']}", "",
             f"{report['planned_trials']} planned trials ({counts}); objective {report['metric']}, "
             f"{report['direction']}d.", ""]
    best = report["best"]
    if best is not None:
        lines += [f"## Best: trial {best['number']}, {report['metric']} = {best['value']:.4f}", "",
                  "| parameter | value |", "| --- | ---: |"]
        lines += [f"| {name} | {_number(value)} |" for name, value in best["params"].items()]
        lines += ["", "| split | metrics |", "| --- | --- |",
                  f"| validation | {_metrics(best['validation'])} |", f"| test | {_metrics(best['test'])} |", "",
                  f"Adapter: `{best['output_dir']}`", ""]
    lines += ["## Trials", "", "| trial | state | value | " + " | ".join(names) + " | last eval step | seconds | dir |",
              "| ---: | --- | ---: | " + " | ".join("---:" for _ in names) + " | ---: | ---: | --- |"]
    for row in report["trials"]:
        cells = [str(row["number"]), row["state"].lower(), _number(row["value"]),
                 *(_number(row["params"].get(name)) for name in names), _number(row["last_evaluated_step"]),
                 _number(row["seconds"]), row["output_dir"] or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _number(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _metrics(metrics: dict) -> str:
    return ", ".join(f"{name} {value:.2f}" for name, value in sorted(metrics.items())) or "-"


def draw_plots(study: optuna.Study, output_dir: Path) -> dict[str, str]:
    """PNG plots, by name -> file name, or -> why it was not drawn (too few finished trials, ...)."""
    matplotlib = require("matplotlib", extra="tune")
    matplotlib.use("Agg")  # files only, no display
    plt = require("matplotlib.pyplot", extra="tune")
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    searched = sorted({name for trial in complete for name in trial.distributions})
    plot, target = optuna.visualization.matplotlib, f"eval_{study.user_attrs.get('metric')}"
    plots = {
        "optimization_history": (lambda: plot.plot_optimization_history(study, target_name=target), 1),
        "param_importances": (lambda: plot.plot_param_importances(study, target_name=target), 2),
    }
    if set(CONTOUR_PARAMS) <= set(searched):
        plots["contour_" + "_".join(CONTOUR_PARAMS)] = (
            lambda: plot.plot_contour(study, params=list(CONTOUR_PARAMS), target_name=target), 2)
    drawn = {}
    for name, (draw, needed) in plots.items():
        if len(complete) < needed:
            drawn[name] = f"not drawn: needs {needed} complete trials, the study has {len(complete)}"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
                axes = draw()
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.savefig(output_dir / f"{name}.png", dpi=120, bbox_inches="tight")
            plt.close(figure)
            drawn[name] = f"{name}.png"
        except (ValueError, RuntimeError) as error:  # e.g. importances of a parameter that never varied
            drawn[name] = f"not drawn: {error}"
    return drawn


def write_report(study: optuna.Study, output_dir: str | Path) -> dict:
    """Write tune_report.md / .json and the plots into `output_dir`; return the report."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = summary(study)
    report["plots"] = draw_plots(study, output_dir)
    text = markdown(report) + "\n## Plots\n\n" + "".join(
        f"- {name}: {file if file.startswith('not drawn') else f'![{name}]({file})'}\n"
        for name, file in report["plots"].items())
    (output_dir / f"{REPORT_NAME}.md").write_text(text)
    (output_dir / f"{REPORT_NAME}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def progress_line(study: optuna.Study, trial: FrozenTrial) -> str:
    """One line for the terminal after each trial: its outcome, the study's progress and the best so far."""
    report = summary(study)
    done = sum(n for state, n in report["counts"].items() if state in ("COMPLETE", "PRUNED", "FAIL"))
    value = "" if trial.value is None else f" {report['metric']}={trial.value:.4g}"
    best = report["best"]
    best_text = "no complete trial yet" if best is None else f"best trial {best['number']} ({best['value']:.4g})"
    return (f"[dept-tune] trial {trial.number} {trial.state.name.lower()}{value} | {done}/{report['planned_trials']} "
            f"done | {best_text}")
