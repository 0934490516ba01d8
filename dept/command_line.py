"""The command line shared by every pipeline: the method's flags, a parser that also reads YAML configs, and
the runner of the console scripts.

The text and vision-language CLIs add their own model and data arguments on top; flags that mean the same
thing are spelled the same in both (`--peft_type`, `--prefix_length`, `--r`, `--learning_rate`, ...). A flag that
sets a `DePTConfig` field is declared with `config_flag`, so its help is the config field's own; `FLAG_ALIASES`
is the one table of other spellings every command line accepts.

Each console script (`dept-train`, `dept-train-vl`, `dept-eval`, ...) is

    def main(argv=None) -> int:
        return run_console("dept-train", train, argv)

Exit status 0 on success. An expected error (`dept.errors.UserError`, or a path that does not exist or already
exists) is printed to stderr as `PROG: error: MESSAGE` with exit status 2 and no traceback; `--debug` anywhere on
the command line shows the traceback instead. Anything else is a bug and keeps Python's traceback (status 1).

Under a launcher (`accelerate launch`, `torchrun`), each rank also stops when the launcher is gone: the launcher
forwards SIGTERM and Ctrl-C to the ranks itself, but it starts them in their own sessions, so a launcher killed
with SIGKILL (or by the OOM killer) would leave them running.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from .config import DePTConfig
from .errors import FlagError, UserError
from .methods import PEFT_TYPES

DEFAULT_LORA_RANK = 8  # the LoRA baseline of the DePT paper's comparison

CONFIG_FLAGS = {
    "prefix_length": "num_virtual_tokens",
    "r": "r",
    "lora_alpha": "lora_alpha",
    "prompt_init": "prompt_init",
    "prompt_init_text": "prompt_init_text",
    "max_seq_length": "max_length",
    "task_type": "task_type",
}
"""Each command-line flag that sets a `DePTConfig` field (the official DePT name where it has one) -> the field."""

FLAG_ALIASES = {
    "--num_virtual_tokens": "--prefix_length",  # the paper's and PEFT's name of m
    "--max_length": "--max_seq_length",  # DePTConfig's name of s
    "--model_family": "--task_type",  # this project's earlier name
    "--evaluation_strategy": "--eval_strategy",  # the official code's transformers
    "--k_shot_example": "--k_shot_examples",  # the official code's spelling (its README says k_shot_examples)
    "--task_name": "--tasks",  # the text CLI's flag, for the vision-language CLI
}
"""Other spellings of flags. Each applies where its target is a flag of the command line and it is not one itself
(`--task_name` is the text CLI's own flag, and the VL CLI's `--tasks`)."""


def config_flag(flag: str, default=dataclasses.MISSING, unset: str | None = None, *, field_name: str | None = None,
                subject: str | None = None) -> dataclasses.Field:
    """The dataclass field of the flag `--{flag}`, which sets `DePTConfig.<CONFIG_FLAGS[flag]>` (or `field_name`,
    for a flag of a second adapter, e.g. the ViT's): the default is the config's unless given, and the help is the
    config field's, after `subject` (whose adapter it sets) and before `unset` (what a None default means)."""
    name = field_name or CONFIG_FLAGS[flag]
    config_field = DePTConfig.__dataclass_fields__[name]
    metadata = {key: value for key, value in config_field.metadata.items() if key == "choices"}
    metadata["help"] = ((f"{subject}: " if subject else "") + DePTConfig.field_help(name)
                        + (f" Unset: {unset}." if unset else ""))
    return field(default=config_field.default if default is dataclasses.MISSING else default, metadata=metadata)


def add_fields_as_flags(group, dataclass_type, names) -> None:
    """Add the fields `names` of `dataclass_type` to an argparse parser or group as flags, with the fields' help,
    defaults and choices, so that two command lines reading one setting never drift apart. A flag the parser
    already has is left as it is (commands that combine two modalities share the flags both know)."""
    fields = {f.name: f for f in dataclasses.fields(dataclass_type)}
    types = typing.get_type_hints(dataclass_type)
    for name in names:
        field_, annotation = fields[name], types[name]
        if f"--{name}" in group._option_string_actions:
            continue
        scalar = next((t for t in (bool, int, float) if t in (annotation, *typing.get_args(annotation))), str)
        kwargs = {"type": string_to_bool, "nargs": "?", "const": True} if scalar is bool else {"type": scalar}
        if "choices" in field_.metadata:
            kwargs["choices"] = field_.metadata["choices"]
        default = None if field_.default is dataclasses.MISSING else field_.default
        group.add_argument(f"--{name}", default=default, help=field_.metadata["help"], **kwargs)


@dataclass(kw_only=True)
class RunStages:
    """`--do_train`, `--do_eval`, `--do_predict`, shared by every pipeline's data arguments; one is required."""

    do_train: bool = field(default=False, metadata={"help": "Train."})
    do_eval: bool = field(default=False, metadata={"help": "Evaluate on the validation split."})
    do_predict: bool = field(default=False, metadata={"help": "Predict and score the test split."})

    def __post_init__(self):
        if not (self.do_train or self.do_eval or self.do_predict):
            raise ValueError("Nothing to do: pass --do_train, --do_eval and/or --do_predict.")


@dataclass
class MethodArguments:
    """Which method trains the model, and its sizes (the official DePT flag names)."""

    peft_type: str = field(
        default="PROMPT_TUNING_LORA",
        metadata={"help": "PROMPT_TUNING_LORA (DePT), PROMPT_TUNING, LORA or FULL.", "choices": list(PEFT_TYPES)},
    )
    prefix_length: int | None = config_flag(
        "prefix_length", default=None, unset=f"{DePTConfig.num_virtual_tokens}, or the --peft_model_id adapter's"
    )
    r: int | None = config_flag(
        "r", default=None,
        unset=f"{DePTConfig.r}, or the --peft_model_id adapter's; with --peft_type LORA it is the LoRA rank (--lora_r)",
    )
    lora_alpha: float = config_flag("lora_alpha")
    prompt_init: str = config_flag("prompt_init")
    prompt_init_text: str = config_flag("prompt_init_text")
    peft_model_id: str | None = field(
        default=None, metadata={"help": "Start from this saved adapter (ours or an official DePT checkpoint)."}
    )
    lora_r: int | None = field(
        default=None, metadata={"help": "Rank of the LoRA baseline (q and v); the same as --r with --peft_type LORA."}
    )

    def __post_init__(self):
        if self.peft_model_id:  # before the defaults fill in what was not given
            self.check_agrees_with_adapter(DePTConfig.from_pretrained(self.peft_model_id))
        self.prefix_length = DePTConfig.num_virtual_tokens if self.prefix_length is None else self.prefix_length
        both = self.r is not None and self.lora_r is not None
        if self.peft_type == "LORA" and both and self.r != self.lora_r:
            raise ValueError(
                f"--r {self.r} and --lora_r {self.lora_r} disagree. With --peft_type LORA both set the LoRA rank; "
                "pass one of them."
            )
        if self.peft_type == "LORA":
            rank = self.lora_r if self.lora_r is not None else self.r
            self.r = self.lora_r = DEFAULT_LORA_RANK if rank is None else rank
        else:
            self.r = DePTConfig.r if self.r is None else self.r
            self.lora_r = DEFAULT_LORA_RANK if self.lora_r is None else self.lora_r

    def check_agrees_with_adapter(self, adapter: DePTConfig) -> None:
        """Refuse --prefix_length / --r given next to --peft_model_id when they differ from the adapter's: the
        adapter's sizes are the ones trained, so the flags would be silently ignored."""
        given = {"--prefix_length": (self.prefix_length, adapter.num_virtual_tokens)}
        if self.peft_type == "PROMPT_TUNING_LORA":
            given["--r"] = (self.r, adapter.r)
        conflicts = [f"{flag} {value} (the adapter has {own})" for flag, (value, own) in given.items()
                     if value is not None and value != own]
        if conflicts:
            raise FlagError(
                f"--peft_model_id {self.peft_model_id} fixes the adapter's sizes, but {', '.join(conflicts)}. "
                "Drop these flags to continue from the adapter, or drop --peft_model_id to train new sizes."
            )

    def dept_config(self, max_length: int, task_type: str, base_model_name_or_path: str | None = None,
                    seed: int = 0) -> DePTConfig:
        return DePTConfig(
            num_virtual_tokens=self.prefix_length,
            r=self.r if self.peft_type == "PROMPT_TUNING_LORA" else 0,
            max_length=max_length,
            lora_alpha=self.lora_alpha,
            prompt_init=self.prompt_init,
            prompt_init_text=self.prompt_init_text,
            task_type=task_type,
            base_model_name_or_path=base_model_name_or_path,
            init_seed=seed,
        )


def check_model_name_or_path(name: str, flag: str = "--model_name_or_path") -> None:
    """Refuse, before anything loads, a base model that is neither a local directory nor a possible hub id."""
    path = Path(name).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise FlagError(f"{flag} {name}: is a file; pass the model's directory (with config.json) or a hub id.")
    looks_like_a_path = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
    try:
        validate_repo_id(name)
    except HFValidationError:
        looks_like_a_path = True
    if looks_like_a_path:
        raise FlagError(f"{flag} {name}: not found: no such directory, and not a hub id (hub ids look like "
                        "'t5-base' or 'org/name'). Check the path.")


def yaml_to_argv(path: str | Path) -> list[str]:
    """A YAML mapping of flag -> value, as command-line words (later flags on the real command line win)."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise FlagError(f"--config {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise FlagError(f"{path} must be a YAML mapping of flag names to values.")
    argv = []
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, bool):
            argv += [f"--{key}", str(value).lower()]
        elif isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def parse_arguments(dataclass_types, argv: list[str] | None = None):
    """Parse flags into the given dataclasses; `--config FILE.yaml` supplies defaults the flags override, and the
    spellings of `FLAG_ALIASES` are accepted (e.g. `--evaluation_strategy` for `--eval_strategy`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise FlagError("--config needs a YAML file path.")
        command_line = argv[:index] + argv[index + 2:]
        argv = _direction_follows_metric(yaml_to_argv(argv[index + 1]), command_line) + command_line
    parser = HfArgumentParser(dataclass_types)
    argv = [canonical_flag(word, parser) for word in argv]
    try:
        return parser.parse_args_into_dataclasses(args=argv)
    except UserError:
        raise
    except ValueError as err:  # a dataclass's own check of its flags (e.g. "Nothing to do: pass --do_train")
        raise FlagError(str(err)) from err


def _direction_follows_metric(recipe: list[str], command_line: list[str]) -> list[str]:
    """The recipe's flags without its `greater_is_better` when the command line picks another metric and no
    direction: the direction then follows the new metric (`TrainingArguments.best_model_criterion`), instead of
    a recipe's "true" silently maximising a `--metric_for_best_model loss`."""
    named = {word.partition("=")[0] for word in command_line}
    if "--metric_for_best_model" not in named or "--greater_is_better" in named:
        return recipe
    kept, words = [], iter(recipe)
    for word in words:
        if word == "--greater_is_better":
            next(words, None)  # yaml_to_argv always writes a value after a flag
        else:
            kept.append(word)
    return kept


def canonical_flag(word: str, parser: argparse.ArgumentParser) -> str:
    """A command-line word as `parser` spells it: a flag (`--flag` or `--flag=value`) of `FLAG_ALIASES` becomes
    its target when that is a flag of the parser and the alias is not; anything else is returned as it is."""
    if not word.startswith("--"):
        return word
    name, equals, value = word.partition("=")
    known, target = parser._option_string_actions, FLAG_ALIASES.get(name)
    return (target if target in known and name not in known else name) + equals + value


def run_command_line(dataclass_types, run: Callable[..., dict], argv: list[str] | None = None) -> dict:
    """Parse the flags into the dataclasses, call `run(*parsed)`, print its results as JSON and return them."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    results = run(*parse_arguments(dataclass_types, argv))
    print(json.dumps(results, indent=2, sort_keys=True))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()  # leave no process group behind for a clean exit
    return results

EXPECTED_ERRORS = (UserError, FileNotFoundError, FileExistsError)
DEBUG_FLAG = "--debug"
USAGE_ERROR_STATUS = 2  # argparse's status for a bad command line


def run_console(prog: str, command: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> int:
    """Run `command(argv)` (argv without `--debug`) and return the exit status for `sys.exit`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a rank started by torch's elastic launcher (accelerate uses it)
        stop_when_the_launcher_dies()
    debug = DEBUG_FLAG in argv
    argv = [word for word in argv if word != DEBUG_FLAG]
    try:
        command(argv)
    except EXPECTED_ERRORS as err:
        if debug:
            raise
        message = " ".join(str(err).split("\n"))  # one line, whatever the message holds
        print(f"{prog}: error: {message}", file=sys.stderr)
        print(f"{prog}: (pass {DEBUG_FLAG} to see the traceback)", file=sys.stderr)
        return USAGE_ERROR_STATUS
    return 0


def stop_when_the_launcher_dies(poll_seconds: float = 1.0) -> None:
    """Send this process SIGTERM once its parent (the launcher) has exited, from a daemon thread."""
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_seconds)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="stop-with-launcher", daemon=True).start()
