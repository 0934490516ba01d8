"""Bad and unusual text data: each bad row stops loading with its file and row; unicode survives formatting and
tokenization; over-long inputs are cut with one summary line; an unlabeled test split goes all the way to batches.

The main bad-row cases (empty text, missing/null label, label outside the task, "1" for 1, a list for a string,
the unlabeled marker outside test) and the unicode pass-through of loading are in tests/nlp/test_tasks.py.
"""

from __future__ import annotations

import logging
import re

import pytest
from transformers import AutoTokenizer

from dept_nlp.data_files import DataValidationError, load_task_datasets
from dept_nlp.preprocess import TextCollator, tokenize_rows
from tests.conftest import T5_TOKENIZER_DIR, build_word_tokenizer, write_rows, write_task_fixture

# Values of the wrong type or outside the task, each in the formats that can hold it (CSV holds only text).
BAD_VALUES = {
    "a number for a text": ({"sentence": 42, "label": 0}, "column 'sentence' is 42 (int), not a string"),
    "an object for a text": ({"sentence": {"text": "hi"}, "label": 0}, "is {'text': 'hi'} (dict), not a string"),
    "a text key that is absent": ({"label": 0}, "column 'sentence' is missing"),
    "a fractional label": ({"sentence": "ok", "label": 1.5}, "column 'label' is 1.5 (float), not an integer"),
    "a list for a label": ({"sentence": "ok", "label": [1]}, "column 'label' is [1] (list), not an integer"),
    "a label name for a label index": ({"sentence": "ok", "label": "positive"}, "is 'positive' (str), not an int"),
}
JSON_FORMATS = ("jsonl", "json")


@pytest.mark.parametrize("file_format", JSON_FORMATS)
@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_a_value_of_the_wrong_type_names_its_file_and_row(case, file_format, tmp_path):
    bad_row, problem = BAD_VALUES[case]
    good = {"sentence": "fine", "label": 1}
    path = tmp_path / f"train.{file_format}"
    write_rows([good, good, good, bad_row], path)
    with pytest.raises(DataValidationError) as error:
        load_task_datasets("sst2", train_file=path, splits=("train",))
    message = str(error.value)
    assert message.startswith(f"{path}: row 3")
    assert problem in message


@pytest.mark.parametrize(
    ("csv_text", "problem"),
    [
        ("sentence,label\nfine,1\n,0\n", "row 1 (after the header), column 'sentence' is empty"),
        ("sentence,label\nfine,1\nok,\n", "row 1 (after the header), column 'label' is missing"),
        ("sentence,label\nfine,1\nok,1.0\n", "row 1 (after the header), column 'label' is '1.0', not an integer"),
        ("sentence,label\nfine,1\nok,7\n", "row 1 (after the header), column 'label' is 7, not a label"),
        ("sentence,label\nfine,1\nshort row\n", "row 1 (after the header), column 'label' is missing"),
    ],
)
def test_bad_csv_cells_name_their_row(csv_text, problem, tmp_path):
    path = tmp_path / "validation.csv"
    path.write_text(csv_text, encoding="utf-8")
    with pytest.raises(DataValidationError, match=re.escape(problem)) as error:
        load_task_datasets("sst2", validation_file=path, splits=("validation",))
    assert str(path) in str(error.value)


def test_stsb_score_out_of_range_or_not_a_number_names_its_row(tmp_path):
    path = tmp_path / "train.jsonl"
    for bad, problem in [(5.5, "is 5.5, outside [0.0, 5.0]"), ("3.5", "'3.5' (str), not a number"),
                         (float("nan"), "is missing (NaN)")]:
        write_rows([{"sentence1": "a", "sentence2": "b", "label": 1.0},
                    {"sentence1": "a", "sentence2": "b", "label": bad}], path)
        with pytest.raises(DataValidationError, match="row 1") as error:
            load_task_datasets("stsb", train_file=path, splits=("train",))
        assert problem in str(error.value)


# ---------------------------------------------------------------------------------------------------------------
# Unicode through formatting and tokenization

UNICODE_TEXTS = ["😀 great", "مرحبا بالعالم", "שלום עולם", "café naïve", "ünïcödé ∑ 東京"]


def _formatted_sources(tmp_path, texts):
    path = tmp_path / "train.jsonl"
    write_rows([{"sentence": text, "label": i % 2} for i, text in enumerate(texts)], path)
    return load_task_datasets("sst2", train_file=path, splits=("train",))["train"]


def test_unicode_round_trips_through_formatting_and_the_word_tokenizer(tmp_path):
    train = _formatted_sources(tmp_path, UNICODE_TEXTS)
    tokenizer = build_word_tokenizer(train["source"])
    tokenized = tokenize_rows(train, tokenizer, "seq2seq", max_length=64, split_name="train")
    for source, ids in zip(train["source"], tokenized["input_ids"]):
        assert tokenizer.unk_token_id not in ids
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True).split() == source.lower().replace(":", " :").split()


needs_t5_tokenizer = pytest.mark.skipif(not T5_TOKENIZER_DIR.is_dir(), reason="../shared/reference is absent")


@pytest.fixture(scope="module")
def t5_tokenizer():
    return AutoTokenizer.from_pretrained(str(T5_TOKENIZER_DIR))


@needs_t5_tokenizer
def test_latin_text_round_trips_through_the_real_t5_tokenizer(tmp_path, t5_tokenizer):
    texts = ["Zürich straße café", "l'été à Montréal, garçon"]
    train = _formatted_sources(tmp_path, texts)
    tokenized = tokenize_rows(train, t5_tokenizer, "seq2seq", max_length=64, split_name="train")
    decoded = [t5_tokenizer.decode(ids, skip_special_tokens=True) for ids in tokenized["input_ids"]]
    assert decoded == list(train["source"])
    assert all(ids[-1] == t5_tokenizer.eos_token_id for ids in tokenized["input_ids"])


@needs_t5_tokenizer
def test_t5_tokenizes_composed_and_decomposed_accents_alike(t5_tokenizer):
    assert t5_tokenizer("cafe\u0301")["input_ids"] == t5_tokenizer("caf\u00e9")["input_ids"]


@needs_t5_tokenizer
@pytest.mark.parametrize("text", ["مرحبا بالعالم", "שלום עולם", "😀 great 👍🏽"])
def test_scripts_outside_t5s_vocabulary_become_unk_tokens_never_vanish(text, tmp_path, t5_tokenizer):
    """T5's vocabulary has no Arabic, Hebrew or emoji: each such word must still be there, as <unk>, so the model
    sees that something was written and the positions of the words after it do not shift."""
    train = _formatted_sources(tmp_path, [text, "fine"])
    ids = tokenize_rows(train, t5_tokenizer, "seq2seq", max_length=64)["input_ids"][0]
    foreign_words = [word for word in text.split() if not word.isascii()]
    assert ids.count(t5_tokenizer.unk_token_id) >= len(foreign_words)
    assert t5_tokenizer.decode(ids, skip_special_tokens=True).startswith("sentence:")
    assert ids[-1] == t5_tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------------------------
# Over-long inputs


@pytest.mark.parametrize("family", ["seq2seq", "cls", "causal"])
def test_long_inputs_are_cut_to_max_length_with_one_summary_line(family, tmp_path, caplog):
    texts = ["red " * 500, "green", "blue " * 40, "red green"]
    train = _formatted_sources(tmp_path, texts)
    tokenizer = build_word_tokenizer([*train["source"], "answer 0 1"])
    with caplog.at_level(logging.WARNING, logger="dept_nlp.preprocess"):
        tokenized = tokenize_rows(train, tokenizer, family, max_length=16, split_name="train")
    warnings = [record.getMessage() for record in caplog.records if record.name == "dept_nlp.preprocess"]
    assert warnings == ["train: 2 of 4 inputs were longer than max_length=16 tokens and were truncated."]
    lengths = [len(ids) for ids in tokenized["input_ids"]]
    assert lengths[0] == lengths[2] == 16 and max(lengths) == 16
    if family != "causal":  # the closing </s> survives the cut; the short rows are untouched
        assert all(ids[-1] == tokenizer.eos_token_id for ids in tokenized["input_ids"])
        assert tokenized["input_ids"][1] == tokenizer(train["source"][1])["input_ids"]
    else:  # the target and its eos survive the cut, so the model still learns to answer
        assert all(ids[-2:] == tokenizer(" 0")["input_ids"][:1] + [tokenizer.eos_token_id] or
                   ids[-2:] == tokenizer(" 1")["input_ids"][:1] + [tokenizer.eos_token_id]
                   for ids in tokenized["input_ids"])


def test_inputs_within_max_length_log_nothing(tmp_path, caplog):
    train = _formatted_sources(tmp_path, ["red", "green"])
    tokenizer = build_word_tokenizer(train["source"])
    with caplog.at_level(logging.WARNING, logger="dept_nlp.preprocess"):
        tokenize_rows(train, tokenizer, "seq2seq", max_length=4)
    assert not [record for record in caplog.records if record.name == "dept_nlp.preprocess"]


# ---------------------------------------------------------------------------------------------------------------
# Predict-only


@pytest.mark.parametrize("family", ["seq2seq", "causal", "cls"])
def test_an_unlabeled_test_split_reaches_batches_without_labels(family, tmp_path):
    """Loading an unlabeled test file is in tests/nlp/test_tasks.py; here it goes on through tokenization and
    collation, and the batch carries no labels (so no loss against a made-up target)."""
    paths = write_task_fixture("rte", tmp_path, labeled_test=False)
    test = load_task_datasets("rte", test_file=paths["test_file"], splits=("test",))["test"]
    tokenizer = build_word_tokenizer([*test["source"], "answer : 0 1"])
    tokenized = tokenize_rows(test, tokenizer, family, max_length=32, split_name="test")
    batch = TextCollator(tokenizer, family)([tokenized[i] for i in range(len(tokenized))])
    assert "labels" not in batch
    assert batch["references"] == [[]] * len(test)
    assert batch["input_ids"].shape[0] == len(test)
