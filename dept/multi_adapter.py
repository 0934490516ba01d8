"""Many DePT adapters served by one frozen model, in one batch: a thin add/remove/list API over the model kinds.

DePT changes only the input embeddings, so the rows of one batch can belong to different adapters. The model
kind for the base (`DePTModelForSeq2SeqLM`, `...ForCausalLM`, `...ForSequenceClassification`) holds them all
in one `DePTEmbedding` bank and routes each row to its adapter (`adapter_names`); this class loads saved
adapter directories into it, removes and lists them, and forwards every call.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .adapter_files import load_adapter
from .config import DePTConfig, infer_task_type
from .embedding import PromptRouting
from .model import _MODEL_CLASSES, AdapterMismatchError, DePTModel


class MultiAdapterModel(nn.Module):
    """One frozen Hugging Face model serving many DePT adapters; each row of a batch names its adapter.

    Adapters are saved DePT directories (ours or official DePT releases); everything is frozen and in eval mode.
    `model` is the underlying model kind, whose bank holds the adapters.

    Shapes: `forward(input_ids (batch, seq), attention_mask (batch, seq), adapter_names=[...] (batch names))`.
    Decoder-only logits cover `width + seq` positions, `width` being the longest prompt among the batch's
    adapters (`embed` returns the matching mask).

    Example:
        >>> model = MultiAdapterModel(t5, {"sst2": "adapters/sst2", "rte": "adapters/rte"})  # doctest: +SKIP
        >>> batch = tokenizer(["sentence: great film", "premise: ... hypothesis: ..."], padding=True,
        ...                   return_tensors="pt")  # doctest: +SKIP
        >>> model.generate(**batch, adapter_names=["sst2", "rte"], max_new_tokens=4)  # doctest: +SKIP

    `generate` returns what the model kind's returns: for decoder-only models the input ids followed by the new
    tokens, as transformers does; `new_tokens_only=True` gives the new tokens alone.
    """

    def __init__(self, base_model: nn.Module, adapters: dict[str, str | Path] | None = None):
        super().__init__()
        kind = _MODEL_CLASSES[infer_task_type(base_model)]
        self.model = kind(base_model.requires_grad_(False).eval(), None)
        for name, directory in (adapters or {}).items():
            self.add_adapter(name, directory)

    @classmethod
    def from_dept_models(cls, models: dict[str, DePTModel]) -> MultiAdapterModel:
        """Serve already-built `DePTModel`s together, over the first one's base model.

        The others must wrap that same base model, or one with identical frozen weights. The shared base model
        is frozen and put in eval mode.
        """
        if not models:
            raise ValueError("from_dept_models needs at least one DePTModel.")
        base_model = next(iter(models.values())).base_model
        for name, dept_model in models.items():
            _check_same_frozen_base(name, dept_model, base_model)
        multi = cls(base_model)
        for name, dept_model in models.items():
            config = DePTConfig.from_dict(dept_model.config.to_dict())
            multi.model.add_adapter(name, config, dept_model.adapter_state_dict(), f"DePTModel {name!r}")
        return multi

    # ----------------------------------------------------------------------------------------------------------
    # Adapters
    def add_adapter(self, name: str, directory: str | Path) -> None:
        """Load a saved adapter (ours or an official DePT directory) under `name`.

        An adapter for another base model (d, vocabulary, model type, task type) is refused before any compute.
        """
        config, state, source = load_adapter(directory)
        self.model.add_adapter(name, config, state, source)

    def remove_adapter(self, name: str) -> None:
        self.model.remove_adapter(name)

    def list_adapters(self) -> list[str]:
        """The loaded adapters' names, in the bank's order."""
        return self.model.adapter_names

    @property
    def adapters(self) -> dict[str, DePTConfig]:
        """Each loaded adapter's config, by name."""
        return self.model.adapter_configs

    @property
    def base_model(self) -> nn.Module:
        return self.model.base_model

    @property
    def task_type(self) -> str:
        return self.model.task_type

    # ----------------------------------------------------------------------------------------------------------
    # Calls
    def embed(self, adapter_names: str | Sequence[str] | None, input_ids: torch.Tensor | None = None,
              attention_mask: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor, PromptRouting]:
        """Word embeddings with each row's adapter applied: (batch, width + seq, d), the (batch, width + seq) mask,
        and where the prompts went."""
        tokens, mask, _, routing = self.model.embed_tokens(input_ids, attention_mask, inputs_embeds, adapter_names)
        return *self.model.prompt_encoder.with_prompts(tokens, mask, routing), routing

    @torch.no_grad()
    def forward(self, *args, adapter_names=None, **kwargs):
        return self.model(*args, adapter_names=adapter_names, **kwargs)

    @torch.no_grad()
    def generate(self, *args, adapter_names=None, **kwargs):
        return self.model.generate(*args, adapter_names=adapter_names, **kwargs)


def _check_same_frozen_base(name: str, dept_model: DePTModel, base_model: nn.Module) -> None:
    if not isinstance(dept_model, DePTModel):
        raise TypeError(f"from_dept_models takes DePTModels; {name!r} is a {type(dept_model).__name__}.")
    if dept_model.base_model is base_model:
        return
    own = dict(dept_model.base_model.named_parameters())
    shared = dict(base_model.named_parameters())
    trained = tuple(f"{module}." for module in dept_model.modules_to_save)
    frozen = [key for key in shared if not key.startswith(trained)]
    if set(own) != set(shared) or any(not torch.equal(own[key], shared[key]) for key in frozen):
        raise AdapterMismatchError(f"DePTModel {name!r} wraps a base model whose frozen weights differ from the "
                                   "first model's: adapters can be served together only over one base model.")
