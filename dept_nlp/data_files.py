"""A task's train/validation/test, from the Hugging Face Hub, from local files, or both; every row validated.

    splits = load_task_datasets("rte")                                   # hub, with the task's split rule
    splits = load_task_datasets("sst2", **sample_sst2_files())           # the small offline sample shipped here
    splits["train"][0]  # {"source": "sentence: ...", "target": "1", "label": 1, "references": ["1"]}

Which data makes which split:

- A file you pass (`train_file`, `validation_file`, `test_file`) is that split, whole and unchanged.
- A split you do not pass comes from the hub, built by the task's split rule (`dept_nlp.tasks.SplitRule`) exactly
  as if no file had been given. If you pass all the splits you ask for, the hub is never contacted.
  E.g. rte with only `train_file`: validation and test are still the two halves of the hub validation split.
- Files are json (JSON Lines or one array of objects), jsonl, csv or parquet, with the hub's column names and
  types (`TaskSpec.required_columns`). Other columns are ignored.

Validation (`DataValidationError`, a ValueError): a missing column, an empty text, a missing label, a label that is
not one of the task's labels, or a value of the wrong type (a number written as a string, a list where a string is
expected) stops loading with a message that names the file, the row and what was expected.
The test split may be unlabeled, for predict-only runs: no label column at all, or the hub's own marker on a row
(-1 as GLUE's test sets, "" as winogrande's). Such rows get label -1, target "" and no references.
Loading never normalises text: unicode, emoji and right-to-left text pass through as they are (only the MRQA
formatting pads punctuation with spaces, as the official code does; see `dept_nlp.tasks.pad_punctuation`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dept.errors import UserError
from dept.extras import LazyModule
from dept_nlp.tasks import SPLITS, ColumnType, SplitRule, TaskSpec, get_task

logger = logging.getLogger(__name__)
datasets = LazyModule("datasets")  # imported on first use: it costs a third of `import torch` at start-up

SUPPORTED_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
VALIDATION_HOLDOUT = 1000
"""HOLD_OUT_TRAIN tasks: how many shuffled training rows become the validation split (the official value)."""

SAMPLE_DATA_DIR = Path(__file__).resolve().parent / "data"


class DataValidationError(UserError, ValueError):
    """A data row does not fit its task. The message names the file (or hub split), the row and what was expected."""


class HubDataError(UserError, RuntimeError):
    """The task's dataset could not be loaded from the Hugging Face Hub (offline, unknown config, ...)."""


def load_task_datasets(
    task_name: str,
    *,
    dataset_config_name: str | None = None,
    train_file: str | Path | None = None,
    validation_file: str | Path | None = None,
    test_file: str | Path | None = None,
    seed: int = 42,
    cache_dir: str | Path | None = None,
    splits: Iterable[str] = SPLITS,
) -> datasets.DatasetDict:
    """Load, validate and format the splits of a task (see the module docstring for where each split comes from).

    Args:
        task_name: a key of `dept_nlp.tasks.TASKS`.
        dataset_config_name: accepted for the official CLI and ignored, as there: each task always loads its own
            hub config (`TaskSpec.hub_config`). A different name is logged, never passed to the hub.
        train_file / validation_file / test_file: local files in the hub schema; each replaces that split.
        seed: seeds the shuffle of the split rule. Keep 42 to get the official code's exact splits.
        cache_dir: the `datasets` cache for hub downloads.
        splits: which splits to build; e.g. ``("test",)`` with only `test_file` for a predict-only run.

    Returns:
        A DatasetDict with the requested splits. Each has the columns `source` (str), `target` (str), `label`
        (int class index; float score for stsb; -1 when unknown and for MRQA) and `references` (list[str]: every
        valid answer, `[target]` for classification, `[]` when unlabeled).
    """
    task = get_task(task_name)
    splits = tuple(splits)
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown or not splits:
        raise ValueError(f"splits must be a non-empty subset of {SPLITS}; got {splits}.")
    files = {"train": train_file, "validation": validation_file, "test": test_file}
    raw = {split: load_data_file(task, files[split], split) for split in splits if files[split] is not None}
    missing = [split for split in splits if split not in raw]
    if dataset_config_name is not None and dataset_config_name != task.hub_config:
        logger.warning("--dataset_config_name %r is ignored: task %s always loads %s config %r, as the official "
                       "code does.", dataset_config_name, task.name, task.hub_path, task.hub_config)
    if missing:
        raw.update(load_hub_splits(task, missing, config=task.hub_config, seed=seed, cache_dir=cache_dir))
    return datasets.DatasetDict({split: format_split(task, raw[split]) for split in splits})


def sample_sst2_files() -> dict[str, str]:
    """The small synthetic sentiment set shipped in `dept_nlp/data/` (sst2 schema), as `load_task_datasets` kwargs."""
    return {f"{split}_file": str(SAMPLE_DATA_DIR / f"sst2_sample_{split}.jsonl") for split in SPLITS}


def output_features(task: TaskSpec) -> datasets.Features:
    return datasets.Features(
        {
            "source": datasets.Value("string"),
            "target": datasets.Value("string"),
            "label": datasets.Value("float64" if task.is_regression else "int64"),
            "references": datasets.List(datasets.Value("string")),
        }
    )


def format_split(task: TaskSpec, dataset: datasets.Dataset) -> datasets.Dataset:
    """Rows in the hub schema -> rows of `source`, `target`, `label`, `references` (see `TaskSpec.to_row`)."""
    return dataset.map(
        task.to_row,
        remove_columns=dataset.column_names,
        features=output_features(task),
        desc=f"Formatting {task.name}",
    )


# ---------------------------------------------------------------------------------------------------------------
# The hub


def hub_split_rows(
    task: TaskSpec, hub_sizes: Mapping[str, int], seed: int = 42
) -> dict[str, tuple[str, list[int] | None]]:
    """For train/validation/test: which hub split it comes from and which of its rows (None: all, in order).

    The shuffle is `torch.randperm` with a generator seeded with `seed`, as in the official code, so seed 42
    gives exactly the official validation/test halves and the official 1000-row validation holdout.
    """
    names = task.hub_splits
    if task.split_rule is SplitRule.HUB_SPLITS:
        return {split: (names[split], None) for split in SPLITS}
    if task.split_rule is SplitRule.HALVE_VALIDATION:
        order = _permutation(hub_sizes[names["validation"]], seed)
        half = len(order) // 2
        return {
            "train": (names["train"], None),
            "validation": (names["validation"], order[:half]),
            "test": (names["validation"], order[half:]),
        }
    order = _permutation(hub_sizes[names["train"]], seed)
    if len(order) <= VALIDATION_HOLDOUT:
        raise ValueError(
            f"{task.name}: the hub train split has {len(order)} rows; the split rule holds out {VALIDATION_HOLDOUT} "
            "of them for validation and needs more than that."
        )
    train_rows = order[VALIDATION_HOLDOUT:]
    if task.max_train_examples is not None:
        train_rows = train_rows[: task.max_train_examples]
    return {
        "train": (names["train"], train_rows),
        "validation": (names["train"], order[:VALIDATION_HOLDOUT]),
        "test": (names["test"], None),
    }


def split_is_shuffled(task: TaskSpec, split: str, from_file: bool) -> bool:
    """Whether the split rule already put a hub split's rows in seeded random order (see `hub_split_rows`)."""
    if from_file:
        return False
    if task.split_rule is SplitRule.HALVE_VALIDATION:
        return split in ("validation", "test")
    return task.split_rule is SplitRule.HOLD_OUT_TRAIN and split in ("train", "validation")


def subsample(dataset: datasets.Dataset, max_samples: int | None, seed: int = 42, *,
              already_shuffled: bool = False) -> datasets.Dataset:
    """A random subset of `max_samples` rows drawn with `seed`, as the official `--max_*_samples` (`subsample`).

    The official code takes the first rows of `torch.randperm(len, seed)`; for a split the split rule already
    shuffled with that permutation (`split_is_shuffled`), it takes the split's first rows instead, in the same
    order. None (or more rows than the split has) keeps the whole split.
    """
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    if max_samples < 1:
        raise ValueError(f"max samples must be >= 1 or unset, got {max_samples}.")
    rows = range(max_samples) if already_shuffled else _permutation(len(dataset), seed)[:max_samples]
    return dataset.select(rows)


def _permutation(size: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(size, generator=generator).tolist()


def load_hub_splits(
    task: TaskSpec,
    splits: Sequence[str],
    *,
    config: str | None,
    seed: int = 42,
    cache_dir: str | Path | None = None,
) -> dict[str, datasets.Dataset]:
    """The requested splits of `task`, from `datasets.load_dataset(task.hub_path, config)` and the split rule.

    Rows stay in the hub schema; each split is validated (errors name the hub split and its row number).
    """
    needed = sorted({task.hub_splits[split] for split in SPLITS if split in task.hub_splits})
    hub = {name: _load_hub_split(task, config, name, needed, cache_dir) for name in needed}
    plan = hub_split_rows(task, {name: len(hub[name]) for name in needed}, seed)
    loaded = {}
    for split in splits:
        hub_name, rows = plan[split]
        dataset = hub[hub_name] if rows is None else hub[hub_name].select(rows)
        source = f"{task.hub_path} ({config}), split {hub_name!r}"
        validate_dataset(task, dataset, split=split, source=source, row_name=_hub_row_name(rows))
        loaded[split] = dataset
    return loaded


def _load_hub_split(task: TaskSpec, config: str | None, split: str, needed: list[str],
                    cache_dir: str | Path | None) -> datasets.Dataset:
    """`datasets.load_dataset(hub_path, config, split=split)`, as the official `load_dataset` asks for it."""
    try:
        return datasets.load_dataset(task.hub_path, config, split=split,
                                     cache_dir=None if cache_dir is None else str(cache_dir))
    except ValueError as err:
        if "split" in str(err).lower():  # datasets: 'Unknown split "x". Should be one of [...]'
            raise DataValidationError(
                f"{task.hub_path} ({config}): {err} Task {task.name} needs the splits {needed}. "
                "Pass the split as a file instead."
            ) from err
        raise _hub_error(task, config, err) from err
    except Exception as err:  # offline, network, unknown config: all need the same advice
        raise _hub_error(task, config, err) from err


def _hub_error(task: TaskSpec, config: str | None, err: Exception) -> HubDataError:
    return HubDataError(
        f"Could not load {task.hub_path!r} (config {config!r}) for task {task.name!r}: {err}\n"
        "Without the Hub, pass every split you need as a file (--train_file, --validation_file, --test_file; "
        f"json, jsonl, csv or parquet) with the columns {task.required_columns}."
    )


def _hub_row_name(rows: list[int] | None) -> Callable[[int], str]:
    if rows is None:
        return lambda index: f"row {index}"
    return lambda index: f"row {rows[index]}"


# ---------------------------------------------------------------------------------------------------------------
# Local files


@dataclass
class _Table:
    columns: dict[str, list[Any]]
    num_rows: int
    values_are_text: bool  # CSV: every value is a string and numbers are parsed from it
    row_name: Callable[[int], str]


_MISSING = object()  # a JSON row without the key


def load_data_file(task: TaskSpec, path: str | Path, split: str) -> datasets.Dataset:
    """A local file as a Dataset of the task's hub columns, after every row passed validation."""
    path = Path(path)
    table = read_table(path)
    columns = validate_columns(
        task,
        table.columns,
        split=split,
        source=str(path),
        row_name=table.row_name,
        values_are_text=table.values_are_text,
    )
    return datasets.Dataset.from_dict(columns)


def read_table(path: Path) -> _Table:
    """Read a json/jsonl/csv/parquet file into columns, keeping each value's type as the file wrote it.

    JSON is parsed here rather than by `datasets`, whose loader turns a column of mixed types into JSON values
    and so cannot tell the label 1 from the label "1".
    """
    if path.is_dir():
        raise DataValidationError(f"{path} is a directory, not a data file: pass the file itself "
                                  f"({', '.join(sorted(SUPPORTED_FORMATS))}).")
    if not path.is_file():
        raise FileNotFoundError(f"Data file not found: {path}")
    kind = SUPPORTED_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(SUPPORTED_FORMATS)}.")
    table = {"json": _read_json, "csv": _read_csv, "parquet": _read_parquet}[kind](path)
    if table.num_rows == 0:
        raise DataValidationError(f"{path}: the file has no rows.")
    return table


def _read_text(path: Path) -> str:
    """The file as text (UTF-8, with or without a byte-order mark); other encodings name the line to fix."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataValidationError(
            f"{path}: line {line} is not UTF-8 (byte {data[err.start]:#04x} at offset {err.start}). Save the file "
            "as UTF-8, e.g. iconv -f latin1 -t utf-8 IN > OUT."
        ) from None


def _read_json(path: Path) -> _Table:
    text = _read_text(path)
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataValidationError(f"{path}: not valid JSON ({err}).") from err
        row_name = _plain_row_name
    else:  # JSON Lines. Split on "\n" only: JSON strings may hold U+2028, which str.splitlines() splits on.
        items, line_numbers = [], []
        for line_number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as err:
                if _is_one_json_object(text):
                    raise DataValidationError(
                        f"{path}: the file is one JSON object; expected one object per line (JSON Lines) "
                        "or an array of objects."
                    ) from err
                raise DataValidationError(
                    f"{path}: line {line_number} is not valid JSON ({err.msg}). Expected one JSON object per line."
                ) from err
            line_numbers.append(line_number)

        def row_name(index: int) -> str:
            return f"row {index} (line {line_numbers[index]})"

    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataValidationError(f"{path}: {row_name(index)} is {_show(item)}; expected a JSON object.")
    names = dict.fromkeys(key for item in items for key in item)
    columns = {name: [item.get(name, _MISSING) for item in items] for name in names}
    return _Table(columns, len(items), values_are_text=False, row_name=row_name)


def _is_one_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _read_csv(path: Path) -> _Table:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    rows = list(reader)
    names = [name for name in reader.fieldnames or [] if name is not None]
    # A short row gives None for the cells it lacks: treated as missing.
    columns = {name: [row.get(name) for row in rows] for name in names}
    return _Table(columns, len(rows), values_are_text=True, row_name=lambda index: f"row {index} (after the header)")


def _read_parquet(path: Path) -> _Table:
    import pyarrow.parquet as pq

    columns = pq.read_table(path).to_pydict()
    num_rows = len(next(iter(columns.values()))) if columns else 0
    return _Table(columns, num_rows, values_are_text=False, row_name=_plain_row_name)


def _plain_row_name(index: int) -> str:
    return f"row {index}"


# ---------------------------------------------------------------------------------------------------------------
# Validation


class _Problem(Exception):
    """What is wrong with one value; turned into a DataValidationError that says where."""


def validate_dataset(
    task: TaskSpec,
    dataset: datasets.Dataset,
    *,
    split: str,
    source: str,
    row_name: Callable[[int], str] = _plain_row_name,
    batch_size: int = 10_000,
) -> None:
    """`validate_columns` over a Dataset, a batch at a time, so a large hub split never sits in memory at once."""
    wanted = [name for name in task.required_columns if name in dataset.column_names]
    _check_columns_present(task, set(dataset.column_names), split=split, source=source)
    offset = 0
    for batch in dataset.select_columns(wanted).iter(batch_size=batch_size):
        validate_columns(task, batch, split=split, source=source, row_name=lambda i, start=offset: row_name(start + i))
        offset += len(next(iter(batch.values())))


def validate_columns(
    task: TaskSpec,
    columns: Mapping[str, Sequence[Any]],
    *,
    split: str,
    source: str,
    row_name: Callable[[int], str] = _plain_row_name,
    values_are_text: bool = False,
) -> dict[str, list[Any]]:
    """Check every value the task reads; return those columns with numbers parsed (CSV) and integral floats as int.

    Raises DataValidationError at the first bad value, naming `source`, the row and what was expected.
    """
    _check_columns_present(task, set(columns), split=split, source=source)
    checks: dict[str, Callable[[Any], Any]] = {
        name: _value_check(kind, values_are_text) for name, kind in task.schema.items()
    }
    if task.label_column is not None and task.label_column in columns:
        checks[task.label_column] = lambda value: _check_label(task, value, split, values_are_text)
    if task.answers_column is not None and task.answers_column in columns:
        checks[task.answers_column] = lambda value: _check_text_list(
            value, values_are_text, allow_empty=split == "test"
        )

    checked = {}
    for name, check in checks.items():
        values = []
        for index, value in enumerate(columns[name]):
            try:
                values.append(check(value))
            except _Problem as problem:
                raise DataValidationError(
                    f"{source}: {row_name(index)}, column {name!r} {problem}. "
                    f"Expected {task.required_columns[name]} (task {task.name}, {split} split)."
                ) from None
        checked[name] = values
    return checked


def _check_columns_present(task: TaskSpec, present: set[str], *, split: str, source: str) -> None:
    required = dict(task.required_columns)
    label = task.label_column or task.answers_column
    if split == "test":
        required.pop(label)  # an unlabeled test split is fine: predict-only
    absent = [name for name in required if name not in present]
    if absent:
        raise DataValidationError(
            f"{source}: missing column(s) {absent} for task {task.name} ({split} split). "
            f"Expected columns {task.required_columns}; found {sorted(present)}."
        )


def _value_check(kind: ColumnType, values_are_text: bool) -> Callable[[Any], Any]:
    if kind is ColumnType.TEXT:
        return _check_text
    if kind is ColumnType.INT:
        return lambda value: _check_int(value, values_are_text)
    return lambda value: _check_text_list(value, values_are_text, allow_empty=False)


def _check_text(value: Any) -> str:
    if value is _MISSING or value is None:
        raise _Problem("is missing")
    if not isinstance(value, str):
        raise _Problem(f"is {_show(value)}, not a string")
    if not value.strip():
        raise _Problem(f"is empty ({value!r})")
    return value


def _check_int(value: Any, values_are_text: bool) -> int:
    if value is _MISSING or value is None or (values_are_text and value == ""):
        raise _Problem("is missing")
    if values_are_text:
        if not re.fullmatch(r"\s*[+-]?\d+\s*", value):
            raise _Problem(f"is {value!r}, not an integer")
        return int(value)
    if isinstance(value, float) and value.is_integer():  # pandas writes integer columns with gaps as floats
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        hint = "; write numbers without quotes" if isinstance(value, str) else ""
        raise _Problem(f"is {_show(value)}, not an integer{hint}")
    return value


def _check_number(value: Any, values_are_text: bool) -> float:
    if value is _MISSING or value is None or (values_are_text and value == ""):
        raise _Problem("is missing")
    if values_are_text:
        try:
            number = float(value)
        except ValueError:
            raise _Problem(f"is {value!r}, not a number") from None
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = "; write numbers without quotes" if isinstance(value, str) else ""
        raise _Problem(f"is {_show(value)}, not a number{hint}")
    else:
        number = float(value)
    if math.isnan(number):
        raise _Problem("is missing (NaN)")
    return number


def _check_label(task: TaskSpec, value: Any, split: str, values_are_text: bool) -> Any:
    unlabeled = task.unlabeled_value
    if task.is_regression:
        label = _check_number(value, values_are_text)
    elif isinstance(unlabeled, str):
        label = _check_text_label(value)
    else:
        label = _check_int(value, values_are_text)
    if label == unlabeled:
        if split == "test":
            return label
        raise _Problem(f"is {label!r}, which marks an unlabeled row; only the test split may be unlabeled")
    if task.is_regression:
        low, high = task.score_range
        if not low <= label <= high:
            raise _Problem(f"is {label}, outside [{low}, {high}]")
    elif label not in task.raw_labels:
        raise _Problem(f"is {label!r}, not a label of this task")
    return label


def _check_text_label(value: Any) -> str:
    if value is _MISSING or value is None:
        raise _Problem("is missing")
    if not isinstance(value, str):
        raise _Problem(f"is {_show(value)}, not a string")
    return value


def _check_text_list(value: Any, values_are_text: bool, allow_empty: bool) -> list[str]:
    if values_are_text:
        raise _Problem("cannot be read from CSV, which has no lists; use a .jsonl or .parquet file")
    if value is _MISSING or value is None:
        raise _Problem("is missing")
    if not isinstance(value, (list, tuple)):
        raise _Problem(f"is {_show(value)}, not a list")
    if not value and not allow_empty:
        raise _Problem("is an empty list; only the test split may be unlabeled")
    answers = []
    for position, answer in enumerate(value):
        try:
            answers.append(_check_text(answer))
        except _Problem as problem:
            raise _Problem(f"has item {position} that {problem}") from None
    return answers


def _show(value: Any) -> str:
    """A value and its type for an error message, e.g. "'1' (str)"."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"
