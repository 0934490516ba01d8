"""The direction of the best-checkpoint metric follows the metric, wherever it is chosen: dept-tune's --metric,
dept-train's --metric_for_best_model on top of a recipe, and the Python TrainingArguments. A loss is minimised, a
task's metric maximised; an explicit direction that contradicts the metric is refused."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from dept.training_args import TrainingArguments
from dept_nlp.cli import main as dept_train
from dept_tune.cli import main, tune
from dept_tune.storage import open_storage
from tests.conftest import REPO_ROOT, TUNE_TASK

RECIPE = REPO_ROOT / "configs" / "nlp" / f"{TUNE_TASK}.yaml"  # metric_for_best_model: accuracy


def _eval_losses(run_dir: Path) -> dict[int, float]:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return {entry["step"]: entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry}


def _assert_lowest_loss_was_kept(run_dir: Path, kept_value: float) -> None:
    """The run's best checkpoint, and the adapter it kept (evaluated again at the end), have its lowest eval loss."""
    losses = _eval_losses(run_dir)
    assert len(losses) >= 3 and max(losses.values()) > min(losses.values()), losses  # a choice to get wrong
    best_step = min(losses, key=losses.get)
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert state["best_metric"] == min(losses.values())
    assert Path(state["best_model_checkpoint"]).name == f"checkpoint-{best_step}"
    assert kept_value == pytest.approx(min(losses.values()), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("metric_flag", ["--metric", "--metric_for_best_model"])
def test_dept_tune_loss_on_a_recipe_minimises_and_keeps_each_trials_lowest_loss_checkpoint(
        tiny_task, tmp_path, metric_flag):
    root = tmp_path / "study"
    report = tune(["--config", str(RECIPE), *tiny_task, "--output_dir", str(root), metric_flag, "loss",
                   "--n_trials", "2", "--pruner", "none", "--search", "learning_rate=1e-1:1"])
    study = optuna.load_study(study_name="study", storage=open_storage(str(root / "optuna_journal.log")))
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    assert (report["metric"], report["direction"]) == ("eval_loss", "minimize")
    trials = study.get_trials()
    assert len(trials) == 2 and all(t.state == TrialState.COMPLETE for t in trials)
    for trial in trials:  # each trial's value and kept adapter come from its lowest-loss evaluation
        _assert_lowest_loss_was_kept(root / trial.user_attrs["output_dir"], trial.value)
    assert study.best_value == min(t.value for t in trials)


@pytest.mark.slow
@pytest.mark.parametrize("recipe_direction", ["", "greater_is_better: true\n"], ids=["recipe", "recipe_maximising"])
def test_dept_train_metric_override_on_a_recipe_keeps_the_lowest_loss_checkpoint(tiny_task, tmp_path, capsys,
                                                                                 recipe_direction):
    # A recipe of the user's own may still say greater_is_better: true (ours did) for its metric; the command line
    # that picks another metric picks its direction too.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.read_text() + recipe_direction)
    output_dir = tmp_path / "run"
    status = dept_train(["--config", str(recipe), *tiny_task, "--output_dir", str(output_dir),
                         "--metric_for_best_model", "loss", "--learning_rate", "0.5", "--do_predict", "false"])
    assert status == 0, capsys.readouterr().err
    kept = json.loads((output_dir / "eval_results.json").read_text())["eval_loss"]
    _assert_lowest_loss_was_kept(output_dir, kept)


def test_the_direction_is_derived_from_the_metric(tmp_path):
    def criterion(main_metric="accuracy", **kwargs):
        return TrainingArguments(output_dir=str(tmp_path), **kwargs).best_model_criterion(main_metric, True)

    assert criterion() == ("eval_accuracy", True)  # the evaluator's main metric, its way
    assert criterion(None) == ("eval_loss", False)  # no evaluator: the loss
    assert criterion(metric_for_best_model="loss") == ("eval_loss", False)
    assert criterion(metric_for_best_model="eval_nll_loss") == ("eval_nll_loss", False)
    assert criterion(metric_for_best_model="f1") == ("eval_f1", True)
    assert criterion(metric_for_best_model="loss", greater_is_better=False) == ("eval_loss", False)
    # A metric of the user's own whose direction cannot be derived: the explicit direction is kept.
    assert criterion(metric_for_best_model="perplexity", greater_is_better=False) == ("eval_perplexity", False)


@pytest.mark.parametrize(("metric", "greater_is_better", "main_metric", "wanted"), [
    ("loss", True, "accuracy", "'loss' is minimised"),
    ("eval_loss", True, None, "'loss' is minimised"),
    ("accuracy", False, "accuracy", "'accuracy' is maximised"),
    (None, False, "accuracy", "'accuracy' is maximised"),
])
def test_a_direction_against_the_metric_is_refused_in_python(tmp_path, metric, greater_is_better, main_metric,
                                                              wanted):
    with pytest.raises(ValueError, match=wanted):
        TrainingArguments(output_dir=str(tmp_path), metric_for_best_model=metric,
                          greater_is_better=greater_is_better).best_model_criterion(main_metric, True)


def test_a_loss_maximised_is_refused_by_dept_train_and_dept_tune(tiny_task, tmp_path, capsys):
    flags = ["--config", str(RECIPE), *tiny_task, "--greater_is_better", "true"]
    assert dept_train([*flags, "--output_dir", str(tmp_path / "train"), "--metric_for_best_model", "loss"]) == 2
    error = capsys.readouterr().err
    assert "'loss' is minimised, but greater_is_better is true" in error and "Drop --greater_is_better" in error
    assert main([*flags, "--output_dir", str(tmp_path / "tune"), "--metric", "loss"]) == 2  # the console contract: one line, exit status 2
    assert "'loss' is minimised, but greater_is_better is true" in capsys.readouterr().err
    assert not (tmp_path / "train").exists() and not (tmp_path / "tune").exists()  # refused before any work
