"""The command line every CLI shares, one job per module:

- `flags`: flags from dataclasses (`config_flag`, whose help is a `DePTConfig` field's), the one table of other
  spellings (`FLAG_ALIASES`), and `parse_arguments`;
- `config_file`: `--config FILE.yaml` read as flags, its keys checked;
- `arguments`: the argument dataclasses every training CLI shares (`RunStages`, `MethodArguments`);
- `console`: the console contract of the six CLIs (`run_console`): results once on stdout, logs on stderr, a user
  error in one line with exit status 2;
- `launcher_watchdog`: a rank stops when its launcher is gone.
"""

from .arguments import DEFAULT_LORA_RANK, IGNORED_FLAGS, MethodArguments, RunStages, check_model_name_or_path
from .config_file import CONFIG_FLAG, yaml_to_argv
from .console import EXPECTED_ERRORS, USAGE_ERROR_STATUS, console_logging, run_command_line, run_console
from .flags import (
    CONFIG_FLAGS,
    DEBUG_FLAG,
    FLAG_ALIASES,
    LOG_LEVEL_FLAG,
    ArgumentParser,
    add_console_flags,
    add_fields_as_flags,
    canonical_flag,
    config_flag,
    parse_arguments,
)

__all__ = [
    "CONFIG_FLAG",
    "CONFIG_FLAGS",
    "DEBUG_FLAG",
    "DEFAULT_LORA_RANK",
    "EXPECTED_ERRORS",
    "FLAG_ALIASES",
    "IGNORED_FLAGS",
    "LOG_LEVEL_FLAG",
    "USAGE_ERROR_STATUS",
    "ArgumentParser",
    "MethodArguments",
    "RunStages",
    "add_console_flags",
    "add_fields_as_flags",
    "canonical_flag",
    "console_logging",
    "check_model_name_or_path",
    "config_flag",
    "parse_arguments",
    "run_command_line",
    "run_console",
    "yaml_to_argv",
]
