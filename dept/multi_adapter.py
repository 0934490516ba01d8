"""Many DePT adapters served by one frozen model, in one batch.

DePT changes only the input embeddings, so the rows of one batch can belong to different adapters. Row i
with adapter a(i) gets

    E'_i = E_i + scaling_a (A_a @ B_a)[position]     position = index among the row's real tokens
    X_i  = [pads ; P_a ; E'_i]                       pads fill the prompt slots up to the batch's longest m

Every adapter's P is stacked into one (num_adapters, max m, d) table and its `scaling * (A @ B)` into one
(num_adapters, max s, d) table, computed once when the adapter is added. A batch gathers its rows from these
tables by (adapter index, real-token position); no step loops over rows. The prompt slots a row does not use
are masked pads: in front of the prompt (`[pads ; P_i ; E'_i]`, where left padding already goes, so T5's
relative distances are kept), or after the tokens for classifiers (`[P_i ; E'_i ; pads]`, so the pooler still
reads P_i, or the first token when m_i = 0, at position 0). Each row thus gives the same output as a run of its adapter alone.

A trainable module saved with an adapter (a classifier head, a visual projection) is applied per adapter too:
the base model's module output is recomputed, for each adapter in the batch, by that adapter's own copy.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .adapter_files import load_adapter
from .config import ConfigError, DePTConfig
from .embedding import DePTEmbedding, InputTooLongError, prompt_layout
from .model import (
    AdapterMismatchError,
    DePTModel,
    check_compatible,
    check_saved_base,
    embed_inputs,
    infer_task_type,
    real_token_position_ids,
)
from .prompt_cache import (
    PromptKVCache,
    PromptStates,
    compute_prompt_states,
    forward_after_prompt,
    generate_after_prompt,
    generation_expand_size,
    prompt_cache_applies,
    stack_prompt_states,
    with_prompt_logits,
)

DEPT_KEYS = ("prompt_embeddings", "lora_embedding_A", "lora_embedding_B")
MODULES_PREFIX = "modules."
_VALID_ADAPTER_NAME = re.compile(r"^[^.]+$")


class LoadedAdapter(nn.Module):
    """One adapter held by a `MultiAdapterModel`: its config, P, A and B, and its own trainable modules."""

    def __init__(self, config: DePTConfig, prompt_encoder: DePTEmbedding, modules: dict[str, nn.Module]):
        super().__init__()
        self.config = config
        self.prompt_encoder = prompt_encoder
        self.modules_to_save = nn.ModuleDict(modules)
        self.prompt_cache = PromptKVCache()  # decoder-only models: P's keys, values and logits


@dataclass
class AdapterRouting:
    """Which adapter each row of a batch uses, and where its prompt goes.

    Attributes:
        adapter_index: (batch,) index of each row's adapter in the stacked tables.
        num_virtual_tokens: (batch,) each row's prompt length m_i.
        width: the batch's prompt width, max m_i; rows with a shorter prompt get masked pads.
        layout: gather index (batch, width + seq) from `[prompt slots ; tokens]` to the output order, or None.
    """

    adapter_index: torch.Tensor
    num_virtual_tokens: torch.Tensor
    width: int
    layout: torch.Tensor | None

    def prompt_mask(self) -> torch.Tensor:
        """(batch, width): 1 at the row's m_i prompt slots, 0 at the slots it does not use."""
        slots = torch.arange(self.width, device=self.num_virtual_tokens.device)
        return (slots.unsqueeze(0) < self.num_virtual_tokens.unsqueeze(1)).long()

    def prompted_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The (batch, width + seq) attention mask of the prompted sequence."""
        mask = self.prompt_mask().to(attention_mask.dtype)
        return DePTEmbedding.place(mask, attention_mask, self.layout)

    def insert_prompt(self, per_token: torch.Tensor, fill_value) -> torch.Tensor:
        """Align labels or token types (batch, seq) with the prompted sequence, `fill_value` over the prompt."""
        prompt_part = per_token.new_full((per_token.shape[0], self.width), fill_value)
        return DePTEmbedding.place(prompt_part, per_token, self.layout)


class MultiAdapterModel(nn.Module):
    """One frozen Hugging Face model serving many DePT adapters; each row of a batch names its adapter.

    `MultiAdapterModel(base_model, adapters)` returns the class for the model's kind
    (`MultiAdapterModelForSeq2SeqLM`, `...ForCausalLM`, `...ForSequenceClassification`). Adapters are saved
    DePT directories (ours or official DePT releases); everything is frozen and in eval mode.

    Shapes: `forward(input_ids (batch, seq), attention_mask (batch, seq), adapter_names=[...] (batch names))`.
    Decoder-only logits cover `width + seq` positions, `width` being the longest prompt among the batch's
    adapters (`embed` returns the matching mask).

    Example:
        >>> model = MultiAdapterModel(t5, {"sst2": "adapters/sst2", "rte": "adapters/rte"})  # doctest: +SKIP
        >>> batch = tokenizer(["sentence: great film", "premise: ... hypothesis: ..."], padding=True,
        ...                   return_tensors="pt")  # doctest: +SKIP
        >>> model.generate(**batch, adapter_names=["sst2", "rte"], max_new_tokens=4)  # doctest: +SKIP
    """

    task_type: str = ""
    generate_returns_new_tokens_only: bool = True  # as DePTModel: no input ids in front of the new tokens
    prompt_first: bool = False  # True keeps P at position 0 for classifiers, as DePTModel does

    def __new__(cls, *args, **kwargs):
        base_model = args[0] if args else kwargs.get("base_model")
        if cls is MultiAdapterModel and base_model is not None:  # pick the class for the model's kind
            cls = _MODEL_CLASSES[infer_task_type(base_model)]
        return super().__new__(cls)

    def __init__(self, base_model: nn.Module, adapters: dict[str, str | Path] | None = None):
        super().__init__()
        kind = infer_task_type(base_model)
        if self.task_type and kind != self.task_type:
            raise ConfigError(f"{type(self).__name__} serves {self.task_type!r} models, but "
                              f"{type(base_model).__name__} is a {kind!r} model: use MultiAdapterModel(...).")
        self.base_model = base_model.requires_grad_(False).eval()
        self.adapters = nn.ModuleDict()
        self._adapter_ids: dict[str, int] = {}
        self._restack()
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
            multi._register(name, config, dept_model.adapter_state_dict(), f"DePTModel {name!r}")
        return multi

    # ----------------------------------------------------------------------------------------------------------
    # Adapters
    def add_adapter(self, name: str, directory: str | Path) -> None:
        """Load a saved adapter (ours or an official DePT directory) under `name`.

        An adapter for another base model (d, vocabulary, model type, task type) is refused before any compute.
        """
        config, state, source = load_adapter(directory)
        self._register(name, config, state, source)

    def remove_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"No adapter named {name!r}; loaded adapters: {sorted(self.adapters)}.")
        del self.adapters[name]
        self._restack()

    @torch.no_grad()
    def _register(self, name: str, config: DePTConfig, state: dict[str, torch.Tensor], source: str) -> None:
        if not isinstance(name, str) or not _VALID_ADAPTER_NAME.match(name):
            raise ValueError(f"Adapter name {name!r} must be a non-empty string without '.'.")
        if name in self.adapters:
            raise ValueError(f"An adapter named {name!r} is already loaded: remove_adapter({name!r}) first, "
                             "or load this one under another name.")
        check_saved_base(config, self.base_model, source)
        token_dim = self.word_embeddings.weight.shape[1]
        check_compatible(config, self.base_model.config, token_dim, self.task_type)
        prompt_encoder = DePTEmbedding(config, token_dim)
        if config.num_virtual_tokens > 0 and "prompt_embeddings" not in state:
            raise AdapterMismatchError(f"{source} has no prompt_embeddings, but its config says "
                                       f"num_virtual_tokens={config.num_virtual_tokens}.")
        if config.r > 0 and "lora_embedding_B" not in state:
            warnings.warn(f"{source} holds only the prompt: lora_embedding_A/B are missing, so A @ B = 0 and the "
                          "adapter acts as vanilla prompt tuning with this prompt.", stacklevel=3)
        try:
            prompt_encoder.load_state_dict({key: state[key] for key in DEPT_KEYS if key in state}, strict=False)
        except RuntimeError as err:
            raise AdapterMismatchError(f"{source} does not fit this base model or its own config: {err}") from None
        adapter = LoadedAdapter(config, prompt_encoder, self._load_modules(state, source))
        device = self.word_embeddings.weight.device
        try:
            self.adapters[name] = adapter.to(device).requires_grad_(False).eval()
        except KeyError:  # a name that clashes with a ModuleDict attribute, such as "keys"
            raise ValueError(f"Adapter name {name!r} is reserved: choose another name.") from None
        self._restack()

    def _load_modules(self, state: dict[str, torch.Tensor], source: str) -> dict[str, nn.Module]:
        """Copies of the base model's trainable modules (`modules.<name>.*`) with this adapter's weights."""
        by_module: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            if key.startswith(MODULES_PREFIX):
                module_name, _, param_name = key[len(MODULES_PREFIX):].partition(".")
                by_module.setdefault(module_name, {})[param_name] = tensor
        modules = {}
        for module_name, module_state in by_module.items():
            base_module = getattr(self.base_model, module_name, None)
            if not isinstance(base_module, nn.Module):
                raise AdapterMismatchError(f"{source} holds weights for a module {module_name!r} that "
                                           f"{type(self.base_model).__name__} does not have.")
            own = copy.deepcopy(base_module)
            try:
                own.load_state_dict(module_state)
            except RuntimeError as err:
                raise AdapterMismatchError(
                    f"{source}: the saved {module_name!r} does not fit this model (adapters served together must "
                    f"share its shape, e.g. the number of labels): {err}"
                ) from None
            modules[module_name] = own
        return modules

    @torch.no_grad()
    def _restack(self) -> None:
        """Stack every adapter's P (zero-padded to the longest m) and scaling * (A @ B) (to the longest s)."""
        encoders = [adapter.prompt_encoder for adapter in self.adapters.values()]
        weight = self.word_embeddings.weight
        width = max((e.num_virtual_tokens for e in encoders), default=0)
        longest = max((e.max_length for e in encoders), default=0)
        prompts = torch.zeros(len(encoders), width, weight.shape[1], device=weight.device)
        updates = torch.zeros(len(encoders), longest, weight.shape[1], device=weight.device)
        for i, encoder in enumerate(encoders):  # once per adapter, never per batch
            prompts[i, : encoder.num_virtual_tokens] = encoder.prompt_embeddings
            updates[i, : encoder.max_length] = encoder.embedding_update()
        self.register_buffer("prompts", prompts, persistent=False)
        self.register_buffer("embedding_updates", updates, persistent=False)
        self.register_buffer("num_virtual_tokens", torch.tensor([e.num_virtual_tokens for e in encoders],
                                                                dtype=torch.long, device=weight.device),
                             persistent=False)
        self.register_buffer("max_lengths", torch.tensor([e.max_length for e in encoders], dtype=torch.long,
                                                         device=weight.device), persistent=False)
        self._adapter_ids = {name: i for i, name in enumerate(self.adapters)}

    # ----------------------------------------------------------------------------------------------------------
    # The prompt, per row
    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.base_model.get_input_embeddings()

    def adapter_index(self, adapter_names: str | Sequence[str] | None, batch_size: int) -> torch.Tensor:
        """(batch,) index of each row's adapter; one name stands for the whole batch."""
        known = sorted(self._adapter_ids)
        if not known:
            raise ValueError("No adapters are loaded: call add_adapter(name, directory) first.")
        if adapter_names is None:
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
        ids = [self._adapter_ids[name] for name in adapter_names]
        return torch.tensor(ids, dtype=torch.long, device=self.num_virtual_tokens.device)

    def route(self, adapter_names: str | Sequence[str] | None, attention_mask: torch.Tensor) -> AdapterRouting:
        """Each row's adapter and the prompt layout for a (batch, seq) attention mask."""
        adapter_index = self.adapter_index(adapter_names, attention_mask.shape[0])
        num_virtual_tokens = self.num_virtual_tokens[adapter_index]
        width = int(num_virtual_tokens.max())
        layout = prompt_layout(attention_mask.long(), num_virtual_tokens, width, self.prompt_first)
        return AdapterRouting(adapter_index, num_virtual_tokens, width, layout)

    def embed(
        self,
        adapter_names: str | Sequence[str] | None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, AdapterRouting]:
        """Word embeddings with each row's adapter applied.

        Returns (batch, width + seq, d) embeddings, the (batch, width + seq) mask, and the routing.
        """
        tokens, attention_mask, routing = self.embed_tokens(adapter_names, input_ids, attention_mask, inputs_embeds)
        return *self._with_prompts(tokens, attention_mask, routing), routing

    def _with_prompts(self, tokens: torch.Tensor, attention_mask: torch.Tensor,
                      routing: AdapterRouting) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's prompt put in front of its E': (batch, width + seq, d) and the matching mask."""
        prompts = self.prompts[routing.adapter_index, : routing.width].to(tokens.dtype)
        return DePTEmbedding.place(prompts, tokens, routing.layout), routing.prompted_mask(attention_mask)

    def embed_tokens(
        self,
        adapter_names: str | Sequence[str] | None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, AdapterRouting]:
        """Each row's E' = E + scaling (A @ B)[position] (batch, seq, d) without the prompt, the (batch, seq)
        mask, and the routing."""
        inputs_embeds, attention_mask = embed_inputs(self.word_embeddings, input_ids, attention_mask, inputs_embeds)
        routing = self.route(adapter_names, attention_mask)
        mask = attention_mask.long()
        self._check_lengths(mask, routing.adapter_index)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        update = self.embedding_updates[routing.adapter_index.unsqueeze(1), positions].to(inputs_embeds.dtype)
        return inputs_embeds + update * mask.unsqueeze(-1).to(inputs_embeds.dtype), attention_mask, routing

    def _check_lengths(self, mask: torch.Tensor, adapter_index: torch.Tensor) -> None:
        lengths = mask.sum(dim=1)
        too_long = lengths > self.max_lengths[adapter_index]
        if bool(too_long.any()):
            row = int(too_long.nonzero()[0, 0])
            name = list(self._adapter_ids)[int(adapter_index[row])]
            raise InputTooLongError(
                f"Row {row} has {int(lengths[row])} tokens but its adapter {name!r} has max_length "
                f"{int(self.max_lengths[adapter_index[row]])}. Truncate each input to its adapter's max_length."
            )

    @contextmanager
    def per_row_modules(self, routing: AdapterRouting) -> Iterator[None]:
        """While active, the base model's trainable modules (heads, projections) use each row's adapter copy."""
        names = list(self._adapter_ids)
        present = [self.adapters[names[i]] for i in routing.adapter_index.unique().tolist()]
        module_names = sorted({name for adapter in present for name in adapter.modules_to_save})
        handles = []
        try:
            for module_name in module_names:
                hook = self._route_module_hook(module_name, routing)
                handles.append(getattr(self.base_model, module_name).register_forward_hook(hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _route_module_hook(self, module_name: str, routing: AdapterRouting):
        names = list(self._adapter_ids)
        batch = routing.adapter_index.shape[0]

        def hook(module, args, kwargs, output):
            if not isinstance(output, torch.Tensor) or output.shape[0] != batch:
                raise ValueError(f"Cannot route {module_name!r} per adapter: it must map a batch of {batch} rows "
                                 f"to one tensor of {batch} rows (got {type(output).__name__}).")
            output = output.clone()
            for i in routing.adapter_index.unique().tolist():  # a loop over the batch's adapters, not its rows
                own = self.adapters[names[i]].modules_to_save
                if module_name not in own:
                    continue  # this adapter keeps the base model's module
                rows = (routing.adapter_index == i).nonzero().squeeze(1)
                output[rows] = own[module_name](*_select_rows(args, rows, batch), **_select_rows(kwargs, rows, batch))
            return output

        return hook


def _select_rows(inputs, rows: torch.Tensor, batch: int):
    """The given rows of every batch-first tensor in a tuple or dict of module inputs."""
    def pick(value):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            return value.index_select(0, rows)
        return value

    if isinstance(inputs, dict):
        return {key: pick(value) for key, value in inputs.items()}
    return tuple(pick(value) for value in inputs)


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


class MultiAdapterModelForSeq2SeqLM(MultiAdapterModel):
    """Encoder-decoders (T5, and the VL-T5 model): each row's prompt goes into the encoder input only.

    Extra keyword arguments (decoder inputs, labels, image features for VL-T5) pass through to the base model.
    """

    task_type = "seq2seq"

    @torch.no_grad()
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, adapter_names=None, **kwargs):
        if kwargs.get("encoder_outputs") is not None:  # the prompts are already inside the encoder outputs
            if attention_mask is None:
                raise ValueError("With encoder_outputs, pass the attention_mask of the unprompted input, so that "
                                 "each row's prompt slots can be masked.")
            routing = self.route(adapter_names, attention_mask)
            with self.per_row_modules(routing):
                return self.base_model(attention_mask=routing.prompted_mask(attention_mask), **kwargs)
        embeds, mask, routing = self.embed(adapter_names, input_ids, attention_mask, inputs_embeds)
        with self.per_row_modules(routing):
            return self.base_model(inputs_embeds=embeds, attention_mask=mask, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, inputs_embeds=None, adapter_names=None, **kwargs):
        embeds, mask, routing = self.embed(adapter_names, input_ids, attention_mask, inputs_embeds)
        with self.per_row_modules(routing):
            return self.base_model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)


class MultiAdapterModelForCausalLM(MultiAdapterModel):
    """Decoder-only LMs: `[pads ; P_i ; E'_i]`, labels -100 over the prompt slots, positions over real tokens.

    `forward` returns logits over all width + seq positions. `generate` returns only the new tokens; the prompt
    goes in at prefill and the KV cache carries it.

    Each adapter's P keys, values and logits are computed once (the prompt KV cache, see `dept.prompt_cache`)
    and stacked into one table; a batch takes each row's from it, masks the slots beyond its m_i, and runs the
    base model on its own tokens only. `use_prompt_cache = False` (or per call) runs the whole prompted sequence.
    """

    task_type = "causal"
    use_prompt_cache: bool = True

    def _restack(self) -> None:
        super()._restack()
        self._stacked_prompt_states: tuple[tuple, PromptStates | None] | None = None

    def prompt_states(self) -> PromptStates | None:
        """Every adapter's prompt states, stacked (num_adapters, ..., longest m, ...) in `adapters` order; each
        adapter's are recomputed only after its P or the base model changed."""
        states, generations = [], []
        for index, adapter in enumerate(self.adapters.values()):
            encoder = adapter.prompt_encoder
            if encoder.num_virtual_tokens == 0:
                states.append(None)
                continue
            routing = AdapterRouting(torch.tensor([index], device=self.num_virtual_tokens.device),
                                     self.num_virtual_tokens[index:index + 1], encoder.num_virtual_tokens, None)

            def compute(prompt=encoder.prompt_embeddings, routing=routing):
                with self.per_row_modules(routing):  # an adapter's own trained modules (e.g. its lm_head)
                    return compute_prompt_states(self.base_model, prompt)

            state = adapter.prompt_cache.get(self.base_model, encoder.prompt_embeddings, compute)
            if state is None:
                return None  # this base model's cache is not plain keys and values
            states.append(state)
            generations.append(adapter.prompt_cache.generation)
        key = tuple(generations)
        if self._stacked_prompt_states is None or self._stacked_prompt_states[0] != key:
            width = max((a.prompt_encoder.num_virtual_tokens for a in self.adapters.values()), default=0)
            self._stacked_prompt_states = key, stack_prompt_states(states, width)
        return self._stacked_prompt_states[1]

    def _cached_prompts(self, use_prompt_cache: bool | None, routing: AdapterRouting, kwargs: dict,
                        generating: bool = False) -> PromptStates | None:
        enabled = self.use_prompt_cache if use_prompt_cache is None else use_prompt_cache
        if routing.width == 0 or not prompt_cache_applies(self, enabled, kwargs, generating):
            return None
        return self.prompt_states()

    @torch.no_grad()
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, adapter_names=None,
                use_prompt_cache: bool | None = None, **kwargs):
        kwargs.pop("position_ids", None)
        tokens, attention_mask, routing = self.embed_tokens(adapter_names, input_ids, attention_mask, inputs_embeds)
        if labels is not None:
            labels = routing.insert_prompt(labels, -100)
        if (states := self._cached_prompts(use_prompt_cache, routing, kwargs)) is not None:
            rows = states.select(routing.adapter_index, routing.width)
            num_items_in_batch = kwargs.pop("num_items_in_batch", None)
            with self.per_row_modules(routing):
                output = forward_after_prompt(self.base_model, rows, tokens, attention_mask, routing.prompt_mask(),
                                              **kwargs)
            return with_prompt_logits(self.base_model, output, rows.logits,
                                      lambda prompt, tokens: DePTEmbedding.place(prompt, tokens, routing.layout),
                                      labels, num_items_in_batch)
        embeds, mask = self._with_prompts(tokens, attention_mask, routing)
        position_ids = real_token_position_ids(mask, self.base_model.config)
        with self.per_row_modules(routing):
            return self.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                   labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, inputs_embeds=None, adapter_names=None,
                 use_cache: bool = True, use_prompt_cache: bool | None = None, **kwargs):
        if not use_cache:
            raise ValueError("MultiAdapterModel.generate needs the KV cache for decoder-only models (the prompt "
                             "goes in at prefill only): drop use_cache=False.")
        tokens, attention_mask, routing = self.embed_tokens(adapter_names, input_ids, attention_mask, inputs_embeds)
        if (states := self._cached_prompts(use_prompt_cache, routing, kwargs, generating=True)) is not None:
            expand = generation_expand_size(self.base_model, kwargs)
            rows = states.select(routing.adapter_index.repeat_interleave(expand), routing.width)
            with self.per_row_modules(routing):
                return generate_after_prompt(self.base_model, rows, tokens, attention_mask, routing.prompt_mask(),
                                             **kwargs)
        embeds, mask = self._with_prompts(tokens, attention_mask, routing)
        with self.per_row_modules(routing):  # positions over real tokens, also after a right-padded input
            return self.base_model.generate(inputs_embeds=embeds, attention_mask=mask,
                                            position_ids=real_token_position_ids(mask, self.base_model.config),
                                            **kwargs)


class MultiAdapterModelForSequenceClassification(MultiAdapterModel):
    """Encoder classifiers (BERT, RoBERTa): `[P_i ; E'_i ; pads]`, and each row scored by its adapter's head."""

    task_type = "cls"
    prompt_first = True

    @torch.no_grad()
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, token_type_ids=None,
                adapter_names=None, **kwargs):
        embeds, mask, routing = self.embed(adapter_names, input_ids, attention_mask, inputs_embeds)
        if token_type_ids is not None:
            token_type_ids = routing.insert_prompt(token_type_ids, 0)
        kwargs.pop("position_ids", None)
        position_ids = real_token_position_ids(mask, self.base_model.config)
        with self.per_row_modules(routing):
            return self.base_model(inputs_embeds=embeds, attention_mask=mask, token_type_ids=token_type_ids,
                                   position_ids=position_ids, **kwargs)


_MODEL_CLASSES = {
    "seq2seq": MultiAdapterModelForSeq2SeqLM,
    "causal": MultiAdapterModelForCausalLM,
    "cls": MultiAdapterModelForSequenceClassification,
}
