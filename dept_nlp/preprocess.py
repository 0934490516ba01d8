"""Turn task rows (source, target, label, references) into token ids for each task type, and batch them.

- seq2seq: `input_ids` from the source, `labels` from the target.
- causal: `input_ids` = the source in `causal_template` (official: ``"{source} Label : "``), the target, eos;
  `labels` = -100 over the templated source, which alone (`prompt_input_ids`) is kept for generation.
- cls: `input_ids` from the source, `labels` = the class index (a float score for regression).

Inputs longer than `max_length` are cut (keeping a closing special token), and the count is reported once.
"""

from __future__ import annotations

import logging
import string
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

CAUSAL_TEMPLATE = "{source} Label : "
"""Decoder-only models: the text before the target, as the official `decoder_preprocess_function` writes it."""


def check_causal_template(template: str) -> str:
    """The template, if it holds `{source}` once and no other field; else a ValueError that says how to write it."""
    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    if fields != ["source"]:
        raise ValueError(
            f"--causal_template {template!r} must contain {{source}} exactly once and no other {{field}}, "
            f"e.g. the official {CAUSAL_TEMPLATE!r}."
        )
    return template


def _cut(ids: list[int], limit: int, special_ids: set[int]) -> list[int]:
    """Truncate to `limit` tokens, keeping a closing special token (eos, [SEP]) the tokenizer appended."""
    if len(ids) <= limit:
        return ids
    if ids[-1] in special_ids:
        return ids[: limit - 1] + ids[-1:]
    return ids[:limit]


def encode_source(tokenizer, task_type: str, source: str, causal_template: str = CAUSAL_TEMPLATE) -> list[int]:
    """The input ids of one source text, before truncation, as the model of that task type reads them.

    Decoder-only models read `bos + causal_template(source)`, the target following; the others read the
    tokenizer's own encoding (with its special tokens).
    """
    if task_type == "causal":
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return bos + tokenizer(causal_template.format(source=source), add_special_tokens=False)["input_ids"]
    return tokenizer(source)["input_ids"]


def seq2seq_target_ids(tokenizer, target: str, max_target_length: int) -> list[int]:
    """The label ids of an encoder-decoder target, cut at `max_target_length` keeping eos (the official labels)."""
    return _cut(tokenizer(target)["input_ids"], max_target_length, set(tokenizer.all_special_ids))


def tokenize_rows(
    dataset: datasets.Dataset,
    tokenizer,
    task_type: str,
    max_length: int,
    max_target_length: int = 20,
    split_name: str = "",
    causal_template: str = CAUSAL_TEMPLATE,
) -> datasets.Dataset:
    """Token ids for one split. Keeps `references`; drops the text columns."""
    check_causal_template(causal_template)
    special_ids = set(tokenizer.all_special_ids)
    truncated = 0

    def encode(batch):
        nonlocal truncated
        out = {"input_ids": [], "labels": []}
        if task_type == "causal":
            out["prompt_input_ids"] = []
        for source, target, label in zip(batch["source"], batch["target"], batch["label"]):
            if task_type == "causal":
                source_ids = encode_source(tokenizer, task_type, source, causal_template)
                target_ids = tokenizer(target, add_special_tokens=False)["input_ids"][: max_target_length - 1]
                target_ids = target_ids + [tokenizer.eos_token_id]
                room = max(max_length - len(target_ids), 1)
                truncated += len(source_ids) > room
                source_ids = source_ids[:room]
                out["prompt_input_ids"].append(source_ids)
                out["input_ids"].append((source_ids + target_ids)[:max_length])
                out["labels"].append(([-100] * len(source_ids) + target_ids)[:max_length])
                continue
            ids = encode_source(tokenizer, task_type, source)
            truncated += len(ids) > max_length
            out["input_ids"].append(_cut(ids, max_length, special_ids))
            if task_type == "seq2seq":
                out["labels"].append(seq2seq_target_ids(tokenizer, target, max_target_length))
            else:
                out["labels"].append(label)
        return out

    text_columns = [c for c in ("source", "target", "label") if c in dataset.column_names]
    encoded = dataset.map(encode, batched=True, remove_columns=text_columns, desc=f"Tokenizing {split_name}".strip())
    if truncated:
        logger.warning(
            "%s: %d of %d inputs were longer than max_length=%d tokens and were truncated.",
            split_name or "data", truncated, len(dataset), max_length,
        )
    return encoded


def pad(sequences: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    """Pad lists of ids to the longest one: batches are padded only as far as they need."""
    longest = max(len(s) for s in sequences)
    rows = [([value] * (longest - len(s)) + s) if side == "left" else (s + [value] * (longest - len(s)))
            for s in sequences]
    return torch.tensor(rows, dtype=torch.long)


@dataclass
class TextCollator:
    """Batches tokenized rows, padding each batch only to its longest example.

    Returns model inputs as tensors, plus `references` (a list) and, for decoder-only models, left-padded
    `generation_inputs` (a dict) that the evaluator feeds to `generate`.
    """

    tokenizer: object
    task_type: str

    def __call__(self, rows: list[dict]) -> dict:
        pad_id = self.tokenizer.pad_token_id
        input_ids = pad([r["input_ids"] for r in rows], pad_id)
        batch = {"input_ids": input_ids, "attention_mask": pad([[1] * len(r["input_ids"]) for r in rows], 0)}
        if all(r["references"] for r in rows):  # unlabeled rows (a test split without labels) get no loss
            labels = [r["labels"] for r in rows]
            if self.task_type != "cls":
                batch["labels"] = pad(labels, -100)
            else:
                dtype = torch.float if any(isinstance(label, float) for label in labels) else torch.long
                batch["labels"] = torch.tensor(labels, dtype=dtype)
        if self.task_type == "causal":
            prompts = [r["prompt_input_ids"] for r in rows]
            batch["generation_inputs"] = {
                "input_ids": pad(prompts, pad_id, side="left"),
                "attention_mask": pad([[1] * len(p) for p in prompts], 0, side="left"),
            }
        batch["references"] = [r["references"] for r in rows]
        return batch
