"""The task registry, its formatting, the split rules, local files and row validation."""

from __future__ import annotations

import importlib.util
import json

import datasets
import pytest
import torch

from dept_nlp.data_files import (
    SAMPLE_DATA_DIR,
    DataValidationError,
    hub_split_rows,
    load_task_datasets,
    sample_sst2_files,
)
from dept_nlp.tasks import GLUE_TASKS, MRQA_TASKS, OTHER_TASKS, SUPERGLUE_TASKS, TASKS, get_task, pad_punctuation
from tests.conftest import hub_dataset_dict, hub_rows, write_rows, write_task_fixture

PAPER_TASKS = {
    *("cola", "mrpc", "mnli", "qnli", "qqp", "rte", "sst2", "stsb"),
    *("superglue-multirc", "superglue-wic", "superglue-wsc.fixed", "superglue-cb", "superglue-boolq"),
    *("newsqa", "searchqa", "hotpotqa", "nq"),
    *("winogrande", "yelp_polarity", "scitail", "paws"),
}


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace `datasets.load_dataset` with an in-memory hub; records the (path, config, split) it was asked for."""
    calls = []

    def install(task_name, sizes):
        hub = hub_dataset_dict(task_name, sizes)

        def load_dataset(path, name=None, split=None, **kwargs):
            calls.append((path, name, split))
            if split is None:
                return hub
            if split not in hub:  # the message of datasets' own check
                raise ValueError(f'Unknown split "{split}". Should be one of {list(hub)}.')
            return hub[split]

        monkeypatch.setattr(datasets, "load_dataset", load_dataset)
        return hub

    install.calls = calls
    return install


@pytest.fixture
def no_hub(monkeypatch):
    def load_dataset(*args, **kwargs):
        raise AssertionError("the hub must not be contacted")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


# ---------------------------------------------------------------------------------------------------------------
# Registry


def test_registry_has_every_paper_task_under_its_official_name():
    assert PAPER_TASKS <= set(TASKS)
    assert set(TASKS) - PAPER_TASKS == {"wnli"}  # DESIGN.md lists it among the small sets
    assert {*GLUE_TASKS, *SUPERGLUE_TASKS, *MRQA_TASKS, *OTHER_TASKS} == PAPER_TASKS


def test_hub_ids_are_parquet_repos_with_their_configs():
    assert (get_task("cola").hub_path, get_task("cola").hub_config) == ("nyu-mll/glue", "cola")
    assert (get_task("superglue-wsc.fixed").hub_path, get_task("superglue-wsc.fixed").hub_config) == (
        "aps/super_glue",
        "wsc.fixed",
    )
    assert get_task("nq").hub_path == "lucadiliello/naturalquestionsshortqa"
    assert (get_task("winogrande").hub_path, get_task("winogrande").hub_config) == (
        "allenai/winogrande",
        "winogrande_xl",
    )
    assert (get_task("scitail").hub_path, get_task("scitail").hub_config) == ("allenai/scitail", "snli_format")
    assert (get_task("paws").hub_path, get_task("paws").hub_config) == (
        "google-research-datasets/paws",
        "labeled_final",
    )
    assert get_task("yelp_polarity").hub_path == "fancyzhx/yelp_polarity"


def test_labels_and_main_metrics_follow_the_official_code():
    assert get_task("mnli").label_words == ("0", "1", "2")
    assert get_task("superglue-cb").num_labels == 3
    assert get_task("stsb").label_words is None and get_task("stsb").num_labels == 1
    assert get_task("nq").label_words is None and get_task("nq").num_labels == 0
    expected_main = {
        "cola": "matthews_correlation",
        "stsb": "pearson",
        "mrpc": "accuracy",  # the official metric_for_best_model is TASK_TO_METRICS[task][0]
        "qqp": "accuracy",
        "superglue-cb": "f1_multiclass",
        "superglue-multirc": "f1",
        "hotpotqa": "em",
        "sst2": "accuracy",
    }
    assert {name: get_task(name).main_metric for name in expected_main} == expected_main
    assert get_task("mrpc").metric_names == ("accuracy", "f1")
    assert get_task("nq").metric_names == ("em", "f1")


def test_unknown_task_error_suggests_the_close_name():
    with pytest.raises(ValueError, match="Did you mean 'sst2'"):
        get_task("sst-2")


# ---------------------------------------------------------------------------------------------------------------
# Formatting: one hand-written example per task, with the exact expected text.

FORMATTING_CASES = {
    "cola": ({"sentence": "The book was read.", "label": 1, "idx": 0}, "sentence: The book was read.", "1"),
    "sst2": ({"sentence": "a gorgeous , witty film", "label": 1}, "sentence: a gorgeous , witty film", "1"),
    "mrpc": (
        {"sentence1": "He said hi.", "sentence2": "He greeted us.", "label": 1},
        "sentence1: He said hi. sentence2: He greeted us.",
        "1",
    ),
    "rte": (
        {"sentence1": "Cats purr.", "sentence2": "Dogs purr.", "label": 1},
        "sentence1: Cats purr. sentence2: Dogs purr.",
        "1",
    ),
    "wnli": (
        {"sentence1": "I ate.", "sentence2": "I was fed.", "label": 0},
        "sentence1: I ate. sentence2: I was fed.",
        "0",
    ),
    "stsb": (
        {"sentence1": "A man sings.", "sentence2": "A man is singing.", "label": 3.75},
        "sentence1: A man sings. sentence2: A man is singing.",
        "3.8",
    ),
    "qnli": (
        {"question": "Where is it?", "sentence": "It is in Paris.", "label": 0},
        "question: Where is it? sentence: It is in Paris.",
        "0",
    ),
    "qqp": (
        {"question1": "How old?", "question2": "What age?", "label": 1},
        "question1: How old? question2: What age?",
        "1",
    ),
    "mnli": (
        {"premise": "It rains.", "hypothesis": "It is dry.", "label": 2},
        "premise: It rains. hypothesis: It is dry.",
        "2",
    ),
    "superglue-boolq": (
        {"question": "is the sky blue", "passage": "The sky is blue.", "label": 1},
        "question: is the sky blue passage: The sky is blue.",
        "1",
    ),
    "superglue-cb": (
        {"premise": "It may rain.", "hypothesis": "It rains.", "label": 2},
        "premise: It may rain. hypothesis: It rains.",
        "2",
    ),
    "superglue-multirc": (
        {
            "paragraph": "<b>Sent 1: </b>Tom ran.<br><b>Sent 2: </b>He won.<br>",
            "question": "Who won?",
            "answer": "Tom",
            "label": 1,
        },
        "question: Who won? answer: Tom paragraph: Sent 1: Tom ran. Sent 2: He won. ",
        "1",
    ),
    "superglue-wic": (
        {"word": "bank", "sentence1": "A river bank.", "sentence2": "A bank loan.", "label": 0},
        "sentence1: A river bank. sentence2: A bank loan. word: bank",
        "0",
    ),
    "superglue-wsc.fixed": (
        {
            "text": "Mark told Pete many lies about himself, which Pete included in his book. He should have known.",
            "span1_text": "Mark",
            "span1_index": 0,
            "span2_text": "He",
            "span2_index": 13,
            "label": 0,
        },
        "text: * Mark * told Pete many lies about himself, which Pete included in his book. # He # should have known.",
        "0",
    ),
    "nq": (
        {"question": "who wrote it?", "context": "It was J.K. Rowling (1997).", "answers": ["J.K. Rowling", "Rowling"]},
        "question: who wrote it ? context: It was J . K . Rowling ( 1997 ) .",
        "J . K . Rowling",
    ),
    "winogrande": (
        {"sentence": "The cup broke the vase because _ was hard.", "option1": "cup", "option2": "vase", "answer": "1"},
        "sentence: The cup broke the vase because _ was hard. option0: cup option1: vase",
        "0",
    ),
    "yelp_polarity": ({"text": "Great tacos!", "label": 1}, "sentence: Great tacos!", "1"),
    "scitail": (
        {"sentence1": "Ice melts.", "sentence2": "Water freezes.", "gold_label": "neutral"},
        "premise: Ice melts. hypothesis: Water freezes.",
        "1",
    ),
    "paws": ({"sentence1": "A b.", "sentence2": "B a.", "label": 0}, "sentence1: A b. sentence2: B a.", "0"),
}


@pytest.mark.parametrize("task_name", sorted(FORMATTING_CASES))
def test_each_task_formats_a_hand_written_example_as_the_official_code(task_name):
    example, source, target = FORMATTING_CASES[task_name]
    assert get_task(task_name).format_example(example) == (source, target)


def test_every_task_has_a_formatting_case():
    assert set(FORMATTING_CASES) | {"newsqa", "searchqa", "hotpotqa"} == set(TASKS)


def test_winogrande_shows_both_options_not_option1_twice():
    source, _ = get_task("winogrande").format_example(
        {"sentence": "_ won.", "option1": "Ann", "option2": "Bob", "answer": "2"}
    )
    assert source == "sentence: _ won. option0: Ann option1: Bob"


@pytest.mark.parametrize(
    ("score", "target"),
    [(3.75, "3.8"), (2.25, "2.2"), (0.35, "0.4"), (4.0, "4.0"), (5, "5.0"), (0.0, "0.0"), (1.2345, "1.2")],
)
def test_stsb_target_is_the_score_rounded_to_one_decimal_with_numpy_rounding(score, target):
    # 2.25 -> 2.2 (ties to even); 0.35 -> 0.4 (numpy rounds 3.5 after scaling; round(0.35, 1) would give 0.3).
    example = {"sentence1": "a", "sentence2": "b", "label": score}
    assert get_task("stsb").format_example(example)[1] == target


def test_wsc_marks_the_pronoun_after_shifting_past_the_noun_marks():
    wsc = get_task("superglue-wsc.fixed")
    noun_first = {
        "text": "The trophy doesn't fit into the brown suitcase because it is too large.",
        "span1_text": "the brown suitcase",
        "span1_index": 5,
        "span2_text": "it",
        "span2_index": 9,
        "label": 0,
    }
    assert wsc.format_example(noun_first)[0] == (
        "text: The trophy doesn't fit into * the brown suitcase * because # it # is too large."
    )
    pronoun_first = {
        "text": "When he arrived, John was tired.",
        "span1_text": "John",
        "span1_index": 3,
        "span2_text": "he",
        "span2_index": 1,
        "label": 1,
    }
    assert wsc.format_example(pronoun_first)[0] == "text: When # he # arrived, * John * was tired."


def test_mrqa_pads_punctuation_and_symbols_but_leaves_letters_of_any_script():
    assert pad_punctuation("François (Zoë) — naïve?") == "François ( Zoë ) — naïve ?"
    assert pad_punctuation("مرحبا، שלום!") == "مرحبا ، שלום !"
    assert pad_punctuation("snake_case  x\ty") == "snake_case x y"


def test_mrqa_row_keeps_every_answer_as_a_reference():
    row = get_task("hotpotqa").to_row({"question": "Who?", "context": "Ann.", "answers": ["Ann", "Ann B."]})
    assert row == {
        "source": "question: Who ? context: Ann .",
        "target": "Ann",
        "label": -1,
        "references": ["Ann", "Ann B ."],
    }


# ---------------------------------------------------------------------------------------------------------------
# Split rules


def _official_order(size, seed=42):
    # The official `shuffled_indices`: torch.randperm with a generator seeded with the task seed.
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()


def test_small_task_halves_the_shuffled_hub_validation_into_validation_and_test(fake_hub):
    hub = fake_hub("cola", {"train": 6, "validation": 11})
    splits = load_task_datasets("cola")
    assert fake_hub.calls == [("nyu-mll/glue", "cola", "train"), ("nyu-mll/glue", "cola", "validation")]
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (6, 5, 6)
    assert splits["train"]["source"] == [f"sentence: {row['sentence']}" for row in hub["train"]]
    order = _official_order(11)
    hub_sources = [f"sentence: {row['sentence']}" for row in hub["validation"]]
    assert splits["validation"]["source"] == [hub_sources[i] for i in order[:5]]
    assert splits["test"]["source"] == [hub_sources[i] for i in order[5:]]
    assert set(splits["validation"]["source"]).isdisjoint(splits["test"]["source"])


def test_split_rule_is_deterministic_and_follows_the_seed(fake_hub):
    fake_hub("rte", {"train": 4, "validation": 20})
    first = load_task_datasets("rte", splits=("validation",))["validation"]["source"]
    again = load_task_datasets("rte", splits=("validation",))["validation"]["source"]
    other = load_task_datasets("rte", splits=("validation",), seed=7)["validation"]["source"]
    assert first == again
    assert first != other


def test_large_task_holds_out_1000_training_rows_and_tests_on_the_hub_validation(fake_hub):
    hub = fake_hub("sst2", {"train": 1010, "validation": 7})
    splits = load_task_datasets("sst2")
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (10, 1000, 7)
    order = _official_order(1010)
    train_sources = [f"sentence: {row['sentence']}" for row in hub["train"]]
    assert splits["validation"]["source"] == [train_sources[i] for i in order[:1000]]
    assert splits["train"]["source"] == [train_sources[i] for i in order[1000:]]
    assert splits["test"]["source"] == [f"sentence: {row['sentence']}" for row in hub["validation"]]


def test_mnli_validates_on_mismatched_and_tests_on_matched(fake_hub):
    hub = fake_hub("mnli", {"train": 3, "validation_matched": 4, "validation_mismatched": 5, "test_matched": 2})
    splits = load_task_datasets("mnli")
    assert len(splits["validation"]) == 5 and len(splits["test"]) == 4
    assert splits["test"]["source"][0] == get_task("mnli").format_example(hub["validation_matched"][0])[0]


def test_paws_keeps_its_own_splits(fake_hub):
    fake_hub("paws", {"train": 3, "validation": 4, "test": 5})
    splits = load_task_datasets("paws")
    assert [len(splits[name]) for name in ("train", "validation", "test")] == [3, 4, 5]


def test_yelp_polarity_trains_on_the_first_100k_rows_after_the_holdout_as_the_official_code():
    plan = hub_split_rows(get_task("yelp_polarity"), {"train": 101_500, "test": 38_000})
    assert plan["test"] == ("test", None)
    assert len(plan["validation"][1]) == 1000 and len(plan["train"][1]) == 100_000
    assert set(plan["validation"][1]).isdisjoint(plan["train"][1])


def test_hold_out_rule_needs_more_than_1000_training_rows(fake_hub):
    fake_hub("qnli", {"train": 1000, "validation": 3})
    with pytest.raises(ValueError, match="holds out 1000"):
        load_task_datasets("qnli")


def test_dataset_config_name_never_overrides_the_tasks_own_config(fake_hub):
    # The official seed command passes --dataset_config_name en; every official task hard-codes its config.
    fake_hub("winogrande", {"train": 1002, "validation": 3})
    load_task_datasets("winogrande", dataset_config_name="en", splits=("test",))
    assert {config for _, config, _ in fake_hub.calls} == {"winogrande_xl"}


# What each official task asks the hub for (ZhengxiangShi/DePT src/tasks.py `load_dataset`, with the datasets'
# current hub ids): (path, config) and the hub splits its train/validation/test are built from.
_GLUE = "nyu-mll/glue"
OFFICIAL_HUB_REQUESTS = {
    "cola": (_GLUE, "cola", {"train", "validation"}),
    "mrpc": (_GLUE, "mrpc", {"train", "validation"}),
    "rte": (_GLUE, "rte", {"train", "validation"}),
    "wnli": (_GLUE, "wnli", {"train", "validation"}),
    "stsb": (_GLUE, "stsb", {"train", "validation"}),
    "sst2": (_GLUE, "sst2", {"train", "validation"}),
    "qnli": (_GLUE, "qnli", {"train", "validation"}),
    "qqp": (_GLUE, "qqp", {"train", "validation"}),
    "mnli": (_GLUE, "mnli", {"train", "validation_mismatched", "validation_matched"}),
    "superglue-boolq": ("aps/super_glue", "boolq", {"train", "validation"}),
    "superglue-cb": ("aps/super_glue", "cb", {"train", "validation"}),
    "superglue-multirc": ("aps/super_glue", "multirc", {"train", "validation"}),
    "superglue-wic": ("aps/super_glue", "wic", {"train", "validation"}),
    "superglue-wsc.fixed": ("aps/super_glue", "wsc.fixed", {"train", "validation"}),
    "newsqa": ("lucadiliello/newsqa", None, {"train", "validation"}),
    "searchqa": ("lucadiliello/searchqa", None, {"train", "validation"}),
    "hotpotqa": ("lucadiliello/hotpotqa", None, {"train", "validation"}),
    "nq": ("lucadiliello/naturalquestionsshortqa", None, {"train", "validation"}),
    "winogrande": ("allenai/winogrande", "winogrande_xl", {"train", "validation"}),
    "yelp_polarity": ("fancyzhx/yelp_polarity", "plain_text", {"train", "test"}),
    "scitail": ("allenai/scitail", "snli_format", {"train", "validation"}),
    "paws": ("google-research-datasets/paws", "labeled_final", {"train", "validation", "test"}),
}


@pytest.mark.parametrize("task_name", sorted(OFFICIAL_HUB_REQUESTS))
def test_each_task_requests_its_own_path_config_and_splits_from_the_hub(fake_hub, task_name):
    assert len(OFFICIAL_HUB_REQUESTS) == len(TASKS) == 22
    path, config, hub_splits = OFFICIAL_HUB_REQUESTS[task_name]
    large = get_task(task_name).split_rule.value == "hold_out_train"
    fake_hub(task_name, {name: 1003 if large and name == "train" else 4 for name in sorted(hub_splits)})
    splits = load_task_datasets(task_name, dataset_config_name="en")  # the seed command's flag changes nothing
    assert sorted(fake_hub.calls) == sorted((path, config, split) for split in hub_splits)
    assert all(len(splits[split]) > 0 for split in ("train", "validation", "test"))


def test_missing_hub_split_error_lists_the_available_ones(fake_hub):
    fake_hub("cola", {"train": 4})
    with pytest.raises(ValueError, match=r"Should be one of \['train'\][\s\S]*needs the splits \['train', 'validation'\]"):
        load_task_datasets("cola")


def test_hub_failure_explains_how_to_work_offline(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"no network[\s\S]*--train_file[\s\S]*'sentence'"):
        load_task_datasets("sst2")


# ---------------------------------------------------------------------------------------------------------------
# Local files


@pytest.mark.parametrize("task_name", sorted(TASKS))
def test_every_task_loads_from_local_files_without_the_hub(task_name, tmp_path, no_hub):
    paths = write_task_fixture(task_name, tmp_path, n_train=6, n_val=3, n_test=3)
    splits = load_task_datasets(task_name, **paths)
    assert [len(splits[name]) for name in ("train", "validation", "test")] == [6, 3, 3]
    assert splits["train"].column_names == ["source", "target", "label", "references"]
    task = get_task(task_name)
    first = splits["train"][0]
    expected_source, expected_target = task.format_example(hub_rows(task_name, 1)[0])
    assert (first["source"], first["target"]) == (expected_source, expected_target)
    if task.label_words is not None:
        assert set(splits["train"]["target"]) <= set(task.label_words)
        assert splits["train"]["label"] == [int(target) for target in splits["train"]["target"]]


@pytest.mark.parametrize("file_format", ["json", "csv", "parquet"])
@pytest.mark.parametrize("task_name", ["sst2", "stsb", "winogrande", "superglue-wsc.fixed"])
def test_json_csv_and_parquet_load_the_same_rows_as_jsonl(task_name, file_format, tmp_path, no_hub):
    reference = load_task_datasets(task_name, **write_task_fixture(task_name, tmp_path / "jsonl"))
    other = load_task_datasets(
        task_name, **write_task_fixture(task_name, tmp_path / file_format, file_format=file_format)
    )
    for split in ("train", "validation", "test"):
        assert other[split].to_list() == reference[split].to_list()


def test_a_local_file_replaces_its_split_and_the_hub_rule_builds_the_rest(fake_hub, tmp_path):
    hub = fake_hub("rte", {"train": 5, "validation": 8})
    train_file = tmp_path / "train.jsonl"
    write_rows(hub_rows("rte", 3, start=100), train_file)
    splits = load_task_datasets("rte", train_file=train_file)
    assert splits["train"]["source"] == [get_task("rte").format_example(row)[0] for row in hub_rows("rte", 3, 100)]
    order = _official_order(8)
    hub_sources = [get_task("rte").format_example(row)[0] for row in hub["validation"]]
    assert splits["validation"]["source"] == [hub_sources[i] for i in order[:4]]
    assert splits["test"]["source"] == [hub_sources[i] for i in order[4:]]


@pytest.mark.parametrize("task_name", ["sst2", "stsb", "winogrande", "nq", "scitail"])
def test_unlabeled_test_split_loads_for_predict_only(task_name, tmp_path, no_hub):
    paths = write_task_fixture(task_name, tmp_path, labeled_test=False)
    test = load_task_datasets(task_name, test_file=paths["test_file"], splits=("test",))["test"]
    assert set(test["target"]) == {""}
    assert set(test["label"]) == {-1}
    assert test["references"] == [[]] * len(test)


def test_test_file_without_a_label_column_loads_for_predict_only(tmp_path, no_hub):
    test_file = tmp_path / "test.csv"
    write_rows([{"sentence": "fine"}, {"sentence": "bad"}], test_file)
    test = load_task_datasets("sst2", test_file=test_file, splits=("test",))["test"]
    assert test.to_list() == [
        {"source": "sentence: fine", "target": "", "label": -1, "references": []},
        {"source": "sentence: bad", "target": "", "label": -1, "references": []},
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_unicode_emoji_and_right_to_left_text_pass_through_unchanged(suffix, tmp_path, no_hub):
    texts = ["😀 great 👍🏽", "مرحبا بالعالم", "שלום עולם", "cafe\u0301 vs café", "line\u2028separator"]
    path = tmp_path / f"train{suffix}"
    write_rows([{"sentence": text, "label": i % 2} for i, text in enumerate(texts)], path)
    train = load_task_datasets("sst2", train_file=path, splits=("train",))["train"]
    assert train["source"] == [f"sentence: {text}" for text in texts]


def test_missing_file_and_unknown_format_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_task_datasets("sst2", train_file=tmp_path / "nowhere.jsonl", splits=("train",))
    tsv = tmp_path / "train.tsv"
    tsv.write_text("sentence\tlabel\n")
    with pytest.raises(ValueError, match=r"unsupported file type '\.tsv'"):
        load_task_datasets("sst2", train_file=tsv, splits=("train",))


# ---------------------------------------------------------------------------------------------------------------
# Validation: each error names the file, the row and what was expected.

GOOD_SST2 = {"sentence": "a fine film", "label": 1}
BAD_ROW_CASES = {
    "empty text": ({"sentence": "   ", "label": 1}, "column 'sentence' is empty", "a non-empty string"),
    "missing label": ({"sentence": "ok"}, "column 'label' is missing", "one of 0, 1"),
    "null label": ({"sentence": "ok", "label": None}, "column 'label' is missing", "one of 0, 1"),
    "label outside the task": ({"sentence": "ok", "label": 2}, "column 'label' is 2, not a label", "one of 0, 1"),
    "number as a string": (
        {"sentence": "ok", "label": "1"},
        "column 'label' is '1' (str), not an integer; write numbers without quotes",
        "one of 0, 1",
    ),
    "list instead of a string": (
        {"sentence": ["a", "list"], "label": 0},
        "column 'sentence' is ['a', 'list'] (list), not a string",
        "a non-empty string",
    ),
    "boolean label": (
        {"sentence": "ok", "label": True},
        "column 'label' is True (bool), not an integer",
        "one of 0, 1",
    ),
    "unlabeled marker outside test": (
        {"sentence": "ok", "label": -1},
        "is -1, which marks an unlabeled row; only the test split may be unlabeled",
        "one of 0, 1",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ROW_CASES))
def test_bad_row_error_names_file_row_column_and_expectation(case, tmp_path):
    bad_row, problem, expected = BAD_ROW_CASES[case]
    path = tmp_path / "my_train.jsonl"
    write_rows([GOOD_SST2, GOOD_SST2, bad_row, GOOD_SST2], path)
    with pytest.raises(DataValidationError) as error:
        load_task_datasets("sst2", train_file=path, splits=("train",))
    message = str(error.value)
    assert str(path) in message
    assert "row 2 (line 3)" in message
    assert problem in message
    assert f"Expected {expected}" in message


def test_missing_column_error_lists_the_expected_and_found_columns(tmp_path):
    path = tmp_path / "train.jsonl"
    write_rows([{"text": "wrong column", "label": 1}], path)
    with pytest.raises(DataValidationError, match=r"missing column\(s\) \['sentence'\].*found \['label', 'text'\]"):
        load_task_datasets("sst2", train_file=path, splits=("train",))


@pytest.mark.parametrize(
    ("task_name", "bad_row", "problem"),
    [
        ("stsb", {"sentence1": "a", "sentence2": "b", "label": 7.5}, "is 7.5, outside [0.0, 5.0]"),
        ("winogrande", {"sentence": "_", "option1": "a", "option2": "b", "answer": 1}, "is 1 (int), not a string"),
        ("winogrande", {"sentence": "_", "option1": "a", "option2": "b", "answer": "3"}, "is '3', not a label"),
        ("scitail", {"sentence1": "a", "sentence2": "b", "gold_label": "contradiction"}, "is 'contradiction'"),
        ("nq", {"question": "q", "context": "c", "answers": "a"}, "is 'a' (str), not a list"),
        ("nq", {"question": "q", "context": "c", "answers": []}, "is an empty list"),
        ("nq", {"question": "q", "context": "c", "answers": ["a", ""]}, "has item 1 that is empty"),
        (
            "superglue-wsc.fixed",
            {"text": "a b", "span1_text": "a", "span1_index": "0", "span2_text": "b", "span2_index": 1, "label": 0},
            "column 'span1_index' is '0' (str), not an integer",
        ),
    ],
)
def test_task_specific_bad_values_are_reported(task_name, bad_row, problem, tmp_path):
    path = tmp_path / "train.jsonl"
    write_rows([hub_rows(task_name, 1)[0], bad_row], path)
    with pytest.raises(DataValidationError, match="row 1 \\(line 2\\)") as error:
        load_task_datasets(task_name, train_file=path, splits=("train",))
    assert problem in str(error.value)


def test_csv_values_are_parsed_and_a_bad_number_names_its_row(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('sentence,label\n"fine, really",1\nbad,0\nworse,yes\n', encoding="utf-8")
    with pytest.raises(DataValidationError) as error:
        load_task_datasets("sst2", train_file=path, splits=("train",))
    assert f"{path}: row 2 (after the header), column 'label' is 'yes', not an integer" in str(error.value)


def test_invalid_json_line_is_reported_with_its_line_number(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"sentence": "ok", "label": 1}\n\n{"sentence": "oops", "label": 1\n', encoding="utf-8")
    with pytest.raises(DataValidationError, match=r"line 3 is not valid JSON"):
        load_task_datasets("sst2", train_file=path, splits=("train",))


def test_a_json_file_holding_one_object_says_which_layouts_work(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"data": [GOOD_SST2]}, indent=2), encoding="utf-8")
    with pytest.raises(DataValidationError, match="one JSON object; expected one object per line"):
        load_task_datasets("sst2", train_file=path, splits=("train",))


def test_null_in_a_parquet_file_is_reported(tmp_path):
    path = tmp_path / "validation.parquet"
    write_rows([GOOD_SST2, {"sentence": None, "label": 0}], path)
    with pytest.raises(DataValidationError, match=r"validation\.parquet: row 1, column 'sentence' is missing"):
        load_task_datasets("sst2", validation_file=path, splits=("validation",))


def test_bad_hub_row_is_reported_with_its_hub_split_and_row_number(monkeypatch):
    hub = hub_dataset_dict("cola", {"train": 3, "validation": 10})
    rows = hub["validation"].to_list()
    rows[7]["sentence"] = ""
    hub["validation"] = datasets.Dataset.from_list(rows)
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, split, **kwargs: hub[split])
    with pytest.raises(
        DataValidationError, match=r"nyu-mll/glue \(cola\), split 'validation': row 7, column 'sentence'"
    ):
        load_task_datasets("cola")


# ---------------------------------------------------------------------------------------------------------------
# The shipped sample


def _load_make_sample():
    spec = importlib.util.spec_from_file_location("make_sample", SAMPLE_DATA_DIR / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_sample_is_exactly_what_make_sample_generates():
    generated = _load_make_sample().build_splits()
    for split, path in sample_sst2_files().items():
        shipped = [json.loads(line) for line in open(path, encoding="utf-8")]
        assert shipped == generated[split.removesuffix("_file")]


def test_sample_loads_as_sst2_balanced_disjoint_and_small(no_hub):
    splits = load_task_datasets("sst2", **sample_sst2_files())
    assert {name: len(split) for name, split in splits.items()} == {"train": 600, "validation": 100, "test": 100}
    for split in splits.values():
        assert sum(split["label"]) * 2 == len(split)
    sources = [set(split["source"]) for split in splits.values()]
    assert sources[0].isdisjoint(sources[1]) and sources[0].isdisjoint(sources[2]) and sources[1].isdisjoint(sources[2])
    assert sum(path.stat().st_size for path in SAMPLE_DATA_DIR.glob("*.jsonl")) < 200_000


def test_sample_label_follows_its_sentiment_words():
    make_sample = _load_make_sample()
    for row in make_sample.build_splits()["train"]:
        words = set(row["sentence"].split())
        assert bool(words & set(make_sample.POSITIVE)) == (row["label"] == 1)
        assert bool(words & set(make_sample.NEGATIVE)) == (row["label"] == 0)
