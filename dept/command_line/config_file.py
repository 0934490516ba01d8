"""`--config FILE.yaml`: a YAML mapping of flag names to values (the recipes in configs/), read as command-line
words that the flags given on the command line override."""

from __future__ import annotations

import difflib
from collections.abc import Collection
from pathlib import Path

import yaml

from dept.errors import FlagError

CONFIG_FLAG = "--config"


def yaml_to_argv(path: str | Path, accepted: Collection[str] | None = None,
                 command_line_only: Collection[str] = ()) -> list[str]:
    """A YAML mapping of flag -> value, as command-line words (later flags on the real command line win).

    With `accepted` (the flags a command line knows, with their dashes), a key that is not one of them is refused,
    naming the file and the closest accepted key; so is a key of `command_line_only` (e.g. `debug`)."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise FlagError(f"{CONFIG_FLAG} {path}: cannot be read ({err.strerror or err}).") from None
    except yaml.YAMLError as err:
        raise FlagError(f"{CONFIG_FLAG} {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise FlagError(f"{path} must be a YAML mapping of flag names to values.")
    argv = []
    for key, value in data.items():
        if accepted is not None:
            check_key(path, str(key), accepted, command_line_only)
        if value is None:
            continue
        if isinstance(value, bool):
            argv += [f"--{key}", str(value).lower()]
        elif isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def check_key(path: str | Path, key: str, accepted: Collection[str], command_line_only: Collection[str]) -> None:
    """Refuse a key of the config file `path` that is not a flag of the command line (a typo, most often)."""
    if f"--{key}" in command_line_only:
        raise FlagError(f"{CONFIG_FLAG} {path}: '{key}' is a flag of the command line only; pass --{key} there.")
    if f"--{key}" not in accepted:
        keys = sorted(flag[2:] for flag in accepted if flag.startswith("--") and f"--{flag[2:]}" not in command_line_only)
        close = difflib.get_close_matches(key, keys, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise FlagError(f"{CONFIG_FLAG} {path}: unknown key '{key}'.{hint} The keys are the command line's flags "
                        "without their dashes (see --help).")


def split_config(argv: list[str], accepted: Collection[str] | None = None,
                 command_line_only: Collection[str] = ()) -> tuple[list[str], str | None, list[str]]:
    """(the config file's flags as words, the file's path or None, the rest of the command line)."""
    if CONFIG_FLAG not in argv:
        return [], None, argv
    index = argv.index(CONFIG_FLAG)
    if index + 1 >= len(argv):
        raise FlagError(f"{CONFIG_FLAG} needs a YAML file path.")
    path = argv[index + 1]
    return yaml_to_argv(path, accepted, command_line_only), path, argv[:index] + argv[index + 2:]


def direction_follows_metric(recipe: list[str], command_line: list[str]) -> list[str]:
    """The recipe's flags without its `greater_is_better` when the command line picks another metric and no
    direction: the direction then follows the new metric (`TrainingArguments.best_model_criterion`), instead of
    a recipe's "true" silently maximising a `--metric_for_best_model loss`."""
    named = {word.partition("=")[0] for word in command_line}
    if "--metric_for_best_model" not in named or "--greater_is_better" in named:
        return recipe
    kept, words = [], iter(recipe)
    for word in words:
        if word.partition("=")[0] == "--greater_is_better":
            if "=" not in word:
                next(words, None)  # yaml_to_argv writes a value after a flag
        else:
            kept.append(word)
    return kept
