"""DePT and its baselines behind one switch, so every comparison runs through the same code path.

`PROMPT_TUNING_LORA` is DePT, `PROMPT_TUNING` is DePT with r = 0 (vanilla prompt tuning), `LORA` goes through
HF PEFT, and `FULL` trains every weight.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from torch import nn

from .config import ConfigError, DePTConfig
from .extras import require
from .model import DePTModel, get_dept_model, infer_task_type

logger = logging.getLogger(__name__)

PEFT_TYPES = ("PROMPT_TUNING_LORA", "PROMPT_TUNING", "LORA", "FULL")
_PEFT_TASK_TYPES = {"seq2seq": "SEQ_2_SEQ_LM", "causal": "CAUSAL_LM", "cls": "SEQ_CLS"}


@dataclasses.dataclass
class LoraSettings:
    """The LoRA baseline: rank 8 on the attention queries and values, as in the DePT paper's comparison."""

    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None  # None: PEFT's default (q and v) for the architecture
    custom_model: bool = False  # a non-Hugging Face base (e.g. timm): PEFT's plain PeftModel, no task type


def prepare_model(
    model: nn.Module,
    peft_type: str,
    *,
    dept_config: DePTConfig | None = None,
    tokenizer=None,
    peft_model_id: str | None = None,
    lora: LoraSettings | None = None,
    modules_to_save: tuple[str, ...] | None = None,
    model_class: type[DePTModel] | None = None,
) -> nn.Module:
    """Make `model` ready to train with one method.

    Args:
        peft_type: one of `PEFT_TYPES`.
        dept_config: m, r, max_length, ... for DePT and prompt tuning (r is forced to 0 for PROMPT_TUNING).
        peft_model_id: a saved DePT adapter (ours or official) to start from instead of a fresh one (transfer).
            With `dept_config` too, the adapter must cover `dept_config.max_length` (see `check_max_length`).
        modules_to_save: extra modules trained with the prompt (a classifier head, a visual projection);
            None keeps each model kind's default.
        model_class: the DePT model kind for a base that `infer_task_type` does not know (e.g. a timm ViT);
            None picks it from the model.
    """
    if peft_type not in PEFT_TYPES:
        raise ConfigError(f"Unknown peft_type {peft_type!r}: choose one of {PEFT_TYPES}.")
    extra: dict[str, Any] = {} if modules_to_save is None else {"modules_to_save": tuple(modules_to_save)}
    if peft_type in ("PROMPT_TUNING_LORA", "PROMPT_TUNING"):
        if peft_model_id:
            if dept_config is not None:  # before loading anything onto the model
                check_max_length(DePTConfig.from_pretrained(peft_model_id), dept_config.max_length, peft_model_id)
            loaded = (model_class or DePTModel).from_pretrained(model, peft_model_id, is_trainable=True, **extra)
            if peft_type == "PROMPT_TUNING" and loaded.config.r > 0:
                raise ConfigError(f"{peft_model_id} is a DePT adapter with r={loaded.config.r}; use PROMPT_TUNING_LORA.")
            return loaded
        if dept_config is None:
            raise ConfigError(f"peft_type {peft_type} needs a DePTConfig.")
        if peft_type == "PROMPT_TUNING":
            dept_config = dataclasses.replace(dept_config, r=0)
        if model_class is not None:
            return model_class(model, dept_config, tokenizer=tokenizer, **extra)
        return get_dept_model(model, dept_config, tokenizer=tokenizer, **extra)
    if peft_model_id:
        raise ConfigError(f"peft_model_id initialises DePT adapters; it does not apply to peft_type {peft_type}.")
    if peft_type == "LORA":
        return _lora(model, lora or LoraSettings(), modules_to_save)
    model.requires_grad_(True)
    return model


def check_max_length(config: DePTConfig, requested: int, source: str = "the adapter") -> None:
    """Refuse an adapter whose A covers fewer positions than the inputs will have.

    The pipelines truncate inputs at `requested` (`--max_seq_length`). An adapter with a larger `max_length`
    is fine (A is sliced to each batch's length); a smaller one would meet positions it has no row of A for.
    """
    if requested > config.max_length:
        raise ConfigError(
            f"{source} has max_length={config.max_length}, but inputs are truncated at {requested} tokens "
            f"(--max_seq_length): its A has no rows past position {config.max_length}. "
            f"Pass --max_seq_length {config.max_length} or lower."
        )


def _lora(model: nn.Module, settings: LoraSettings, modules_to_save) -> nn.Module:
    peft = require("peft", extra="peers")  # the LoRA baseline only
    config = peft.LoraConfig(
        task_type=None if settings.custom_model else _PEFT_TASK_TYPES[infer_task_type(model)],
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.target_modules,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
    )
    return peft.get_peft_model(model, config)


def count_trainable_parameters(model: nn.Module) -> dict[str, int]:
    """The breakdown a DePT model reports, or the plain trainable total for the baselines."""
    if isinstance(model, DePTModel):
        return model.num_trainable_parameters()
    return {"total": sum(p.numel() for p in model.parameters() if p.requires_grad)}
