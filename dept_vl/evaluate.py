"""Evaluate VL adapters: the pipeline's `VLEvaluator` (generate answers and captions with VL-T5, score each task
with its own metric), and the vision-language side of `dept-eval` (`VLEvaluation`).

Metrics are named `<task>_<metric>` (`vqa_accuracy`, `nlvr_consistency`, `caption_cider`, ...); VQA adds the
official per-answer-type accuracy (`vqa_accuracy_yes_no`, `vqa_accuracy_number`, `vqa_accuracy_other`). The trainer
prefixes them with the split (`eval_vqa_accuracy`). With several tasks, `average` is the mean of each task's
main metric and is the main metric of the run (VL-Adapter's multitask score).

`dept-eval` scores a saved adapter as its training run scored it: the same task files and split rules, region
features, collator and `VLEvaluator`, with inputs cut at the adapter's
`max_length`. The adapter's `training_task.json` (written by `dept-train-vl`) names the tasks it may be evaluated
on and the size of the features its visual projection reads.

    dept-eval --model_name_or_path t5-base --adapter out/vqa:vqa --split validation \\
        --vqa_dir data/vqa --feature_file data/features.h5 --output_dir eval/
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from dept.command_line import add_fields_as_flags
from dept.config import ConfigError
from dept.errors import TaskMismatchError
from dept_vl import metrics
from dept_vl.arguments import VLDataArguments, VLModelArguments
from dept_vl.data import (
    VLCollator,
    build_feature_sources,
    check_features_cover,
    check_images_load,
    feature_dim,
    tokenize_vl_rows,
)
from dept_vl.modeling import load_tokenizer, load_vl_base_model, model_feat_dim
from dept_vl.tasks import TASKS, load_task_splits
from dept_vl.vision_backbone import pair_refusal

VISUAL_INPUTS = ("vis_feats", "vis_boxes", "vis_attention_mask", "pixel_values")  # pixels: a ViT inside the model


def answer_type_key(answer_type: str) -> str:
    """A VQA answer type as a metric-name suffix: "yes/no" -> "yes_no" (so `vqa_accuracy_yes_no`)."""
    return "_".join(answer_type.replace("/", " ").split())


def score_task(task: str, predictions: list[str], references: list[dict]) -> dict[str, float]:
    """The metrics of one task, without prefix, e.g. {"accuracy": 71.3, "consistency": 40.0} for NLVR2."""
    answers = [reference["answers"] for reference in references]
    if task == "vqa":
        scores = {"accuracy": metrics.vqa_accuracy(predictions, answers)}
        types = [reference.get("answer_type") or "" for reference in references]
        if all(types):  # the official per-answer-type accuracy, when the annotations name the types
            per_type = metrics.vqa_accuracy_per_answer_type(predictions, answers, types)
            scores.update({f"accuracy_{answer_type_key(name)}": value for name, value in per_type.items()})
        return scores
    if task == "gqa":
        return {"accuracy": metrics.accuracy(predictions, [a[0] for a in answers])}
    if task == "nlvr":
        labels = [a[0] for a in answers]
        groups = [metrics.nlvr_sentence_id(reference["example_id"]) for reference in references]
        return {"accuracy": metrics.accuracy(predictions, labels),
                "consistency": metrics.nlvr_consistency(predictions, labels, groups)}
    if task == "caption":
        return metrics.caption_scores(predictions, answers)
    raise ValueError(f"Unknown task {task!r}: choose from {sorted(TASKS)}.")


@dataclass
class VLEvaluator:
    """Generates with beam search (`num_beams`) and scores every task of the batch rows with its own metric.

    Args:
        task_names: the tasks the evaluation sets hold.
        tokenizer: decodes the generated ids.
        max_new_tokens: longest answer or caption generated.
        num_beams: 1 is greedy decoding.
    """

    task_names: list[str]
    tokenizer: object
    max_new_tokens: int = 20
    num_beams: int = 1
    greater_is_better: bool = True

    @property
    def main_metric(self) -> str:
        if len(self.task_names) > 1:
            return "average"
        task = self.task_names[0]
        return f"{task}_{TASKS[task].main_metric}"

    @torch.no_grad()
    def predict_step(self, model, batch: dict) -> list[str]:
        """Decoded generations, one per row. `batch` holds the collated tensors (labels are ignored)."""
        visual = {key: batch[key] for key in VISUAL_INPUTS if key in batch}
        generated = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **visual,
            max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return [text.strip() for text in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]

    def compute_metrics(self, predictions: list[str], references: list[dict]) -> dict[str, float]:
        """Per-task metrics `<task>_<metric>`, plus `average` over the tasks' main metrics when there are several.

        Rows without gold answers (unlabelled test data) are predicted but not scored.
        """
        by_task: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
        for prediction, reference in zip(predictions, references, strict=True):
            if reference["answers"]:
                by_task[reference["task"]][0].append(prediction)
                by_task[reference["task"]][1].append(reference)
        results: dict[str, float] = {}
        for task, (task_predictions, task_references) in by_task.items():
            for name, value in score_task(task, task_predictions, task_references).items():
                results[f"{task}_{name}"] = value
        if len(self.task_names) > 1 and by_task:
            mains = [results[f"{task}_{TASKS[task].main_metric}"] for task in self.task_names if task in by_task]
            results["average"] = sum(mains) / len(mains)
        return results


# ----------------------------------------------------------------------------------------- a saved adapter


def check_task_fits_adapter(task_name: str, training_task: dict | None, source: str = "the adapter") -> None:
    """Refuse a task the adapter was not trained on (VL tasks differ in answers, so only its own tasks fit).

    `training_task` is the adapter's `training_task.json`; a VL adapter needs one for its feature size.
    """
    if task_name not in TASKS:
        raise ConfigError(f"Unknown vision-language task {task_name!r}: choose from {sorted(TASKS)}.")
    if training_task is None:
        raise ConfigError(
            f"{source} has no training_task.json, which a VL adapter needs (its tasks and feature size): "
            "evaluate an adapter saved by dept-train-vl."
        )
    if task_name not in training_task["task_names"]:
        raise TaskMismatchError(
            f"{source} was trained on {training_task['task_names']}, not on {task_name}, whose answers differ. "
            f"Evaluate it on one of its tasks, or train an adapter for {task_name}."
        )
    refusal = pair_refusal(source, training_task, "dept-eval")
    if refusal:
        raise ConfigError(refusal)
    if not isinstance(training_task.get("feat_dim"), int):
        raise ConfigError(f"{source}'s training_task.json has no integer 'feat_dim'; dept-train-vl writes one.")


EVAL_DATA_FLAGS = ("vqa_dir", "gqa_dir", "nlvr_dir", "caption_file", "feature_file", "image_dir", "backbone",
                   "pretrained", "image_size", "max_target_length", "generation_max_length", "num_beams",
                   "max_eval_samples", "data_seed")
"""The `VLDataArguments` fields that mean the same at evaluation; `tasks` and `max_seq_length` come from the pair."""


class VLEvaluation:
    """What `dept-eval` needs for VQAv2, GQA, NLVR2 and COCO captions on VL-T5.

    `DePTModel.from_pretrained` brings back the `visual_embedding` the adapter file holds, and leaves the base's
    own (frozen, seeded) projection when training kept it frozen.
    """

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("vision-language tasks")
        add_fields_as_flags(group, VLDataArguments, EVAL_DATA_FLAGS)  # the training CLI's help and defaults
        add_fields_as_flags(group, VLModelArguments, ("tokenizer_name",))

    def check_task(self, task_name: str, training_task: dict | None, source: str) -> None:
        check_task_fits_adapter(task_name, training_task, source)

    def base_model_key(self, args: argparse.Namespace, task_name: str, training_task: dict | None) -> Hashable:
        # One VL-T5 serves every task: all read the same --feature_file/--image_dir features.
        return None

    def load_tokenizer(self, args: argparse.Namespace, training_task: dict | None):
        return load_tokenizer(VLModelArguments(args.model_name_or_path, tokenizer_name=args.tokenizer_name))

    def load_base_model(self, args: argparse.Namespace, task_name: str, training_task: dict | None):
        return load_vl_base_model(args.model_name_or_path, training_task["feat_dim"])

    def build_eval_components(self, task_name, tokenizer, model, *, max_length, split, args, training_task):
        data_args = VLDataArguments(tasks=task_name, max_seq_length=max_length, do_eval=True,
                                    **{name: getattr(args, name) for name in EVAL_DATA_FLAGS})
        return build_vl_eval_components(task_name, tokenizer, model, max_length=max_length, split=split,
                                        data_args=data_args)


def build_vl_eval_components(task_name: str, tokenizer, model=None, *, max_length: int, split: str,
                             data_args: VLDataArguments):
    """(dataset, collate_fn, evaluator) to evaluate an adapter on one split of one task, for `dept-eval`.

    Args:
        task_name: one of `dept_vl.tasks.TASKS`.
        tokenizer: the base model's tokenizer.
        model: if given, its visual feature size is checked against the features' size.
        max_length: the adapter's s (inputs are cut there).
        split: "validation" or "test" (or "train").
        data_args: where the task files and features are (`--vqa_dir ... --feature_file/--image_dir`), and the
            generation settings (`generation_max_length`, `num_beams`, `max_eval_samples`).
    """
    rows = load_task_splits([task_name], data_args.sources, [split], data_args.data_seed,
                            max_eval_samples=data_args.max_eval_samples)[split]
    sources = build_feature_sources([task_name], data_args.feature_file, data_args.image_dir, data_args.backbone,
                                    data_args.pretrained, data_args.image_size)
    check_features_cover(rows, sources, split)
    check_images_load({split: rows}, sources)
    if model is not None:
        expected = model_feat_dim(model)
        found = feature_dim(sources[task_name], rows[0]["image_ids"][0])
        if expected is not None and expected != found:
            raise ConfigError(f"The model reads {expected}-dimensional features, but {task_name}'s are {found}-d.")
    dataset = tokenize_vl_rows(rows, tokenizer, max_length, data_args.max_target_length, split)
    evaluator = VLEvaluator([task_name], tokenizer, data_args.generation_max_length, data_args.num_beams)
    return dataset, VLCollator(tokenizer, sources), evaluator
