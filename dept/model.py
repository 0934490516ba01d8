"""Attach DePT to a Hugging Face model: freeze it, put the prompt in, save and load the adapter.

Each model kind gets one small class that knows where the prompt goes:

- `DePTModelForSeq2SeqLM` (T5, VL-T5): the encoder input only; decoder and labels untouched.
- `DePTModelForCausalLM` (LLaMA, GPT-2): in front of the input; labels get -100 over the prompt; at `generate`
  the prompt goes in at prefill and the KV cache carries it afterwards. In eval mode the prompt's own keys and
  values are computed once and reused (`dept.prompt_cache`), so each call runs the base on its input alone.
- `DePTModelForSequenceClassification` (BERT, RoBERTa): in front of the input, with a trainable head.

Each holds one adapter, the one it trains (`get_dept_model`) or loads (`DePTModel.from_pretrained`). The math
lives once, in `dept.embedding`; serving several adapters in one batch is `dept.MultiAdapterModel`'s job.

Caching rule (`dept.caching`): the eval caches (the scaling * A @ B table, the prompt's KV cache) are recomputed
after every `train()`/`eval()` call, load (`load_state_dict`, `load_adapter_state_dict`), move or cast, adapter add
or remove, and forward that needs gradients, never keyed on tensor versions or addresses, and after any other
in-place change of P, A, B or the base's weights in eval mode you call `invalidate_caches()`.
"""

from __future__ import annotations

import functools
import inspect
import types
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from .adapter_files import load_adapter, save_adapter
from .caching import EvalCachingModule, builds_graph
from .config import ConfigError, DePTConfig, infer_task_type
from .distributed import full_shape, needs_synced_generation
from .embedding import (
    PADDING_OFFSET_MODEL_TYPES,
    DePTEmbedding,
    PromptRouting,
    real_token_position_ids,
)
from .errors import UserError
from .hf_compat import HuggingFaceModelMixin, input_embedding_weight
from .hub import resolve_adapter_dir, upload_adapter, write_model_card
from .prompt_cache import (
    PromptKVCache,
    PromptStates,
    compute_prompt_states,
    forward_after_prompt,
    generate_after_prompt,
    generation_expand_size,
    prompt_cache_applies,
    with_prompt_logits,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Heads that are trained with the prompt, as PEFT's modules_to_save for sequence classification.
CLASSIFIER_HEAD_NAMES = ("classifier", "score")
MODULES_PREFIX = "modules."  # a trained module's keys in an adapter file: modules.<module>.<key>


class AdapterMismatchError(UserError, ValueError):
    """An adapter that does not fit the model it is loaded into."""


def forward_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The parameters of `cls.forward`, and of its parents' while each forward takes `**kwargs` it may pass on."""
    parameters: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "forward" not in vars(klass):
            continue
        own = list(inspect.signature(vars(klass)["forward"]).parameters.values())[1:]  # without self
        parameters.update({p.name: p for p in own if p.name not in parameters})
        if not any(p.kind is p.VAR_KEYWORD for p in own):
            break
    return parameters


def expose_forward_signature(model: nn.Module, base_model: nn.Module) -> None:
    """Let `inspect.signature(model.forward)` name what `base_model.forward` takes, next to the model's own
    parameters, so that transformers' `Trainer` (`remove_unused_columns=True`) keeps `labels`,
    `decoder_input_ids`, `token_type_ids`, VL-T5's visual inputs and the like.

    The positional parameters of the model's forward keep their places (they are what it really takes
    positionally); every other parameter of the model's forwards, then of the base's, follows as keyword-only, then
    `**kwargs`, which the model passes on. A forward that takes `**kwargs` may pass them to its parent's (VL-T5 passes
    `labels` and the decoder's inputs to T5's), so the parents' parameters are named too.
    """
    implementation = type(model).forward
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    first = list(inspect.signature(implementation).parameters.values())
    positional = [p for p in first if p.kind is p.POSITIONAL_OR_KEYWORD]  # self first
    named = {**forward_parameters(type(model)), **forward_parameters(type(base_model))}
    keyword_only = [p.replace(kind=p.KEYWORD_ONLY) for name, p in named.items()
                    if p.kind not in variadic and name not in {q.name for q in positional}]
    var_keyword = inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)
    signature = inspect.signature(implementation).replace(parameters=[*positional, *keyword_only, var_keyword])

    @functools.wraps(implementation)
    def forward(self, *args, **kwargs):
        return implementation(self, *args, **kwargs)

    vars(forward)["__signature__"] = signature  # what inspect.signature reads (PEP 362)
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


class DePTModel(HuggingFaceModelMixin, EvalCachingModule):
    """A frozen Hugging Face model plus one DePT adapter: P, A, B, and any trainable modules such as a head.

    Build one with `get_dept_model(model, config)`, or load one with `DePTModel.from_pretrained(model, dir)`.
    The caching rule of its eval caches is in the module docstring.
    """

    task_type: str = ""
    # True where `forward` passes the base model's arguments through: its signature then names them (see
    # `expose_forward_signature`), so transformers' Trainer keeps labels, decoder_input_ids and the like.
    forwards_to_base: bool = False
    prompt_first: bool = False  # True keeps P at position 0 under left padding (see DePTEmbedding)

    def __init__(
        self,
        base_model: nn.Module,
        config: DePTConfig,
        tokenizer=None,
        modules_to_save: tuple[str, ...] = (),
        initialize: bool = True,
    ):
        super().__init__()
        base = self.describe_base(base_model)
        token_dim = base["token_dim"]
        check_compatible(config, getattr(base_model, "config", None), token_dim, self.task_type)  # before any change
        self._attach(base_model, token_dim)
        self.config = config
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

    def _attach(self, base_model: nn.Module, token_dim: int) -> None:
        """Hold the frozen base model (`dept.MultiAdapterModel`'s models attach the same way)."""
        self.token_dim = token_dim
        self.base_model = base_model.requires_grad_(False)
        if self.forwards_to_base:
            expose_forward_signature(self, base_model)

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
    # The eval caches (see the caching rule in the module docstring)
    def invalidate_caches(self) -> None:
        """Drop every cached value; the next eval call recomputes it from the current weights."""
        self.prompt_encoder.invalidate_caches()

    # ----------------------------------------------------------------------------------------------------------
    # The prompt
    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.base_model.get_input_embeddings()

    def route(self, attention_mask: torch.Tensor) -> PromptRouting:
        """Where the prompt goes, for a (batch, seq) attention mask."""
        return self.prompt_encoder.route(attention_mask, self.prompt_first)

    def embed_tokens(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        """E' (batch, seq, d) without the prompt, the (batch, seq) mask, and where the prompt goes."""
        inputs_embeds, attention_mask = embed_inputs(self.word_embeddings, input_ids, attention_mask, inputs_embeds)
        routing = self.route(attention_mask)
        return self.prompt_encoder.update_tokens(inputs_embeds, attention_mask), attention_mask, routing

    def embed(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Word embeddings with DePT applied: (batch, m + seq, d) and the (batch, m + seq) mask."""
        return self.prompt_encoder.with_prompts(*self.embed_tokens(input_ids, attention_mask, inputs_embeds))

    def insert_prompt(self, per_token: torch.Tensor, attention_mask: torch.Tensor | None,
                      fill_value) -> torch.Tensor:
        """Align labels or token types with the prompted sequence, `fill_value` over the prompt."""
        if attention_mask is None:
            attention_mask = torch.ones_like(per_token)
        return self.route(attention_mask).insert_prompt(per_token, fill_value)

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
        groups: list[dict[str, Any]] = [
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
    def adapter_state_dict(self, parameters: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors under their file keys (`prompt_embeddings`, ..., `modules.<name>.<key>`).

        `parameters` (named as in `named_parameters()`) replaces the model's own tensors: whole tensors gathered
        from ZeRO-3 or FSDP shards, or the fp32 master weights of a DeepSpeed run.
        """
        sources = {key: (f"prompt_encoder.{key}", tensor) for key, tensor in self.prompt_encoder.adapter_tensors().items()}
        for module_name in self.modules_to_save:
            for key, tensor in getattr(self.base_model, module_name).state_dict().items():
                sources[f"{MODULES_PREFIX}{module_name}.{key}"] = (f"base_model.{module_name}.{key}", tensor)
        parameters = parameters or {}
        return {key: parameters.get(source, tensor).detach() for key, (source, tensor) in sources.items()}

    def save_pretrained(
        self, save_directory: str | Path, state_dict: Mapping[str, torch.Tensor] | None = None, *,
        push_to_hub: bool = False, model_card_data=None, **push_kwargs
    ) -> Path:
        """Write adapter_config.json and adapter_model.safetensors (P, A, B and any trainable modules), and the
        model card README.md (`dept.hub.write_model_card`: a README.md that dept did not write is kept).

        `state_dict`: whole tensors by parameter name to save instead of the model's own (see
        `adapter_state_dict`); the trainer passes them under DeepSpeed and FSDP. `model_card_data`: a
        `huggingface_hub.ModelCardData` or dict of fields for the card. `push_to_hub=True` then uploads the adapter
        files and README.md to the Hub repository `repo_id` (default: the directory's name), with
        `dept.hub.upload_adapter`'s other options (token, private, revision, commit_message, create_pr).
        """
        path = save_adapter(save_directory, self.config, self.adapter_state_dict(state_dict))
        repo_id = push_kwargs.pop("repo_id", None)
        if push_kwargs and not push_to_hub:
            raise TypeError(f"save_pretrained got Hub options {sorted(push_kwargs)} without push_to_hub=True.")
        write_model_card(path, self.config, repo_id=repo_id, model_card_data=model_card_data,
                         tags=getattr(self.base_model, "model_tags", None) or ())  # e.g. TRL's
        if push_to_hub:
            upload_adapter(path, repo_id or path.resolve().name, **push_kwargs)
        return path

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
        cls, model: nn.Module, adapter_dir: str | Path, is_trainable: bool = False, *, revision: str | None = None,
        token: str | bool | None = None, cache_dir: str | Path | None = None, **kwargs
    ) -> DePTModel:
        """Load an adapter (ours, or an official DePT checkpoint dir) onto `model`.

        `adapter_dir` is a local directory or a Hub repository id ("user/adapter"), fetched at `revision` with
        `token` into `cache_dir` (`dept.hub.resolve_adapter_dir`; offline, from the cache). A prompt-only
        official checkpoint loads with B = 0, and a warning says so. With `is_trainable=False` (the default) every
        parameter is frozen and the model is put in eval mode.
        """
        adapter_dir = resolve_adapter_dir(adapter_dir, revision=revision, token=token, cache_dir=cache_dir)
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


class DePTModelForSeq2SeqLM(DePTModel):
    """DePT for encoder-decoders (T5, and the VL-T5 model): the prompt goes into the encoder input only.

    Extra keyword arguments (decoder inputs, labels, image features for VL-T5) pass through to the base model.
    """

    task_type = "seq2seq"
    forwards_to_base = True

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        if kwargs.get("encoder_outputs") is not None:  # the prompt is already inside the encoder outputs
            if attention_mask is not None:
                attention_mask = self.route(attention_mask).prompted_mask(attention_mask.long())
            return self.base_model(attention_mask=attention_mask, labels=labels, **kwargs)
        embeds, mask = self.prompt_encoder.with_prompts(*self.embed_tokens(input_ids, attention_mask, inputs_embeds))
        return self.base_model(inputs_embeds=embeds, attention_mask=mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, inputs_embeds=None, new_tokens_only: bool = False,
                 **kwargs):
        """The decoder's tokens (its start token, then the new ones), as transformers returns them for an
        encoder-decoder: they never hold the input, so `new_tokens_only` changes nothing here."""
        embeds, mask = self.prompt_encoder.with_prompts(*self.embed_tokens(input_ids, attention_mask, inputs_embeds))
        return self.base_model.generate(inputs_embeds=embeds, attention_mask=mask, **self._generate_kwargs(kwargs))


class DePTModelForCausalLM(DePTModel):
    """DePT for decoder-only LMs: `[P ; E']`, labels -100 over P, positions counted over real tokens.

    `forward` returns logits over all m + seq positions (as PEFT does). `generate` follows transformers: given
    `input_ids` it returns them followed by the new tokens (so `out[:, input_ids.shape[1]:]` is the answer), given
    only `inputs_embeds` the new tokens; `new_tokens_only=True` asks for the new tokens alone.

    In eval mode (when nothing needs gradients through P) P's keys, values and logits are computed once and
    reused by every call, which then runs the base model on its own tokens only (the prompt KV cache, see
    `dept.prompt_cache`; recomputed by the caching rule of the module docstring). Set `use_prompt_cache = False`,
    or pass `use_prompt_cache=False` to a call, to run the whole prompted sequence instead.
    """

    task_type = "causal"
    forwards_to_base = True
    use_prompt_cache: bool = True

    def _attach(self, base_model: nn.Module, token_dim: int) -> None:
        super()._attach(base_model, token_dim)
        self.prompt_cache = PromptKVCache()

    def invalidate_caches(self) -> None:
        super().invalidate_caches()
        self.prompt_cache.clear()

    def prompt_states(self) -> PromptStates | None:
        """P's keys, values and logits, computed once (see the caching rule)."""
        return self.prompt_cache.get(self.base_model, self._compute_prompt_states)

    def _compute_prompt_states(self) -> PromptStates | None:
        return compute_prompt_states(self.base_model, self.prompt_encoder.prompt_embeddings)

    def _cached_prompt(self, use_prompt_cache: bool | None, routing: PromptRouting, kwargs: dict,
                       generating: bool = False) -> PromptStates | None:
        if not self.training and builds_graph(self):  # a graph through P in eval mode: a step may follow
            self.invalidate_caches()
        enabled = self.use_prompt_cache if use_prompt_cache is None else use_prompt_cache
        if routing.width == 0 or not prompt_cache_applies(self, enabled, kwargs, generating):
            return None
        return self.prompt_states()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                use_prompt_cache: bool | None = None, **kwargs):
        kwargs.pop("position_ids", None)
        tokens, mask, routing = self.embed_tokens(input_ids, attention_mask, inputs_embeds)
        if labels is not None:
            labels = routing.insert_prompt(labels, -100)
        if (states := self._cached_prompt(use_prompt_cache, routing, kwargs)) is not None:
            rows = routing.select_states(states, tokens.shape[0])
            num_items_in_batch = kwargs.pop("num_items_in_batch", None)
            output = forward_after_prompt(self.base_model, rows, tokens, mask, routing.prompt_mask(mask), **kwargs)
            return with_prompt_logits(self.base_model, output, rows, routing.layout, labels, num_items_in_batch)
        embeds, mask = self.prompt_encoder.with_prompts(tokens, mask, routing)
        return self.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=self.position_ids(mask),
                               labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, inputs_embeds=None, use_cache: bool = True,
                 use_prompt_cache: bool | None = None, new_tokens_only: bool = False, **kwargs):
        """Prompt at prefill, then the KV cache carries it; with the prompt cache the prefill runs on the input
        alone. `use_cache=False` recomputes the whole sequence at every step (greedy only): slow, but the
        reference the cached paths must match.

        Returns `input_ids` followed by the new tokens, as transformers and PEFT do (the new tokens alone when
        only `inputs_embeds` is given, or with `new_tokens_only=True`).
        """
        new_tokens = self._generate_new_tokens(input_ids, attention_mask, inputs_embeds, use_cache, use_prompt_cache,
                                               **kwargs)
        return new_tokens if input_ids is None or new_tokens_only else prepend_inputs(input_ids, new_tokens)

    def _generate_new_tokens(self, input_ids, attention_mask, inputs_embeds, use_cache, use_prompt_cache, **kwargs):
        tokens, mask, routing = self.embed_tokens(input_ids, attention_mask, inputs_embeds)
        if not use_cache:
            return self._greedy_without_cache(*self.prompt_encoder.with_prompts(tokens, mask, routing), **kwargs)
        kwargs = self._generate_kwargs(kwargs)
        if (states := self._cached_prompt(use_prompt_cache, routing, kwargs, generating=True)) is not None:
            rows = routing.select_states(states, tokens.shape[0], generation_expand_size(self.base_model, kwargs))
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
                **kwargs):
        tokens, attention_mask, routing = self.embed_tokens(input_ids, attention_mask, inputs_embeds)
        embeds, mask = self.prompt_encoder.with_prompts(tokens, attention_mask, routing)
        if token_type_ids is not None:
            token_type_ids = routing.insert_prompt(token_type_ids, 0)
        kwargs.pop("position_ids", None)
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
    hf_model = cast("PreTrainedModel", model)  # the model kinds that call this are those of Hugging Face models
    base_config = hf_model.config
    return {
        "token_dim": full_shape(input_embedding_weight(hf_model))[1],  # also for a ZeRO-3 shard
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
