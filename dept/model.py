"""Attach DePT to a Hugging Face model: freeze it, put the prompt in, save and load the adapter.

Each model kind gets one small class that knows where the prompt goes:

- `DePTModelForSeq2SeqLM` (T5, VL-T5): the encoder input only; decoder and labels untouched.
- `DePTModelForCausalLM` (LLaMA, GPT-2): in front of the input; labels get -100 over the prompt; at `generate`
  the prompt goes in at prefill and the KV cache carries it afterwards. In eval mode the prompt's own keys and
  values are computed once and reused (`dept.prompt_cache`), so each call runs the base on its input alone.
- `DePTModelForSequenceClassification` (BERT, RoBERTa): in front of the input, with a trainable head.

Each kind takes `adapter_names=None` in `forward` and `generate`: a model built with `get_dept_model` or
`from_pretrained` holds one adapter (a bank of one) and needs no names; one built with `config=None` serves the
saved adapters given to `add_adapter`, each row on its own (`dept.MultiAdapterModel` is the directory-loading API
over it). The math itself lives once, in `DePTEmbedding`.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import re
import types
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .adapter_files import load_adapter, save_adapter
from .config import ConfigError, DePTConfig, infer_task_type
from .distributed import full_shape, needs_synced_generation
from .embedding import (
    PADDING_OFFSET_MODEL_TYPES,
    DePTEmbedding,
    PromptRouting,
    invalidate_after_load,
    place,
    real_token_position_ids,
)
from .errors import UserError
from .prompt_cache import (
    PromptKVCache,
    PromptStates,
    compute_prompt_states,
    forward_after_prompt,
    generate_after_prompt,
    generation_expand_size,
    needs_gradients,
    prompt_cache_applies,
    stack_prompt_states,
    with_prompt_logits,
)

logger = logging.getLogger(__name__)

# Heads that are trained with the prompt, as PEFT's modules_to_save for sequence classification.
CLASSIFIER_HEAD_NAMES = ("classifier", "score")
MODULES_PREFIX = "modules."  # a trained module's keys in an adapter file: modules.<module>.<key>
_VALID_ADAPTER_NAME = re.compile(r"^[^.]+$")


class AdapterMismatchError(UserError, ValueError):
    """An adapter that does not fit the model it is loaded into."""


def expose_forward_signature(model: nn.Module, base_model: nn.Module) -> None:
    """Let `inspect.signature(model.forward)` name what `base_model.forward` takes, next to the model's own
    parameters, so that transformers' `Trainer` (`remove_unused_columns=True`) keeps `labels`,
    `decoder_input_ids`, `token_type_ids`, VL-T5's visual inputs and the like.

    The model's own named parameters keep their places (they are what it really takes positionally); the base's
    other parameters follow as keyword-only, then `**kwargs`, which the model passes to the base. A base whose
    forward takes `**kwargs` may pass them to its parent's forward (VL-T5 passes `labels` and the decoder's inputs
    to T5's), so the parents' parameters are named too.
    """
    implementation = type(model).forward
    own = inspect.signature(implementation).parameters
    base: dict[str, inspect.Parameter] = {}
    for cls in type(base_model).__mro__:
        if "forward" not in vars(cls):
            continue
        parameters = list(inspect.signature(vars(cls)["forward"]).parameters.values())[1:]  # without self
        base.update({p.name: p for p in parameters if p.name not in base})
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    named = [p for p in own.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    passed_on = [p.replace(kind=p.KEYWORD_ONLY) for name, p in base.items()
                 if name not in own and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    positional = [p for p in named if p.kind is not p.KEYWORD_ONLY]
    keyword_only = [p for p in named if p.kind is p.KEYWORD_ONLY]
    var_keyword = inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)
    signature = inspect.signature(implementation).replace(
        parameters=[*positional, *passed_on, *keyword_only, var_keyword])

    @functools.wraps(implementation)
    def forward(self, *args, **kwargs):
        return implementation(self, *args, **kwargs)

    forward.__signature__ = signature
    model.forward = types.MethodType(forward, model)  # per instance: each base model takes its own arguments


def embed_inputs(word_embeddings: nn.Module, input_ids, attention_mask, inputs_embeds):
    """(inputs_embeds, attention_mask) from whichever of input_ids / inputs_embeds was given; mask of ones if none."""
    if inputs_embeds is None:
        if input_ids is None:
            raise ValueError("Pass input_ids or inputs_embeds.")
        inputs_embeds = word_embeddings(input_ids)
    if attention_mask is None:
        attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
    return inputs_embeds, attention_mask


class DePTModel(nn.Module):
    """A frozen Hugging Face model plus a bank of DePT adapters (P, A, B, and any trainable modules such as a head).

    Build one with `get_dept_model(model, config)` or load one with `DePTModel.from_pretrained(model, dir)`: a bank
    of one adapter, which trains. `config=None` builds a bank with no adapter yet, for serving several saved
    adapters over one frozen base (`add_adapter`, `remove_adapter`; `dept.MultiAdapterModel` wraps this): then
    `forward` and `generate` take `adapter_names`, one name per row (or one for the whole batch), each row gives
    exactly what its adapter alone gives, and each adapter's trained modules (a classifier head, a visual
    projection) are applied to its own rows.

    Caching rule: the eval caches (the scaling * A @ B table, the prompt's KV cache) are recomputed after every
    `train()`/`eval()` call, load (`load_state_dict`, `load_adapter_state_dict`), move or cast, adapter add or
    remove, and forward that needs gradients, never keyed on tensor versions or addresses, and after any other
    in-place change of P, A, B or the base's weights in eval mode you call `invalidate_caches()`.
    """

    task_type: str = ""
    # True where `forward` passes the base model's arguments through: its signature then names them (see
    # `expose_forward_signature`), so transformers' Trainer keeps labels, decoder_input_ids and the like.
    forwards_to_base: bool = False
    prompt_first: bool = False  # True keeps P at position 0 under left padding (see DePTEmbedding)

    def __init__(
        self,
        base_model: nn.Module,
        config: DePTConfig | None,
        tokenizer=None,
        modules_to_save: tuple[str, ...] = (),
        initialize: bool = True,
    ):
        super().__init__()
        base = self.describe_base(base_model)
        self.token_dim = token_dim = base["token_dim"]
        if config is not None:  # before anything is changed
            check_compatible(config, getattr(base_model, "config", None), token_dim, self.task_type)
        self.base_model = base_model
        for param in base_model.parameters():
            param.requires_grad_(False)
        self.adapter_modules = nn.ModuleDict()  # a served adapter's own copies of its trained modules
        self.config = config
        self.register_load_state_dict_post_hook(invalidate_after_load)
        if self.forwards_to_base:
            expose_forward_signature(self, self.base_model)
        if config is None:  # a bank for serving: frozen, in eval mode, adapters come with add_adapter
            self.modules_to_save = ()
            self.prompt_encoder = DePTEmbedding([], token_dim, names=[]).to(self.input_device())
            self.requires_grad_(False).eval()
            return
        config.token_dim = token_dim
        config.vocab_size = base["vocab_size"]
        config.base_model_type = base["base_model_type"]
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = base["base_model_name_or_path"]
        self.modules_to_save = tuple(name for name in modules_to_save if hasattr(base_model, name))
        for name in self.modules_to_save:
            getattr(base_model, name).requires_grad_(True)
        self.prompt_encoder = DePTEmbedding(config, token_dim).to(self.input_device())
        if config.r == 0:  # vanilla prompt tuning: A and B are empty, nothing to train
            self.prompt_encoder.lora_embedding_A.requires_grad_(False)
            self.prompt_encoder.lora_embedding_B.requires_grad_(False)
        if initialize:
            self._initialize_prompt(tokenizer)

    # ----------------------------------------------------------------------------------------------------------
    # The base model (a model kind for a non-Hugging Face base overrides these)
    @classmethod
    def describe_base(cls, base_model: nn.Module) -> dict:
        """What an adapter records about its base and checks at load: token_dim (d), vocab_size,
        base_model_type and base_model_name_or_path (None where the base has no such notion)."""
        return describe_hf_base(base_model)

    def input_device(self) -> torch.device:
        """Where the inputs are embedded, so P, A and B live next to them."""
        return self.word_embeddings.weight.device

    def _initialize_prompt(self, tokenizer) -> None:
        """P from the frozen word embeddings (see `DePTEmbedding.initialize`), A and B as the paper says."""
        self.prompt_encoder.initialize(self.word_embeddings.weight, tokenizer)

    # ----------------------------------------------------------------------------------------------------------
    # The eval caches (see the caching rule in the class docstring)
    def invalidate_caches(self) -> None:
        """Drop every cached value; the next eval call recomputes it from the current weights."""
        self.prompt_encoder.invalidate_caches()

    def train(self, mode: bool = True):
        super().train(mode)
        self.invalidate_caches()
        return self

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        self.invalidate_caches()  # a move or a cast
        return result

    # ----------------------------------------------------------------------------------------------------------
    # The adapters of the bank
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
        if self.config is not None:
            raise ValueError("add_adapter serves saved adapters over a frozen base; this model trains its own "
                             "adapter. Build the serving model with MultiAdapterModel(base_model).")
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
        bank = self.prompt_encoder
        self._restack([(n, c, bank.adapter_tensors(i)) for i, (n, c) in enumerate(zip(bank.names, bank.configs))]
                      + [(name, config, own.adapter_tensors())])
        self._forget_adapter(name)  # computed from nothing yet, whatever was once served under this name

    def remove_adapter(self, name: str) -> None:
        if self.config is not None or name not in self.prompt_encoder.names:
            raise KeyError(f"No adapter named {name!r}; loaded adapters: {sorted(self.prompt_encoder.names)}.")
        bank = self.prompt_encoder
        self._restack([(n, c, bank.adapter_tensors(i)) for i, (n, c) in enumerate(zip(bank.names, bank.configs))
                       if n != name])
        if name in self.adapter_modules:
            del self.adapter_modules[name]
        self._forget_adapter(name)

    def _forget_adapter(self, name: str) -> None:
        """Drop what was cached for adapter `name` (the bank itself is new after every add or remove)."""

    @torch.no_grad()
    def _restack(self, adapters: list[tuple[str, DePTConfig, dict[str, torch.Tensor]]]) -> None:
        """A new bank holding `adapters` (name, config, tensors), frozen; once per add or remove, never per batch."""
        bank = DePTEmbedding([config for _, config, _ in adapters], self.token_dim,
                             names=[name for name, _, _ in adapters]).to(self.input_device())
        for index, (_, _, tensors) in enumerate(adapters):
            for key, target in bank.adapter_tensors(index).items():
                target.copy_(tensors[key])
        self.prompt_encoder = bank.requires_grad_(False).eval()

    def adapter_index(self, adapter_names: str | Sequence[str] | None, batch_size: int) -> torch.Tensor | None:
        """(batch,) index of each row's adapter in the bank; one name stands for the whole batch. None for a
        model that trains its own adapter and is called without names."""
        known = sorted(self.prompt_encoder.names)
        if adapter_names is None:
            if self.config is not None:
                return None
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
    def per_row_modules(self, adapter_index: torch.Tensor | None) -> Iterator[None]:
        """While active, the base model's trainable modules (heads, projections) use each row's adapter copy."""
        if adapter_index is None or not len(self.adapter_modules):
            yield
            return
        names = self.prompt_encoder.names
        present = [names[i] for i in adapter_index.unique().tolist() if names[i] in self.adapter_modules]
        module_names = sorted({module for name in present for module in self.adapter_modules[name]})
        handles = []
        try:
            for module_name in module_names:
                hook = self._route_module_hook(module_name, adapter_index)
                handles.append(getattr(self.base_model, module_name).register_forward_hook(hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _route_module_hook(self, module_name: str, adapter_index: torch.Tensor):
        names, batch = self.prompt_encoder.names, adapter_index.shape[0]

        def hook(module, args, kwargs, output):
            if not isinstance(output, torch.Tensor) or output.shape[0] != batch:
                raise ValueError(f"Cannot route {module_name!r} per adapter: it must map a batch of {batch} rows "
                                 f"to one tensor of {batch} rows (got {type(output).__name__}).")
            output = output.clone()
            for i in adapter_index.unique().tolist():  # a loop over the batch's adapters, not its rows
                own = self.adapter_modules[names[i]] if names[i] in self.adapter_modules else {}
                if module_name not in own:
                    continue  # this adapter keeps the base model's module
                rows = (adapter_index == i).nonzero().squeeze(1)
                output[rows] = own[module_name](*_select_rows(args, rows, batch), **_select_rows(kwargs, rows, batch))
            return output

        return hook

    # ----------------------------------------------------------------------------------------------------------
    # The prompt
    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.base_model.get_input_embeddings()

    def embed_tokens(self, input_ids=None, attention_mask=None, inputs_embeds=None, adapter_names=None):
        """Each row's E' (batch, seq, d) without the prompt, the (batch, seq) mask, each row's adapter index
        (None: the bank's one adapter) and where the prompts go (`PromptRouting`)."""
        inputs_embeds, attention_mask = embed_inputs(self.word_embeddings, input_ids, attention_mask, inputs_embeds)
        adapter_index = self.adapter_index(adapter_names, inputs_embeds.shape[0])
        routing = self.prompt_encoder.route(attention_mask, adapter_index, self.prompt_first)
        tokens = self.prompt_encoder.update_tokens(inputs_embeds, attention_mask, adapter_index)
        return tokens, attention_mask, adapter_index, routing

    def embed(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        adapter_names: str | Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Word embeddings with DePT applied: (batch, width + seq, d) and the (batch, width + seq) mask."""
        tokens, attention_mask, _, routing = self.embed_tokens(input_ids, attention_mask, inputs_embeds,
                                                               adapter_names)
        return self.prompt_encoder.with_prompts(tokens, attention_mask, routing)

    def insert_prompt(self, per_token: torch.Tensor, attention_mask: torch.Tensor | None, fill_value,
                      adapter_names: str | Sequence[str] | None = None) -> torch.Tensor:
        """Align labels or token types with the prompted sequence, `fill_value` over the prompt."""
        if attention_mask is None:
            attention_mask = torch.ones_like(per_token)
        adapter_index = self.adapter_index(adapter_names, per_token.shape[0])
        return self.prompt_encoder.route(attention_mask, adapter_index, self.prompt_first).insert_prompt(
            per_token, fill_value)

    def position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Positions counted over real tokens only (prompt first), so padding never shifts them."""
        return real_token_position_ids(attention_mask, self.base_model.config)

    def _generate_kwargs(self, kwargs: dict) -> dict:
        """`kwargs` for the base's `generate`, with `synced_gpus=True` when parameters are sharded over ranks
        (ZeRO-3, FSDP): transformers sets it only for ZeRO-3 loaded with `zero3_init_flag`, and a rank that stops
        early would leave the others waiting in their parameter gathers."""
        if "synced_gpus" not in kwargs and needs_synced_generation(self):
            kwargs = {**kwargs, "synced_gpus": True}
        return kwargs

    # ----------------------------------------------------------------------------------------------------------
    # Training helpers
    def optimizer_param_groups(
        self, learning_rate: float, lora_embedding_lr: float, weight_decay: float = 0.0, modules_lr: float | None = None
    ) -> list[dict]:
        """P at `learning_rate`; A and B at `lora_embedding_lr`; trainable modules (a head) at `modules_lr`
        (default `lora_embedding_lr`: a head at the prompt's 0.3 would diverge)."""
        encoder = self.prompt_encoder
        groups = [
            {"name": "prompt", "params": [encoder.prompt_embeddings], "lr": learning_rate},
            {"name": "lora_embedding", "params": [encoder.lora_embedding_A, encoder.lora_embedding_B],
             "lr": lora_embedding_lr},
        ]
        module_params = [p for name in self.modules_to_save for p in getattr(self.base_model, name).parameters()]
        if module_params:
            groups.append({"name": "modules_to_save", "params": module_params,
                           "lr": lora_embedding_lr if modules_lr is None else modules_lr})
        for group in groups:
            group["params"] = [p for p in group["params"] if p.requires_grad and p.numel() > 0]
            group["weight_decay"] = weight_decay
        return [group for group in groups if group["params"]]

    def num_trainable_parameters(self) -> dict[str, int]:
        """Trainable parameters by part: prompt (P), lora_embedding (A and B), each trainable module, total."""
        encoder = self.prompt_encoder
        counts = {
            "prompt": encoder.prompt_embeddings.numel(),
            "lora_embedding": encoder.lora_embedding_A.numel() + encoder.lora_embedding_B.numel(),
        }
        counts["dept"] = counts["prompt"] + counts["lora_embedding"]
        for name in self.modules_to_save:
            counts[name] = sum(p.numel() for p in getattr(self.base_model, name).parameters())
        counts["total"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return counts

    def print_trainable_parameters(self) -> None:
        """A table of the adapter's parts; `trainable now` is 0 for an adapter loaded for inference."""
        counts = self.num_trainable_parameters()
        base = sum(p.numel() for p in self.base_model.parameters())
        m, r, s, d = (self.config.num_virtual_tokens, self.config.r, self.config.max_length, self.config.token_dim)
        rows = [(f"prompt P ({m} x {d})", counts["prompt"]),
                (f"A ({s} x {r}) + B ({r} x {d})", counts["lora_embedding"])]
        rows += [(f"module {name!r}", counts[name]) for name in self.modules_to_save]
        adapter = sum(count for _, count in rows)
        for label, count in rows:
            print(f"{label:<36}{count:>14,}")
        print(f"{'adapter total':<36}{adapter:>14,}   ({100 * adapter / max(base, 1):.4f}% of the base's {base:,})")
        print(f"{'trainable now':<36}{counts['total']:>14,}")

    # ----------------------------------------------------------------------------------------------------------
    # Save and load
    def adapter_state_dict(self, parameters: Mapping[str, torch.Tensor] | None = None,
                           name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors under their file keys (`prompt_embeddings`, ..., `modules.<name>.<key>`).

        `parameters` (named as in `named_parameters()`) replaces the model's own tensors: whole tensors gathered
        from ZeRO-3 or FSDP shards, or the fp32 master weights of a DeepSpeed run. `name` picks a served adapter.
        """
        if name is not None:
            tensors = self.prompt_encoder.adapter_tensors(self.prompt_encoder.names.index(name))
            modules = self.adapter_modules[name] if name in self.adapter_modules else {}
            for module_name, module in modules.items():
                tensors.update({f"{MODULES_PREFIX}{module_name}.{k}": v for k, v in module.state_dict().items()})
            return {key: tensor.detach() for key, tensor in tensors.items()}
        sources = {key: (f"prompt_encoder.{key}", tensor) for key, tensor in self.prompt_encoder.adapter_tensors().items()}
        for module_name in self.modules_to_save:
            for key, tensor in getattr(self.base_model, module_name).state_dict().items():
                sources[f"{MODULES_PREFIX}{module_name}.{key}"] = (f"base_model.{module_name}.{key}", tensor)
        parameters = parameters or {}
        return {key: parameters.get(source, tensor).detach() for key, (source, tensor) in sources.items()}

    def save_pretrained(
        self, save_directory: str | Path, state_dict: Mapping[str, torch.Tensor] | None = None
    ) -> Path:
        """Write adapter_config.json and adapter_model.safetensors (P, A, B and any trainable modules).

        `state_dict`: whole tensors by parameter name to save instead of the model's own (see
        `adapter_state_dict`); the trainer passes them under DeepSpeed and FSDP.
        """
        return save_adapter(save_directory, self.config, self.adapter_state_dict(state_dict))

    @torch.no_grad()
    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
        """Copy P, A, B (and modules) into the model, after checking every shape against it."""
        load_adapter_tensors(self.prompt_encoder.adapter_tensors(), state, source)
        modules = saved_modules(state)
        unknown = sorted(set(modules) - set(self.modules_to_save))
        if unknown:
            raise AdapterMismatchError(
                f"{source} holds trained modules {unknown} that this model does not train "
                f"(modules_to_save={list(self.modules_to_save)}): pass modules_to_save to keep them."
            )
        for module_name, module_state in modules.items():
            load_module_state(getattr(self.base_model, module_name), module_state, source, module_name)
        self.invalidate_caches()

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, adapter_dir: str | Path, is_trainable: bool = False, **kwargs
    ) -> DePTModel:
        """Load an adapter (ours, or an official DePT checkpoint dir) onto `model`.

        A prompt-only official checkpoint loads with B = 0, and a warning says so. With `is_trainable=False`
        (the default) every parameter is frozen and the model is put in eval mode.
        """
        config, state, source = load_adapter(adapter_dir)
        kind = _MODEL_CLASSES[infer_task_type(model)] if cls is DePTModel else cls
        check_saved_base(config, model, source, kind.describe_base(model))
        check_adapter_state(config, state, source)
        if saved_modules(state) and "modules_to_save" not in kwargs:
            kwargs["modules_to_save"] = tuple(saved_modules(state))  # a saved head or visual projection comes back
        dept_model = kind(model, config, initialize=False, **kwargs)
        dept_model.load_adapter_state_dict(state, source)
        if not is_trainable:
            dept_model.requires_grad_(False)
            dept_model.eval()
        return dept_model


def check_adapter_state(config: DePTConfig, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse an adapter whose prompt is missing; warn that a prompt-only adapter (three of the official
    checkpoints) acts as vanilla prompt tuning."""
    if config.num_virtual_tokens > 0 and "prompt_embeddings" not in state:
        raise AdapterMismatchError(f"{source} has no prompt_embeddings, but its config says "
                                   f"num_virtual_tokens={config.num_virtual_tokens}.")
    if config.r > 0 and "lora_embedding_B" not in state:
        warnings.warn(f"{source} holds only the prompt: lora_embedding_A/B are missing, so B = 0 and A @ B = 0. "
                      "The adapter acts as vanilla prompt tuning with this prompt.", stacklevel=3)


_TENSOR_MEANINGS = {
    "prompt_embeddings": "(num_virtual_tokens, token_dim)",
    "lora_embedding_A": "(max_length, r)",
    "lora_embedding_B": "(r, token_dim)",
}


def load_adapter_tensors(targets: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy P, A and B from `state` into `targets` (an adapter's tensors in a bank), after checking each shape."""
    for key, target in targets.items():
        if key not in state:
            continue
        if tuple(state[key].shape) != tuple(target.shape):
            raise AdapterMismatchError(
                f"{source}: {key} has shape {tuple(state[key].shape)} but this model needs "
                f"{tuple(target.shape)} {_TENSOR_MEANINGS[key]}. The adapter was trained for another base model "
                "or another max_length."
            )
        with torch.no_grad():
            target.copy_(state[key])


def saved_modules(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The trained modules of an adapter file (`modules.<name>.<key>`), each as its own state dict."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key.startswith(MODULES_PREFIX):
            module_name, _, param_name = key[len(MODULES_PREFIX):].partition(".")
            modules.setdefault(module_name, {})[param_name] = tensor
    return modules


def load_module_state(module: nn.Module, module_state: dict[str, torch.Tensor], source: str, name: str) -> nn.Module:
    try:
        module.load_state_dict(module_state)
    except RuntimeError as err:
        raise AdapterMismatchError(
            f"{source}: the saved {name!r} does not fit this model (adapters served together must share its "
            f"shape, e.g. the number of labels): {err}"
        ) from None
    return module


def prepend_inputs(input_ids: torch.Tensor, generated):
    """transformers' decoder-only convention: the input ids (repeated for beams and returned sequences) followed by
    the new tokens, in a tensor or in `generate`'s output object."""
    sequences = generated if isinstance(generated, torch.Tensor) else generated.sequences
    inputs = input_ids.to(sequences.device).repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
    sequences = torch.cat([inputs, sequences], dim=1)
    if isinstance(generated, torch.Tensor):
        return sequences
    generated.sequences = sequences
    return generated


def _select_rows(inputs, rows: torch.Tensor, batch: int):
    """The given rows of every batch-first tensor in a tuple or dict of module inputs."""
    def pick(value):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            return value.index_select(0, rows)
        return value

    if isinstance(inputs, dict):
        return {key: pick(value) for key, value in inputs.items()}
    return tuple(pick(value) for value in inputs)


class DePTModelForSeq2SeqLM(DePTModel):
    """DePT for encoder-decoders (T5, and the VL-T5 model): the prompt goes into the encoder input only.

    Extra keyword arguments (decoder inputs, labels, image features for VL-T5) pass through to the base model.
    """

    task_type = "seq2seq"
    forwards_to_base = True

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, adapter_names=None,
                **kwargs):
        if kwargs.get("encoder_outputs") is not None:  # the prompt is already inside the encoder outputs
            return self._with_encoder_outputs(attention_mask, adapter_names, labels=labels, **kwargs)
        tokens, attention_mask, adapter_index, routing = self.embed_tokens(input_ids, attention_mask, inputs_embeds,
                                                                           adapter_names)
        embeds, mask = self.prompt_encoder.with_prompts(tokens, attention_mask, routing)
        with self.per_row_modules(adapter_index):
            return self.base_model(inputs_embeds=embeds, attention_mask=mask, labels=labels, **kwargs)

    def _with_encoder_outputs(self, attention_mask, adapter_names, **kwargs):
        if attention_mask is None:
            if self.config is None:
                raise ValueError("With encoder_outputs, pass the attention_mask of the unprompted input, so that "
                                 "each row's prompt slots can be masked.")
            return self.base_model(attention_mask=None, **kwargs)
        adapter_index = self.adapter_index(adapter_names, attention_mask.shape[0])
        routing = self.prompt_encoder.route(attention_mask, adapter_index)
        with self.per_row_modules(adapter_index):
            return self.base_model(attention_mask=routing.prompted_mask(attention_mask), **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, inputs_embeds=None, adapter_names=None,
                 new_tokens_only: bool = False, **kwargs):
        """The decoder's tokens (its start token, then the new ones), as transformers returns them for an
        encoder-decoder: they never hold the input, so `new_tokens_only` changes nothing here."""
        tokens, attention_mask, adapter_index, routing = self.embed_tokens(input_ids, attention_mask, inputs_embeds,
                                                                           adapter_names)
        embeds, mask = self.prompt_encoder.with_prompts(tokens, attention_mask, routing)
        with self.per_row_modules(adapter_index):
            return self.base_model.generate(inputs_embeds=embeds, attention_mask=mask,
                                            **self._generate_kwargs(kwargs))


class DePTModelForCausalLM(DePTModel):
    """DePT for decoder-only LMs: `[P ; E']`, labels -100 over P, positions counted over real tokens.

    `forward` returns logits over all width + seq positions (as PEFT does; width is the longest prompt among the
    rows' adapters, the shorter ones padded with masked slots). `generate` follows transformers: given `input_ids`
    it returns them followed by the new tokens (so `out[:, input_ids.shape[1]:]` is the answer), given only
    `inputs_embeds` the new tokens; `new_tokens_only=True` asks for the new tokens alone.

    In eval mode (when nothing needs gradients through P) each adapter's P keys, values and logits are computed
    once and reused by every call, which then runs the base model on its own tokens only (the prompt KV cache,
    see `dept.prompt_cache`). Set `use_prompt_cache = False`, or pass `use_prompt_cache=False` to a call, to run
    the whole prompted sequence instead.
    """

    task_type = "causal"
    forwards_to_base = True

    def __init__(self, *args, **kwargs):
        self.prompt_caches: dict[str, PromptKVCache] = {}  # by adapter name; before the base class calls eval()
        self._stacked_prompt_states: tuple[tuple, PromptStates | None] | None = None
        super().__init__(*args, **kwargs)
        self.use_prompt_cache = True

    def invalidate_caches(self) -> None:
        super().invalidate_caches()
        for cache in self.prompt_caches.values():
            cache.clear()
        self._stacked_prompt_states = None

    def _forget_adapter(self, name: str) -> None:
        self.prompt_caches.pop(name, None)
        self._stacked_prompt_states = None

    def prompt_states(self) -> PromptStates | None:
        """P's keys, values and logits, one row per adapter of the bank (stacked to the longest m); each
        adapter's are computed once, then kept as the caching rule says."""
        bank = self.prompt_encoder
        if bank.num_adapters == 1:
            return self._adapter_prompt_states(0)
        states, generations = [], []
        for index, name in enumerate(bank.names):
            if bank.configs[index].num_virtual_tokens == 0:
                states.append(None)
                continue
            if (state := self._adapter_prompt_states(index)) is None:
                return None  # this base model's cache is not plain keys and values
            states.append(state)
            generations.append((name, self.prompt_caches[name].generation))
        key = tuple(generations)
        if self._stacked_prompt_states is None or self._stacked_prompt_states[0] != key:
            self._stacked_prompt_states = key, stack_prompt_states(states, bank.num_virtual_tokens)
        return self._stacked_prompt_states[1]

    def _adapter_prompt_states(self, index: int) -> PromptStates | None:
        name = self.prompt_encoder.names[index]
        prompt = self.prompt_encoder.adapter_tensors(index)["prompt_embeddings"]
        cache = self.prompt_caches.setdefault(name, PromptKVCache())

        def compute():
            with self.per_row_modules(torch.tensor([index], device=prompt.device)):  # an adapter's own lm_head
                return compute_prompt_states(self.base_model, prompt)

        return cache.get(self.base_model, compute)

    def _cached_prompt(self, use_prompt_cache: bool | None, routing: PromptRouting, kwargs: dict,
                       generating: bool = False) -> PromptStates | None:
        if needs_gradients(self):  # a graph through P: a step may follow
            self.invalidate_caches()
        enabled = self.use_prompt_cache if use_prompt_cache is None else use_prompt_cache
        if routing.width == 0 or not prompt_cache_applies(self, enabled, kwargs, generating):
            return None
        return self.prompt_states()

    @staticmethod
    def _rows(states: PromptStates, routing: PromptRouting, batch: int, expand: int = 1) -> PromptStates:
        """Each row's prompt states: the one adapter's repeated (no copy), or each row's own from the bank."""
        if routing.adapter_index is None:
            return states.select(batch * expand)
        return states.select(routing.adapter_index.repeat_interleave(expand), routing.width)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, adapter_names=None,
                use_prompt_cache: bool | None = None, **kwargs):
        kwargs.pop("position_ids", None)
        tokens, mask, adapter_index, routing = self.embed_tokens(input_ids, attention_mask, inputs_embeds,
                                                                 adapter_names)
        if labels is not None:
            labels = routing.insert_prompt(labels, -100)
        with self.per_row_modules(adapter_index):
            if (states := self._cached_prompt(use_prompt_cache, routing, kwargs)) is not None:
                rows = self._rows(states, routing, tokens.shape[0])
                num_items_in_batch = kwargs.pop("num_items_in_batch", None)
                output = forward_after_prompt(self.base_model, rows, tokens, mask, routing.prompt_mask(mask),
                                              **kwargs)
                return with_prompt_logits(self.base_model, output, rows.logits,
                                          lambda prompt, tokens: place(prompt, tokens, routing.layout),
                                          labels, num_items_in_batch)
            embeds, mask = self.prompt_encoder.with_prompts(tokens, mask, routing)
            return self.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=self.position_ids(mask),
                                   labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, inputs_embeds=None, adapter_names=None,
                 use_cache: bool = True, use_prompt_cache: bool | None = None, new_tokens_only: bool = False,
                 **kwargs):
        """Prompt at prefill, then the KV cache carries it; with the prompt cache the prefill runs on the input
        alone. `use_cache=False` recomputes the whole sequence at every step (greedy only): slow, but the
        reference the cached paths must match.

        Returns `input_ids` followed by the new tokens, as transformers and PEFT do (the new tokens alone when
        only `inputs_embeds` is given, or with `new_tokens_only=True`).
        """
        new_tokens = self._generate_new_tokens(input_ids, attention_mask, inputs_embeds, adapter_names, use_cache,
                                               use_prompt_cache, **kwargs)
        return new_tokens if input_ids is None or new_tokens_only else prepend_inputs(input_ids, new_tokens)

    def _generate_new_tokens(self, input_ids, attention_mask, inputs_embeds, adapter_names, use_cache,
                             use_prompt_cache, **kwargs):
        tokens, mask, adapter_index, routing = self.embed_tokens(input_ids, attention_mask, inputs_embeds,
                                                                 adapter_names)
        with self.per_row_modules(adapter_index):
            if not use_cache:
                return self._greedy_without_cache(*self.prompt_encoder.with_prompts(tokens, mask, routing), **kwargs)
            kwargs = self._generate_kwargs(kwargs)
            if (states := self._cached_prompt(use_prompt_cache, routing, kwargs, generating=True)) is not None:
                rows = self._rows(states, routing, tokens.shape[0], generation_expand_size(self.base_model, kwargs))
                return generate_after_prompt(self.base_model, rows, tokens, mask, routing.prompt_mask(mask), **kwargs)
            embeds, mask = self.prompt_encoder.with_prompts(tokens, mask, routing)
            # Positions over real tokens, also for the new tokens after a right-padded input.
            return self.base_model.generate(inputs_embeds=embeds, attention_mask=mask,
                                            position_ids=self.position_ids(mask), **kwargs)

    def _greedy_without_cache(self, embeds, mask, max_new_tokens: int = 20, min_new_tokens: int = 0,
                              eos_token_id=None, pad_token_id=None, do_sample: bool = False, num_beams: int = 1,
                              **unused):
        if do_sample or num_beams != 1 or unused:
            raise ValueError(
                f"generate(use_cache=False) supports greedy decoding only; got do_sample={do_sample}, "
                f"num_beams={num_beams}, other options {sorted(unused)}. Use the KV cache for these."
            )
        base_config = self.base_model.generation_config
        eos_token_id = base_config.eos_token_id if eos_token_id is None else eos_token_id
        pad_token_id = base_config.pad_token_id if pad_token_id is None else pad_token_id
        eos_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                               device=embeds.device)
        finished = torch.zeros(embeds.shape[0], dtype=torch.bool, device=embeds.device)
        new_tokens = []
        for step in range(max_new_tokens):
            logits = self.base_model(inputs_embeds=embeds, attention_mask=mask,
                                     position_ids=self.position_ids(mask), use_cache=False).logits[:, -1]
            if step < min_new_tokens and eos_ids.numel():
                logits[:, eos_ids] = float("-inf")
            next_tokens = logits.argmax(dim=-1)
            if pad_token_id is not None:
                next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_token_id), next_tokens)
            new_tokens.append(next_tokens)
            finished |= torch.isin(next_tokens, eos_ids)
            embeds = torch.cat([embeds, self.word_embeddings(next_tokens)[:, None]], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            if finished.all():
                break
        return torch.stack(new_tokens, dim=1)


class DePTModelForSequenceClassification(DePTModel):
    """DePT for encoder classifiers (BERT, RoBERTa): `[P ; E']` and a trainable head (`classifier`/`score`).

    Unlike the official code, A @ B is applied here too.
    """

    task_type = "cls"
    forwards_to_base = True
    prompt_first = True  # the pooler reads position 0, so the prompt stays in front even under left padding

    def __init__(self, base_model, config, tokenizer=None, modules_to_save=CLASSIFIER_HEAD_NAMES, initialize=True):
        super().__init__(base_model, config, tokenizer, modules_to_save, initialize)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, token_type_ids=None, labels=None,
                adapter_names=None, **kwargs):
        tokens, attention_mask, adapter_index, routing = self.embed_tokens(input_ids, attention_mask, inputs_embeds,
                                                                           adapter_names)
        embeds, mask = self.prompt_encoder.with_prompts(tokens, attention_mask, routing)
        if token_type_ids is not None:
            token_type_ids = routing.insert_prompt(token_type_ids, 0)
        kwargs.pop("position_ids", None)
        with self.per_row_modules(adapter_index):
            return self.base_model(inputs_embeds=embeds, attention_mask=mask, token_type_ids=token_type_ids,
                                   position_ids=self.position_ids(mask), labels=labels, **kwargs)


_MODEL_CLASSES = {
    "seq2seq": DePTModelForSeq2SeqLM,
    "causal": DePTModelForCausalLM,
    "cls": DePTModelForSequenceClassification,
}


def get_dept_model(model: nn.Module, config: DePTConfig, tokenizer=None, **kwargs) -> DePTModel:
    """Freeze `model` and attach a freshly initialised DePT adapter described by `config`.

    Example:
        >>> from transformers import T5Config, T5ForConditionalGeneration
        >>> base = T5ForConditionalGeneration(T5Config(vocab_size=100, d_model=32, num_layers=1, num_heads=2))
        >>> model = get_dept_model(base, DePTConfig(num_virtual_tokens=4, r=2, max_length=16, prompt_init="vocab"))
        >>> model.num_trainable_parameters()["total"]  # 4*32 + 16*2 + 2*32
        224
    """
    kind = infer_task_type(model)
    if config.task_type != kind:
        raise ConfigError(
            f"DePTConfig.task_type is {config.task_type!r} but {type(model).__name__} is a {kind!r} model: "
            f"set task_type={kind!r}."
        )
    return _MODEL_CLASSES[kind](model, config, tokenizer=tokenizer, **kwargs)


def check_compatible(config: DePTConfig, base_config, token_dim: int, task_type: str) -> None:
    if task_type and config.task_type != task_type:
        raise ConfigError(f"The adapter's task_type is {config.task_type!r}, but this is a {task_type!r} model.")
    if config.token_dim is not None and config.token_dim != token_dim:
        raise AdapterMismatchError(
            f"The adapter has token_dim={config.token_dim} but the model's embeddings have d={token_dim}: "
            "it was trained on another base model."
        )
    check_position_limit(config, base_config)


def check_position_limit(config: DePTConfig, base_config) -> None:
    """Refuse m + s beyond the base model's position limit, where it has one (`max_position_embeddings`: learned
    absolute positions such as BERT's and GPT-2's, or the RoPE range of LLaMA; T5's relative positions have none)."""
    model_type = getattr(base_config, "model_type", None)
    max_positions = getattr(base_config, "max_position_embeddings", None)
    if not isinstance(max_positions, int):
        return
    offset = base_config.pad_token_id + 1 if model_type in PADDING_OFFSET_MODEL_TYPES else 0
    limit = max_positions - offset
    length = config.num_virtual_tokens + config.max_length
    if length > limit:
        raise ConfigError(
            f"num_virtual_tokens + max_length = {config.num_virtual_tokens} + {config.max_length} = {length} "
            f"exceeds the {limit} positions of this {model_type} model (its max_position_embeddings"
            f"{f' less {offset}' if offset else ''}): lower num_virtual_tokens (--prefix_length) or max_length "
            "(--max_seq_length) so that they add up to at most "
            f"{limit}."
        )


def describe_hf_base(model: nn.Module) -> dict:
    """`DePTModel.describe_base` for a Hugging Face model: d of its input embeddings and its config's fields."""
    base_config = model.config
    return {
        "token_dim": full_shape(model.get_input_embeddings().weight)[1],  # also for a ZeRO-3 shard
        "vocab_size": getattr(base_config, "vocab_size", None),
        "base_model_type": getattr(base_config, "model_type", None),
        "base_model_name_or_path": getattr(base_config, "_name_or_path", None) or None,
    }


def check_saved_base(config: DePTConfig, model: nn.Module, source: str, base: dict | None = None) -> None:
    """Refuse, before any compute, an adapter saved for another base (d, vocabulary or model type).

    `base` describes the model as `DePTModel.describe_base` does (default: a Hugging Face model).
    """
    base = describe_hf_base(model) if base is None else base
    checks = [(name, getattr(config, name), base[name]) for name in ("token_dim", "vocab_size", "base_model_type")]
    for name, saved, actual in checks:
        if saved is not None and actual is not None and saved != actual:
            raise AdapterMismatchError(
                f"{source} was saved for a base model with {name}={saved!r}, but this model has {name}={actual!r}. "
                "Load it onto the base model it was trained with."
            )
