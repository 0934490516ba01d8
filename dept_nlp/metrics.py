"""Task metrics on decoded text, offline (scikit-learn, scipy and the SQuAD v1.1 rules), all scaled x100.

    compute("mrpc", predictions=["1", "0", "yes"], references=["1", "1", "0"])
    # {"accuracy": 33.33..., "f1": 50.0}

Key names are the official code's: `accuracy`, `f1`, `matthews_correlation`, `pearson`, `spearmanr`,
`f1_multiclass`, `em`. Which task gets which metrics is `TaskSpec.metric_names` (`dept_nlp.tasks`).

The rules are the official DePT code's (`src/metrics.py`). Invalid predictions are never dropped:

- Classification: a prediction that is not a label word ("0", "1", ...) never equals the reference.
  - Binary F1 (mrpc, qqp, multirc): it becomes the class opposite to the reference (`f1_score_with_invalid`).
  - Matthews correlation (cola): sklearn on the raw strings, so each distinct invalid prediction is one more
    class (it is not flipped to the wrong label).
  - Macro F1 (superglue-cb): a miss for the reference's class and a hit for no class.
- STS-B: a prediction that does not parse as a float becomes -1.0 (the official `string_to_float` default).
  A correlation that is undefined (constant predictions) is 0, as in the official code.
- MRQA: `em` and `f1` (the main figures) score against the first answer only, as the official code does
  (its labels are the first answer, cut at 20 tokens: see `TextEvaluator`). `em_max_over_answers` and
  `f1_max_over_answers` take the best over all answers (the MRQA/SQuAD standard). Any text is a valid answer.

Predictions and references are stripped of surrounding whitespace first, as the official post-processor does.

`dept_nlp.metric_modules.load` gives each of these metrics as a Hugging Face `evaluate` module, built locally.
"""

from __future__ import annotations

import math
import re
import string
import warnings
from collections import Counter
from collections.abc import Sequence

import numpy as np

from dept_nlp.tasks import TaskSpec, get_task

MRQA_METRICS = ("em", "f1", "em_max_over_answers", "f1_max_over_answers")
REGRESSION_METRICS = ("pearson", "spearmanr")


def available_metrics(task_name: str) -> tuple[str, ...]:
    """Every metric `compute` can score a task with: its own (`TaskSpec.metric_names`) and the others its
    targets allow (binary F1 needs two classes; Pearson and Spearman need scores; EM/F1 need answers)."""
    task = get_task(task_name)
    if task.is_extractive_qa:
        return MRQA_METRICS
    if task.is_regression:
        return REGRESSION_METRICS
    binary_f1 = ("f1",) if task.num_labels == 2 else ()
    return ("accuracy", *binary_f1, "f1_multiclass", "matthews_correlation")


def check_metric_names(task_name: str, metric_names: Sequence[str]) -> None:
    """Raise a ValueError naming the choices unless `metric_names` is a non-empty subset of `available_metrics`."""
    available = available_metrics(task_name)
    if not metric_names or not set(metric_names) <= set(available):
        raise ValueError(f"{task_name} cannot be scored with {list(metric_names)}; pick from {list(available)}.")


def compute(
    task_name: str,
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    first_answers: Sequence[str] | None = None,
    metric_names: Sequence[str] | None = None,
) -> dict:
    """The task's metrics (`TaskSpec.metric_names`, plus the best-over-answers figures for MRQA), each x100, as
    Python floats.

    Args:
        predictions: decoded model outputs, one string per example.
        references: for classification/regression the gold target string of each example; for MRQA the list of
            valid answers of each example (a single string is taken as a one-answer list).
        first_answers: MRQA only: the answer the main `em`/`f1` score against, if not the first of `references`
            (the official code scores its decoded, truncated label).
        metric_names: score these instead, in this order; any of `available_metrics(task_name)`.
    """
    task = get_task(task_name)
    if metric_names is not None:
        check_metric_names(task_name, metric_names)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
    if len(predictions) == 0:
        raise ValueError("No predictions to score.")
    for prediction in predictions:
        if not isinstance(prediction, str):
            raise TypeError(f"Predictions must be decoded strings; got {prediction!r} ({type(prediction).__name__}).")
    predictions = [prediction.strip() for prediction in predictions]
    if task.is_extractive_qa:
        scores = squad_em_f1(predictions, references, first_answers=first_answers)
    else:
        references = [_gold_reference(task, reference) for reference in references]
        if task.is_regression:
            scores = _correlations(predictions, references)
        else:
            return _classification_metrics(task, predictions, references, metric_names or task.metric_names)
    return scores if metric_names is None else {name: scores[name] for name in metric_names}


def valid_labels(task_name: str) -> list[str] | None:
    """The label words a classification prediction must be ("0", "1", ...); None for regression and MRQA."""
    words = get_task(task_name).label_words
    return None if words is None else list(words)


def is_valid_prediction(task_name: str, prediction: str) -> bool:
    """Whether a decoded prediction is a label (classification), a number (STS-B) or any text (MRQA)."""
    task = get_task(task_name)
    prediction = prediction.strip()
    if task.is_regression:
        return not math.isnan(string_to_float(prediction, default=math.nan))
    if task.label_words is None:
        return True
    return prediction in task.label_words


def string_to_float(text: str, default: float = -1.0) -> float:
    """`float(text)`, or `default` when the text is not a number (the official STS-B rule)."""
    try:
        return float(text)
    except ValueError:
        return default


def _gold_reference(task: TaskSpec, reference: object) -> str:
    if not isinstance(reference, str):
        raise TypeError(f"{task.name}: references must be target strings; got {reference!r}.")
    reference = reference.strip()
    valid = is_valid_prediction(task.name, reference)
    if not valid:
        expected = "a number" if task.is_regression else f"one of {list(task.label_words)}"
        raise ValueError(
            f"{task.name}: reference {reference!r} is not a label; expected {expected}. "
            "An unlabeled (predict-only) split cannot be scored."
        )
    return reference


# ---------------------------------------------------------------------------------------------------------------
# Classification and regression


def _classification_metrics(
    task: TaskSpec, predictions: list[str], references: list[str], names: Sequence[str]
) -> dict[str, float]:
    from sklearn.metrics import f1_score, matthews_corrcoef  # here, not at the top: a second of start-up

    gold = np.array([int(reference) for reference in references])
    label_words = set(task.label_words)
    predicted = np.array([int(p) if p in label_words else -1 for p in predictions])  # -1: invalid
    # Binary metrics: an invalid prediction becomes the wrong class.
    predicted_or_wrong = np.where(predicted == -1, 1 - gold, predicted)
    scores = {
        "accuracy": lambda: (predicted == gold).mean(),
        "f1": lambda: f1_score(gold, predicted_or_wrong, zero_division=0.0),
        "matthews_correlation": lambda: matthews_corrcoef(references, predictions),  # raw strings, as official
        "f1_multiclass": lambda: f1_score(
            gold, predicted, labels=list(range(task.num_labels)), average="macro", zero_division=0.0
        ),
    }
    return {name: 100 * float(scores[name]()) for name in names}


def _correlations(predictions: list[str], references: list[str]) -> dict[str, float]:
    from scipy import stats  # here, not at the top: half a second of start-up

    predicted = np.array([string_to_float(prediction) for prediction in predictions])
    gold = np.array([float(reference) for reference in references])
    return {
        "pearson": _correlation(stats.pearsonr, gold, predicted),
        "spearmanr": _correlation(stats.spearmanr, gold, predicted),
    }


def _correlation(function, gold: np.ndarray, predicted: np.ndarray) -> float:
    if len(gold) < 2:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: the coefficient is NaN, scored 0 below
        value = float(function(gold, predicted)[0])
    return 0.0 if math.isnan(value) else 100 * value


# ---------------------------------------------------------------------------------------------------------------
# SQuAD v1.1 exact match and F1 (MRQA)

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """The official SQuAD v1.1 normalisation: lowercase, drop ASCII punctuation, drop a/an/the, squash spaces."""
    text = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(answer))


def token_f1(prediction: str, answer: str) -> float:
    """F1 of the bags of normalised tokens (SQuAD v1.1: 0 when they share no token, even if both are empty)."""
    predicted_tokens = normalize_answer(prediction).split()
    answer_tokens = normalize_answer(answer).split()
    overlap = sum((Counter(predicted_tokens) & Counter(answer_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(predicted_tokens)
    recall = overlap / len(answer_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_em_f1(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    first_answers: Sequence[str] | None = None,
) -> dict[str, float]:
    """SQuAD EM and F1 (x100): against the first answer (`em`, `f1`: the official DePT figures; `first_answers`
    replaces it when given) and the best over all answers (`em_max_over_answers`, `f1_max_over_answers`: the
    MRQA standard)."""
    if len(predictions) == 0:
        raise ValueError("No predictions to score.")
    if first_answers is not None and len(first_answers) != len(predictions):
        raise ValueError(f"{len(first_answers)} first answers for {len(predictions)} predictions.")
    totals = dict.fromkeys(MRQA_METRICS, 0.0)
    for index, (prediction, answers) in enumerate(zip(predictions, references, strict=True)):
        answers = [answers] if isinstance(answers, str) else list(answers)
        if not answers:
            raise ValueError("An example has no reference answers; an unlabeled split cannot be scored.")
        first = answers[0] if first_answers is None else first_answers[index]
        exact = [exact_match(prediction, answer) for answer in answers]
        f1 = [token_f1(prediction, answer) for answer in answers]
        totals["em"] += exact_match(prediction, first)
        totals["f1"] += token_f1(prediction, first)
        totals["em_max_over_answers"] += max(exact)
        totals["f1_max_over_answers"] += max(f1)
    return {name: 100 * total / len(predictions) for name, total in totals.items()}


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face `evaluate` modules
