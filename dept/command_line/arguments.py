"""The argument dataclasses every training command line shares: the run stages, and the method with its sizes.

The text, vision-language and image CLIs add their own model and data arguments on top; flags that mean the same
thing are spelled the same in all of them (`--peft_type`, `--prefix_length`, `--r`, `--learning_rate`, ...).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from dept.config import DePTConfig
from dept.errors import FlagError
from dept.hub import resolve_adapter_dir
from dept.methods import PEFT_TYPES

from .flags import COMMAND_LINE, config_flag

logger = logging.getLogger(__name__)

DEFAULT_LORA_RANK = 8  # the LoRA baseline of the DePT paper's comparison

IGNORED_FLAGS = {
    "PROMPT_TUNING_LORA": {"lora_r": "the LoRA baseline's rank"},
    "PROMPT_TUNING": {"r": "PROMPT_TUNING is DePT with r = 0: it has no A and B",
                      "lora_alpha": "it scales A @ B, which PROMPT_TUNING does not have",
                      "lora_r": "the LoRA baseline's rank"},
    "LORA": {"prefix_length": "LORA has no prompt", "prompt_init": "LORA has no prompt",
             "prompt_init_text": "LORA has no prompt",
             "lora_alpha": "it is DePT's scale of A @ B; the LoRA baseline keeps PEFT's alpha 16",
             "lora_embedding_lr": "LORA trains every LoRA weight at --learning_rate",
             "peft_model_id": "it starts from a DePT adapter"},
    "FULL": {"prefix_length": "FULL has no prompt", "r": "FULL has no A and B", "lora_r": "FULL has no LoRA",
             "lora_alpha": "FULL has no A and B", "prompt_init": "FULL has no prompt",
             "prompt_init_text": "FULL has no prompt",
             "lora_embedding_lr": "FULL trains every weight at --learning_rate",
             "peft_model_id": "it starts from a DePT adapter"},
}
"""For each --peft_type, the flags that method does not read, and why. Given on the command line they are refused
(they would be silently ignored); set by a --config file they are ignored with a warning, so that one recipe also
runs its baselines (`--config configs/nlp/sst2.yaml --peft_type PROMPT_TUNING`)."""


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
        metadata={"help": "PROMPT_TUNING_LORA (DePT), PROMPT_TUNING, LORA or FULL. A flag the method does not read "
                          "(e.g. --r with PROMPT_TUNING) is refused.", "choices": list(PEFT_TYPES)},
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
            self.peft_model_id = str(resolve_adapter_dir(self.peft_model_id))  # a dir or a Hub id (dept.hub)
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

    def check_given_flags(self, given: Mapping[str, str]) -> None:
        """Refuse a flag that `peft_type` does not read, given on the command line; warn for one from a config
        file. `given` maps each flag that was set (without `--`) to where: `COMMAND_LINE` or the file's path.
        (`dept.command_line.parse_arguments` calls this after parsing.)"""
        ignored = IGNORED_FLAGS[self.peft_type]
        refused = [f"--{name} ({why})" for name, why in ignored.items() if given.get(name) == COMMAND_LINE]
        if refused:
            raise FlagError(f"--peft_type {self.peft_type} does not use {', '.join(refused)}: drop "
                            f"{'it' if len(refused) == 1 else 'them'}, or choose the method that reads "
                            f"{'it' if len(refused) == 1 else 'them'}.")
        for name, why in ignored.items():
            if name in given:
                logger.warning("%s sets %s, which --peft_type %s ignores (%s).", given[name], name, self.peft_type,
                               why)

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
        assert self.prefix_length is not None and self.r is not None  # __post_init__ filled in the defaults
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
