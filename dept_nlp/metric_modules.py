"""The text metrics as Hugging Face `evaluate` modules, built here: no hub fetch, no network.

    >>> from dept_nlp import metric_modules
    >>> mrpc = metric_modules.load("mrpc")  # the task's own metrics, as dept-eval reports them
    >>> mrpc.compute(predictions=["1", "0", "yes"], references=["1", "1", "0"])  # doctest: +ELLIPSIS
    {'accuracy': 33.33..., 'f1': 50.0}

Each module is an `evaluate.Metric`, so `add`, `add_batch`, `compute`, `evaluate.combine` and the `evaluator` API
work as with a module from the hub. Its `_compute` calls `dept_nlp.metrics`, where the math lives, so the numbers
are those of dept-eval and the trainer:

- a task name ("mrpc", "cola", "stsb", "nq", ...): the task's own metrics (`TaskSpec.metric_names`);
- one metric under a task's rules: "accuracy", "f1", "f1_multiclass", "matthews_correlation", "pearson",
  "spearmanr" with `task=` (e.g. CoLA's accuracy beside its Matthews correlation);
- "mrqa": SQuAD EM/F1 against the first answer (`em`, `f1`, the official DePT figures) and the best over all
  answers (`em_max_over_answers`, `f1_max_over_answers`).

Inputs are decoded strings, as the model generates them: label words ("0", "1", ...), STS-B scores ("3.8"), or
answers; MRQA references are each example's list of answers.
"""

from __future__ import annotations

import datasets
import evaluate

from dept_nlp import metrics
from dept_nlp.tasks import TASKS, get_task

_DEPT_CITATION = """\
@inproceedings{shi2024dept,
  title={DePT: Decomposed Prompt Tuning for Parameter-Efficient Fine-tuning},
  author={Shi, Zhengxiang and Lipani, Aldo},
  booktitle={International Conference on Learning Representations},
  year={2024}
}"""
_SQUAD_CITATION = """\
@inproceedings{rajpurkar2016squad,
  title={SQuAD: 100,000+ Questions for Machine Comprehension of Text},
  author={Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy},
  booktitle={EMNLP},
  year={2016}
}"""
_OFFICIAL_CODE = "https://github.com/ZhengxiangShi/DePT"

_CLASSIFICATION_INPUTS = """
Args:
    predictions (`list` of `str`): decoded outputs. One that is not a label word counts as wrong, never dropped.
    references (`list` of `str`): the gold label words ("0", "1", ...) or, for STS-B, scores ("3.8").
Returns:
    The chosen metrics, x100, under the official DePT code's key names.
"""
_MRQA_INPUTS = """
Args:
    predictions (`list` of `str`): the generated answers.
    references (`list` of `list` of `str`): each example's answers; the first is the one `em`/`f1` score against.
Returns:
    `em`, `f1` (the first answer, as the official DePT code) and `em_max_over_answers`, `f1_max_over_answers`
    (the best over all answers, the MRQA standard), x100.
"""


def _answers_features() -> datasets.Features:
    return datasets.Features({"predictions": datasets.Value("string"),
                              "references": datasets.Sequence(datasets.Value("string"))})


class TaskMetrics(evaluate.Metric):
    """A task's metrics, under its rules for invalid predictions; the config name is the task ("mrpc").

    `metric_names` None scores the task's own metrics; the one-metric modules below set it.
    """

    metric_names: tuple[str, ...] | None = None

    def _info(self) -> evaluate.MetricInfo:
        task = get_task(self.config_name)
        names = self.metric_names or task.metric_names
        metrics.check_metric_names(task.name, names)  # at load time, not at the first compute
        if task.is_extractive_qa:
            features, inputs = _answers_features(), _MRQA_INPUTS
        else:
            features = datasets.Features({"predictions": datasets.Value("string"),
                                          "references": datasets.Value("string")})
            inputs = _CLASSIFICATION_INPUTS
        return evaluate.MetricInfo(
            description=f"{', '.join(names)} of {task.name}, as the official DePT code scores it (dept_nlp.metrics).",
            citation=_DEPT_CITATION,
            inputs_description=inputs,
            features=features,
            codebase_urls=[_OFFICIAL_CODE],
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        return metrics.compute(self.config_name, predictions, references, metric_names=self.metric_names)


class Accuracy(TaskMetrics):
    metric_names = ("accuracy",)


class F1(TaskMetrics):
    """Binary F1 of a two-class task (an invalid prediction becomes the wrong class), or SQuAD F1 of MRQA."""

    metric_names = ("f1",)


class F1Multiclass(TaskMetrics):
    metric_names = ("f1_multiclass",)


class MatthewsCorrelation(TaskMetrics):
    """sklearn's Matthews correlation on the raw strings: each distinct invalid prediction is one more class."""

    metric_names = ("matthews_correlation",)


class Pearson(TaskMetrics):
    metric_names = ("pearson",)


class Spearmanr(TaskMetrics):
    metric_names = ("spearmanr",)


class Mrqa(evaluate.Metric):
    """SQuAD v1.1 EM and F1 of MRQA answers: against the first answer, and the best over all answers."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="SQuAD v1.1 exact match and token F1 with the official normalisation (dept_nlp.metrics).",
            citation=_SQUAD_CITATION + "\n" + _DEPT_CITATION,
            inputs_description=_MRQA_INPUTS,
            features=_answers_features(),
            codebase_urls=[_OFFICIAL_CODE],
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        return metrics.squad_em_f1(predictions, references)


ONE_METRIC_MODULES: dict[str, type[TaskMetrics]] = {
    "accuracy": Accuracy,
    "f1": F1,
    "f1_multiclass": F1Multiclass,
    "matthews_correlation": MatthewsCorrelation,
    "pearson": Pearson,
    "spearmanr": Spearmanr,
}


def load(name: str, task: str | None = None, **module_kwargs) -> evaluate.EvaluationModule:
    """One of these metrics as an `evaluate.EvaluationModule`, built locally: no hub fetch, works offline.

    Args:
        name: a task ("mrpc": the task's own metrics, as `compute` scores them), "mrqa" (SQuAD EM/F1 against the
            first answer and the best over all answers), or one metric ("accuracy", "f1", "f1_multiclass",
            "matthews_correlation", "pearson", "spearmanr") scored under the rules of `task`.
        task: the task whose label rules one metric follows.
        module_kwargs: `evaluate.EvaluationModule`'s own (`cache_dir`, `keep_in_memory`, `num_process`,
            `process_id`, `experiment_id`, ...).

    >>> load("accuracy", task="cola").compute(predictions=["1", "x"], references=["1", "0"])  # CoLA's accuracy
    {'accuracy': 50.0}
    """
    if name in TASKS:
        if task not in (None, name):
            raise ValueError(f"load({name!r}) is {name}'s own metrics; leave task out, or load one metric of "
                             f"{task}, e.g. load('accuracy', task={task!r}).")
        return TaskMetrics(config_name=name, **module_kwargs)
    if name == "mrqa":
        return Mrqa(**module_kwargs)
    if name in ONE_METRIC_MODULES:
        if task is None:
            raise ValueError(f"{name} scores predictions under a task's label rules; name the task, e.g. "
                             f"load({name!r}, task='mrpc').")
        return ONE_METRIC_MODULES[name](config_name=get_task(task).name, **module_kwargs)
    raise ValueError(f"No text metric {name!r}. Load a task ({', '.join(sorted(TASKS))}), 'mrqa', or one of "
                     f"{', '.join(ONE_METRIC_MODULES)} with task=.")
