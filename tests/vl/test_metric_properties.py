"""Properties of the vision-language metrics that must hold for any input (hypothesis)."""

from __future__ import annotations

import evaluate
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dept_vl import metric_modules
from dept_vl.metrics import (
    accuracy,
    caption_scores,
    nlvr_consistency,
    normalize_vqa_answer,
    tokenize_caption,
    vqa_accuracy,
    vqa_score,
)

# Pieces that exercise every normalisation rule: punctuation, periods and commas near digits, number words,
# articles, contractions (with both apostrophes), and whitespace.
VQA_PIECES = list("abeilnorstwy019 .,;:/'\"()?!-_\n\t’") + ["two", "the", "a", "an", "none", "dont", "cant", "weve"]
vqa_text = st.one_of(st.lists(st.sampled_from(VQA_PIECES), max_size=12).map("".join), st.text(max_size=20))
vqa_answer = st.sampled_from(["yes", "no", "Yes.", "2", "two", "red", "the red", "dont", "don’t", "1,000"])
vqa_question = st.tuples(vqa_answer, st.lists(vqa_answer, min_size=1, max_size=10))

CAPTION_WORDS = ["a", "the", "dog", "cat", "runs", "on", "grass", "red", "car", "man's", "black-and-white", ",", "."]
caption = st.lists(st.sampled_from(CAPTION_WORDS), max_size=10).map(" ".join)
caption_example = st.tuples(caption, st.lists(caption, min_size=1, max_size=4))

label = st.sampled_from(["true", "false", "True ", "yes", "no"])
labelled_example = st.tuples(label, label, st.integers(0, 3))


@settings(max_examples=300, deadline=None)
@given(vqa_text)
def test_normalize_vqa_answer_is_idempotent(text):
    once = normalize_vqa_answer(text)
    assert normalize_vqa_answer(once) == once


@settings(max_examples=100, deadline=None)
@given(vqa_question)
def test_vqa_score_is_a_probability_that_grows_with_agreement(question):
    prediction, humans = question
    score = vqa_score(prediction, humans)
    assert 0.0 <= score <= 1.0
    assert vqa_score(prediction, [*humans, prediction]) >= score


@settings(max_examples=100, deadline=None)
@given(st.lists(vqa_question, min_size=1, max_size=8), st.randoms(use_true_random=False))
def test_vqa_accuracy_is_bounded_and_ignores_question_order(questions, rng):
    shuffled = list(questions)
    rng.shuffle(shuffled)
    score = vqa_accuracy([p for p, _ in questions], [h for _, h in questions])
    assert 0.0 <= score <= 100.0
    assert vqa_accuracy([p for p, _ in shuffled], [h for _, h in shuffled]) == pytest.approx(score, abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(st.lists(labelled_example, min_size=1, max_size=12), st.randoms(use_true_random=False))
def test_accuracy_and_consistency_are_bounded_order_free_and_agree_on_perfection(examples, rng):
    shuffled = list(examples)
    rng.shuffle(shuffled)
    predictions, references, groups = (list(column) for column in zip(*examples))
    acc = accuracy(predictions, references)
    consistency = nlvr_consistency(predictions, references, groups)
    assert 0.0 <= acc <= 100.0
    assert 0.0 <= consistency <= 100.0
    assert (acc == 100.0) == (consistency == 100.0)
    predictions, references, groups = (list(column) for column in zip(*shuffled))
    assert accuracy(predictions, references) == pytest.approx(acc, abs=1e-9)
    assert nlvr_consistency(predictions, references, groups) == pytest.approx(consistency, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.lists(caption_example, min_size=1, max_size=6), st.randoms(use_true_random=False))
def test_caption_scores_are_bounded_and_ignore_image_order(examples, rng):
    shuffled = list(examples)
    rng.shuffle(shuffled)
    scores = caption_scores([p for p, _ in examples], [r for _, r in examples])
    assert 0.0 <= scores["bleu4"] <= 100.0 + 1e-9
    assert 0.0 <= scores["cider"] <= 1000.0 + 1e-9  # CIDEr-D's factor 10, times 100
    shuffled_scores = caption_scores([p for p, _ in shuffled], [r for _, r in shuffled])
    assert shuffled_scores == pytest.approx(scores, rel=1e-9, abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(st.one_of(caption, st.text(max_size=30)))
def test_tokenizing_tokenized_text_changes_nothing(text):
    tokens = tokenize_caption(text)
    assert all(token and not any(character.isspace() for character in token) for token in tokens)
    assert tokenize_caption(" ".join(tokens)) == tokens


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("evaluate"))


def _add_in_batches(module, predictions, references, cuts):
    for start, end in zip([0, *cuts], [*cuts, len(predictions)]):
        module.add_batch(predictions=predictions[start:end], references=references[start:end])
    return module.compute()


@settings(max_examples=40, deadline=None)
@given(st.lists(vqa_question, min_size=1, max_size=8), st.data())
def test_the_vqa_module_equals_vqa_accuracy_for_any_questions_and_any_batching(cache_dir, questions, data):
    predictions, answers = [p for p, _ in questions], [h for _, h in questions]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(questions)), max_size=3)))
    module = metric_modules.load("vqa", keep_in_memory=True, cache_dir=cache_dir)  # in memory: no files between examples
    assert _add_in_batches(module, predictions, answers, cuts) == {"accuracy": vqa_accuracy(predictions, answers)}


@settings(max_examples=30, deadline=None)
@given(st.lists(caption_example, min_size=1, max_size=6), st.data())
def test_the_caption_modules_combined_equal_caption_scores_for_any_corpus_and_any_batching(cache_dir, examples, data):
    predictions, references = [p for p, _ in examples], [r for _, r in examples]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(examples)), max_size=3)))
    combined = evaluate.combine([metric_modules.load(name, keep_in_memory=True, cache_dir=cache_dir) for name in ("bleu4", "cider")])
    assert _add_in_batches(combined, predictions, references, cuts) == caption_scores(predictions, references)
