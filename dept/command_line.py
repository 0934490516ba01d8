"""The command line shared by every pipeline: the method's flags, a parser that also reads YAML configs, and
the runner of the console scripts.

The text and vision-language CLIs add their own model and data arguments on top; flags that mean the same
thing are spelled the same in both (`--peft_type`, `--prefix_length`, `--r`, `--learning_rate`, ...).

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

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import HfArgumentParser

from .config import OFFICIAL_INIT_TEXT, DePTConfig
from .errors import FlagError, UserError
from .methods import PEFT_TYPES

DEFAULT_PREFIX_LENGTH = 60
DEFAULT_DEPT_RANK = 30
DEFAULT_LORA_RANK = 8  # the LoRA baseline of the DePT paper's comparison


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
    prefix_length: int | None = field(
        default=None,
        metadata={"help": f"m: number of prompt vectors (default {DEFAULT_PREFIX_LENGTH}, or the --peft_model_id "
                          "adapter's; 0 trains A·B alone)."},
    )
    r: int | None = field(
        default=None,
        metadata={"help": f"Rank: of DePT's A @ B (default {DEFAULT_DEPT_RANK}, or the --peft_model_id adapter's), "
                          f"or of LoRA with --peft_type LORA (default {DEFAULT_LORA_RANK})."},
    )
    lora_alpha: float = field(default=8.0, metadata={"help": "DePT scales A @ B by lora_alpha / sqrt(r)."})
    prompt_init: str = field(default="text", metadata={"help": "P starts from 'text', 'vocab' or 'random'."})
    prompt_init_text: str = field(default=OFFICIAL_INIT_TEXT, metadata={"help": "Text for --prompt_init text."})
    peft_model_id: str | None = field(
        default=None, metadata={"help": "Start from this saved adapter (ours or an official DePT checkpoint)."}
    )
    lora_r: int | None = field(
        default=None, metadata={"help": "Rank of the LoRA baseline (q and v); the same as --r with --peft_type LORA."}
    )

    def __post_init__(self):
        if self.peft_model_id:  # before the defaults fill in what was not given
            self.check_agrees_with_adapter(DePTConfig.from_pretrained(self.peft_model_id))
        self.prefix_length = DEFAULT_PREFIX_LENGTH if self.prefix_length is None else self.prefix_length
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
            self.r = DEFAULT_DEPT_RANK if self.r is None else self.r
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


def parse_arguments(dataclass_types, argv: list[str] | None = None, aliases: dict[str, str] | None = None):
    """Parse flags into the given dataclasses; `--config FILE.yaml` supplies defaults the flags override.

    `aliases` maps old flag spellings to current ones (e.g. `--evaluation_strategy` -> `--eval_strategy`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise FlagError("--config needs a YAML file path.")
        argv = yaml_to_argv(argv[index + 1]) + argv[:index] + argv[index + 2:]
    argv = [_rename_flag(word, aliases or {}) for word in argv]
    parser = HfArgumentParser(dataclass_types)
    try:
        return parser.parse_args_into_dataclasses(args=argv)
    except UserError:
        raise
    except ValueError as err:  # a dataclass's own check of its flags (e.g. "Nothing to do: pass --do_train")
        raise FlagError(str(err)) from err


def _rename_flag(word: str, aliases: dict[str, str]) -> str:
    if not word.startswith("--"):
        return word
    name, equals, value = word.partition("=")
    return aliases.get(name, name) + equals + value


def run_command_line(dataclass_types, run: Callable[..., dict], argv: list[str] | None = None,
                     aliases: dict[str, str] | None = None) -> dict:
    """Parse the flags into the dataclasses, call `run(*parsed)`, print its results as JSON and return them."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    results = run(*parse_arguments(dataclass_types, argv, aliases))
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
