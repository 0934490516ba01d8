"""The two pipelines a study can drive, text and vision-language, behind one small interface.

Both parse the same way (`dept.command_line.parse_arguments`, `--config FILE.yaml` first) into
`(model_args, data_args, method_args, training_args)` and train through the one trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dept.command_line import MethodArguments, parse_arguments, yaml_to_argv
from dept.training_args import TrainingArguments
from dept_nlp import pipeline as text
from dept_nlp.arguments import DataArguments, ModelArguments
from dept_nlp.modeling import load_config
from dept_nlp.tasks import get_task
from dept_vl import pipeline as vl
from dept_vl.arguments import ARGUMENT_TYPES as VL_ARGUMENT_TYPES
from dept_vl.arguments import VLModelArguments
from dept_vl.evaluate import VLEvaluator
from dept_vl.modeling import load_vl_config


@dataclass(frozen=True)
class Pipeline:
    """How to parse, name and run one training run of a modality."""

    modality: str
    dataclass_types: tuple
    run: Callable[..., dict]
    load_config: Callable[[Any], Any]  # model_args -> the base model's config (no weights are loaded)

    def parse(self, argv: list[str]) -> tuple:
        return tuple(parse_arguments(self.dataclass_types, argv))

    def task_label(self, parsed: tuple) -> str:
        data_args = parsed[1]
        return data_args.task_name if self.modality == "text" else "+".join(data_args.task_names)

    def main_metric(self, parsed: tuple) -> str:
        """The metric that ranks runs of this task, without the `eval_` prefix (higher is better)."""
        data_args = parsed[1]
        if self.modality == "text":
            return get_task(data_args.task_name).main_metric
        return VLEvaluator(data_args.task_names, tokenizer=None).main_metric

    def hidden_size(self, parsed: tuple) -> int:
        """d of the base model, read from its config (no weights are loaded)."""
        model_args = parsed[0]
        config = self.load_config(model_args)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        for name in ("d_model", "hidden_size", "n_embd"):
            if getattr(config, name, None):
                return int(getattr(config, name))
        raise ValueError(f"Cannot read the hidden size of {model_args.model_name_or_path} from its config.")


def text_config(model_args: ModelArguments):
    return load_config(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)


def vl_config(model_args: VLModelArguments):
    return load_vl_config(model_args.model_name_or_path)  # a saved VL-T5's config too ("vlt5", see dept_vl.modeling)


def text_pipeline() -> Pipeline:
    return Pipeline("text", (ModelArguments, DataArguments, MethodArguments, TrainingArguments), text.run, text_config)


def vl_pipeline() -> Pipeline:
    return Pipeline("vl", VL_ARGUMENT_TYPES, vl.run, vl_config)


def detect_pipeline(argv: list[str]) -> Pipeline:
    """The VL pipeline when the run names VL tasks (`--tasks`, in a recipe or on the command line), else text."""
    words = list(argv)
    if "--config" in words:
        index = words.index("--config")
        if index + 1 < len(words) and Path(words[index + 1]).is_file():
            words += yaml_to_argv(words[index + 1])
    return vl_pipeline() if "--tasks" in words else text_pipeline()
