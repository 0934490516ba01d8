"""Metrics against hand-computed values, with invalid predictions counted as wrong."""

from __future__ import annotations

import math

import pytest

from dept_nlp.metrics import (
    available_metrics,
    compute,
    is_valid_prediction,
    normalize_answer,
    token_f1,
    valid_labels,
)
from dept_nlp.tasks import TASKS


def test_accuracy_counts_an_invalid_prediction_as_wrong_not_dropped():
    # 2 of 4 right; dropping the invalid "maybe" would give 2 of 3.
    assert compute("sst2", ["1", "0", "maybe", "1"], ["1", "1", "0", "1"]) == {"accuracy": 50.0}


def test_binary_f1_maps_an_invalid_prediction_to_the_wrong_class():
    # "x" (gold 1) becomes 0: TP=1 (row 0), FP=1 (row 3), FN=2 (rows 1, 2).
    # precision 1/2, recall 1/3, F1 = 2 * (1/6) / (5/6) = 0.4. Accuracy 1/4.
    scores = compute("mrpc", ["1", "0", "x", "1"], ["1", "1", "1", "0"])
    assert scores == pytest.approx({"accuracy": 25.0, "f1": 40.0})
    # "x" (gold 0) becomes 1: a false positive. TP=1, FP=1, FN=0 -> F1 = 2/3.
    assert compute("qqp", ["1", "x"], ["1", "0"])["f1"] == pytest.approx(200 / 3)


def test_matthews_correlation_by_hand():
    scores = compute("cola", ["1", "1", "0", "0", "0"], ["1", "0", "0", "0", "1"])
    # TP=1, FP=1, TN=2, FN=1: (1*2 - 1*1) / sqrt(2 * 2 * 3 * 3) = 1/6.
    assert scores == {"matthews_correlation": pytest.approx(100 / 6)}


def test_matthews_correlation_counts_an_invalid_prediction_as_its_own_class_as_the_official_code():
    # sklearn's multiclass MCC on the raw strings (official src/metrics.py): with c = 3 correct of s = 4,
    # true counts t = {0: 2, 1: 2}, predicted counts p = {0: 2, 1: 1, x: 1}:
    # (c*s - sum p*t) / sqrt((s^2 - sum p^2) * (s^2 - sum t^2)) = (12 - 6) / sqrt(10 * 8) = 6 / sqrt(80).
    scores = compute("cola", ["1", "x", "0", "0"], ["1", "1", "0", "0"])
    assert scores == {"matthews_correlation": pytest.approx(100 * 6 / math.sqrt(80))}
    # Flipping "x" to the wrong label ("0") would give (12 - 8) / sqrt(6 * 8) instead.
    assert scores["matthews_correlation"] != pytest.approx(100 * 4 / math.sqrt(48))


def test_cb_macro_f1_and_accuracy_by_hand():
    # class 0: TP=2 FP=1 FN=0 -> F1 0.8; class 1: TP=0 FN=1 -> 0; class 2: TP=1 FN=1 ("bad") -> 2/3.
    scores = compute("superglue-cb", ["0", "0", "0", "2", "bad"], ["0", "0", "1", "2", "2"])
    assert scores == pytest.approx({"f1_multiclass": 100 * (0.8 + 0 + 2 / 3) / 3, "accuracy": 60.0})
    assert list(scores) == ["f1_multiclass", "accuracy"]


def test_multirc_reports_f1_over_all_answers():
    # TP=2 (rows 0, 3), FP=1 (row 1), FN=1 (row 2) -> F1 = 4 / (4 + 1 + 1).
    assert compute("superglue-multirc", ["1", "1", "0", "1"], ["1", "0", "1", "1"]) == {"f1": pytest.approx(200 / 3)}


def test_stsb_unparsable_prediction_becomes_minus_one():
    # predictions become [1, 2, -1]. Pearson: sum(dx*dy) = -2, sum(dx^2) = 2, sum(dy^2) = 14/3 -> -2/sqrt(28/3).
    # Spearman: ranks [1, 2, 3] vs [2, 3, 1] -> -0.5.
    scores = compute("stsb", ["1", "2", "oops"], ["1.0", "2.0", "3.0"])
    assert scores == pytest.approx({"pearson": -200 / math.sqrt(28 / 3), "spearmanr": -50.0})


def test_stsb_perfect_and_constant_predictions():
    assert compute("stsb", ["0.4", "2.2", "5.0"], ["0.4", "2.2", "5.0"]) == pytest.approx(
        {"pearson": 100.0, "spearmanr": 100.0}
    )
    # Constant predictions have no correlation; the official code scores that 0.
    assert compute("stsb", ["3.0", "3.0", "3.0"], ["1.0", "2.0", "4.0"]) == {"pearson": 0.0, "spearmanr": 0.0}


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The  Eiffel-Tower!", "eiffeltower"),
        ("An apple a day", "apple day"),
        ("theatre, an anthem", "theatre anthem"),  # articles only as whole words
        ("Café  “quoted”", "café “quoted”"),  # only ASCII punctuation is removed, as in SQuAD v1.1
        ("  ", ""),
    ],
)
def test_squad_normalisation(text, normalized):
    assert normalize_answer(text) == normalized


def test_squad_em_and_f1_score_the_first_answer_and_report_the_best_apart():
    # Example 1: "cat sat" vs the first answer "cat sat down": EM 0, P = 2/2, R = 2/3, F1 = 0.8.
    # Example 2: "Paris" vs the first answer "London": 0; vs the second, "paris": EM 1, F1 1.
    scores = compute("nq", ["the cat sat", " Paris "], [["A cat sat down", "dog"], ["London", "paris"]])
    assert scores == pytest.approx({"em": 0.0, "f1": 40.0, "em_max_over_answers": 50.0,
                                    "f1_max_over_answers": 90.0})


def test_squad_f1_of_two_empty_answers_is_zero_but_they_match_exactly():
    # SQuAD v1.1 semantics: no shared token gives F1 0, while "" == "" is an exact match.
    assert token_f1("", "the") == 0.0
    assert compute("hotpotqa", [""], [["the"]]) == {"em": 100.0, "f1": 0.0, "em_max_over_answers": 100.0,
                                                    "f1_max_over_answers": 0.0}


def test_squad_accepts_a_single_answer_string_as_reference():
    assert compute("newsqa", ["blue"], ["Blue."]) == dict.fromkeys(
        ("em", "f1", "em_max_over_answers", "f1_max_over_answers"), 100.0)


def test_valid_labels_and_is_valid_prediction():
    assert valid_labels("superglue-cb") == ["0", "1", "2"]
    assert valid_labels("stsb") is None and valid_labels("nq") is None
    assert is_valid_prediction("rte", " 1 ") and not is_valid_prediction("rte", "yes")
    assert is_valid_prediction("stsb", "3.4") and not is_valid_prediction("stsb", "three")
    assert is_valid_prediction("searchqa", "anything at all")


@pytest.mark.parametrize("task_name", sorted(TASKS))
def test_every_task_scores_a_perfect_prediction_at_100(task_name):
    task = TASKS[task_name]
    if task.is_extractive_qa:
        predictions, references = ["an answer", "other"], [["an answer"], ["other", "x"]]
    elif task.is_regression:
        predictions = references = ["1.0", "2.5", "4.0"]
    else:
        predictions = references = list(task.label_words) * 2
    scores = compute(task_name, predictions, references)
    extra = ["em_max_over_answers", "f1_max_over_answers"] if task.is_extractive_qa else []
    assert list(scores) == [*task.metric_names, *extra]
    assert scores == pytest.approx(dict.fromkeys(scores, 100.0))


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute("sst2", ["1", "0"], ["1"])
    with pytest.raises(ValueError, match="No predictions"):
        compute("sst2", [], [])
    with pytest.raises(ValueError, match="unlabeled"):
        compute("sst2", ["1"], [""])
    with pytest.raises(TypeError, match="decoded strings"):
        compute("sst2", [1], ["1"])
    with pytest.raises(ValueError, match="no reference answers"):
        compute("nq", ["a"], [[]])


def test_metric_names_score_a_task_with_other_metrics_under_its_rules_in_the_order_asked():
    # CoLA's accuracy: "x" is wrong (2 of 4 right); its Matthews correlation is the one compute reports by default.
    predictions, references = ["1", "x", "0", "1"], ["1", "1", "0", "0"]
    scores = compute("cola", predictions, references, metric_names=["accuracy", "matthews_correlation"])
    assert list(scores) == ["accuracy", "matthews_correlation"] and scores["accuracy"] == 50.0
    assert scores["matthews_correlation"] == compute("cola", predictions, references)["matthews_correlation"]
    # mrpc's macro F1: "x" (gold 1) is a miss for class 1 and a hit for none. Class 0: TP 1, FN 1 -> 2/3;
    # class 1: TP 1, FP 1, FN 1 -> 1/2.
    assert compute("mrpc", predictions, references, metric_names=["f1_multiclass"]) == {
        "f1_multiclass": pytest.approx(100 * (2 / 3 + 1 / 2) / 2)}
    assert compute("stsb", ["1", "2", "3"], ["1.0", "2.0", "4.0"], metric_names=["spearmanr"]) == {"spearmanr": 100.0}
    assert compute("nq", ["Paris"], [["London", "paris"]], metric_names=["f1_max_over_answers", "em"]) == {
        "f1_max_over_answers": 100.0, "em": 0.0}


def test_available_metrics_follow_the_targets_and_exclude_what_cannot_be_computed():
    assert available_metrics("mrpc") == ("accuracy", "f1", "f1_multiclass", "matthews_correlation")
    assert available_metrics("superglue-cb") == ("accuracy", "f1_multiclass", "matthews_correlation")  # 3 classes
    assert available_metrics("stsb") == ("pearson", "spearmanr")
    assert available_metrics("nq") == ("em", "f1", "em_max_over_answers", "f1_max_over_answers")
    for task in TASKS.values():
        assert set(task.metric_names) <= set(available_metrics(task.name))
    with pytest.raises(ValueError, match=r"superglue-cb cannot be scored with \['f1'\]; pick from"):
        compute("superglue-cb", ["0"], ["0"], metric_names=["f1"])
    with pytest.raises(ValueError, match="stsb cannot be scored with"):
        compute("stsb", ["1.0"], ["1.0"], metric_names=[])
