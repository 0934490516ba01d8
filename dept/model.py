"""Attach DePT to a Hugging Face model: freeze it, put the prompt in, save and load the adapter.

Each model kind gets one small class that knows where the prompt goes:

- `DePTModelForSeq2SeqLM` (T5, VL-T5): the encoder input only; decoder and labels untouched.
- `DePTModelForCausalLM` (LLaMA, GPT-2): in front of the input; labels get -100 over the prompt; at `generate`
  the prompt goes in at prefill and the KV cache carries it afterwards. In eval mode the prompt's own keys and
  values are computed once and reused (`dept.prompt_cache`), so each call runs the base on its input alone.
- `DePTModelForSequenceClassification` (BERT, RoBERTa): in front of the input, with a trainable head.

The math itself lives once, in `DePTEmbedding`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .adapter_files import load_adapter, save_adapter
from .config import ConfigError, DePTConfig, infer_task_type
from .distributed import full_shape, gathered_parameters, needs_synced_generation
from .embedding import PADDING_OFFSET_MODEL_TYPES, DePTEmbedding, real_token_position_ids
from .errors import UserError
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

logger = logging.getLogger(__name__)

# Heads that are trained with the prompt, as PEFT's modules_to_save for sequence classification.
CLASSIFIER_HEAD_NAMES = ("classifier", "score")
# Models with learned absolute positions, whose table bounds m + max_length.
ABSOLUTE_POSITION_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "gpt2")


class AdapterMismatchError(UserError, ValueError):
    """An adapter that does not fit the model it is loaded into."""


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
    """A frozen Hugging Face model plus a DePT adapter (P, A, B, and any trainable modules such as a head).

    Build one with `get_dept_model(model, config)` or load one with `DePTModel.from_pretrained(model, dir)`.
    """

    task_type: str = ""
    prompt_first: bool = False  # True keeps `[P ; pads ; E']` under left padding (see DePTEmbedding)
    # A decoder-only `generate` fed embeddings returns only the new tokens (Hugging Face returns input + new).
    generate_returns_new_tokens_only: bool = True

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
        check_compatible(config, getattr(base_model, "config", None), token_dim, self.task_type)
        config.token_dim = token_dim
        config.vocab_size = base["vocab_size"]
        config.base_model_type = base["base_model_type"]
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = base["base_model_name_or_path"]
        self.config = config
        self.base_model = base_model
        self.modules_to_save = tuple(name for name in modules_to_save if hasattr(base_model, name))
        for param in base_model.parameters():
            param.requires_grad_(False)
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

    # ----------------------------------------------------------------------------------------------------------
    # Initialisation
    @torch.no_grad()
    def _initialize_prompt(self, tokenizer) -> None:
        generator = torch.Generator().manual_seed(self.config.init_seed)
        self.prompt_encoder.reset_lora_parameters(generator)
        m = self.config.num_virtual_tokens
        if m == 0:
            return
        table = self.word_embeddings.weight
        vocab_size, token_dim = full_shape(table)
        if self.config.prompt_init == "text":
            if tokenizer is None:
                raise ConfigError(
                    "prompt_init='text' needs the tokenizer to embed prompt_init_text: pass tokenizer=..., "
                    "or use prompt_init='vocab' or 'random'."
                )
            # With special tokens, as the official code (for T5 the ids end in </s>), then tiled.
            token_ids = tokenizer(self.config.prompt_init_text)["input_ids"]
            if not token_ids:
                raise ConfigError(f"prompt_init_text {self.config.prompt_init_text!r} tokenizes to nothing.")
            repeats = -(-m // len(token_ids))  # tile the text, then cut to m tokens, as the official code does
            ids = torch.tensor((token_ids * repeats)[:m])
        elif self.config.prompt_init == "vocab":
            ids = torch.randint(0, vocab_size, (m,), generator=generator)
        else:
            ids = None
            noise = torch.randn(m, token_dim, generator=generator)
        # Under ZeRO-3 (zero3_init_flag) the frozen table is a size-0 shard on each rank: gather it to read rows.
        with gathered_parameters([table]):
            if ids is None:
                self.prompt_encoder.prompt_embeddings.copy_(noise * table.float().std().cpu())
            else:
                self.prompt_encoder.prompt_embeddings.copy_(table[ids.to(table.device)].float())

    # ----------------------------------------------------------------------------------------------------------
    # The prompt
    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.base_model.get_input_embeddings()

    def embed(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Word embeddings with DePT applied: (batch, m + seq, d) and the (batch, m + seq) mask."""
        inputs_embeds, attention_mask = embed_inputs(self.word_embeddings, input_ids, attention_mask, inputs_embeds)
        return self.prompt_encoder(inputs_embeds, attention_mask, self.prompt_first)

    def insert_prompt(self, per_token: torch.Tensor, attention_mask: torch.Tensor | None, fill_value) -> torch.Tensor:
        """Align labels or token types with the prompted sequence, `fill_value` over the prompt."""
        if attention_mask is None:
            attention_mask = torch.ones_like(per_token)
        return self.prompt_encoder.insert_prompt(per_token, attention_mask, fill_value, self.prompt_first)

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
    def adapter_state_dict(self, parameters: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors under their file keys (`prompt_embeddings`, ..., `modules.<name>.<key>`).

        `parameters` (named as in `named_parameters()`) replaces the model's own tensors: whole tensors gathered
        from ZeRO-3 or FSDP shards, or the fp32 master weights of a DeepSpeed run.
        """
        encoder = self.prompt_encoder
        sources = {
            "prompt_embeddings": ("prompt_encoder.prompt_embeddings", encoder.prompt_embeddings),
            "lora_embedding_A": ("prompt_encoder.lora_embedding_A", encoder.lora_embedding_A),
            "lora_embedding_B": ("prompt_encoder.lora_embedding_B", encoder.lora_embedding_B),
        }
        for name in self.modules_to_save:
            for key, tensor in getattr(self.base_model, name).state_dict().items():
                sources[f"modules.{name}.{key}"] = (f"base_model.{name}.{key}", tensor)
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
        encoder = self.prompt_encoder
        targets = {
            "prompt_embeddings": encoder.prompt_embeddings,
            "lora_embedding_A": encoder.lora_embedding_A,
            "lora_embedding_B": encoder.lora_embedding_B,
        }
        meaning = {
            "prompt_embeddings": "(num_virtual_tokens, token_dim)",
            "lora_embedding_A": "(max_length, r)",
            "lora_embedding_B": "(r, token_dim)",
        }
        for key, target in targets.items():
            if key not in state:
                continue
            if tuple(state[key].shape) != tuple(target.shape):
                raise AdapterMismatchError(
                    f"{source}: {key} has shape {tuple(state[key].shape)} but this model needs "
                    f"{tuple(target.shape)} {meaning[key]}. The adapter was trained for another base model "
                    "or another max_length."
                )
            target.copy_(state[key])
        module_state = {k[len("modules."):]: v for k, v in state.items() if k.startswith("modules.")}
        unknown = sorted({key.split(".")[0] for key in module_state} - set(self.modules_to_save))
        if unknown:
            raise AdapterMismatchError(
                f"{source} holds trained modules {unknown} that this model does not train "
                f"(modules_to_save={list(self.modules_to_save)}): pass modules_to_save to keep them."
            )
        for name in self.modules_to_save:
            own = {k[len(name) + 1:]: v for k, v in module_state.items() if k.startswith(name + ".")}
            if own:
                try:
                    getattr(self.base_model, name).load_state_dict(own)
                except RuntimeError as err:
                    raise AdapterMismatchError(f"{source}: the saved {name!r} does not fit this model: {err}") from None

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
        saved_modules = tuple(dict.fromkeys(key.split(".")[1] for key in state if key.startswith("modules.")))
        if saved_modules and "modules_to_save" not in kwargs:
            kwargs["modules_to_save"] = saved_modules  # a saved head or visual projection comes back with it
        dept_model = kind(model, config, initialize=False, **kwargs)
        if "lora_embedding_B" not in state and config.r > 0:
            warnings.warn(
                f"{source} holds only the prompt: lora_embedding_A/B are missing, so B = 0 and A @ B = 0. "
                "The adapter acts as vanilla prompt tuning with this prompt.",
                stacklevel=2,
            )
        dept_model.load_adapter_state_dict(state, source)
        if not is_trainable:
            dept_model.requires_grad_(False)
            dept_model.eval()
        return dept_model


class DePTModelForSeq2SeqLM(DePTModel):
    """DePT for encoder-decoders (T5, and the VL-T5 model): the prompt goes into the encoder input only.

    Extra keyword arguments (decoder inputs, labels, image features for VL-T5) pass through to the base model.
    """

    task_type = "seq2seq"

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        if kwargs.get("encoder_outputs") is not None:  # the prompt is already inside the encoder outputs
            return self.base_model(attention_mask=self._encoder_mask(attention_mask), **kwargs)
        embeds, mask = self.embed(input_ids, attention_mask, inputs_embeds)
        return self.base_model(inputs_embeds=embeds, attention_mask=mask, **kwargs)

    def _encoder_mask(self, attention_mask):
        return None if attention_mask is None else self.insert_prompt(attention_mask, attention_mask, 1)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        embeds, mask = self.embed(input_ids, attention_mask, inputs_embeds)
        return self.base_model.generate(inputs_embeds=embeds, attention_mask=mask, **self._generate_kwargs(kwargs))


class DePTModelForCausalLM(DePTModel):
    """DePT for decoder-only LMs: `[P ; E']`, labels -100 over P, positions counted over real tokens.

    `forward` returns logits over all m + seq positions (as PEFT does). `generate` returns only the new tokens.

    In eval mode (when nothing needs gradients through P) P's keys, values and logits are computed once and
    reused by every call, which then runs the base model on its own tokens only (the prompt KV cache, see
    `dept.prompt_cache`). Set `use_prompt_cache = False`, or pass `use_prompt_cache=False` to a call, to run
    the whole prompted sequence instead.
    """

    task_type = "causal"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.use_prompt_cache = True
        self._prompt_cache = PromptKVCache()

    def prompt_states(self) -> PromptStates | None:
        """P's keys, values and logits (one row), recomputed only after P or the base model changed."""
        prompt = self.prompt_encoder.prompt_embeddings
        return self._prompt_cache.get(self.base_model, prompt, lambda: compute_prompt_states(self.base_model, prompt))

    def _cached_prompt(self, use_prompt_cache: bool | None, kwargs: dict,
                       generating: bool = False) -> PromptStates | None:
        enabled = self.use_prompt_cache if use_prompt_cache is None else use_prompt_cache
        if self.config.num_virtual_tokens == 0 or not prompt_cache_applies(self, enabled, kwargs, generating):
            return None
        return self.prompt_states()

    def embed_tokens(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        """E' (batch, seq, d) without the prompt, and the (batch, seq) mask."""
        inputs_embeds, attention_mask = embed_inputs(self.word_embeddings, input_ids, attention_mask, inputs_embeds)
        return self.prompt_encoder.update_tokens(inputs_embeds, attention_mask), attention_mask

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                use_prompt_cache: bool | None = None, **kwargs):
        kwargs.pop("position_ids", None)
        if (states := self._cached_prompt(use_prompt_cache, kwargs)) is not None:
            tokens, mask = self.embed_tokens(input_ids, attention_mask, inputs_embeds)
            batch = tokens.shape[0]
            num_items_in_batch = kwargs.pop("num_items_in_batch", None)
            output = forward_after_prompt(self.base_model, states.select(batch), tokens, mask,
                                          mask.new_ones(batch, self.config.num_virtual_tokens), **kwargs)
            layout = self.prompt_encoder.prompt_layout(mask)
            if labels is not None:
                labels = self.insert_prompt(labels, mask, -100)
            return with_prompt_logits(self.base_model, output, states.select(batch).logits,
                                      lambda prompt, tokens: DePTEmbedding.place(prompt, tokens, layout),
                                      labels, num_items_in_batch)
        embeds, mask = self.embed(input_ids, attention_mask, inputs_embeds)
        if labels is not None:
            labels = self.insert_prompt(labels, attention_mask, -100)
        return self.base_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=self.position_ids(mask), labels=labels, **kwargs
        )

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, inputs_embeds=None, use_cache: bool = True,
                 use_prompt_cache: bool | None = None, **kwargs):
        """Prompt at prefill, then the KV cache carries it; with the prompt cache the prefill runs on the input
        alone. `use_cache=False` recomputes the whole sequence at every step (greedy only): slow, but the
        reference the cached paths must match."""
        if not use_cache:
            embeds, mask = self.embed(input_ids, attention_mask, inputs_embeds)
            return self._greedy_without_cache(embeds, mask, **kwargs)
        kwargs = self._generate_kwargs(kwargs)
        if (states := self._cached_prompt(use_prompt_cache, kwargs, generating=True)) is not None:
            tokens, mask = self.embed_tokens(input_ids, attention_mask, inputs_embeds)
            rows = tokens.shape[0] * generation_expand_size(self.base_model, kwargs)
            prompt_mask = mask.new_ones(tokens.shape[0], self.config.num_virtual_tokens)
            return generate_after_prompt(self.base_model, states.select(rows), tokens, mask, prompt_mask, **kwargs)
        embeds, mask = self.embed(input_ids, attention_mask, inputs_embeds)
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
    prompt_first = True  # the pooler reads position 0, so the prompt stays in front even under left padding

    def __init__(self, base_model, config, tokenizer=None, modules_to_save=CLASSIFIER_HEAD_NAMES, initialize=True):
        super().__init__(base_model, config, tokenizer, modules_to_save, initialize)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, token_type_ids=None, **kwargs):
        embeds, mask = self.embed(input_ids, attention_mask, inputs_embeds)
        if token_type_ids is not None:
            token_type_ids = self.insert_prompt(token_type_ids, attention_mask, 0)
        kwargs.pop("position_ids", None)
        return self.base_model(inputs_embeds=embeds, attention_mask=mask, token_type_ids=token_type_ids,
                               position_ids=self.position_ids(mask), **kwargs)


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
    model_type = getattr(base_config, "model_type", None)
    max_positions = getattr(base_config, "max_position_embeddings", None)
    if model_type in ABSOLUTE_POSITION_MODEL_TYPES and max_positions is not None:
        offset = base_config.pad_token_id + 1 if model_type in PADDING_OFFSET_MODEL_TYPES else 0
        if config.num_virtual_tokens + config.max_length + offset > max_positions:
            raise ConfigError(
                f"num_virtual_tokens + max_length = {config.num_virtual_tokens + config.max_length} exceeds the "
                f"{max_positions - offset} positions of this {model_type} model: lower max_length."
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
