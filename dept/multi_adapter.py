"""Many DePT adapters served by one frozen model, in one batch: each row names its adapter.

DePT changes only the input embeddings, so the rows of one batch can belong to different adapters. A serving
model (`ServedSeq2SeqLM`, `ServedCausalLM`, `ServedSequenceClassification`) is its model kind with the adapters
held in a `dept.bank.AdapterBank` instead of one `DePTEmbedding`: `forward` and `generate` take `adapter_names`
(one per row, or one for the whole batch), route each row to its adapter, and apply each adapter's own trained
modules (a classifier head, a visual projection) to its own rows. `MultiAdapterModel` loads saved adapter
directories into it, removes and lists them, and forwards every call. Each row gives exactly what its adapter
alone gives. Serving runs one call at a time (the rows of a call are set for its duration).
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .adapter_files import load_adapter
from .bank import AdapterBank, BankRouting
from .caching import EvalCachingModule
from .config import DePTConfig, infer_task_type
from .embedding import DePTEmbedding
from .model import (
    _MODEL_CLASSES,
    MODULES_PREFIX,
    AdapterMismatchError,
    DePTModel,
    DePTModelForCausalLM,
    DePTModelForSeq2SeqLM,
    DePTModelForSequenceClassification,
    check_adapter_state,
    check_compatible,
    check_saved_base,
    embed_inputs,
    load_adapter_tensors,
    load_module_state,
    saved_modules,
)
from .prompt_cache import PromptKVCache, PromptStates, compute_prompt_states, stack_prompt_states

_VALID_ADAPTER_NAME = re.compile(r"^[^.]+$")


class ServingModel(DePTModel):
    """A model kind serving the saved adapters given to `add_adapter` over its frozen base, each row on its own.

    Everything is frozen and in eval mode. Pair it with a kind (the classes below); `MultiAdapterModel` is the
    directory-loading API over it. It follows the caching rule of `dept.model`; after an add or a remove the
    other adapters keep their prompt states, which their unchanged P still gives.
    """

    # A serving model holds a bank, not the training model's single adapter, and no config of its own.
    prompt_encoder: AdapterBank  # type: ignore[assignment]
    config: DePTConfig | None  # type: ignore[assignment]

    def __init__(self, base_model: nn.Module):
        EvalCachingModule.__init__(self)  # no adapter of its own to attach, as DePTModel.__init__ does
        self._attach(base_model, self.describe_base(base_model)["token_dim"])
        self.config = None
        self.modules_to_save = ()
        self.adapter_modules = nn.ModuleDict()  # each served adapter's own copies of its trained modules
        self.prompt_caches: dict[str, PromptKVCache] = {}  # each adapter's prompt states, by name
        self._rows: torch.Tensor | None = None  # the adapter of each row of the call in progress
        self.prompt_encoder = AdapterBank([], self.token_dim, names=[]).to(self.input_device())
        self.requires_grad_(False).eval()

    # ----------------------------------------------------------------------------------------------------------
    # The adapters
    @property
    def adapter_names(self) -> list[str]:
        return list(self.prompt_encoder.names)

    @property
    def adapter_configs(self) -> dict[str, DePTConfig]:
        return dict(zip(self.prompt_encoder.names, self.prompt_encoder.configs))

    @torch.no_grad()
    def add_adapter(self, name: str, config: DePTConfig, state: dict[str, torch.Tensor],
                    source: str = "adapter") -> None:
        """Serve a saved adapter (its config and tensors, as `dept.adapter_files.load_adapter` reads them) under
        `name`. An adapter for another base model (d, vocabulary, model type, task type) is refused first."""
        if not isinstance(name, str) or not _VALID_ADAPTER_NAME.match(name):
            raise ValueError(f"Adapter name {name!r} must be a non-empty string without '.'.")
        if name in self.prompt_encoder.names:
            raise ValueError(f"An adapter named {name!r} is already loaded: remove_adapter({name!r}) first, "
                             "or load this one under another name.")
        check_saved_base(config, self.base_model, source, self.describe_base(self.base_model))
        check_compatible(config, getattr(self.base_model, "config", None), self.token_dim, self.task_type)
        check_adapter_state(config, state, source)
        own = DePTEmbedding(config, self.token_dim)
        load_adapter_tensors(own.adapter_tensors(), state, source)
        modules = nn.ModuleDict()
        for module_name, module_state in saved_modules(state).items():
            base_module = getattr(self.base_model, module_name, None)
            if not isinstance(base_module, nn.Module):
                raise AdapterMismatchError(f"{source} holds weights for a module {module_name!r} that "
                                           f"{type(self.base_model).__name__} does not have.")
            modules[module_name] = load_module_state(copy.deepcopy(base_module), module_state, source, module_name)
        if modules:
            try:
                self.adapter_modules[name] = modules.to(self.input_device()).requires_grad_(False).eval()
            except KeyError:  # a name that clashes with a ModuleDict attribute, such as "keys"
                raise ValueError(f"Adapter name {name!r} is reserved: choose another name.") from None
        self._restack(self._served() + [(name, config, own.adapter_tensors())], name)

    def remove_adapter(self, name: str) -> None:
        if name not in self.prompt_encoder.names:
            raise KeyError(f"No adapter named {name!r}; loaded adapters: {sorted(self.prompt_encoder.names)}.")
        self._restack([adapter for adapter in self._served() if adapter[0] != name], name)
        if name in self.adapter_modules:
            del self.adapter_modules[name]

    def _served(self) -> list[tuple[str, DePTConfig, dict[str, torch.Tensor]]]:
        bank = self.prompt_encoder
        return [(name, config, bank.adapter_tensors(index))
                for index, (name, config) in enumerate(zip(bank.names, bank.configs))]

    def _restack(self, adapters: list[tuple[str, DePTConfig, dict[str, torch.Tensor]]], changed: str) -> None:
        """A new bank holding `adapters`, once per add or remove, never per batch; what was cached for the adapter
        `changed` (and over the whole bank) goes with the old one."""
        self.prompt_encoder = AdapterBank.stack(adapters, self.token_dim).to(self.input_device()).eval()
        self.prompt_caches.pop(changed, None)
        super().invalidate_caches()  # the kind's caches over the bank; the other adapters' prompt states stay

    def invalidate_caches(self) -> None:
        super().invalidate_caches()
        for cache in self.prompt_caches.values():
            cache.clear()

    def adapter_state_dict(self, parameters=None, name: str | None = None) -> dict[str, torch.Tensor]:
        """The served adapter `name`'s tensors under their file keys (`prompt_embeddings`, ...,
        `modules.<module>.<key>`)."""
        if name not in self.prompt_encoder.names:
            raise KeyError(f"No adapter named {name!r}; loaded adapters: {sorted(self.prompt_encoder.names)}.")
        tensors = self.prompt_encoder.adapter_tensors(self.prompt_encoder.names.index(name))
        modules = self.adapter_modules[name] if name in self.adapter_modules else nn.ModuleDict()
        for module_name, module in modules.named_children():
            tensors.update({f"{MODULES_PREFIX}{module_name}.{k}": v for k, v in module.state_dict().items()})
        return {key: tensor.detach() for key, tensor in tensors.items()}

    # ----------------------------------------------------------------------------------------------------------
    # Which adapter each row uses
    def adapter_index(self, adapter_names: str | Sequence[str] | None, batch_size: int) -> torch.Tensor:
        """(batch,) index of each row's adapter in the bank; one name stands for the whole batch."""
        known = sorted(self.prompt_encoder.names)
        if adapter_names is None:
            if not known:
                raise ValueError("No adapters are loaded: call add_adapter(name, directory) first.")
            raise ValueError(f"Pass adapter_names: one adapter per row, or one name for the whole batch. "
                             f"Loaded adapters: {known}.")
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names] * batch_size
        if len(adapter_names) != batch_size:
            raise ValueError(f"adapter_names has {len(adapter_names)} names but the batch has {batch_size} rows: "
                             "give one adapter name per row.")
        unknown = sorted(set(adapter_names) - set(known))
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown} in adapter_names. Loaded adapters: {known}. "
                             "Load more with add_adapter(name, directory).")
        ids = {name: i for i, name in enumerate(self.prompt_encoder.names)}
        return torch.tensor([ids[name] for name in adapter_names], dtype=torch.long, device=self.input_device())

    @contextmanager
    def rows(self, adapter_index: torch.Tensor) -> Iterator[None]:
        """While active, row i goes through adapter `adapter_index[i]`: its P, A and B, and its own copies of the
        base model's trained modules (heads, projections), through forward hooks. Calls may nest."""
        outer, self._rows = self._rows, adapter_index
        handles = []
        try:
            if outer is None:
                for module_name in sorted({m for modules in self.adapter_modules.values()
                                           for m, _ in modules.named_children()}):
                    module = getattr(self.base_model, module_name)
                    handles.append(module.register_forward_hook(self._row_module_hook(module_name), with_kwargs=True))
            yield
        finally:
            self._rows = outer
            for handle in handles:
                handle.remove()

    def _row_module_hook(self, module_name: str):
        def hook(module, args, kwargs, output):
            rows, names = self._rows, self.prompt_encoder.names
            own = {i: self.adapter_modules[names[i]][module_name] for i in rows.unique().tolist()
                   if names[i] in self.adapter_modules and module_name in self.adapter_modules[names[i]]}
            if not own:
                return None  # the batch's adapters keep the base model's module
            batch = rows.shape[0]
            if not isinstance(output, torch.Tensor) or output.shape[0] != batch:
                raise ValueError(f"Cannot route {module_name!r} per adapter: it must map a batch of {batch} rows "
                                 f"to one tensor of {batch} rows (got {type(output).__name__}).")
            output = output.clone()
            for i, adapter_module in own.items():  # a loop over the batch's adapters, not its rows
                selected = (rows == i).nonzero().squeeze(1)
                output[selected] = adapter_module(*_select_rows(args, selected, batch),
                                                  **_select_rows(kwargs, selected, batch))
            return output

        return hook

    def route(self, attention_mask: torch.Tensor) -> BankRouting:
        if self._rows is None:
            raise ValueError("Pass adapter_names: one adapter per row, or one name for the whole batch.")
        return self.prompt_encoder.route(attention_mask, self._rows, self.prompt_first)

    def embed_tokens(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        inputs_embeds, attention_mask = embed_inputs(self.word_embeddings, input_ids, attention_mask, inputs_embeds)
        routing = self.route(attention_mask)
        return self.prompt_encoder.update_tokens(inputs_embeds, attention_mask, routing), attention_mask, routing

    # ----------------------------------------------------------------------------------------------------------
    # Calls: the model kind's, with each row on its adapter
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, *args, adapter_names=None, **kwargs):
        if attention_mask is None and kwargs.get("encoder_outputs") is not None:
            raise ValueError("With encoder_outputs, pass the attention_mask of the unprompted input, so that "
                             "each row's prompt slots can be masked.")
        with self.rows(self.adapter_index(adapter_names, _batch_size(input_ids, attention_mask, inputs_embeds))):
            return super().forward(input_ids, attention_mask, inputs_embeds, *args, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, inputs_embeds=None, *args, adapter_names=None, **kwargs):
        with self.rows(self.adapter_index(adapter_names, _batch_size(input_ids, attention_mask, inputs_embeds))):
            return super().generate(input_ids, attention_mask, inputs_embeds, *args, **kwargs)

    def embed(self, input_ids=None, attention_mask=None, inputs_embeds=None, adapter_names=None):
        with self.rows(self.adapter_index(adapter_names, _batch_size(input_ids, attention_mask, inputs_embeds))):
            return super().embed(input_ids, attention_mask, inputs_embeds)

    def insert_prompt(self, per_token, attention_mask, fill_value, adapter_names=None):
        with self.rows(self.adapter_index(adapter_names, per_token.shape[0])):
            return super().insert_prompt(per_token, attention_mask, fill_value)


class ServedSeq2SeqLM(ServingModel, DePTModelForSeq2SeqLM):
    """Adapters served over an encoder-decoder (T5, VL-T5)."""


class ServedSequenceClassification(ServingModel, DePTModelForSequenceClassification):
    """Adapters served over an encoder classifier (BERT, RoBERTa), each with its own head."""


class ServedCausalLM(ServingModel, DePTModelForCausalLM):
    """Adapters served over a decoder-only LM: the prompt KV cache holds each adapter's states, computed once,
    stacked into one table (zero-padded to the longest m) for the batch's rows to pick from."""

    def _compute_prompt_states(self) -> PromptStates | None:
        bank = self.prompt_encoder
        states: list[PromptStates | None] = []
        for index, (name, config) in enumerate(zip(bank.names, bank.configs)):
            if config.num_virtual_tokens == 0:
                states.append(None)
                continue
            cache = self.prompt_caches.setdefault(name, PromptKVCache())
            if (state := cache.get(self.base_model, functools.partial(self._adapter_prompt_states, index))) is None:
                return None  # this base model's cache is not plain keys and values
            states.append(state)
        return stack_prompt_states(states, bank.num_virtual_tokens)

    def _adapter_prompt_states(self, index: int) -> PromptStates | None:
        prompt = self.prompt_encoder.adapter_tensors(index)["prompt_embeddings"]
        with self.rows(torch.tensor([index], device=prompt.device)):  # the adapter's own modules (an lm_head)
            return compute_prompt_states(self.base_model, prompt)


SERVING_CLASSES: dict[type[DePTModel], type[ServingModel]] = {
    DePTModelForSeq2SeqLM: ServedSeq2SeqLM,
    DePTModelForCausalLM: ServedCausalLM,
    DePTModelForSequenceClassification: ServedSequenceClassification,
}


def _batch_size(*inputs: torch.Tensor | None) -> int:
    given = [tensor for tensor in inputs if tensor is not None]
    if not given:
        raise ValueError("Pass input_ids or inputs_embeds.")
    return given[0].shape[0]


def _select_rows(inputs, rows: torch.Tensor, batch: int):
    """The given rows of every batch-first tensor in a tuple or dict of module inputs."""
    def pick(value):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            return value.index_select(0, rows)
        return value

    if isinstance(inputs, dict):
        return {key: pick(value) for key, value in inputs.items()}
    return tuple(pick(value) for value in inputs)


class MultiAdapterModel(nn.Module):
    """One frozen Hugging Face model serving many DePT adapters; each row of a batch names its adapter.

    Adapters are saved DePT directories (ours or official DePT releases); everything is frozen and in eval mode.
    `model` is the serving model (`ServedSeq2SeqLM`, ...: an instance of the model kind for the base), whose bank
    holds the adapters.

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
        serving = SERVING_CLASSES[_MODEL_CLASSES[infer_task_type(base_model)]]
        self.model = serving(base_model.requires_grad_(False).eval())
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
              ) -> tuple[torch.Tensor, torch.Tensor, BankRouting]:
        """Word embeddings with each row's adapter applied: (batch, width + seq, d), the (batch, width + seq) mask,
        and where the prompts went."""
        model = self.model
        with model.rows(model.adapter_index(adapter_names, _batch_size(input_ids, attention_mask, inputs_embeds))):
            tokens, mask, routing = model.embed_tokens(input_ids, attention_mask, inputs_embeds)
            return *model.prompt_encoder.with_prompts(tokens, mask, routing), routing

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
