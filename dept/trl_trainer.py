"""DePT in TRL's `SFTTrainer` (TRL is imported here only, never by `import dept`).

    >>> from trl import SFTConfig
    >>> from dept.trl_trainer import DePTSFTTrainer
    >>> trainer = DePTSFTTrainer(model=model, args=SFTConfig("out", learning_rate=3e-1), train_dataset=dataset,
    ...                          processing_class=tokenizer, lora_embedding_lr=5e-3)  # doctest: +SKIP

The same seams as `dept.hf_trainer.DePTTrainerMixin` (the adapter files only, DePT's two learning rates), plus
one of TRL's: `SFTTrainer` computes the loss with a fused LM head that it installs by patching the forward of the
model it trains, running `model.base_model` as the transformer backbone (for a `PeftModel` it patches the Hugging
Face model inside). DePT's prompt must go in first, so the head goes on the decoder-only Hugging Face model
inside the DePT model, and DePT's forward passes `fused_lm_head=True` through to it with the labels it has
aligned to the prompted sequence (-100 over P).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .extras import require

require("trl", extra="peers")  # without TRL: one line naming `pip install 'dept[peers]'`, not a traceback

import trl.trainer.sft_trainer as sft_trainer_module  # noqa: E402
from trl import SFTTrainer  # noqa: E402

from .hf_trainer import DePTTrainerMixin  # noqa: E402
from .model import DePTModel  # noqa: E402


@contextmanager
def _fused_lm_head_on_base_model(dept_model) -> Iterator[None]:
    """While SFTTrainer sets up, its `add_fused_lm_head(model, ...)` patches `model.base_model` for a DePT model."""
    add_fused_lm_head = sft_trainer_module.add_fused_lm_head

    def on_base_model(model: Any, *args: Any, **kwargs: Any) -> None:  # add_fused_lm_head's signature
        add_fused_lm_head(model.base_model if model is dept_model else model, *args, **kwargs)

    sft_trainer_module.add_fused_lm_head = on_base_model
    try:
        yield
    finally:
        sft_trainer_module.add_fused_lm_head = add_fused_lm_head


class DePTSFTTrainer(DePTTrainerMixin, SFTTrainer):
    """TRL's `SFTTrainer` for a decoder-only DePT model: saves the adapter only, takes `lora_embedding_lr`, and puts
    TRL's fused LM head on the base model behind the prompt."""

    def __init__(self, model, *args, **kwargs):
        if not isinstance(model, DePTModel):
            raise TypeError(f"DePTSFTTrainer trains a DePT model (dept.get_dept_model); got {type(model).__name__}. "
                            "Use trl.SFTTrainer for other models.")
        if model.task_type != "causal":
            raise ValueError(f"SFTTrainer trains decoder-only models; this DePT model is {model.task_type!r}. "
                             "Use dept.hf_trainer.DePTSeq2SeqTrainer or DePTTrainer for it.")
        with _fused_lm_head_on_base_model(model):
            super().__init__(model, *args, **kwargs)
