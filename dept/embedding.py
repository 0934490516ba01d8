"""The DePT math, once: a short prompt P and a position-wise low-rank update A @ B of the input embeddings.

For the token at position i (the i-th *real* token of its row, pads not counted):

    E'_i = E_i + scaling * (A @ B)[i]      i < s = the row's real tokens <= max_length
    X    = concat(P, E')                    the mask gets m ones in front

with P (m x d) = `prompt_embeddings`, A (max_length x r) = `lora_embedding_A`, B (r x d) = `lora_embedding_B`,
m = `num_virtual_tokens`, r = `r`, s_max = `max_length` and scaling = lora_alpha / sqrt(r). `DePTEmbedding` is one
such adapter. Each step is one function: `real_token_positions` (i), `check_input_lengths` (s <= max_length),
`prompt_layout` and `place` (where P goes), with `low_rank_update` and `add_update` for the formula;
`dept.bank.AdapterBank` applies the same functions to many adapters at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .caching import EvalCachingModule, builds_graph
from .config import ConfigError, DePTConfig
from .distributed import full_shape, gathered_parameters

# RoBERTa-family position ids start after the padding index.
PADDING_OFFSET_MODEL_TYPES = ("roberta", "xlm-roberta", "camembert")
DEFAULT_ADAPTER_NAME = "default"
ADAPTER_KEYS = ("prompt_embeddings", "lora_embedding_A", "lora_embedding_B")


class InputTooLongError(ValueError):
    """An input has more real tokens than the adapter's max_length covers."""


# ---------------------------------------------------------------------------------------------------------------
# The steps and the formula, each in one function


def real_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """i: the index of each token among its row's real tokens (pads get 0), (batch, seq)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def real_token_position_ids(attention_mask: torch.Tensor, base_config) -> torch.Tensor:
    """The base model's position ids (batch, seq) over the mask's real tokens, so padding never shifts them."""
    positions = real_token_positions(attention_mask)
    if getattr(base_config, "model_type", None) in PADDING_OFFSET_MODEL_TYPES:
        positions = positions + base_config.pad_token_id + 1
    return positions


def input_too_long(row: int, length: int, limit: int, name: str) -> InputTooLongError:
    return InputTooLongError(
        f"Row {row} has {length} tokens but its adapter {name!r} covers {limit} (its max_length is "
        f"{limit}). Truncate inputs to max_length (the pipelines set the tokenizer's max_length from the adapter "
        "config), or train an adapter with a larger max_length."
    )


def check_input_lengths(lengths: torch.Tensor, max_length: int, name: str = DEFAULT_ADAPTER_NAME) -> int:
    """Refuse a row with more real tokens than max_length; return the longest row's length (the forward's one
    device-to-host sync)."""
    longest = int(lengths.max()) if lengths.numel() else 0
    if longest > max_length:
        row = int((lengths > max_length).nonzero()[0, 0])
        raise input_too_long(row, int(lengths[row]), max_length, name)
    return longest


def prompt_layout(
    attention_mask: torch.Tensor, num_virtual_tokens: int | torch.Tensor, width: int, prompt_first: bool = False
) -> torch.Tensor | None:
    """Gather index (batch, width + seq) from `[prompt slots ; tokens]` to the output order, or None when equal.

    The prompt slots hold a row's m_i prompt vectors followed by `width - m_i` empty slots (several adapters
    padded to one width). A row with k leading pads becomes `[pads(k) ; empty slots ; P ; rest]`, so its
    prompt stays right before its first real token. With `prompt_first` (classifiers, whose pooler reads
    position 0) a row becomes `[P ; real tokens ; pads ; empty slots]`, so position 0 holds P, or the first
    real token when m_i = 0, whatever the padding side.

    Shapes: attention_mask (batch, seq); num_virtual_tokens an int or (batch,) per-row m_i <= width.
    """
    seq = attention_mask.shape[1]
    m = torch.as_tensor(num_virtual_tokens, device=attention_mask.device).reshape(-1, 1)
    empty_slots = width - m
    t = torch.arange(width + seq, device=attention_mask.device).unsqueeze(0)
    leading_pads = (attention_mask.cumsum(dim=1) == 0).sum(dim=1, keepdim=True)
    if not bool(leading_pads.any()) and not bool(empty_slots.any()):
        return None
    if prompt_first:
        real_end = m + seq - leading_pads
        return torch.where(
            t < m,
            t,  # P
            torch.where(
                t < real_end,
                t - m + leading_pads + width,  # the real tokens
                torch.where(t < m + seq, t - real_end + width, t - seq),  # the leading pads, then empty slots
            ),
        )
    return torch.where(
        t < leading_pads,
        t + width,  # the row's leading pads
        torch.where(
            t < leading_pads + empty_slots,
            t - leading_pads + m,  # empty prompt slots m_i .. width - 1
            torch.where(t < leading_pads + width, t - leading_pads - empty_slots, t),  # P, then the real tokens
        ),
    )


def place(prompt_part: torch.Tensor, tokens: torch.Tensor, layout: torch.Tensor | None) -> torch.Tensor:
    """Concatenate a per-prompt-slot and a per-token tensor along dim 1, in the layout's order."""
    combined = torch.cat([prompt_part, tokens], dim=1)
    if layout is None:
        return combined
    index = layout.view(*layout.shape, *([1] * (combined.dim() - 2))).expand_as(combined)
    return combined.gather(1, index)


def low_rank_update(A: torch.Tensor, B: torch.Tensor, scaling: float | torch.Tensor) -> torch.Tensor:
    """scaling * (A @ B): (s, d) from A (s, r) and B (r, d); batched over leading dimensions."""
    return (A @ B) * scaling


def add_update(inputs_embeds: torch.Tensor, update: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """E' = E + update at the real tokens, (batch, seq, d); `update` is (batch, seq, d), pads are left unchanged."""
    return inputs_embeds + update.to(inputs_embeds.dtype) * attention_mask.unsqueeze(-1).to(inputs_embeds.dtype)


@torch.no_grad()
def reset_lora(A: torch.Tensor, B: torch.Tensor, r: int, generator: torch.Generator | None = None) -> None:
    """A ~ Kaiming-uniform(a=sqrt(5)), i.e. U(-1/sqrt(r), 1/sqrt(r)); B = 0, so A @ B = 0 at step 0."""
    if r > 0:
        bound = 1.0 / math.sqrt(r)
        A.uniform_(-bound, bound, generator=generator)
    B.zero_()


@torch.no_grad()
def initialize_adapter(tensors: dict[str, torch.Tensor], config: DePTConfig, word_embeddings: torch.Tensor | None,
                       tokenizer=None, prompt_bound: float | None = None) -> None:
    """An adapter's initialisation, in place, from a generator seeded with its `init_seed`: A and B by
    `reset_lora`, then P by its `prompt_init`:

    - "text": the frozen `word_embeddings` (the (vocab, d) table) of `prompt_init_text`, tokenized with its
      special tokens as the official code does (for T5 the ids end in </s>), tiled and cut to m tokens;
    - "vocab": the embeddings of m tokens drawn uniformly from the vocabulary;
    - "random": N(0, 1) times the table's standard deviation; or U(-prompt_bound, prompt_bound) when a bound
      is given (VPT's initialisation of a visual prompt, which has no vocabulary).
    """
    generator = torch.Generator().manual_seed(config.init_seed)
    reset_lora(tensors["lora_embedding_A"], tensors["lora_embedding_B"], config.r, generator)
    prompt, m = tensors["prompt_embeddings"], config.num_virtual_tokens
    if m == 0:
        return
    if prompt_bound is not None:
        prompt.copy_(torch.empty(prompt.shape).uniform_(-prompt_bound, prompt_bound, generator=generator))
        return
    if word_embeddings is None:
        raise ConfigError(f"prompt_init={config.prompt_init!r} reads the frozen word embeddings: pass "
                          "word_embeddings=..., or prompt_bound=... for a prompt without a vocabulary.")
    vocab_size, token_dim = full_shape(word_embeddings)
    if config.prompt_init == "text":
        if tokenizer is None:
            raise ConfigError(
                "prompt_init='text' needs the tokenizer to embed prompt_init_text: pass tokenizer=..., "
                "or use prompt_init='vocab' or 'random'."
            )
        token_ids = tokenizer(config.prompt_init_text)["input_ids"]
        if not token_ids:
            raise ConfigError(f"prompt_init_text {config.prompt_init_text!r} tokenizes to nothing.")
        repeats = -(-m // len(token_ids))  # tile the text, then cut to m tokens, as the official code does
        ids = torch.tensor((token_ids * repeats)[:m])
    elif config.prompt_init == "vocab":
        ids = torch.randint(0, vocab_size, (m,), generator=generator)
    else:
        ids = None
        noise = torch.randn(m, token_dim, generator=generator)
    # Under ZeRO-3 (zero3_init_flag) the frozen table is a size-0 shard on each rank: gather it to read rows.
    with gathered_parameters([word_embeddings]):
        if ids is None:
            prompt.copy_(noise * word_embeddings.float().std().cpu())
        else:
            prompt.copy_(word_embeddings[ids.to(word_embeddings.device)].float())


# ---------------------------------------------------------------------------------------------------------------
# Where the prompt goes in a batch


@dataclass
class PromptRouting:
    """Where the prompt of a (batch, seq) input goes: m prompt slots in front of each row's first real token
    (or at position 0, `prompt_first`), in the order of `layout` (None: `[P ; tokens]` as they are)."""

    num_virtual_tokens: int
    layout: torch.Tensor | None

    @property
    def width(self) -> int:
        """The prompt slots of each row."""
        return self.num_virtual_tokens

    def place(self, prompt_part: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return place(prompt_part, tokens, self.layout)

    def prompt_mask(self, like: torch.Tensor) -> torch.Tensor:
        """(batch, width), dtype and device of `like`: 1 at each row's prompt slots."""
        return like.new_ones(like.shape[0], self.width)

    def prompted_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The (batch, width + seq) attention mask of the prompted sequence."""
        return self.place(self.prompt_mask(attention_mask), attention_mask)

    def insert_prompt(self, per_token: torch.Tensor, fill_value) -> torch.Tensor:
        """Align labels or token types (batch, seq) with the prompted sequence, `fill_value` over the prompt."""
        return self.place(per_token.new_full((per_token.shape[0], self.width), fill_value), per_token)

    def select_states(self, states, batch: int, expand: int = 1):
        """The prompt's cached states (`dept.prompt_cache.PromptStates`) for each of `batch * expand` rows."""
        return states.select(batch * expand)


# ---------------------------------------------------------------------------------------------------------------
# One adapter


class DePTEmbedding(EvalCachingModule):
    """One DePT adapter applied to already-embedded inputs:

        E' = E + scaling * (A @ B)[position]   position = index of the token among the row's real tokens
        X  = concat(P, E')                     the mask gets m ones in front

    P is (m, d), A (max_length, r), B (r, d): the shapes of the saved files, of PEFT and of the official code.
    Position i is the i-th *real* token of a row, counted from the attention mask, so the result does not
    depend on the padding side or on how much padding the batch has. Pads get no update. With left padding
    the prompt goes right before the first real token (`[pads ; P ; E']`), so relative-position models
    such as T5 see the same distances as without padding; `prompt_first=True` puts P at position 0, then the
    real tokens, for classifiers whose pooler reads position 0.

    In eval mode without autograd the `scaling * A @ B` table is computed once, and recomputed after every
    train()/eval() call, load_state_dict, move or cast, call that needs gradients through A and B, and
    `invalidate_caches()`; in training mode it is computed at every call.

    Shapes:
        inputs_embeds: (batch, seq, d); attention_mask: (batch, seq) of 0/1.
        returns (batch, m + seq, d) embeddings and a (batch, m + seq) mask.

    Example:
        >>> from dept import DePTConfig
        >>> layer = DePTEmbedding(DePTConfig(num_virtual_tokens=4, r=2, max_length=16, prompt_init="random"), 8)
        >>> embeds, mask = layer(torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.long))
        >>> tuple(embeds.shape), tuple(mask.shape)
        ((3, 9, 8), (3, 9))
    """

    def __init__(self, config: DePTConfig, token_dim: int):
        super().__init__()
        self.config, self.token_dim = config, token_dim
        self.num_virtual_tokens, self.max_length, self.r = config.num_virtual_tokens, config.max_length, config.r
        self.scaling = config.scaling
        self.prompt_embeddings = nn.Parameter(torch.zeros(self.num_virtual_tokens, token_dim))
        self.lora_embedding_A = nn.Parameter(torch.zeros(self.max_length, self.r))
        self.lora_embedding_B = nn.Parameter(torch.zeros(self.r, token_dim))
        self._cached_update: torch.Tensor | None = None
        self.reset_lora_parameters()

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """P, A and B under the file keys: the parameters themselves (also a ZeRO-3 shard, which cannot be sliced)."""
        return {key: getattr(self, key) for key in ADAPTER_KEYS}

    # ----------------------------------------------------------------------------------------------------------
    # Initialisation
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        reset_lora(self.lora_embedding_A, self.lora_embedding_B, self.r, generator)

    def initialize(self, word_embeddings: torch.Tensor | None = None, tokenizer=None,
                   prompt_bound: float | None = None) -> None:
        """P, A and B as `initialize_adapter` says, from the frozen (vocab, d) `word_embeddings`."""
        initialize_adapter(self.adapter_tensors(), self.config, word_embeddings, tokenizer, prompt_bound)

    # ----------------------------------------------------------------------------------------------------------
    # The update table
    def embedding_update(self, length: int | None = None) -> torch.Tensor:
        """scaling * (A @ B)[:length], (length, d)."""
        length = self.max_length if length is None else length
        A, B = self.lora_embedding_A, self.lora_embedding_B
        if builds_graph(self, A, B):
            self._cached_update = None  # a step may follow
            return low_rank_update(A[:length], B, self.scaling)
        if self._cached_update is None:
            self._cached_update = low_rank_update(A, B, self.scaling)
        return self._cached_update[:length]

    def invalidate_caches(self) -> None:
        """Drop the cached table; the next eval call computes it from the current A and B."""
        self._cached_update = None

    # ----------------------------------------------------------------------------------------------------------
    # The forward, in three steps
    def route(self, attention_mask: torch.Tensor, prompt_first: bool = False) -> PromptRouting:
        """Where the prompt goes, for a (batch, seq) attention mask."""
        m = self.num_virtual_tokens
        return PromptRouting(m, prompt_layout(attention_mask.long(), m, m, prompt_first))

    def update_tokens(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """E' = E + scaling * (A @ B)[position], (batch, seq, d), without the prompt; pads are left unchanged."""
        mask = attention_mask.long()
        longest = check_input_lengths(mask.sum(dim=1), self.max_length)
        if self.r == 0:
            return inputs_embeds
        return add_update(inputs_embeds, self.embedding_update(max(longest, 1))[real_token_positions(mask)], mask)

    def with_prompts(self, tokens: torch.Tensor, attention_mask: torch.Tensor,
                     routing: PromptRouting) -> tuple[torch.Tensor, torch.Tensor]:
        """P put in front of E' in the routing's layout: (batch, m + seq, d) and the (batch, m + seq) mask."""
        prompts = self.prompt_embeddings.to(tokens.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return routing.place(prompts, tokens), routing.prompted_mask(attention_mask.long())

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                prompt_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        routing = self.route(attention_mask, prompt_first)
        return self.with_prompts(self.update_tokens(inputs_embeds, attention_mask), attention_mask, routing)
