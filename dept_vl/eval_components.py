"""The vision-language side of `dept-eval` (its evaluation plugin): VL-T5, a task's data, features and metrics.

Everything comes from `dept_vl.pipeline`, so an adapter is scored as its training run scored it: the same task
files and split rules, region features, collator and `VLEvaluator`, with inputs cut at the adapter's
`max_length`. The adapter's `training_task.json` (written by `dept-train-vl`) names the tasks it may be
evaluated on and the size of the features its visual projection reads.

    dept-eval --model_name_or_path t5-base --adapter out/vqa:vqa --split validation \\
        --vqa_dir data/vqa --feature_file data/features.h5 --output_dir eval/
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Hashable

from transformers.hf_argparser import string_to_bool

from dept.config import ConfigError
from dept.errors import TaskMismatchError
from dept_vl.pipeline import (
    VLDataArguments,
    VLModelArguments,
    build_vl_eval_components,
    load_tokenizer,
    load_vl_base_model,
)
from dept_vl.tasks import TASKS
from dept_vl.vision_backbone import TASK_FILE_KEY as VISION_BACKBONE_KEY

DATA_FLAGS = ("vqa_dir", "gqa_dir", "nlvr_dir", "caption_file", "feature_file", "image_dir", "backbone", "pretrained",
              "image_size", "max_target_length", "generation_max_length", "num_beams", "max_eval_samples", "data_seed")
"""The `VLDataArguments` fields that mean the same at evaluation; `tasks` and `max_seq_length` come from the pair."""


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
    modality = training_task.get("modality", "text")
    if modality != "vl":
        raise TaskMismatchError(f"{source} was trained on {modality} tasks {training_task['task_names']}, not vl.")
    if task_name not in training_task["task_names"]:
        raise TaskMismatchError(
            f"{source} was trained on {training_task['task_names']}, not on {task_name}, whose answers differ. "
            f"Evaluate it on one of its tasks, or train an adapter for {task_name}."
        )
    if training_task.get(VISION_BACKBONE_KEY):  # its text adapter reads the features of a ViT tuned with it
        raise ConfigError(
            f"{source} was trained with a vision adapter on {training_task[VISION_BACKBONE_KEY]['backbone']} "
            "(--vision_backbone), which dept-eval does not load: evaluate the pair with dept-train-vl "
            "--peft_model_id DIR --vision_backbone ... --image_dir ... --do_eval."
        )
    if not isinstance(training_task.get("feat_dim"), int):
        raise ConfigError(f"{source}'s training_task.json has no integer 'feat_dim'; dept-train-vl writes one.")


def vl_data_arguments(task_name: str, max_length: int, args: argparse.Namespace) -> VLDataArguments:
    """The training run's data arguments for evaluating `task_name` with inputs cut at `max_length`."""
    return VLDataArguments(tasks=task_name, max_seq_length=max_length, do_eval=True,
                           **{name: getattr(args, name) for name in DATA_FLAGS})


class VLEvaluationPlugin:
    """`dept_eval.cli.EvaluationPlugin` for VQAv2, GQA, NLVR2 and COCO captions on VL-T5.

    It has no `adapter_model_kwargs`: `DePTModel.from_pretrained` brings back the `visual_embedding` the adapter
    file holds, and leaves the base's own (frozen, seeded) projection when training kept it frozen.
    """

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("vision-language tasks")
        fields = {field.name: field for field in dataclasses.fields(VLDataArguments)}
        types = typing.get_type_hints(VLDataArguments)
        for name in DATA_FLAGS:  # the training CLI's help and defaults, so the two never drift apart
            flag = {"type": string_to_bool, "nargs": "?", "const": True} if types[name] is bool else {
                "type": int if int in (types[name], *typing.get_args(types[name])) else str}
            _add_unless_present(group, f"--{name}", default=fields[name].default, help=fields[name].metadata["help"],
                                **flag)
        _add_unless_present(group, "--tokenizer_name", help="Tokenizer, if not the base model's own.")

    def check_task(self, task_name: str, training_task: dict | None, source: str) -> None:
        check_task_fits_adapter(task_name, training_task, source)

    def base_model_key(self, args: argparse.Namespace, task_name: str) -> Hashable:
        # One VL-T5 serves every task: all read the same --feature_file/--image_dir features.
        return None

    def load_tokenizer(self, args: argparse.Namespace, training_task: dict | None):
        return load_tokenizer(VLModelArguments(args.model_name_or_path, tokenizer_name=args.tokenizer_name))

    def load_base_model(self, args: argparse.Namespace, task_name: str, training_task: dict | None):
        return load_vl_base_model(args.model_name_or_path, training_task["feat_dim"])

    def build_eval_components(self, task_name, tokenizer, model, *, max_length, split, data_args):
        return build_vl_eval_components(task_name, tokenizer, model, max_length=max_length, split=split,
                                        data_args=vl_data_arguments(task_name, max_length, data_args))


def _add_unless_present(group, flag: str, **kwargs) -> None:
    """Add a flag unless another modality's plugin already did: a run mixing text and VL adapters shares the
    flags both know (`--generation_max_length`, `--num_beams`, ...), with the first plugin's default."""
    try:
        group.add_argument(flag, **kwargs)
    except argparse.ArgumentError:
        pass


PLUGIN = VLEvaluationPlugin()
