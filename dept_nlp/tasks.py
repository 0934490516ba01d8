"""The text tasks of the DePT paper: hub dataset, split rule, formatting, labels and metrics.

Every task is text-to-text, as in the official DePT task registry (`src/tasks.py`, itself from ATTEMPT):

- `source` is "key: value" pairs joined by spaces, e.g. ``"sentence1: A man sings. sentence2: A man is singing."``.
  There is no task-name prefix: the official `--add_prefix` flag defaults to False and no official script sets it.
- `target` is the class index as a string ("0", "1", ...). STS-B: the score rounded to one decimal ("3.8").
  MRQA: the first answer.

Where this registry differs from the official one on purpose (DESIGN.md §3):

- winogrande shows `option1` and `option2`; the official code shows option1 twice.
- STS-B targets are the score rounded to one decimal. That is what the official code does; its docstring's
  "0.2 grid" is not applied.
- The WSC span text is escaped before it goes into a regular expression (the official code does not escape it).

The loader that builds train/validation/test from these specs is `dept_nlp.data_files.load_task_datasets`.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from dept.errors import FlagError

SPLITS = ("train", "validation", "test")


class ColumnType(str, Enum):
    """The type a task needs in one input column. The value reads as the expected type in error messages."""

    TEXT = "a non-empty string"
    INT = "an integer"
    TEXT_LIST = "a list of non-empty strings"


class SplitRule(str, Enum):
    """How train/validation/test are built from the hub splits (DESIGN.md §3). `TaskSpec.hub_splits` names them.

    - HALVE_VALIDATION (small sets): hub train is train. Hub validation is shuffled (seed) and cut in half:
      the first half is validation, the second half is test.
    - HOLD_OUT_TRAIN (large sets): hub train is shuffled (seed); its first 1000 rows are validation and the rest
      is train. `hub_splits["test"]` (the official validation, or yelp's test) is test.
    - HUB_SPLITS (mnli, paws): each split is the hub split named in `hub_splits`, unchanged.
    """

    HALVE_VALIDATION = "halve_validation"
    HOLD_OUT_TRAIN = "hold_out_train"
    HUB_SPLITS = "hub_splits"


@dataclass(frozen=True)
class KeyValueSource:
    """Builds ``"key1: value1 key2: value2"`` from `(key, column)` pairs, as the official `seq2seq_format`."""

    pairs: tuple[tuple[str, str], ...]

    def __call__(self, example: Mapping[str, Any]) -> str:
        return " ".join(f"{key}: {example[column]}" for key, column in self.pairs)


@dataclass(frozen=True)
class TaskSpec:
    """Everything the pipeline needs to know about one text task.

    Attributes:
        name: the task name used on the command line, e.g. ``"superglue-wsc.fixed"``.
        hub_path / hub_config: the Hugging Face dataset, loaded with ``datasets.load_dataset(hub_path, hub_config)``.
        split_rule: how train/validation/test are built from the hub splits (see `SplitRule`).
        hub_splits: which hub split feeds each role of the split rule, e.g. mnli's
            ``{"train": "train", "validation": "validation_mismatched", "test": "validation_matched"}``.
        build_source: example (a row in the hub schema) -> the model input text.
        schema: the input columns `build_source` reads and their types. The label (or answers) column comes on top.
        label_column: the column holding the label; None for MRQA.
        raw_labels: the label values as the hub stores them, in class-index order, e.g. ``("entailment", "neutral")``
            for scitail: the class index of a row is the position of its raw label here. None for STS-B and MRQA.
        metric_names: the metric keys `dept_nlp.metrics.compute` returns, in the official `TASK_TO_METRICS` order.
        is_regression: STS-B. Its label is a float score in `score_range`.
        score_range: the (low, high) bounds of a regression score.
        answers_column: MRQA's list of answers; None for other tasks.
        max_train_examples: the official code trains yelp_polarity on the first 100,000 training rows only.
            Applied to the hub train split; a train file you pass is used whole.
    """

    name: str
    hub_path: str
    hub_config: str | None
    split_rule: SplitRule
    hub_splits: Mapping[str, str]
    build_source: Callable[[Mapping[str, Any]], str]
    schema: Mapping[str, ColumnType]
    label_column: str | None = "label"
    raw_labels: tuple[Any, ...] | None = (0, 1)
    metric_names: tuple[str, ...] = ("accuracy",)
    is_regression: bool = False
    score_range: tuple[float, float] | None = None
    answers_column: str | None = None
    max_train_examples: int | None = None

    @property
    def is_extractive_qa(self) -> bool:
        return self.answers_column is not None

    @property
    def num_labels(self) -> int:
        """Classes for classification, 1 for regression (as Hugging Face heads count it), 0 for MRQA."""
        if self.is_regression:
            return 1
        return len(self.raw_labels) if self.raw_labels is not None else 0

    @property
    def label_words(self) -> tuple[str, ...] | None:
        """The valid targets of a classification task ("0", "1", ...); None for regression and MRQA."""
        if self.is_regression or self.raw_labels is None:
            return None
        return tuple(str(index) for index in range(len(self.raw_labels)))

    @property
    def main_metric(self) -> str:
        """The metric that picks the best checkpoint: the official `metric_for_best_model = TASK_TO_METRICS[task][0]`.

        So mrpc and qqp select on accuracy, stsb on pearson, superglue-cb on f1_multiclass and MRQA on em.
        """
        return self.metric_names[0]

    @property
    def unlabeled_value(self) -> Any:
        """The raw label that marks a row without a label: -1 (as GLUE test sets) or "" (as winogrande's test)."""
        if self.raw_labels is not None and isinstance(self.raw_labels[0], str):
            return ""
        return -1

    @property
    def required_columns(self) -> dict[str, str]:
        """Every column a data file must have (the test split may lack the label), with its expected type."""
        columns = {name: kind.value for name, kind in self.schema.items()}
        if self.answers_column is not None:
            columns[self.answers_column] = ColumnType.TEXT_LIST.value
        if self.label_column is not None:
            columns[self.label_column] = self.describe_labels()
        return columns

    def describe_labels(self) -> str:
        if self.is_regression:
            low, high = self.score_range
            return f"a number from {low} to {high}"
        return "one of " + ", ".join(repr(value) for value in self.raw_labels)

    def label_of(self, example: Mapping[str, Any]) -> int | float | None:
        """The class index (or the regression score) of a validated example; None when it has no label."""
        if self.label_column is None:
            return None
        raw = example.get(self.label_column, self.unlabeled_value)
        if raw is None or raw == self.unlabeled_value:
            return None
        if self.is_regression:
            return float(raw)
        return self.raw_labels.index(raw)

    def answers_of(self, example: Mapping[str, Any]) -> list[str]:
        """MRQA's answers, punctuation-padded as the official code pads them, so targets match the source."""
        return [pad_punctuation(answer) for answer in example.get(self.answers_column) or []]

    def target_for(self, label: int | float | None) -> str:
        """The target text of a label: the class index as a string, or the score rounded to one decimal."""
        if label is None:
            return ""
        if self.is_regression:
            # np.round, not round(): it is what the official code uses, and the two differ on some ties (0.35).
            return str(float(np.round(label, decimals=1)))
        return str(label)

    def format_example(self, example: Mapping[str, Any]) -> tuple[str, str]:
        """(source, target) of one example in the hub schema. The target is "" when the example has no label."""
        source = self.build_source(example)
        if self.is_extractive_qa:
            answers = self.answers_of(example)
            return source, answers[0] if answers else ""
        return source, self.target_for(self.label_of(example))

    def to_row(self, example: Mapping[str, Any]) -> dict[str, Any]:
        """The uniform row every split is made of: source, target, label and references.

        `label` is the class index (a float score for STS-B); -1 when unknown and always -1 for MRQA.
        `references` holds every valid answer: `[target]` for classification/regression, all answers for MRQA,
        and `[]` for an unlabeled row.
        """
        source, target = self.format_example(example)
        if self.is_extractive_qa:
            return {"source": source, "target": target, "label": -1, "references": self.answers_of(example)}
        label = self.label_of(example)
        return {
            "source": source,
            "target": target,
            "label": -1 if label is None else label,
            "references": [] if label is None else [target],
        }


# ---------------------------------------------------------------------------------------------------------------
# Formatting helpers that reproduce the official preprocessing.


def pad_punctuation(text: str) -> str:
    """Put spaces around every character that is not a letter, number, mark, underscore or space (as T5 and the
    official MRQA preprocessing do), then collapse runs of whitespace. Letters of any script are left untouched.

    The official version keeps a leading/trailing space; this one strips it (tokenizers drop it anyway).

    >>> pad_punctuation("U.S. (2019)")
    'U . S . ( 2019 )'
    """
    padded = "".join(f" {char} " if _is_padded(char) else char for char in text)
    return " ".join(padded.split())


def _is_padded(char: str) -> bool:
    return not (char == "_" or char.isspace() or unicodedata.category(char)[0] in "LNM")


def remove_markup(text: str) -> str:
    """MultiRC's HTML: `<br>` becomes a space and `<b>`/`</b>` are dropped, as the official preprocessing does."""
    return re.sub(r"</?b>", "", text.replace("<br>", " "))


def mark_span(text: str, span_text: str, span_index: int, mark: str) -> str:
    """Surround `span_text`, which starts at word `span_index` of `text`, with `mark` (T5's WSC preprocessing).

    The text is unchanged when the span is not found there, as in the official code.

    >>> mark_span("This is a test sentence .", "test", 3, "*")
    'This is a * test * sentence .'
    """
    pattern = rf"^((?:\S+\s){{{span_index}}})({re.escape(span_text)})"
    return re.sub(pattern, lambda match: f"{match.group(1)}{mark} {match.group(2)} {mark}", text)


def wsc_source(example: Mapping[str, Any]) -> str:
    """``"text: ..."`` with the noun (span1) between `*` and the pronoun (span2) between `#`."""
    text = mark_span(example["text"], example["span1_text"], example["span1_index"], "*")
    # Marking span1 first added two words before span2 when span1 comes first.
    span2_index = example["span2_index"] + 2 * int(example["span1_index"] < example["span2_index"])
    return "text: " + mark_span(text, example["span2_text"], span2_index, "#")


def multirc_source(example: Mapping[str, Any]) -> str:
    return (
        f"question: {remove_markup(example['question'])} answer: {remove_markup(example['answer'])} "
        f"paragraph: {remove_markup(example['paragraph'])}"
    )


def mrqa_source(example: Mapping[str, Any]) -> str:
    return f"question: {pad_punctuation(example['question'])} context: {pad_punctuation(example['context'])}"


# ---------------------------------------------------------------------------------------------------------------
# The registry.

_TEXT = ColumnType.TEXT
_INT = ColumnType.INT
_SMALL = {"split_rule": SplitRule.HALVE_VALIDATION, "hub_splits": {"train": "train", "validation": "validation"}}
_LARGE = {"split_rule": SplitRule.HOLD_OUT_TRAIN, "hub_splits": {"train": "train", "test": "validation"}}


def _key_values(*pairs: tuple[str, str]) -> dict[str, Any]:
    """`build_source` and `schema` of a task whose input is `key: column` pairs."""
    return {"build_source": KeyValueSource(pairs), "schema": {column: _TEXT for _, column in pairs}}


def _glue(name: str, rule: dict[str, Any], pairs: tuple[tuple[str, str], ...], **fields: Any) -> TaskSpec:
    return TaskSpec(name=name, hub_path="nyu-mll/glue", hub_config=name, **rule, **_key_values(*pairs), **fields)


def _superglue(name: str, config: str, **fields: Any) -> TaskSpec:
    return TaskSpec(name=name, hub_path="aps/super_glue", hub_config=config, **_SMALL, **fields)


def _mrqa(name: str, hub_path: str) -> TaskSpec:
    # The per-dataset MRQA 2019 parquet repos the official code loads (train + in-domain dev of mrqa-workshop/mrqa).
    return TaskSpec(
        name=name,
        hub_path=hub_path,
        hub_config=None,
        **_LARGE,
        build_source=mrqa_source,
        schema={"question": _TEXT, "context": _TEXT},
        label_column=None,
        raw_labels=None,
        answers_column="answers",
        metric_names=("em", "f1"),
    )


_SENTENCE_PAIR = (("sentence1", "sentence1"), ("sentence2", "sentence2"))
_PREMISE_HYPOTHESIS = (("premise", "premise"), ("hypothesis", "hypothesis"))

_ALL_TASKS = [
    # GLUE
    _glue("cola", _SMALL, (("sentence", "sentence"),), metric_names=("matthews_correlation",)),
    _glue("mrpc", _SMALL, _SENTENCE_PAIR, metric_names=("accuracy", "f1")),
    _glue("rte", _SMALL, _SENTENCE_PAIR),
    _glue("wnli", _SMALL, _SENTENCE_PAIR),
    _glue(
        "stsb",
        _SMALL,
        _SENTENCE_PAIR,
        raw_labels=None,
        is_regression=True,
        score_range=(0.0, 5.0),
        metric_names=("pearson", "spearmanr"),
    ),
    _glue("sst2", _LARGE, (("sentence", "sentence"),)),
    _glue("qnli", _LARGE, (("question", "question"), ("sentence", "sentence"))),
    _glue("qqp", _LARGE, (("question1", "question1"), ("question2", "question2")), metric_names=("accuracy", "f1")),
    _glue(
        "mnli",
        {
            "split_rule": SplitRule.HUB_SPLITS,
            "hub_splits": {"train": "train", "validation": "validation_mismatched", "test": "validation_matched"},
        },
        _PREMISE_HYPOTHESIS,
        raw_labels=(0, 1, 2),
    ),
    # SuperGLUE
    _superglue("superglue-boolq", "boolq", **_key_values(("question", "question"), ("passage", "passage"))),
    _superglue(
        "superglue-cb",
        "cb",
        **_key_values(*_PREMISE_HYPOTHESIS),
        raw_labels=(0, 1, 2),
        metric_names=("f1_multiclass", "accuracy"),
    ),
    _superglue(
        "superglue-multirc",
        "multirc",
        build_source=multirc_source,
        schema={"question": _TEXT, "answer": _TEXT, "paragraph": _TEXT},
        metric_names=("f1",),
    ),
    _superglue("superglue-wic", "wic", **_key_values(*_SENTENCE_PAIR, ("word", "word"))),
    _superglue(
        "superglue-wsc.fixed",
        "wsc.fixed",
        build_source=wsc_source,
        schema={"text": _TEXT, "span1_text": _TEXT, "span1_index": _INT, "span2_text": _TEXT, "span2_index": _INT},
    ),
    # MRQA 2019
    _mrqa("newsqa", "lucadiliello/newsqa"),
    _mrqa("searchqa", "lucadiliello/searchqa"),
    _mrqa("hotpotqa", "lucadiliello/hotpotqa"),
    _mrqa("nq", "lucadiliello/naturalquestionsshortqa"),
    # Others
    TaskSpec(
        name="winogrande",
        hub_path="allenai/winogrande",
        hub_config="winogrande_xl",
        **_LARGE,
        **_key_values(("sentence", "sentence"), ("option0", "option1"), ("option1", "option2")),
        label_column="answer",
        raw_labels=("1", "2"),
    ),
    TaskSpec(
        name="yelp_polarity",
        hub_path="fancyzhx/yelp_polarity",
        hub_config="plain_text",
        split_rule=SplitRule.HOLD_OUT_TRAIN,
        hub_splits={"train": "train", "test": "test"},
        **_key_values(("sentence", "text")),
        max_train_examples=100_000,
    ),
    TaskSpec(
        name="scitail",
        hub_path="allenai/scitail",
        hub_config="snli_format",
        **_SMALL,
        **_key_values(("premise", "sentence1"), ("hypothesis", "sentence2")),
        label_column="gold_label",
        raw_labels=("entailment", "neutral"),
    ),
    TaskSpec(
        name="paws",
        hub_path="google-research-datasets/paws",
        hub_config="labeled_final",
        split_rule=SplitRule.HUB_SPLITS,
        hub_splits={"train": "train", "validation": "validation", "test": "test"},
        **_key_values(*_SENTENCE_PAIR),
    ),
]

TASKS: dict[str, TaskSpec] = {task.name: task for task in _ALL_TASKS}
"""Every task of the paper (plus wnli, which DESIGN.md lists among the small sets), by name."""

GLUE_TASKS = ("cola", "mrpc", "mnli", "qnli", "qqp", "rte", "sst2", "stsb")
SUPERGLUE_TASKS = ("superglue-multirc", "superglue-wic", "superglue-wsc.fixed", "superglue-cb", "superglue-boolq")
MRQA_TASKS = ("newsqa", "searchqa", "hotpotqa", "nq")
OTHER_TASKS = ("winogrande", "yelp_polarity", "scitail", "paws")


def get_task(name: str) -> TaskSpec:
    """The spec of `name`; an unknown name raises a `FlagError` (a ValueError) that lists the known ones and the
    closest match."""
    try:
        return TASKS[name]
    except KeyError:
        close = difflib.get_close_matches(name, TASKS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise FlagError(f"Unknown task {name!r}.{hint} Known tasks: {', '.join(sorted(TASKS))}.") from None
