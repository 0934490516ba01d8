"""Metrics of the vision-language tasks, all x100.

- VQA: `vqa_accuracy` and `vqa_accuracy_per_answer_type` (the official `vqaEval.py`, in `dept_vl.vqa_eval`).
- GQA and NLVR2: `accuracy`; NLVR2 also reports `nlvr_consistency`.
- COCO captions: `caption_scores`, `bleu4_score`, `cider_d_score` (BLEU-4 and CIDEr-D, in `dept_vl.caption_eval`).

`dept_vl.metric_modules.load` gives each of these metrics as a Hugging Face `evaluate` module, built locally.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from dept_vl.caption_eval import (
    bleu4_score,
    caption_scores,
    cider_d_score,
    cider_d_scores,
    corpus_bleu,
    tokenize_caption,
)
from dept_vl.vqa_eval import normalize_vqa_answer, vqa_accuracy, vqa_accuracy_per_answer_type, vqa_score

__all__ = [
    "accuracy",
    "bleu4_score",
    "caption_scores",
    "cider_d_score",
    "cider_d_scores",
    "corpus_bleu",
    "normalize_vqa_answer",
    "nlvr_consistency",
    "nlvr_sentence_id",
    "tokenize_caption",
    "vqa_accuracy",
    "vqa_accuracy_per_answer_type",
    "vqa_score",
]


def _normalize_label(text: str) -> str:
    return text.strip().lower()


def _correct(predictions: Sequence[str], references: Sequence[str]) -> list[bool]:
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions for {len(references)} references; pass one of each per example"
        )
    if len(predictions) == 0:
        raise ValueError("no examples to score: predictions and references are empty")
    return [_normalize_label(p) == _normalize_label(r) for p, r in zip(predictions, references)]


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Exact-match accuracy (x100) after stripping and lower-casing both sides (GQA, NLVR2)."""
    correct = _correct(predictions, references)
    return 100.0 * sum(correct) / len(correct)


def nlvr_sentence_id(identifier: str) -> str:
    """The sentence an NLVR2 example belongs to, for `nlvr_consistency`.

    NLVR2 identifiers read ``split-set_id-pair_id-sentence_id``. One sentence is paired with several image pairs
    of its set, so, as in the official ``eval/metrics.py``, the group drops the pair id:
    ``"dev-850-0-1"`` and ``"dev-850-2-1"`` are the same sentence, ``"dev-850-0-0"`` is another.

    >>> nlvr_sentence_id("dev-850-2-1")
    'dev-850-1'
    """
    parts = identifier.split("-")
    if len(parts) != 4:
        raise ValueError(f"NLVR2 identifier {identifier!r} is not of the form split-set_id-pair_id-sentence_id")
    split, set_id, _pair_id, sentence_id = parts
    return f"{split}-{set_id}-{sentence_id}"


def nlvr_consistency(predictions: Sequence[str], references: Sequence[str], group_ids: Sequence[Hashable]) -> float:
    """The share (x100) of groups whose examples are all predicted right (NLVR2's consistency).

    Args:
        predictions: one predicted label per example ("true"/"false").
        references: the gold labels.
        group_ids: the group of each example; for NLVR2, ``nlvr_sentence_id(identifier)``.
    """
    correct = _correct(predictions, references)
    if len(group_ids) != len(correct):
        raise ValueError(f"got {len(group_ids)} group ids for {len(correct)} examples; pass one per example")
    all_correct: dict[Hashable, bool] = {}
    for group, is_correct in zip(group_ids, correct):
        all_correct[group] = all_correct.get(group, True) and is_correct
    return 100.0 * sum(all_correct.values()) / len(all_correct)
