"""The text side of `dept-eval` (its evaluation plugin): a task's data, collator and evaluator for one adapter.

Splits and formatting come from the task registry (`dept_nlp.tasks`), local files work as in training, the
metrics are the task's own (`TextEvaluator`), and inputs are cut at the adapter's `max_length`.

    >>> dataset, collate_fn, evaluator = build_text_eval_components(
    ...     "sst2", tokenizer, model, max_length=256, split="validation", data_args=args)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
from collections.abc import Hashable

from transformers import AutoConfig

from dept.config import ConfigError
from dept.errors import TaskMismatchError
from dept_nlp.data_files import load_task_datasets, split_is_shuffled, subsample
from dept_nlp.evaluation import TextEvaluator
from dept_nlp.modeling import FAMILIES, detect_family, load_model, load_tokenizer
from dept_nlp.preprocess import CAUSAL_TEMPLATE, TextCollator, tokenize_rows
from dept_nlp.tasks import TASKS, TaskSpec, get_task


def answer_kind(task: TaskSpec) -> str:
    """What a task's targets are: its class words, a regression score, or an extracted answer."""
    if task.is_extractive_qa:
        return "extracted answers (MRQA)"
    if task.is_regression:
        return "a regression score"
    return f"the labels {list(task.label_words)}"


def check_task_fits_adapter(task_name: str, training_task: dict | None, source: str = "the adapter") -> None:
    """Refuse a task whose targets differ from those the adapter was trained to produce.

    `training_task` is the adapter's `training_task.json`; None (an official DePT checkpoint) trusts the task.
    """
    task = get_task(task_name)
    if training_task is None:
        return
    modality = training_task.get("modality", "text")
    if modality != "text":
        raise TaskMismatchError(f"{source} was trained on {modality} tasks {training_task['task_names']}, not text.")
    trained_words = training_task.get("label_words")
    trained_words = tuple(trained_words) if trained_words is not None else None
    trained_kinds = {answer_kind(TASKS[name]) for name in training_task["task_names"] if name in TASKS}
    if trained_words != task.label_words or (trained_kinds and answer_kind(task) not in trained_kinds):
        trained = ", ".join(sorted(trained_kinds)) or f"the labels {trained_words}"
        raise TaskMismatchError(
            f"{source} was trained on {training_task['task_names']} to produce {trained}, but {task_name} needs "
            f"{answer_kind(task)}. Evaluate it on a task with the same labels, or train an adapter for {task_name}."
        )


def model_family(args: argparse.Namespace, training_task: dict | None = None) -> str:
    """--model_family, else the one recorded at training, else detected from the base model's config."""
    if args.model_family:
        return args.model_family
    if training_task and training_task.get("model_family"):
        return training_task["model_family"]
    return detect_family(AutoConfig.from_pretrained(args.model_name_or_path))


def build_text_eval_components(task_name: str, tokenizer, model=None, *, max_length: int, split: str,
                               data_args: argparse.Namespace):
    """(tokenized dataset, collate_fn, evaluator) to evaluate an adapter on one split of one text task.

    Args:
        task_name: a key of `dept_nlp.tasks.TASKS`.
        tokenizer: the base model's tokenizer.
        model: unused; accepted so every modality has the same signature.
        max_length: the adapter's s: inputs are truncated there, as in training.
        split: "validation" or "test", built by the task's split rule unless a local file is given.
        data_args: `train_file`/`validation_file`/`test_file`, `dataset_config_name`, `data_seed`,
            `max_eval_samples` / `max_predict_samples`, `max_target_length`, `generation_max_length`, `num_beams`, and the `family`.
    """
    task = get_task(task_name)
    files = {f"{name}_file": file_for_task(getattr(data_args, f"{name}_file"), task_name)
             for name in ("train", "validation", "test")}
    data = load_task_datasets(task_name, dataset_config_name=data_args.dataset_config_name, **files,
                              seed=data_args.data_seed, splits=(split,))[split]
    cap = data_args.max_eval_samples if split == "validation" else getattr(data_args, "max_predict_samples", None)
    from_file = files[f"{split}_file"] is not None
    data = subsample(data, cap, data_args.data_seed, already_shuffled=split_is_shuffled(task, split, from_file))
    family = data_args.family
    template = getattr(data_args, "causal_template", None) or CAUSAL_TEMPLATE
    dataset = tokenize_rows(data, tokenizer, family, max_length, data_args.max_target_length, split,
                            causal_template=template)
    evaluator = TextEvaluator(task, tokenizer, family, data_args.generation_max_length, data_args.num_beams,
                              max_target_length=data_args.max_target_length)
    return dataset, TextCollator(tokenizer, family), evaluator


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


class TextEvaluationPlugin:
    """`dept_eval.cli.EvaluationPlugin` for text tasks (T5, decoder-only LMs, encoder classifiers)."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("text tasks")
        files = dict(type=task_file, action="append", metavar="[TASK=]PATH")
        group.add_argument("--train_file", **files, help="Local training data, as in training (some split rules "
                                                           "read it). TASK=PATH for one task; repeat per task.")
        group.add_argument("--validation_file", **files, help="Local validation data (json/jsonl/csv/parquet, hub "
                                                                "schema): PATH for every task, or TASK=PATH, repeated.")
        group.add_argument("--test_file", **files, help="Local test data: PATH, or TASK=PATH repeated per task.")
        group.add_argument("--dataset_config_name", help="Another hub config of the task's dataset.")
        group.add_argument("--data_seed", type=int, default=42, help="Seed of the official split shuffles.")
        group.add_argument("--max_eval_samples", type=int,
                           help="Validation split: a random subset of N examples (drawn with --data_seed, as official).")
        group.add_argument("--max_predict_samples", type=int,
                           help="Test split: a random subset of N examples (drawn with --data_seed, as official).")
        group.add_argument("--max_target_length", type=int, default=20,
                           help="Targets are cut at this many tokens (official: 20).")
        group.add_argument("--generation_max_length", type=int, default=20,
                           help="New tokens generated (official: 20).")
        group.add_argument("--num_beams", type=int, default=1, help="Beam size when generating.")
        group.add_argument("--causal_template",
                           help="Decoder-only models: the text before the target, with {source}; use the one "
                                f"the adapter was trained with (default: the official {CAUSAL_TEMPLATE!r}).")
        group.add_argument("--tokenizer_name", help="Tokenizer, if not the base model's own.")
        group.add_argument("--model_family", choices=FAMILIES, help="seq2seq, causal or cls (default: detected).")

    def check_task(self, task_name: str, training_task: dict | None, source: str) -> None:
        check_task_fits_adapter(task_name, training_task, source)

    def base_model_key(self, args: argparse.Namespace, task_name: str) -> Hashable:
        # A classifier's head has one row per label: tasks with another label count need another base model.
        return get_task(task_name).num_labels if self._family(args) == "cls" else None

    def load_tokenizer(self, args: argparse.Namespace, training_task: dict | None):
        family = self._family(args, training_task)
        return load_tokenizer(args.tokenizer_name or args.model_name_or_path, family)

    def load_base_model(self, args: argparse.Namespace, task_name: str, training_task: dict | None):
        family = self._family(args, training_task)
        return load_model(args.model_name_or_path, family, num_labels=max(get_task(task_name).num_labels, 1))

    def build_eval_components(self, task_name, tokenizer, model, *, max_length, split, data_args):
        data_args.family = self._family(data_args)
        return build_text_eval_components(task_name, tokenizer, model, max_length=max_length, split=split,
                                          data_args=data_args)

    @staticmethod
    def _family(args: argparse.Namespace, training_task: dict | None = None) -> str:
        if getattr(args, "family", None) is None:
            args.family = model_family(args, training_task)
        return args.family


PLUGIN = TextEvaluationPlugin()
