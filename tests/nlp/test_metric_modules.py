"""The text metrics as `evaluate` modules give the numbers of the functions they wrap (`dept_nlp.metrics.compute`),
through `compute`, `add_batch`, `add`, `evaluate.combine` and a real `evaluator` run, offline."""

from __future__ import annotations

import subprocess
import sys

import evaluate
import pytest
import torch
from datasets import Dataset, Value
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import BertForSequenceClassification

from dept_nlp import metric_modules, metrics
from dept_nlp.metric_modules import ONE_METRIC_MODULES
from dept_nlp.tasks import TASKS
from tests.conftest import REPO_ROOT, build_word_tokenizer, tiny_bert_config

# (task, predictions, references): hand-made, each with the edge case the task's rules decide.
CASES = [
    # An invalid prediction ("maybe") is wrong, not dropped; surrounding spaces are stripped.
    ("sst2", ["1", "0", "maybe", " 1 "], ["1", "1", "0", "1"]),
    # Binary F1: an invalid prediction becomes the class opposite to the reference.
    ("mrpc", ["1", "0", "x", "1"], ["1", "1", "1", "0"]),
    # CoLA: Matthews correlation on the raw strings, so "x" and "yes" are two extra classes.
    ("cola", ["1", "x", "0", "0", "yes", "1"], ["1", "1", "0", "0", "0", "1"]),
    # Macro F1 over the three classes; "bad" is a miss for class 2 and a hit for none.
    ("superglue-cb", ["0", "0", "0", "2", "bad"], ["0", "0", "1", "2", "2"]),
    ("superglue-multirc", ["1", "1", "0", "1"], ["1", "0", "1", "1"]),
    # STS-B: an unparsable score becomes -1.0.
    ("stsb", ["1", "2", "oops", "4.5"], ["1.0", "2.0", "3.0", "4.2"]),
    # Empty predictions (the model generated nothing) are invalid labels, hence wrong.
    ("rte", ["", "0", "", "1"], ["0", "0", "1", "1"]),
    # MRQA: the first answer (em, f1) and the best over all answers; an empty answer scores F1 0.
    ("nq", ["the cat sat", " Paris ", "", "blue"], [["A cat sat down", "dog"], ["London", "paris"], ["the"],
                                                    ["Blue.", "navy"]]),
]


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "evaluate")


@pytest.mark.parametrize(("task", "predictions", "references"), CASES, ids=[case[0] for case in CASES])
def test_a_task_module_gives_the_numbers_of_compute_in_one_call_in_batches_and_example_by_example(
        task, predictions, references, cache_dir):
    expected = metrics.compute(task, predictions, references)
    module = metric_modules.load(task, cache_dir=cache_dir)
    assert module.compute(predictions=predictions, references=references) == expected
    module.add_batch(predictions=predictions[:1], references=references[:1])  # uneven batches
    module.add_batch(predictions=predictions[1:], references=references[1:])
    assert module.compute() == expected
    for prediction, reference in zip(predictions, references):
        module.add(prediction=prediction, reference=reference)
    assert module.compute() == expected


def test_the_modules_keep_the_official_rules_by_hand(cache_dir):
    # Hand-checked as in test_metrics.py: the module path changes no number.
    assert metric_modules.load("sst2", cache_dir=cache_dir).compute(predictions=["1", "0", "maybe", "1"], references=["1", "1", "0", "1"]) == {
        "accuracy": 50.0}
    mrpc = metric_modules.load("mrpc", cache_dir=cache_dir).compute(predictions=["1", "0", "x", "1"], references=["1", "1", "1", "0"])
    assert mrpc == pytest.approx({"accuracy": 25.0, "f1": 40.0})
    # sklearn's MCC on the raw strings: (c*s - sum p*t) / sqrt((s^2 - sum p^2)(s^2 - sum t^2)) = 6 / sqrt(80).
    cola = metric_modules.load("cola", cache_dir=cache_dir).compute(predictions=["1", "x", "0", "0"], references=["1", "1", "0", "0"])
    assert cola == {"matthews_correlation": pytest.approx(100 * 6 / 80 ** 0.5)}
    assert metric_modules.load("mrqa", cache_dir=cache_dir).compute(predictions=["the cat sat", " Paris "],
                                                             references=[["A cat sat down", "dog"], ["London", "paris"]]) == pytest.approx(
        {"em": 0.0, "f1": 40.0, "em_max_over_answers": 50.0, "f1_max_over_answers": 90.0})


@pytest.mark.parametrize("task", ["nq", "hotpotqa", "searchqa", "newsqa"])
def test_the_mrqa_module_scores_every_mrqa_task_as_the_task_does(task, cache_dir):
    _, predictions, references = CASES[-1]
    expected = metrics.compute(task, predictions, references)
    assert metric_modules.load("mrqa", cache_dir=cache_dir).compute(predictions=predictions, references=references) == expected
    assert metric_modules.load(task, cache_dir=cache_dir).compute(predictions=predictions, references=references) == expected


@pytest.fixture(scope="module")
def module_cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("evaluate"))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["cola", "mrpc", "superglue-cb"]), st.data())
def test_a_task_module_equals_compute_for_any_predictions_and_any_batching(module_cache_dir, task, data):
    labels = metrics.valid_labels(task)
    size = data.draw(st.integers(1, 12))
    references = data.draw(st.lists(st.sampled_from(labels), min_size=size, max_size=size))
    predictions = data.draw(st.lists(st.sampled_from([*labels, "", " 1", "x", "yes"]), min_size=size, max_size=size))
    cuts = sorted(data.draw(st.lists(st.integers(0, size), max_size=3)))
    module = metric_modules.load(task, keep_in_memory=True, cache_dir=module_cache_dir)  # in memory: no files between examples
    for start, end in zip([0, *cuts], [*cuts, size]):
        module.add_batch(predictions=predictions[start:end], references=references[start:end])
    assert module.compute() == metrics.compute(task, predictions, references)


@pytest.mark.parametrize(("task", "predictions", "references"), CASES, ids=[case[0] for case in CASES])
def test_combining_the_one_metric_modules_rebuilds_the_task_metrics(task, predictions, references, cache_dir):
    own = metrics.compute(task, predictions, references)
    names = [name for name in own if name in ONE_METRIC_MODULES]
    combined = evaluate.combine([metric_modules.load(name, task=task, cache_dir=cache_dir) for name in names])
    assert combined.compute(predictions=predictions, references=references) == {name: own[name] for name in names}


def test_combine_adds_a_metric_the_task_does_not_report_under_its_rules(cache_dir):
    predictions, references = ["1", "x", "0", "0", "1"], ["1", "1", "0", "0", "0"]
    combined = evaluate.combine([metric_modules.load("cola", cache_dir=cache_dir),
                                 metric_modules.load("accuracy", task="cola", cache_dir=cache_dir)])
    combined.add_batch(predictions=predictions[:2], references=references[:2])
    combined.add_batch(predictions=predictions[2:], references=references[2:])
    scores = combined.compute()
    assert scores == metrics.compute("cola", predictions, references, metric_names=["matthews_correlation", "accuracy"])
    assert scores["accuracy"] == 60.0  # "x" is wrong


def test_every_task_and_each_of_its_metrics_is_an_evaluate_metric_with_features_and_citation(cache_dir):
    for task in TASKS:
        one_metric = [name for name in metrics.available_metrics(task) if name in ONE_METRIC_MODULES]
        modules = [metric_modules.load(task, cache_dir=cache_dir)]
        modules += [metric_modules.load(name, task=task, cache_dir=cache_dir) for name in one_metric]
        for module in modules:
            assert isinstance(module, evaluate.Metric)
            assert set(module.features) == {"predictions", "references"}
            assert "DePT" in module.citation and task in module.description
            one_answer = isinstance(module.features["references"], Value)
            assert one_answer != TASKS[task].is_extractive_qa  # MRQA: each example's list of answers


def test_load_refuses_what_it_cannot_score_and_names_the_fix():
    with pytest.raises(ValueError, match="name the task, e.g. load"):
        metric_modules.load("accuracy")
    with pytest.raises(ValueError, match=r"superglue-cb cannot be scored with \['f1'\]; pick from"):
        metric_modules.load("f1", task="superglue-cb")  # binary F1 of a three-class task
    with pytest.raises(ValueError, match="mrpc cannot be scored with"):
        metric_modules.load("pearson", task="mrpc")
    with pytest.raises(ValueError, match="No text metric 'bleu'"):
        metric_modules.load("bleu")
    with pytest.raises(ValueError, match="Unknown task 'sst'. Did you mean 'sst2'"):
        metric_modules.load("accuracy", task="sst")


def test_module_errors_are_those_of_the_functions(cache_dir):
    with pytest.raises(ValueError, match="No predictions to score"):
        metric_modules.load("sst2", cache_dir=cache_dir).compute(predictions=[], references=[])
    with pytest.raises(ValueError, match="No predictions to score"):
        metric_modules.load("mrqa", cache_dir=cache_dir).compute(predictions=[], references=[])
    with pytest.raises(ValueError, match="unlabeled"):
        metric_modules.load("sst2", cache_dir=cache_dir).compute(predictions=["1"], references=[""])
    with pytest.raises(ValueError, match="no reference answers"):
        metric_modules.load("mrqa", cache_dir=cache_dir).compute(predictions=["a"], references=[[]])
    with pytest.raises(ValueError, match=r"Mismatch in the number of predictions \(2\) and references \(1\)"):
        metric_modules.load("sst2", cache_dir=cache_dir).compute(predictions=["1", "0"], references=["1"])


def test_the_modules_load_and_score_with_the_network_cut(network_cut, cache_dir):
    combined = evaluate.combine([metric_modules.load("mrpc", cache_dir=cache_dir),
                                 metric_modules.load("matthews_correlation", task="mrpc", cache_dir=cache_dir)])
    assert combined.compute(predictions=["1", "0"], references=["1", "0"]) == {
        "accuracy": 100.0, "f1": 100.0, "matthews_correlation": 100.0}
    assert metric_modules.load("mrqa", cache_dir=cache_dir).compute(predictions=["x"], references=[["x"]])["f1"] == 100.0


def test_importing_the_metric_functions_does_not_import_evaluate():
    # `evaluate` takes seconds to import; the CLIs and the core (which imports no metric) never pay for it.
    code = "import sys, dept_nlp.metrics, dept_vl.metrics; sys.exit('evaluate' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT).returncode == 0


def _constant_classifier(label_words: list[str], predicted: str):
    """A tiny BERT classifier whose labels are `label_words` and which always predicts `predicted`."""
    tokenizer = build_word_tokenizer(["the movie was great", "a dull film", "good film", "bad movie"])
    model = BertForSequenceClassification(tiny_bert_config(
        len(tokenizer), num_labels=len(label_words), id2label=dict(enumerate(label_words)),
        label2id={word: index for index, word in enumerate(label_words)}))
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([float(word == predicted) for word in label_words]))
    return model.eval(), tokenizer


def test_the_text_classification_evaluator_scores_a_pipeline_with_a_task_module(cache_dir):
    model, tokenizer = _constant_classifier(["0", "1"], predicted="1")
    data = Dataset.from_dict({"text": ["the movie was great", "a dull film", "good film", "bad movie"],
                              "label": ["1", "0", "1", "1"]})
    task_evaluator = evaluate.evaluator("text-classification")
    results = task_evaluator.compute(model_or_pipeline=model, tokenizer=tokenizer, data=data, device=-1,
                                     metric=metric_modules.load("mrpc", cache_dir=cache_dir))
    # Every prediction is "1": accuracy 3/4; F1: TP 3, FP 1, FN 0 -> 2 * 0.75 / 1.75.
    assert results["accuracy"] == 75.0 and results["f1"] == pytest.approx(100 * 1.5 / 1.75)
    assert {key: results[key] for key in ("accuracy", "f1")} == metrics.compute("mrpc", ["1"] * 4, data["label"])
    combined = evaluate.combine([metric_modules.load("accuracy", task="mrpc", cache_dir=cache_dir),
                                 metric_modules.load("matthews_correlation", task="mrpc", cache_dir=cache_dir)])
    results = task_evaluator.compute(model_or_pipeline=model, tokenizer=tokenizer, data=data, device=-1,
                                     metric=combined)
    assert results["accuracy"] == 75.0 and results["matthews_correlation"] == 0.0  # constant predictions


def test_the_readme_metrics_example_gives_the_numbers_it_shows(monkeypatch, tmp_path):
    from dept_vl import metric_modules as vl_metrics
    from dept_vl.metrics import caption_scores

    monkeypatch.setattr(evaluate.config, "HF_METRICS_CACHE", tmp_path)  # evaluate's default cache, kept out of ~

    text_metrics = metric_modules
    # --- README code ("Metrics with evaluate"), the shown results asserted ---
    mrpc = text_metrics.load("mrpc")
    mrpc.add_batch(predictions=["1", "0"], references=["1", "1"])
    mrpc.add_batch(predictions=["yes"], references=["0"])
    assert mrpc.compute() == pytest.approx({"accuracy": 100 / 3, "f1": 50.0})
    cola = evaluate.combine([text_metrics.load("cola"), text_metrics.load("accuracy", task="cola")])
    # MCC on the raw strings: (c*s - sum p*t) / sqrt((s^2 - sum p^2)(s^2 - sum t^2)) = (6 - 3) / sqrt(6 * 4).
    assert cola.compute(predictions=["1", "x", "0"], references=["1", "1", "0"]) == pytest.approx(
        {"matthews_correlation": 100 * 3 / 24 ** 0.5, "accuracy": 200 / 3})
    captions = evaluate.combine([vl_metrics.load("bleu4"), vl_metrics.load("cider")])
    assert vl_metrics.load("vqa").compute(predictions=["Two."], references=[["2"] * 9 + ["3"]]) == {"accuracy": 100.0}
    # --- end ---
    predictions, references = ["a dog runs on the grass", "a red car"], [["a dog on grass", "dogs"], ["a red car"]]
    assert captions.compute(predictions=predictions, references=references) == caption_scores(
        predictions, references)
