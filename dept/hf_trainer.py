"""DePT in transformers' `Trainer` and `Seq2SeqTrainer` (TRL's `SFTTrainer`: `dept.trl_trainer`).

    >>> from transformers import Seq2SeqTrainingArguments
    >>> from dept.hf_trainer import DePTSeq2SeqTrainer
    >>> trainer = DePTSeq2SeqTrainer(model=model, args=Seq2SeqTrainingArguments("out", learning_rate=3e-1),
    ...                              train_dataset=train, data_collator=collator,
    ...                              lora_embedding_lr=5e-3)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    >>> trainer.save_model()  # out/: adapter_config.json + adapter_model.safetensors (+ README.md)  # doctest: +SKIP

Why subclasses and not the plain classes: transformers' `Trainer` saves through `save_pretrained` only for a
`PreTrainedModel` or a `PeftModel`. Any other model has its whole `state_dict` written to `model.safetensors` (the
frozen base too, which fails on T5's tied embeddings) and read back with `load_state_dict`, and every trainable
parameter gets one learning rate. `DePTTrainerMixin` changes exactly these seams and nothing else:

- `save_model`, every checkpoint and `load_best_model_at_end` (`_save`, `_load_from_checkpoint`,
  `_load_best_model`) write and read the adapter files only, `adapter_config.json` + `adapter_model.safetensors`,
  as they do for a PEFT model. Beside them transformers still writes what it writes for every model:
  `training_args.bin`, the tokenizer, and in checkpoints the optimizer, schedule and RNG states;
- the optimizer (`create_optimizer`) is the one `TrainingArguments.optim` names (any of transformers' optimizers
  that take parameter groups; `adamw_torch_fused` by default), over DePT's groups: P at `args.learning_rate`, A
  and B (and a classifier head) at `lora_embedding_lr`. The groups come from `dept.trainer.parameter_groups`,
  the rule our own trainer uses. One argument is simpler than a helper that every caller must wire into
  `optimizers=` (and which would fix the optimizer class that `optim` otherwise picks);
- the model's `config` answers what transformers and TRL ask of a Hugging Face config from the base's
  (`DePTConfig.link_base_config`), as a PEFT model's does.

Everything else is transformers' own: `predict_with_generate` (DePT's `generate` follows transformers'
conventions), gradient checkpointing and bf16 on the frozen base, evaluation, logging, the Hub. A fused optimizer
step leaves no stale cache behind: the A·B table and the prompt KV cache are recomputed on every switch to eval.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from transformers import Seq2SeqTrainer, Trainer

from .adapter_files import load_adapter
from .hub import write_model_card
from .model import AdapterMismatchError, DePTModel
from .optim import parameter_groups

try:
    from transformers.trainer_optimizer import is_optimizer_factory
except ImportError:  # transformers before optimizer factories
    def is_optimizer_factory(optimizer_cls_or_factory: Any) -> bool:
        return False

if TYPE_CHECKING:  # the mixin's members and super() calls are the Trainer's, which it is mixed into
    _Trainer = Trainer
else:
    _Trainer = object

logger = logging.getLogger(__name__)

TRAINING_ARGS_NAME = "training_args.bin"  # transformers' name, written beside the weights
# What `get_optimizer_cls_and_kwargs` returns for optimizers that build their own groups over the model's layers.
_OWN_GROUPS = ("params", "model", "optimizer_dict")


class DePTTrainerMixin(_Trainer):
    """The seams of transformers' `Trainer` that a DePT model needs (see the module docstring).

    Args (besides the Trainer's own):
        lora_embedding_lr: learning rate of A and B (official DePT: 1e-4 to 5e-3), and of a classifier head;
            P trains at `args.learning_rate` (official: 3e-1 or 4e-1). None trains everything at
            `args.learning_rate`, as one group would.
    """

    def __init__(self, *args, lora_embedding_lr: float | None = None, **kwargs):
        self.lora_embedding_lr = lora_embedding_lr
        model = kwargs["model"] if "model" in kwargs else (args[0] if args else None)
        if isinstance(model, DePTModel) and model.config is not None:
            model.config.link_base_config(getattr(model.base_model, "config", None))
        super().__init__(*args, **kwargs)

    def _dept_model(self, model=None) -> DePTModel | None:
        """The DePT model inside `model` (default: the trained one), or None for any other model."""
        unwrapped = self.accelerator.unwrap_model(self.model if model is None else model, keep_torch_compile=False)
        return unwrapped if isinstance(unwrapped, DePTModel) else None

    # ------------------------------------------------------------------------------------------ the two rates

    def create_optimizer(self, model=None):
        dept_model = self._dept_model(model)
        if self.optimizer is not None or dept_model is None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if is_optimizer_factory(optimizer_cls) or any(key in optimizer_kwargs for key in _OWN_GROUPS):
            raise ValueError(
                f"optim={self.args.optim!r} builds its own parameter groups over the model's layers, so DePT's "
                "two learning rates (P; A and B) cannot apply. Choose an optimizer that takes parameter groups, "
                "e.g. optim='adamw_torch_fused' (the default)."
            )
        rates = SimpleNamespace(
            learning_rate=self.args.learning_rate,
            lora_embedding_lr=self.args.learning_rate if self.lora_embedding_lr is None else self.lora_embedding_lr,
            weight_decay=self.args.weight_decay,
        )
        self.optimizer = optimizer_cls(parameter_groups(dept_model, rates), **optimizer_kwargs)
        return self.optimizer

    # ------------------------------------------------------------------------------------------ adapter files

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        dept_model = self._dept_model()
        if dept_model is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if output_dir is None:
            raise ValueError("The trainer has no output_dir (TrainingArguments(output_dir=None)) to save the "
                             "adapter to.")
        os.makedirs(output_dir, exist_ok=True)
        logger.info(f"Saving the DePT adapter to {output_dir}")
        # `state_dict` (DeepSpeed, FSDP) holds whole tensors by parameter name; the adapter's are taken from it.
        dept_model.save_pretrained(output_dir, state_dict=state_dict)
        # What transformers writes beside the weights of every model.
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def create_model_card(self, *args, **kwargs) -> None:
        """DePT's model card in `args.output_dir`, with the trainer's tags (transformers and TRL write theirs there
        at every checkpoint and before a push; theirs would describe a full model)."""
        dept_model = self._dept_model()
        if dept_model is None:
            return super().create_model_card(*args, **kwargs)
        if not self.is_world_process_zero() or self.args.output_dir is None:
            return
        tags = kwargs.get("tags")  # transformers and TRL pass it by keyword
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        os.makedirs(self.args.output_dir, exist_ok=True)
        write_model_card(self.args.output_dir, dept_model.config, repo_id=self.hub_model_id,
                         tags=[*tags, *getattr(self, "_tag_names", [])])

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        dept_model = self._dept_model(model)
        if dept_model is None or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter_into(dept_model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        dept_model, best = self._dept_model(), self.state.best_model_checkpoint
        if dept_model is None or best is None or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_best_model()
        logger.info(f"Loading the best adapter from {best} (score: {self.state.best_metric}).")
        load_adapter_into(dept_model, best)


def load_adapter_into(dept_model: DePTModel, directory: str | Path) -> None:
    """Copy the adapter saved in `directory` (a checkpoint of this run) into `dept_model`, refusing one of another
    shape or scale."""
    config, state, source = load_adapter(directory)
    ours = dept_model.config
    if (config.lora_alpha, config.task_type) != (ours.lora_alpha, ours.task_type):
        raise AdapterMismatchError(
            f"{source} has lora_alpha={config.lora_alpha}, task_type={config.task_type!r}, but the model being "
            f"trained has lora_alpha={ours.lora_alpha}, task_type={ours.task_type!r}: resume from a checkpoint of "
            "this run."
        )
    dept_model.load_adapter_state_dict(state, source)


class DePTTrainer(DePTTrainerMixin, Trainer):
    """transformers' `Trainer` for a DePT model: saves the adapter only, and takes `lora_embedding_lr`."""


class DePTSeq2SeqTrainer(DePTTrainerMixin, Seq2SeqTrainer):
    """transformers' `Seq2SeqTrainer` for a DePT model: saves the adapter only, and takes `lora_embedding_lr`."""
