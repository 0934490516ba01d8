"""k-shot sampling: balanced, deterministic, and loud when it cannot be done."""

from __future__ import annotations

from collections import Counter

import datasets
import pytest

from dept_nlp.sampling import k_shot_sample


def _dataset(labels):
    return datasets.Dataset.from_dict({"source": [f"row {i}" for i in range(len(labels))], "label": labels})


def test_balanced_sample_has_equal_classes_even_when_the_data_is_skewed():
    data = _dataset([0] * 10 + [1] * 40)
    sample = k_shot_sample(data, 8, seed=1)
    assert Counter(sample["label"]) == {0: 4, 1: 4}
    assert len(set(sample["source"])) == 8
    assert set(sample["source"]) <= set(data["source"])


def test_remainder_goes_to_the_lowest_classes():
    sample = k_shot_sample(_dataset([0, 1, 2] * 10), 7, seed=0)
    assert Counter(sample["label"]) == {0: 3, 1: 2, 2: 2}


def test_same_seed_same_sample_other_seed_other_sample():
    data = _dataset([0, 1] * 50)
    first = k_shot_sample(data, 10, seed=3)["source"]
    assert k_shot_sample(data, 10, seed=3)["source"] == first
    assert k_shot_sample(data, 10, seed=4)["source"] != first


def test_sample_keeps_the_shuffled_order_so_classes_are_mixed():
    data = _dataset([0] * 20 + [1] * 20)
    shuffled = data.shuffle(seed=5)["source"]
    sample = k_shot_sample(data, 6, seed=5)["source"]
    assert sample == [source for source in shuffled if source in set(sample)]


def test_regression_and_mrqa_labels_get_a_plain_seeded_sample():
    scores = datasets.Dataset.from_dict({"source": [f"s{i}" for i in range(20)], "label": [i / 4 for i in range(20)]})
    assert k_shot_sample(scores, 5, seed=2)["source"] == scores.shuffle(seed=2)["source"][:5]
    mrqa = _dataset([-1] * 12)
    assert k_shot_sample(mrqa, 4, seed=2)["source"] == mrqa.shuffle(seed=2)["source"][:4]


def test_k_larger_than_the_data_is_an_error():
    with pytest.raises(ValueError, match="k=11 is larger than the dataset, which has 10 rows"):
        k_shot_sample(_dataset([0, 1] * 5), 11, seed=0)


def test_a_class_too_small_for_its_share_is_an_error_not_a_smaller_sample():
    with pytest.raises(ValueError, match="needs 4 rows of class 1, but the dataset has 2"):
        k_shot_sample(_dataset([0] * 10 + [1] * 2), 8, seed=0)


@pytest.mark.parametrize("k", [0, -3, 2.5, True])
def test_k_must_be_a_positive_integer(k):
    with pytest.raises(ValueError, match="positive integer"):
        k_shot_sample(_dataset([0, 1] * 5), k, seed=0)


def test_balanced_request_on_unlabeled_rows_is_an_error():
    with pytest.raises(ValueError, match="integer class labels"):
        k_shot_sample(_dataset([-1, 0, 1, 1]), 2, seed=0, balanced=True)


def test_stsb_k_shot_is_balanced_on_score_at_most_2_5_against_above_as_the_official_code():
    # 40 scores, 30 of them <= 2.5 (2.5 itself included, as the official `float(label) <= 2.5`).
    scores = [0.0, 1.0, 2.0, 2.5] * 7 + [0.5, 2.5] + [2.6, 4.0, 5.0] * 3 + [3.0]
    data = datasets.Dataset.from_dict({"source": [f"s{i}" for i in range(40)], "label": scores})
    sample = k_shot_sample(data, 8, seed=0, score_threshold=2.5)
    assert Counter(score > 2.5 for score in sample["label"]) == {False: 4, True: 4}
    assert sample["source"] == [s for s in data.shuffle(seed=0)["source"] if s in set(sample["source"])]


def test_the_text_pipeline_balances_stsb_k_shot_samples(tmp_path):
    from dept_nlp.arguments import DataArguments
    from dept_nlp.pipeline import load_splits
    from tests.conftest import write_task_fixture

    files = write_task_fixture("stsb", tmp_path, n_train=40, n_val=4, n_test=4)
    args = DataArguments(task_name="stsb", do_train=True, k_shot_examples=6, **{k: str(v) for k, v in files.items()})
    train = load_splits(args, seed=3)["train"]
    assert Counter(score > 2.5 for score in train["label"]) == {False: 3, True: 3}
