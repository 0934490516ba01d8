"""Flags from dataclasses: `config_flag` (a flag whose help is a `DePTConfig` field's), `FLAG_ALIASES` (the one table
of other spellings), and `parse_arguments`, which reads `--config FILE.yaml` and the command line into the
dataclasses of a CLI. A bad command line raises `FlagError` (one line at the console), never argparse's usage
and exit."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import typing
from collections.abc import Iterable
from dataclasses import field
from typing import Any

from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from dept.config import DePTConfig
from dept.errors import FlagError, UserError

from .config_file import CONFIG_FLAG, direction_follows_metric, split_config

COMMAND_LINE = "the command line"  # where a flag was given, when not in a --config file

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

DEBUG_FLAG = "--debug"
LOG_LEVEL_FLAG = "--log_level"
LOG_LEVELS = ("debug", "info", "warning", "error")


def config_flag(flag: str, default: Any = dataclasses.MISSING, unset: str | None = None, *,
                field_name: str | None = None, subject: str | None = None) -> Any:  # a Field, typed as `field()`
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


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a bad command line raises `FlagError` (printed as one line by `run_console`) instead
    of printing the usage and exiting."""

    def error(self, message: str) -> typing.NoReturn:
        raise FlagError(message)


class DataclassArgumentParser(ArgumentParser, HfArgumentParser):
    """transformers' `HfArgumentParser` (flags from dataclass fields), raising `FlagError` on a bad command line."""


def add_console_flags(parser: argparse.ArgumentParser, config_file: bool = True) -> None:
    """List the flags that `run_console` (and `parse_arguments`, for `--config`) read in `--help`. They never reach
    the namespace (`argparse.SUPPRESS`): they are taken out of the command line before it is parsed."""
    group = parser.add_argument_group("console")
    if config_file:
        group.add_argument(CONFIG_FLAG, metavar="FILE.yaml", default=argparse.SUPPRESS,
                           help="A YAML mapping of flag names to values (a recipe in configs/); flags given on the "
                                "command line override it.")
    group.add_argument(DEBUG_FLAG, action="store_true", default=argparse.SUPPRESS,
                       help="Show the traceback of an error instead of its one-line message.")
    group.add_argument(LOG_LEVEL_FLAG, choices=LOG_LEVELS, default=argparse.SUPPRESS,
                       help="Level of this program's own log messages (default: info). Other libraries log at "
                            "warning, or at this level when it is higher.")


def pop_console_flags(argv: list[str]) -> tuple[list[str], bool, str | None]:
    """(argv without `--debug` and `--log_level LEVEL`, whether `--debug` was given, the log level or None)."""
    rest, debug, level = [], False, None
    words = iter(argv)
    for word in words:
        if word == DEBUG_FLAG:
            debug = True
        elif word == LOG_LEVEL_FLAG:
            level = next(words, None)
            if level is None:
                raise FlagError(f"{LOG_LEVEL_FLAG} needs a level: one of {', '.join(LOG_LEVELS)}.")
        elif word.startswith(LOG_LEVEL_FLAG + "="):
            level = word.partition("=")[2]
        else:
            rest.append(word)
    if level is not None and level.lower() not in LOG_LEVELS:
        raise FlagError(f"{LOG_LEVEL_FLAG} {level}: choose one of {', '.join(LOG_LEVELS)}.")
    return rest, debug, level if level is None else level.lower()


def canonical_flag(word: str, parser: argparse.ArgumentParser) -> str:
    """A command-line word as `parser` spells it: a flag (`--flag` or `--flag=value`) of `FLAG_ALIASES` becomes
    its target when that is a flag of the parser and the alias is not; anything else is returned as it is."""
    if not word.startswith("--"):
        return word
    name, equals, value = word.partition("=")
    known, target = parser._option_string_actions, FLAG_ALIASES.get(name)
    return (target if target in known and name not in known else name) + equals + value


def closest_flag_hint(name: str, known: Iterable[str]) -> str:
    """' Did you mean --x?' for the known flag closest to `name` (both with their dashes), or ''."""
    close = difflib.get_close_matches(name, [flag for flag in known if flag.startswith("--")], n=1)
    return f" Did you mean {close[0]}?" if close else ""


def accepted_flags(parser: argparse.ArgumentParser) -> set[str]:
    """The flags `parser` reads, with the aliases of `FLAG_ALIASES` that apply to it."""
    known = set(parser._option_string_actions)
    return known | {alias for alias, target in FLAG_ALIASES.items() if canonical_flag(alias, parser) == target}


def given_flags(words: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """The destinations (field names) of the flags among `words`, spelled as `parser` spells them."""
    names = (word.partition("=")[0] for word in words if word.startswith("--"))
    actions = parser._option_string_actions
    return [actions[name].dest for name in names if name in actions]


def parse_arguments(dataclass_types, argv: list[str] | None = None):
    """Parse flags into the given dataclasses; `--config FILE.yaml` supplies defaults the flags override, and the
    spellings of `FLAG_ALIASES` are accepted (e.g. `--evaluation_strategy` for `--eval_strategy`).

    A parsed dataclass with a `check_given_flags(given)` method gets the flags that were set (field name -> the
    config file's path, or `COMMAND_LINE`), e.g. to refuse a flag that its method ignores. Any problem with the
    flags raises `FlagError`."""
    argv, _, _ = pop_console_flags(list(sys.argv[1:] if argv is None else argv))  # run_console's, already read
    parser = DataclassArgumentParser(dataclass_types)
    add_console_flags(parser)
    console_only = {CONFIG_FLAG, DEBUG_FLAG, LOG_LEVEL_FLAG, "--help"}
    file_words, config_path, argv = split_config(argv, accepted_flags(parser) - console_only, console_only)
    file_words = [canonical_flag(word, parser) for word in file_words]
    argv = [canonical_flag(word, parser) for word in argv]
    file_words = direction_follows_metric(file_words, argv)
    _, unknown = parser.parse_known_args(file_words + argv)
    if unknown:
        flags = [word.partition("=")[0] for word in unknown if word.startswith("--")]
        hint = closest_flag_hint(flags[0], accepted_flags(parser) - console_only) if flags else ""
        raise FlagError(f"Unknown argument(s): {' '.join(unknown)}.{hint}")
    try:
        parsed = parser.parse_args_into_dataclasses(args=file_words + argv)
    except UserError:
        raise
    except ValueError as err:  # a dataclass's own check of its flags (e.g. "Nothing to do: pass --do_train")
        raise FlagError(str(err)) from err
    given = dict.fromkeys(given_flags(file_words, parser), f"{CONFIG_FLAG} {config_path}")
    given.update(dict.fromkeys(given_flags(argv, parser), COMMAND_LINE))
    for parsed_object in parsed:
        if hasattr(parsed_object, "check_given_flags"):
            parsed_object.check_given_flags(given)
    return parsed
