"""Tiny data in each task's real hub schema, as local files or as an in-memory hub DatasetDict.

    paths = write_task_fixture("rte", tmp_path)          # {"train_file": ..., "validation_file": ..., "test_file": ...}
    splits = load_task_datasets("rte", **paths)          # never touches the hub

Labels cycle through the classes (row i has class i % num_classes), and each row's text carries a cue word for
its class, so a tiny model can learn the tasks.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from dept_nlp.tasks import SPLITS, TaskSpec, get_task

CUE_WORDS = ("red", "green", "blue")  # the cue of class 0, 1, 2
FILE_FORMATS = ("jsonl", "json", "csv", "parquet")


def hub_row(task_name: str, index: int, labeled: bool = True) -> dict[str, Any]:
    """Row `index` of a task in its hub schema; `labeled=False` gives the hub's unlabeled marker instead."""
    task = get_task(task_name)
    classes = task.num_labels if task.num_labels > 1 else len(CUE_WORDS)  # regression/QA: cues vary anyway
    cue = CUE_WORDS[index % classes]
    text = f"example {index} is {cue}"
    row: dict[str, Any] = {name: f"{name} of {text}" for name in task.schema}
    if task.name == "superglue-wsc.fixed":
        words = ["Mark", "told", "Pete", "that", "he", "was", cue, "."]
        row.update(text=" ".join(words), span1_text="Mark", span1_index=0, span2_text="he", span2_index=4)
    if task.is_extractive_qa:
        row.update(context=f"The answer of example {index} is {cue} today.", answers=[cue, f"{cue} today"])
        if not labeled:
            row["answers"] = []
        return row
    row[task.label_column] = _raw_label(task, index) if labeled else task.unlabeled_value
    if "idx" not in row and task.label_column == "label":
        row["idx"] = index  # GLUE/SuperGLUE carry an idx column; it is not required
    return row


def _raw_label(task: TaskSpec, index: int) -> Any:
    if task.is_regression:
        return (index % 11) * 0.5  # 0.0 .. 5.0
    return task.raw_labels[index % task.num_labels]


def hub_rows(task_name: str, count: int, start: int = 0, labeled: bool = True) -> list[dict[str, Any]]:
    return [hub_row(task_name, index, labeled) for index in range(start, start + count)]


def hub_dataset_dict(task_name: str, sizes: Mapping[str, int]) -> datasets.DatasetDict:
    """An in-memory stand-in for `datasets.load_dataset(hub_path, hub_config)`: `sizes` maps hub split -> rows.

    Row numbers run on across splits, so every row of the DatasetDict has different text.
    """
    splits, start = {}, 0
    for name, size in sizes.items():
        splits[name] = datasets.Dataset.from_list(hub_rows(task_name, size, start=start))
        start += size
    return datasets.DatasetDict(splits)


def write_task_fixture(
    task_name: str,
    directory: str | Path,
    n_train: int = 8,
    n_val: int = 4,
    n_test: int = 4,
    *,
    file_format: str = "jsonl",
    labeled_test: bool = True,
) -> dict[str, Path]:
    """Write train/validation/test files in the task's hub schema; return them as `load_task_datasets` kwargs.

    `labeled_test=False` writes the test split with the hub's unlabeled marker (-1, "" or no answers).
    MRQA cannot be written as CSV (its answers are lists).
    """
    if file_format not in FILE_FORMATS:
        raise ValueError(f"file_format must be one of {FILE_FORMATS}; got {file_format!r}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sizes = {"train": n_train, "validation": n_val, "test": n_test}
    paths, start = {}, 0
    for split in SPLITS:
        rows = hub_rows(task_name, sizes[split], start=start, labeled=labeled_test or split != "test")
        path = directory / f"{task_name}_{split}.{file_format}"
        write_rows(rows, path)
        paths[f"{split}_file"] = path
        start += sizes[split]
    return paths


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    """Write rows as .jsonl, .json (an array), .csv or .parquet, chosen by the suffix."""
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    elif suffix == ".csv":
        if any(isinstance(value, list) for row in rows for value in row.values()):
            raise ValueError(f"{path}: CSV cannot hold the list columns of these rows.")
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(f"Unsupported suffix {suffix!r}")
