"""What Hugging Face tools read on the model they train, answered by a DePT model from its frozen base.

transformers' `Trainer` and TRL's `SFTTrainer` treat the model they are given as a `PreTrainedModel`: they set its
generation settings, switch on activation checkpointing and tag it for the Hub. A PEFT model forwards such calls to
its base model; `DePTModel` does the same, for the few members these tools use, through this mixin. The prompt
P, A and B need nothing of it: they sit in front of the base, whose settings these are.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import TRAINING_TASK_NAME
from .hub import upload_adapter, write_model_card

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .config import DePTConfig


def input_embedding_weight(model: PreTrainedModel) -> torch.Tensor:
    """The (vocab, d) weight of a Hugging Face model's input embeddings (a ZeRO-3 shard is its local part)."""
    weight = model.get_input_embeddings().weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(model).__name__}.get_input_embeddings() has no weight tensor.")
    return weight


class HuggingFaceModelMixin:
    """The members of a `PreTrainedModel` that transformers' `Trainer` and TRL use, taken from `self.base_model`.

    - `generation_config`: the base's generation settings (read by `Seq2SeqTrainer(predict_with_generate=True)`,
      aligned with the tokenizer's special tokens by `Trainer.train`, given a pad token by TRL);
    - `activation_checkpointing_enable` / `_disable` (and transformers' older names `gradient_checkpointing_*`):
      checkpoint the frozen base's layers (`TrainingArguments(gradient_checkpointing=True)`, on by default in
      TRL's `SFTConfig`). P, A and B are outside every checkpointed layer, and their gradients are the same;
    - `add_model_tags`: the tags TRL records for the Hub;
    - `push_to_hub`: the adapter (not the base) goes to the Hub, with its model card.
    """

    base_model: Any
    config: DePTConfig  # what the model class that mixes this in provides

    def save_pretrained(self, save_directory: str | Path, *args, **kwargs) -> Any:
        raise NotImplementedError

    @property
    def generation_config(self):
        """The frozen base model's `GenerationConfig` (None for a base that does not generate)."""
        return getattr(self.base_model, "generation_config", None)

    @generation_config.setter
    def generation_config(self, value) -> None:
        self.base_model.generation_config = value

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs) -> None:
        """Recompute the frozen base's layer activations in the backward pass (the base's own method)."""
        base = self.base_model
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)
        elif hasattr(base, "gradient_checkpointing_enable"):  # transformers before the rename
            base.gradient_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)
        else:
            raise ValueError(f"The base model {type(base).__name__} cannot checkpoint its activations: activation "
                             "checkpointing works on Hugging Face models that support it.")

    def activation_checkpointing_disable(self) -> None:
        base = self.base_model
        if hasattr(base, "activation_checkpointing_disable"):
            base.activation_checkpointing_disable()
        elif hasattr(base, "gradient_checkpointing_disable"):
            base.gradient_checkpointing_disable()

    # transformers' older names, which its Trainer still calls on models that define no other
    gradient_checkpointing_enable = activation_checkpointing_enable
    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.base_model, "is_gradient_checkpointing", False))

    def add_model_tags(self, tags: list[str] | str) -> None:
        """Hub tags recorded on the base model (TRL adds its trainer's name)."""
        if hasattr(self.base_model, "add_model_tags"):
            self.base_model.add_model_tags(tags)

    def push_to_hub(self, repo_id: str, *, run_dir: str | Path | None = None, model_card_data=None,
                    token: str | bool | None = None, private: bool | None = None, revision: str | None = None,
                    commit_message: str | None = None, create_pr: bool = False):
        """Upload the adapter to the Hub repository `repo_id` (created if needed): adapter_config.json,
        adapter_model.safetensors and its model card README.md. `run_dir`, the training run's output directory,
        gives the card the task and metrics (its training_task.json and all_results.json), and its
        training_task.json goes along, so dept-eval and dept-serve read the run's task, template and base from
        the Hub as from the directory. `model_card_data` adds card fields. Returns huggingface_hub's `CommitInfo`."""
        with tempfile.TemporaryDirectory(prefix="dept-push-") as directory:
            self.save_pretrained(directory)
            if run_dir is not None and (Path(run_dir) / TRAINING_TASK_NAME).is_file():
                shutil.copyfile(Path(run_dir) / TRAINING_TASK_NAME, Path(directory) / TRAINING_TASK_NAME)
            write_model_card(directory, self.config, repo_id=repo_id, run_dir=run_dir,
                             tags=getattr(self.base_model, "model_tags", None) or (), model_card_data=model_card_data)
            return upload_adapter(directory, repo_id, token=token, private=private, revision=revision,
                                  commit_message=commit_message, create_pr=create_pr)
