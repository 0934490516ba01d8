"""Evaluate text adapters: the pipeline's `TextEvaluator` (outputs -> label words -> the task's metrics), and the
text side of `dept-eval` (`TextEvaluation`: a task's data, collator and evaluator for one saved adapter).

Splits and formatting come from the task registry (`dept_nlp.tasks`), local files work as in training, the
metrics are the task's own, and inputs are cut at the adapter's `max_length`.

    >>> dataset, collate_fn, evaluator = build_text_eval_components(
    ...     "sst2", tokenizer, max_length=256, split="validation", data_args=args)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from dept.command_line import add_fields_as_flags
from dept.config import ConfigError
from dept.errors import TaskMismatchError
from dept_nlp import metrics
from dept_nlp.arguments import DataArguments, ModelArguments
from dept_nlp.data_files import load_task_datasets, split_is_shuffled, subsample
from dept_nlp.modeling import load_model, load_tokenizer, resolve_task_type
from dept_nlp.preprocess import CAUSAL_TEMPLATE, TextCollator, seq2seq_target_ids, tokenize_rows
from dept_nlp.tasks import TASKS, TaskSpec, get_task

# ----------------------------------------------------------------------------------------- the evaluator


@dataclass
class TextEvaluator:
    """Generates (seq2seq, causal) or takes the head's argmax (cls), decodes, and calls `metrics.compute`.

    MRQA with an encoder-decoder: the main `em`/`f1` score against the first answer as the official code sees
    it, i.e. its label ids (cut at `max_target_length` tokens) decoded back to text; the `*_max_over_answers`
    figures use every answer as written.
    """

    task: TaskSpec
    tokenizer: object
    task_type: str
    max_new_tokens: int = 20
    num_beams: int = 1
    greater_is_better: bool = True
    max_target_length: int = 20

    @property
    def main_metric(self) -> str:
        return self.task.main_metric

    @torch.no_grad()
    def predict_step(self, model, batch) -> list[str]:
        if self.task_type == "cls":
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            if self.task.is_regression:
                return [f"{value:.4f}" for value in logits[:, 0].float().tolist()]
            return [str(index) for index in logits.argmax(dim=-1).tolist()]
        inputs = batch["generation_inputs"] if self.task_type == "causal" else batch
        generated = model.generate(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
            max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if self.task_type == "causal":  # DePT, PEFT and transformers return the input, then the new tokens
            generated = generated[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]

    def official_target(self, target: str) -> str:
        """The target as the official metric sees it: its label ids decoded, special tokens skipped, stripped."""
        ids = seq2seq_target_ids(self.tokenizer, target, self.max_target_length)
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def compute_metrics(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        if not all(references):  # a split without labels: predict only, nothing to score
            return {}
        if self.task.is_extractive_qa:
            first = [self.official_target(refs[0]) for refs in references] if self.task_type == "seq2seq" else None
            return metrics.compute(self.task.name, predictions, references, first_answers=first)
        return metrics.compute(self.task.name, predictions, [refs[0] for refs in references])


# ----------------------------------------------------------------------------------------- a saved adapter


def answer_kind(task: TaskSpec) -> str:
    """What a task's targets are: its class words, a regression score, or an extracted answer."""
    if task.is_extractive_qa:
        return "extracted answers (MRQA)"
    if task.is_regression:
        return "a regression score"
    return f"the labels {list(task.label_words)}"


def check_task_fits_adapter(task_name: str, training_task: dict | None, source: str = "the adapter") -> None:
    """Refuse a task whose targets differ from those the adapter was trained to produce.

    `training_task` is the adapter's text `training_task.json`; None (an official DePT checkpoint) trusts the task.
    """
    task = get_task(task_name)
    if training_task is None:
        return
    trained_words = training_task.get("label_words")
    trained_words = tuple(trained_words) if trained_words is not None else None
    trained_kinds = {answer_kind(TASKS[name]) for name in training_task["task_names"] if name in TASKS}
    if trained_words != task.label_words or (trained_kinds and answer_kind(task) not in trained_kinds):
        trained = ", ".join(sorted(trained_kinds)) or f"the labels {trained_words}"
        raise TaskMismatchError(
            f"{source} was trained on {training_task['task_names']} to produce {trained}, but {task_name} needs "
            f"{answer_kind(task)}. Evaluate it on a task with the same labels, or train an adapter for {task_name}."
        )


def build_text_eval_components(task_name: str, tokenizer, *, max_length: int, split: str,
                               data_args: argparse.Namespace, training_task: dict | None = None):
    """(tokenized dataset, collate_fn, evaluator) to evaluate an adapter on one split of one text task.

    Args:
        task_name: a key of `dept_nlp.tasks.TASKS`.
        tokenizer: the base model's tokenizer.
        max_length: the adapter's s: inputs are truncated there, as in training.
        split: "validation" or "test", built by the task's split rule unless a local file is given.
        data_args: `train_file`/`validation_file`/`test_file`, `dataset_config_name`, `data_seed`,
            `max_eval_samples` / `max_predict_samples`, `max_target_length`, `generation_max_length`, `num_beams`,
            `causal_template` and the resolved `task_type`.
        training_task: the adapter's `training_task.json`: its causal template, unless `--causal_template` is given.
    """
    task = get_task(task_name)
    files = {f"{name}_file": file_for_task(getattr(data_args, f"{name}_file"), task_name)
             for name in ("train", "validation", "test")}
    data = load_task_datasets(task_name, dataset_config_name=data_args.dataset_config_name, **files,
                              seed=data_args.data_seed, splits=(split,))[split]
    cap = data_args.max_eval_samples if split == "validation" else getattr(data_args, "max_predict_samples", None)
    from_file = files[f"{split}_file"] is not None
    data = subsample(data, cap, data_args.data_seed, already_shuffled=split_is_shuffled(task, split, from_file))
    task_type = data_args.task_type
    template = (getattr(data_args, "causal_template", None) or (training_task or {}).get("causal_template")
                or CAUSAL_TEMPLATE)
    dataset = tokenize_rows(data, tokenizer, task_type, max_length, data_args.max_target_length, split,
                            causal_template=template)
    evaluator = TextEvaluator(task, tokenizer, task_type, data_args.generation_max_length, data_args.num_beams,
                              max_target_length=data_args.max_target_length)
    return dataset, TextCollator(tokenizer, task_type), evaluator


def task_file(spec: str) -> tuple[str | None, str]:
    """`--test_file` values: `TASK=PATH` (that task's file) or `PATH` (every task's) -> (task or None, path)."""
    task_name, sep, path = spec.partition("=")
    if sep and task_name in TASKS:
        if not path:
            raise argparse.ArgumentTypeError(f"{spec!r} names no file after '='.")
        return task_name, path
    return None, spec


def file_for_task(specs: list[tuple[str | None, str]] | None, task_name: str) -> str | None:
    """The file of `task_name` among repeated `--*_file` values: its own `TASK=PATH`, else a plain `PATH`."""
    own = [path for task, path in specs or [] if task == task_name]
    shared = [path for task, path in specs or [] if task is None]
    for found in (own, shared):
        if len(found) > 1:
            raise ConfigError(f"Several files of one split for task {task_name}: {found}. Give one PATH for every "
                              "task, or one TASK=PATH per task.")
    return (own or shared or [None])[0]


EVAL_DATA_FLAGS = ("dataset_config_name", "data_seed", "max_eval_samples", "max_predict_samples", "max_target_length",
                   "generation_max_length", "num_beams")
"""The `DataArguments` fields that mean the same at evaluation (their help and defaults are the training CLI's)."""


class TextEvaluation:
    """What `dept-eval` needs for text tasks (T5, decoder-only LMs, encoder classifiers)."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("text tasks")
        files = dict(type=task_file, action="append", metavar="[TASK=]PATH")
        group.add_argument("--train_file", **files, help="Local training data, as in training (some split rules "
                                                           "read it). TASK=PATH for one task; repeat per task.")
        group.add_argument("--validation_file", **files, help="Local validation data (json/jsonl/csv/parquet, hub "
                                                                "schema): PATH for every task, or TASK=PATH, repeated.")
        group.add_argument("--test_file", **files, help="Local test data: PATH, or TASK=PATH repeated per task.")
        add_fields_as_flags(group, DataArguments, EVAL_DATA_FLAGS)
        group.add_argument("--causal_template",
                           help="Decoder-only models: the text before the target, with {source} (default: the one "
                                f"the adapter was trained with, else the official {CAUSAL_TEMPLATE!r}).")
        add_fields_as_flags(group, ModelArguments, ("tokenizer_name", "task_type"))

    def check_task(self, task_name: str, training_task: dict | None, source: str) -> None:
        check_task_fits_adapter(task_name, training_task, source)

    def base_model_key(self, args: argparse.Namespace, task_name: str, training_task: dict | None) -> Hashable:
        # A classifier's head has one row per label: tasks with another label count need another base model.
        return get_task(task_name).num_labels if self._task_type(args, training_task) == "cls" else None

    def load_tokenizer(self, args: argparse.Namespace, training_task: dict | None):
        return load_tokenizer(args.tokenizer_name or args.model_name_or_path)

    def load_base_model(self, args: argparse.Namespace, task_name: str, training_task: dict | None):
        task_type = self._task_type(args, training_task)
        return load_model(args.model_name_or_path, task_type, num_labels=max(get_task(task_name).num_labels, 1))

    def build_eval_components(self, task_name, tokenizer, model, *, max_length, split, args, training_task):
        data_args = argparse.Namespace(**{**vars(args), "task_type": self._task_type(args, training_task)})
        return build_text_eval_components(task_name, tokenizer, max_length=max_length, split=split,
                                          data_args=data_args, training_task=training_task)

    @staticmethod
    def _task_type(args: argparse.Namespace, training_task: dict | None) -> str:
        return resolve_task_type(args.model_name_or_path, args.task_type, training_task)
