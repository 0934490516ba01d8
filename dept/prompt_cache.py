"""The prompt's KV cache for decoder-only models: computed once per adapter, reused by every request.

In a decoder-only model P sits in front of the input and attention is causal, so P's keys and values (and its
logits) never depend on the input. Positions count real tokens only, so P always holds positions 0..m-1,
whatever the padding side. P's states are therefore a constant of the adapter: compute them once, in eval mode,
and let each request prefill only its own tokens, at positions m, m+1, ..., attending to the m cached keys. A
forward's (batch, m + seq, vocab) logits are the uncached path's: P's cached logits and the tokens' own, put in its
layout by contiguous copies (`place_logits`).

The states follow the one caching rule of `dept.model` (recomputed after every train()/eval() call, load, move or
cast, adapter add or remove, and forward that needs gradients; `invalidate_caches()` after any other in-place
change), and are never keyed on tensor version counters or addresses, which fused optimizers and re-used memory
leave unchanged. An autocast switch gives states of another precision, so it recomputes them too.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .caching import builds_graph
from .embedding import real_token_position_ids
from .hf_compat import input_embedding_weight

if TYPE_CHECKING:
    from transformers import GenerationMixin, PreTrainedModel

    from .model import DePTModel

    class GenerativeModel(PreTrainedModel, GenerationMixin):
        """A Hugging Face model that generates (a decoder-only LM), for type checking only."""

# Forward arguments the cached path handles; any other (hidden states, attentions, a cache of the caller's own,
# logits_to_keep, ...) takes the uncached path, whose outputs cover the prompt positions too.
PROMPT_CACHE_FORWARD_ARGUMENTS = frozenset({"use_cache", "num_items_in_batch", "return_dict"})

CACHE_ARGUMENTS = ("cache", "past_key_values")  # a cache of the caller's own: it already holds the prompt

_CACHE_ARGUMENT: dict[type, str] = {}


def cache_argument(model: nn.Module) -> str:
    """The keyword under which this transformers version passes a KV cache: `cache`, or `past_key_values`
    before the rename."""
    kind = type(model)
    if kind not in _CACHE_ARGUMENT:
        parameters = inspect.signature(model.forward).parameters
        _CACHE_ARGUMENT[kind] = "cache" if "cache" in parameters else "past_key_values"
    return _CACHE_ARGUMENT[kind]


def computation_precision(model: PreTrainedModel) -> tuple:
    """The dtype and device the base computes in, autocast included: states computed in another are not reused."""
    weight = input_embedding_weight(model)
    device_type = weight.device.type
    autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    return weight.dtype, weight.device, autocast


@dataclass
class PromptStates:
    """Prompts' keys and values per layer, each (rows, kv_heads, width, head_dim), and logits (rows, width, vocab).

    Row i holds prompt i in its first m_i slots; with several prompts the slots after it are zeros, masked by
    the caller. States selected for a batch by an index keep the logits table whole: batch row i takes its
    logits from row `rows[i]` (they are only read by `place_logits`, so generation never copies them).
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    logits: torch.Tensor
    rows: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self.logits.shape[1]

    def select(self, rows: torch.Tensor | int, width: int | None = None) -> PromptStates:
        """The states for a batch: an int repeats the single prompt that many times (no copy); a (batch,)
        index picks each row's prompt. `width` keeps only the first slots."""
        width = self.width if width is None else width

        def pick(tensor):
            tensor = tensor[..., :width, :]
            if isinstance(rows, int):
                return tensor.expand(rows, *tensor.shape[1:])
            return tensor.index_select(0, rows)

        keys, values = tuple(map(pick, self.keys)), tuple(map(pick, self.values))
        if isinstance(rows, int):
            return PromptStates(keys, values, pick(self.logits))
        return PromptStates(keys, values, self.logits[:, :width], rows)  # the table, read row by row when placed

    def to_cache(self) -> DynamicCache:
        """A fresh transformers cache holding these states; generation appends to it, never to `self`."""
        cache = DynamicCache()
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            cache.update(keys, values, layer)
        return cache


@torch.no_grad()
def compute_prompt_states(base_model: PreTrainedModel, prompt: torch.Tensor) -> PromptStates | None:
    """Run the frozen `base_model` on the prompt alone, (m, d), at positions 0..m-1.

    Returns None for models whose cache is not plain keys and values per layer (sliding windows, linear
    attention, quantised caches): they keep the uncached path.
    """
    dtype = input_embedding_weight(base_model).dtype
    length = prompt.shape[0]
    positions = torch.arange(length, device=prompt.device).unsqueeze(0)
    output = base_model(inputs_embeds=prompt.to(dtype).unsqueeze(0), position_ids=positions,
                        attention_mask=torch.ones_like(positions), use_cache=True)
    cache = getattr(output, cache_argument(base_model), None)
    if not isinstance(cache, DynamicCache):
        return None
    keys, values = [], []
    for layer in cache.layers:  # plain DynamicLayers only: not a subclass such as a sliding window's
        if not isinstance(layer, DynamicLayer) or type(layer) is not DynamicLayer or layer.keys is None \
                or layer.values is None:
            return None
        keys.append(layer.keys)
        values.append(layer.values)
    return PromptStates(tuple(keys), tuple(values), output.logits)


def stack_prompt_states(states: list[PromptStates | None], width: int) -> PromptStates | None:
    """One table for several prompts, zero-padded to `width` slots; None stands for an empty prompt (m = 0)."""
    present = [s for s in states if s is not None]
    if not present:
        return None

    def stack(tensors: list[torch.Tensor | None]) -> torch.Tensor:
        """One (prompts, ..., width, features) table from each prompt's (1, ..., m, features) tensor."""
        sample = next(tensor for tensor in tensors if tensor is not None)
        table = sample.new_zeros(len(tensors), *sample.shape[1:-2], width, sample.shape[-1])
        for row, tensor in enumerate(tensors):
            if tensor is not None:
                table[row, ..., : tensor.shape[-2], :] = tensor[0]
        return table

    layers = range(len(present[0].keys))
    return PromptStates(tuple(stack([None if s is None else s.keys[i] for s in states]) for i in layers),
                        tuple(stack([None if s is None else s.values[i] for s in states]) for i in layers),
                        stack([None if s is None else s.logits for s in states]))


class PromptKVCache:
    """One prompt's states: computed at first use, kept until `clear()` (or a change of precision).

    `generation` counts the computations, so that tables stacked from several caches know when to restack.
    """

    def __init__(self):
        self._precision: tuple | None = None  # None: nothing computed since the last clear()
        self._states: PromptStates | None = None
        self.generation = 0

    def get(self, base_model: PreTrainedModel, compute: Callable[[], PromptStates | None]) -> PromptStates | None:
        precision = computation_precision(base_model)
        if precision != self._precision:
            self._states = compute()
            self._precision = precision
            self.generation += 1
        return self._states

    def clear(self) -> None:
        self._precision, self._states = None, None


def prompt_cache_applies(module: DePTModel, enabled: bool, kwargs: dict, generating: bool = False) -> bool:
    """The cached path runs in eval mode (the cached states are dropout-free), when nothing needs gradients
    through P, no cache of the caller's own is given, and (for a forward) only the plain outputs are asked for."""
    if generating:  # generation options pass through; a cache of the caller's or per-layer outputs do not
        kwargs = {key: value for key, value in kwargs.items()
                  if key in CACHE_ARGUMENTS or (key in ("output_hidden_states", "output_attentions") and value)}
    if not enabled or module.training or module.base_model.training:
        return False
    if not set(kwargs) <= PROMPT_CACHE_FORWARD_ARGUMENTS or kwargs.get("return_dict") is False:
        return False
    return not builds_graph(module)


def forward_after_prompt(base_model: nn.Module, states: PromptStates, token_embeds: torch.Tensor,
                         attention_mask: torch.Tensor, prompt_mask: torch.Tensor, **kwargs):
    """The base model's output over the input tokens alone, continuing from the prompts' cached states.

    `states` has one row per batch row; `prompt_mask` (batch, width) marks each row's prompt slots.
    """
    full_mask = torch.cat([prompt_mask.to(attention_mask.dtype), attention_mask], dim=1)
    position_ids = real_token_position_ids(full_mask, base_model.config)[:, prompt_mask.shape[1]:]
    return base_model(inputs_embeds=token_embeds, attention_mask=full_mask, position_ids=position_ids,
                      **{cache_argument(base_model): states.to_cache()}, **kwargs)


def placement_runs(layout: torch.Tensor | None, batch: int, width: int, seq: int) -> list[tuple[int, int, int, int]]:
    """`dept.embedding.place`'s order as contiguous runs: (row, start, source, length), each `length` positions
    taken from `source` in a row's `[prompt slots ; tokens]` to `start` in its output (one device-to-host sync)."""
    if layout is None:
        return [run for row in range(batch) for run in ((row, 0, 0, width), (row, width, width, seq))]
    starts_run = torch.ones_like(layout, dtype=torch.bool)
    starts_run[:, 1:] = (layout[:, 1:] - layout[:, :-1] != 1) | (layout[:, 1:] == width)  # the tokens start anew
    rows, starts = starts_run.nonzero(as_tuple=True)
    runs = list(zip(rows.tolist(), starts.tolist(), layout[rows, starts].tolist()))
    ends = [next_start if next_row == row else width + seq
            for (row, _, _), (next_row, next_start, _) in zip(runs, [*runs[1:], (None, 0, 0)])]
    return [(row, start, source, end - start) for (row, start, source), end in zip(runs, ends)]


def place_logits(states: PromptStates, token_logits: torch.Tensor, layout: torch.Tensor | None) -> torch.Tensor:
    """`dept.embedding.place` of the prompts' cached logits and the tokens' (batch, seq, vocab), by contiguous
    copies into one new (batch, width + seq, vocab) tensor: a gather over the vocabulary costs several copies."""
    (batch, seq, vocab), width = token_logits.shape, states.width
    prompt_logits = states.logits.to(token_logits.dtype)
    prompt_rows = range(batch) if states.rows is None else states.rows.tolist()
    output = token_logits.new_empty(batch, width + seq, vocab)
    for row, start, source, length in placement_runs(layout, batch, width, seq):
        if source < width:
            part = prompt_logits[prompt_rows[row], source:source + length]
        else:
            part = token_logits[row, source - width:source - width + length]
        output[row, start:start + length] = part
    return output


def with_prompt_logits(base_model: PreTrainedModel, output, states: PromptStates, layout: torch.Tensor | None, labels=None,
                       num_items_in_batch=None):
    """The output of the uncached path rebuilt: the prompts' cached logits put in front of the tokens' (in the
    routing's `layout`) and the loss over the whole prompted sequence, as the base model computes it."""
    logits = place_logits(states, output.logits, layout)
    loss = None
    if labels is not None:
        extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        loss = base_model.loss_function(logits=logits, labels=labels, vocab_size=base_model.config.vocab_size,
                                        **extra)
    return dataclasses.replace(output, logits=logits, loss=loss)


def generation_expand_size(base_model: nn.Module, kwargs: dict) -> int:
    """How many rows `generate` makes of each input (beams, returned sequences), as transformers computes it."""
    config = kwargs.get("generation_config") or base_model.generation_config
    num_beams = kwargs.get("num_beams", getattr(config, "num_beams", None)) or 1
    num_return_sequences = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", None)) or 1
    return max(num_beams, num_return_sequences)


def generate_after_prompt(base_model: GenerativeModel, states: PromptStates, token_embeds: torch.Tensor,
                          attention_mask: torch.Tensor, prompt_mask: torch.Tensor, **kwargs) -> torch.Tensor:
    """`base_model.generate` continuing from the prompts' cached states: the prefill runs on the input alone.

    `states` has one row per generated row (batch times `generation_expand_size`). transformers takes the
    embeddings of the whole sequence and skips the cached part, so zeros stand in for the prompt slots.
    """
    batch, width = prompt_mask.shape
    full_mask = torch.cat([prompt_mask.to(attention_mask.dtype), attention_mask], dim=1)
    placeholders = token_embeds.new_zeros(batch, width, token_embeds.shape[-1])
    return base_model.generate(inputs_embeds=torch.cat([placeholders, token_embeds], dim=1), attention_mask=full_mask,
                               position_ids=real_token_position_ids(full_mask, base_model.config),
                               **{cache_argument(base_model): states.to_cache()}, **kwargs)
