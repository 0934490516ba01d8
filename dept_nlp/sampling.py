"""k-shot training subsets: balanced by class for classification and STS-B, a plain seeded sample for MRQA.

Like the official `--k_shot_example` code, the training set is shuffled with the run's seed and STS-B is balanced
on score <= 2.5 against > 2.5 (`STSB_K_SHOT_THRESHOLD`). Unlike it, each class gets an exact quota: the official
loop takes rows greedily, `k // classes` per class, and gives the last free slot to whichever row comes next, so
its sample can be unbalanced by one, and falls short of k when k % classes > 1. Here the remainder goes one row
each to the lowest class indices, and a sample that cannot be made is an error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import datasets

STSB_K_SHOT_THRESHOLD = 2.5
"""STS-B k-shot classes, as the official code: score <= 2.5 is class 0, score > 2.5 is class 1."""


def k_shot_sample(
    dataset: datasets.Dataset,
    k: int,
    seed: int,
    *,
    label_column: str = "label",
    balanced: bool | None = None,
    score_threshold: float | None = None,
) -> datasets.Dataset:
    """`k` rows of `dataset`, the same rows for the same seed.

    The dataset is shuffled with `seed` (as the official `k_shot_example` code does) and the sample keeps that
    shuffled order, so the classes come mixed.

    - Balanced (classification): each class gets `k // num_classes` rows; the remainder goes one row each to the
      lowest class indices. A class with too few rows is an error, not a silently smaller sample.
    - Scores with `score_threshold` (STS-B): balanced on two classes, score <= threshold and score > threshold.
    - Not balanced (MRQA, or scores without a threshold): the first `k` shuffled rows.

    Args:
        dataset: a formatted split (`dept_nlp.data_files.load_task_datasets`), or any dataset with `label_column`.
        balanced: None decides from the labels: balanced when they are integer class indices, all >= 0.
        score_threshold: balance regression scores on this threshold (`STSB_K_SHOT_THRESHOLD` for STS-B).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}.")
    if k > len(dataset):
        raise ValueError(f"k={k} is larger than the dataset, which has {len(dataset)} rows.")
    shuffled = dataset.shuffle(seed=seed)
    labels = np.asarray(shuffled[label_column])
    if score_threshold is not None:
        labels = (labels > score_threshold).astype(np.int64)
    is_class_index = np.issubdtype(labels.dtype, np.integer) and bool((labels >= 0).all())
    if balanced is None:
        balanced = is_class_index
    if not balanced:
        return shuffled.select(range(k))
    if not is_class_index:
        raise ValueError(f"A balanced sample needs integer class labels >= 0 in {label_column!r}.")
    classes = np.unique(labels)
    quotas = np.full(len(classes), k // len(classes))
    quotas[: k % len(classes)] += 1
    chosen = []
    for label, quota in zip(classes, quotas):
        rows = np.flatnonzero(labels == label)
        if len(rows) < quota:
            raise ValueError(
                f"A balanced {k}-shot sample needs {quota} rows of class {label}, but the dataset has {len(rows)}."
            )
        chosen.append(rows[:quota])
    return shuffled.select(np.sort(np.concatenate(chosen)).tolist())
