"""The DePT math, once: a short prompt P and a position-wise low-rank update A @ B of the input embeddings.

For the token at position i (the i-th *real* token of its row, pads not counted) of a row served by adapter a:

    E'_i = E_i + scaling_a * (A_a @ B_a)[i]      i < s = the row's real tokens <= max_length_a
    X    = concat(P_a, E')                        the mask gets m_a ones in front

with P (m x d) = `prompt_embeddings`, A (max_length x r) = `lora_embedding_A`, B (r x d) = `lora_embedding_B`,
m = `num_virtual_tokens`, r = `r`, s_max = `max_length` and scaling = lora_alpha / sqrt(r). `DePTEmbedding`
holds a bank of such adapters; a single adapter is a bank of one. Each step below is written once:
`real_token_positions` (i), `check_input_lengths` (s <= max_length), `prompt_layout` and `place` (where P goes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .config import ConfigError, DePTConfig
from .distributed import full_shape, gathered_parameters

# RoBERTa-family position ids start after the padding index.
PADDING_OFFSET_MODEL_TYPES = ("roberta", "xlm-roberta", "camembert")
DEFAULT_ADAPTER_NAME = "default"
ADAPTER_KEYS = ("prompt_embeddings", "lora_embedding_A", "lora_embedding_B")


class InputTooLongError(ValueError):
    """An input has more real tokens than the adapter's max_length covers."""


def invalidate_after_load(module: nn.Module, incompatible_keys) -> None:
    """A load_state_dict post-hook: whatever was loaded, the module's caches are recomputed."""
    module.invalidate_caches()


# ---------------------------------------------------------------------------------------------------------------
# The three steps, each in one function


def real_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """i: the index of each token among its row's real tokens (pads get 0), (batch, seq)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def real_token_position_ids(attention_mask: torch.Tensor, base_config) -> torch.Tensor:
    """The base model's position ids (batch, seq) over the mask's real tokens, so padding never shifts them."""
    positions = real_token_positions(attention_mask)
    if getattr(base_config, "model_type", None) in PADDING_OFFSET_MODEL_TYPES:
        positions = positions + base_config.pad_token_id + 1
    return positions


def check_input_lengths(lengths: torch.Tensor, max_lengths: int | torch.Tensor, adapter_names: Sequence[str],
                        adapter_index: torch.Tensor | None = None) -> int:
    """Refuse a row with more real tokens than its adapter's max_length; return the longest row's length.

    `max_lengths` is the one adapter's int, or each row's (batch,) limit. The longest length is the forward's
    one device-to-host sync (a bank of several adapters adds one more, for the per-row comparison).
    """
    longest = int(lengths.max()) if lengths.numel() else 0
    if isinstance(max_lengths, int):
        if longest <= max_lengths:
            return longest
        too_long = lengths > max_lengths
    else:
        too_long = lengths > max_lengths
        if not bool(too_long.any()):
            return longest
    row = int(too_long.nonzero()[0, 0])
    limit = max_lengths if isinstance(max_lengths, int) else int(max_lengths[row])
    name = adapter_names[0 if adapter_index is None else int(adapter_index[row])]
    raise InputTooLongError(
        f"Row {row} has {int(lengths[row])} tokens but its adapter {name!r} covers {limit} (its max_length is "
        f"{limit}). Truncate inputs to max_length (the pipelines set the tokenizer's max_length from the adapter "
        "config), or train an adapter with a larger max_length."
    )


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


@dataclass
class PromptRouting:
    """Which adapter each row of a batch uses and where its prompt goes.

    Attributes:
        adapter_index: (batch,) each row's adapter in the bank, or None when every row uses the bank's one
            adapter (the fast path: no gather, no per-row mask).
        num_virtual_tokens: each row's m_i, (batch,), or the one adapter's m.
        width: the batch's prompt slots, max m_i; a row with a shorter prompt gets masked empty slots.
        layout: gather index (batch, width + seq) from `[prompt slots ; tokens]` to the output order, or None.
    """

    adapter_index: torch.Tensor | None
    num_virtual_tokens: torch.Tensor | int
    width: int
    layout: torch.Tensor | None

    def prompt_mask(self, like: torch.Tensor) -> torch.Tensor:
        """(batch, width), dtype and device of `like`: 1 at each row's m_i prompt slots, 0 at its empty ones."""
        if self.adapter_index is None:
            return like.new_ones(like.shape[0], self.width)
        slots = torch.arange(self.width, device=like.device)
        return (slots.unsqueeze(0) < self.num_virtual_tokens.unsqueeze(1)).to(like.dtype)

    def prompted_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The (batch, width + seq) attention mask of the prompted sequence."""
        return place(self.prompt_mask(attention_mask), attention_mask, self.layout)

    def insert_prompt(self, per_token: torch.Tensor, fill_value) -> torch.Tensor:
        """Align labels or token types (batch, seq) with the prompted sequence, `fill_value` over the prompt."""
        prompt_part = per_token.new_full((per_token.shape[0], self.width), fill_value)
        return place(prompt_part, per_token, self.layout)


class DePTEmbedding(nn.Module):
    """A bank of n DePT adapters applied to already-embedded inputs; a single adapter is a bank of one.

        E' = E + scaling_a * (A_a @ B_a)[position]   position = index of the token among the row's real tokens
        X  = concat(P_a, E')                         the mask gets m_a ones in front

    The bank stacks P as (n, m_max, d), A as (n, s_max, r_max) and B as (n, r_max, d), each adapter's slice
    zero-padded: its m_a prompt slots are masked, and the zero rows and columns of A and B leave A_a @ B_a
    exact. `scaling * (A @ B)` is one (n, s_max, d) table. A bank of one keeps its tensors without the bank
    axis, (m, d), (max_length, r), (r, d): the shapes of the saved files, of PEFT and of the official code, and
    its forward takes the fast path (no gather, no per-row mask).

    Position i is the i-th *real* token of a row, counted from the attention mask, so the result does not
    depend on the padding side or on how much padding the batch has. Pads get no update. With left padding
    the prompt goes right before the first real token (`[pads ; P ; E']`), so relative-position models
    such as T5 see the same distances as without padding; `prompt_first=True` keeps P at position 0
    for classifiers whose pooler reads it.

    Shapes:
        inputs_embeds: (batch, seq, d); attention_mask: (batch, seq) of 0/1; adapter_index: (batch,) or None.
        returns (batch, width + seq, d) embeddings and a (batch, width + seq) mask, width = the rows' longest m.

    Example:
        >>> from dept import DePTConfig
        >>> layer = DePTEmbedding(DePTConfig(num_virtual_tokens=4, r=2, max_length=16, prompt_init="random"), 8)
        >>> embeds, mask = layer(torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.long))
        >>> tuple(embeds.shape), tuple(mask.shape)
        ((3, 9, 8), (3, 9))
        >>> bank = DePTEmbedding([DePTConfig(num_virtual_tokens=4, r=2, max_length=16),
        ...                       DePTConfig(num_virtual_tokens=0, r=3, max_length=8)], 8, names=["a", "b"])
        >>> tuple(bank.prompt_embeddings.shape), tuple(bank.embedding_update().shape)
        ((2, 4, 8), (2, 16, 8))
        >>> embeds, mask = bank(torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.long), torch.tensor([1, 0, 1]))
        >>> mask.tolist()[0]  # adapter "b" has no prompt: its 4 slots are masked
        [0, 0, 0, 0, 1, 1, 1, 1, 1]
    """

    def __init__(self, configs: DePTConfig | Sequence[DePTConfig], token_dim: int,
                 names: Sequence[str] | None = None):
        super().__init__()
        configs = [configs] if isinstance(configs, DePTConfig) else list(configs)
        names = [DEFAULT_ADAPTER_NAME] if names is None and len(configs) == 1 else list(names or [])
        if len(names) != len(configs):
            raise ValueError(f"A bank of {len(configs)} adapters needs {len(configs)} names, got {names}.")
        self.configs, self.names, self.token_dim = configs, names, token_dim
        # m, s_max and r: the bank's widths (a bank of one: its adapter's own).
        self.num_virtual_tokens = max((c.num_virtual_tokens for c in configs), default=0)
        self.max_length = max((c.max_length for c in configs), default=0)
        self.r = max((c.r for c in configs), default=0)
        bank = () if len(configs) == 1 else (len(configs),)
        self.prompt_embeddings = nn.Parameter(torch.zeros(*bank, self.num_virtual_tokens, token_dim))
        self.lora_embedding_A = nn.Parameter(torch.zeros(*bank, self.max_length, self.r))
        self.lora_embedding_B = nn.Parameter(torch.zeros(*bank, self.r, token_dim))
        if len(configs) == 1:
            self.scaling = configs[0].scaling
        else:
            self.register_buffer("scaling", torch.tensor([c.scaling for c in configs]).view(-1, 1, 1),
                                 persistent=False)
            self.register_buffer("adapter_num_virtual_tokens", torch.tensor(
                [c.num_virtual_tokens for c in configs], dtype=torch.long), persistent=False)
            self.register_buffer("adapter_max_lengths", torch.tensor([c.max_length for c in configs],
                                                                     dtype=torch.long), persistent=False)
        self._cached_update: torch.Tensor | None = None
        self.register_load_state_dict_post_hook(invalidate_after_load)
        self.reset_lora_parameters()

    @property
    def num_adapters(self) -> int:
        return len(self.configs)

    def adapter_tensors(self, index: int = 0) -> dict[str, torch.Tensor]:
        """Adapter `index`'s P (m, d), A (max_length, r) and B (r, d): views into the bank, under the file keys."""
        if self.num_adapters == 1:  # the parameters themselves (also a ZeRO-3 shard, which cannot be sliced)
            return {key: getattr(self, key) for key in ADAPTER_KEYS}
        config = self.configs[index]
        m, s, r = config.num_virtual_tokens, config.max_length, config.r
        P, A, B = self.prompt_embeddings[index], self.lora_embedding_A[index], self.lora_embedding_B[index]
        return {"prompt_embeddings": P[:m], "lora_embedding_A": A[:s, :r], "lora_embedding_B": B[:r]}

    # ----------------------------------------------------------------------------------------------------------
    # Initialisation
    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None, index: int | None = None) -> None:
        """A ~ Kaiming-uniform(a=sqrt(5)), i.e. U(-1/sqrt(r), 1/sqrt(r)); B = 0, so A @ B = 0 at step 0."""
        for i in range(self.num_adapters) if index is None else [index]:
            tensors, r = self.adapter_tensors(i), self.configs[i].r
            if r > 0:
                bound = 1.0 / math.sqrt(r)
                tensors["lora_embedding_A"].uniform_(-bound, bound, generator=generator)
            tensors["lora_embedding_B"].zero_()

    @torch.no_grad()
    def initialize(self, word_embeddings: torch.Tensor | None = None, tokenizer=None,
                   prompt_bound: float | None = None) -> None:
        """Every adapter's initialisation, from a generator seeded with its `init_seed`: A and B as in
        `reset_lora_parameters`, then P by its `prompt_init`:

        - "text": the frozen `word_embeddings` (the (vocab, d) table) of `prompt_init_text`, tokenized with its
          special tokens as the official code does (for T5 the ids end in </s>), tiled and cut to m tokens;
        - "vocab": the embeddings of m tokens drawn uniformly from the vocabulary;
        - "random": N(0, 1) times the table's standard deviation; or U(-prompt_bound, prompt_bound) when a bound
          is given (VPT's initialisation of a visual prompt, which has no vocabulary).
        """
        for index, config in enumerate(self.configs):
            generator = torch.Generator().manual_seed(config.init_seed)
            self.reset_lora_parameters(generator, index)
            prompt, m = self.adapter_tensors(index)["prompt_embeddings"], config.num_virtual_tokens
            if m == 0:
                continue
            if prompt_bound is not None:
                prompt.copy_(torch.empty(prompt.shape).uniform_(-prompt_bound, prompt_bound, generator=generator))
                continue
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

    # ----------------------------------------------------------------------------------------------------------
    # The update table
    def embedding_update(self, length: int | None = None) -> torch.Tensor:
        """scaling * (A @ B)[:length]: (length, d) for a bank of one, (n, length, d) for a bank.

        In eval mode without autograd the full table is computed once and reused until `invalidate_caches()`,
        which every train()/eval() call, load_state_dict, move or cast, and forward that needs gradients does
        (see `dept.model` for the rule); in training mode it is computed afresh at every call.
        """
        length = self.max_length if length is None else length
        A, B = self.lora_embedding_A, self.lora_embedding_B
        if self.training or (torch.is_grad_enabled() and (A.requires_grad or B.requires_grad)):
            self._cached_update = None  # a graph through A and B: a step may follow
            return (A[..., :length, :] @ B) * self.scaling
        if self._cached_update is None:
            self._cached_update = (A @ B) * self.scaling
        return self._cached_update[..., :length, :]

    def invalidate_caches(self) -> None:
        """Drop the cached table; the next eval call computes it from the current A and B."""
        self._cached_update = None

    def train(self, mode: bool = True):
        super().train(mode)
        self.invalidate_caches()
        return self

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        self.invalidate_caches()  # a move or a cast
        return result

    # ----------------------------------------------------------------------------------------------------------
    # The forward, in three steps
    def _single(self, adapter_index: torch.Tensor | None) -> bool:
        """Whether every row uses the bank's one adapter, so the fast path applies."""
        if adapter_index is None:
            if self.num_adapters != 1:
                raise ValueError(f"This bank holds {self.num_adapters} adapters {self.names}: pass each row's "
                                 "adapter_index.")
            return True
        return self.num_adapters == 1

    def route(self, attention_mask: torch.Tensor, adapter_index: torch.Tensor | None = None,
              prompt_first: bool = False) -> PromptRouting:
        """Each row's adapter and where its prompt goes, for a (batch, seq) attention mask."""
        mask = attention_mask.long()
        if self._single(adapter_index):
            m = self.num_virtual_tokens
            return PromptRouting(None, m, m, None if prompt_first else prompt_layout(mask, m, m))
        num_virtual_tokens = self.adapter_num_virtual_tokens[adapter_index]
        width = int(num_virtual_tokens.max()) if num_virtual_tokens.numel() else 0
        return PromptRouting(adapter_index, num_virtual_tokens, width,
                             prompt_layout(mask, num_virtual_tokens, width, prompt_first))

    def update_tokens(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                      adapter_index: torch.Tensor | None = None) -> torch.Tensor:
        """E' = E + scaling * (A @ B)[position], (batch, seq, d), without the prompt; pads are left unchanged."""
        mask = attention_mask.to(torch.long)
        positions, lengths = real_token_positions(mask), mask.sum(dim=1)
        if self._single(adapter_index):
            longest = check_input_lengths(lengths, self.max_length, self.names)
            if self.r == 0:
                return inputs_embeds
            update = self.embedding_update(max(longest, 1)).to(inputs_embeds.dtype)[positions]
        else:
            check_input_lengths(lengths, self.adapter_max_lengths[adapter_index], self.names, adapter_index)
            if self.r == 0:
                return inputs_embeds
            update = self.embedding_update()[adapter_index.unsqueeze(1), positions].to(inputs_embeds.dtype)
        return inputs_embeds + update * mask.unsqueeze(-1).to(inputs_embeds.dtype)

    def with_prompts(self, tokens: torch.Tensor, attention_mask: torch.Tensor,
                     routing: PromptRouting) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's P put in front of its E' in the routing's layout: (batch, width + seq, d) and the mask."""
        batch = tokens.shape[0]
        if routing.adapter_index is None:
            prompts = self.prompt_embeddings.to(tokens.dtype).unsqueeze(0).expand(batch, -1, -1)
        else:
            prompts = self.prompt_embeddings[routing.adapter_index, : routing.width].to(tokens.dtype)
        return place(prompts, tokens, routing.layout), routing.prompted_mask(attention_mask.long())

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                adapter_index: torch.Tensor | None = None, prompt_first: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        routing = self.route(attention_mask, adapter_index, prompt_first)
        tokens = self.update_tokens(inputs_embeds, attention_mask, adapter_index)
        return self.with_prompts(tokens, attention_mask, routing)
