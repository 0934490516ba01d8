"""The DePT math, once: a short prompt P and a position-wise low-rank update A @ B of the input embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import DePTConfig

# RoBERTa-family position ids start after the padding index.
PADDING_OFFSET_MODEL_TYPES = ("roberta", "xlm-roberta", "camembert")


class InputTooLongError(ValueError):
    """An input has more real tokens than the adapter's max_length covers."""


class DePTEmbedding(nn.Module):
    """Applies DePT to already-embedded inputs.

        E' = E + scaling * (A @ B)[position]      position = index of the token among the row's real tokens
        X  = concat(P, E')                       the mask gets m ones in front

    Position i is the i-th *real* token of a row, counted from the attention mask, so the result does not
    depend on the padding side or on how much padding the batch has. Pads get no update. With left padding
    the prompt goes right before the first real token (`[pads ; P ; E']`), so relative-position models
    such as T5 see the same distances as without padding; `prompt_first=True` keeps `[P ; pads ; E']`
    for classifiers whose pooler reads position 0.

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
        self.num_virtual_tokens = config.num_virtual_tokens
        self.r = config.r
        self.max_length = config.max_length
        self.scaling = config.scaling
        self.prompt_embeddings = nn.Parameter(torch.zeros(config.num_virtual_tokens, token_dim))
        self.lora_embedding_A = nn.Parameter(torch.zeros(config.max_length, config.r))
        self.lora_embedding_B = nn.Parameter(torch.zeros(config.r, token_dim))
        self._cached_update: torch.Tensor | None = None
        self._cache_key: tuple | None = None
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """A ~ Kaiming-uniform(a=sqrt(5)), i.e. U(-1/sqrt(r), 1/sqrt(r)); B = 0, so A @ B = 0 at step 0."""
        if self.r > 0:
            bound = 1.0 / math.sqrt(self.r)
            self.lora_embedding_A.uniform_(-bound, bound, generator=generator)
        self.lora_embedding_B.zero_()

    def embedding_update(self, length: int | None = None) -> torch.Tensor:
        """scaling * (A @ B)[:length], shape (length, d).

        In eval mode without autograd the full table is computed once and reused until A or B change
        (tracked by their in-place version counters, which optimizer steps and loads bump).
        """
        length = self.max_length if length is None else length
        A, B = self.lora_embedding_A, self.lora_embedding_B
        if self.training or (torch.is_grad_enabled() and (A.requires_grad or B.requires_grad)):
            return (A[:length] @ B) * self.scaling
        key = (A._version, B._version, A.data_ptr(), B.data_ptr(), A.device, A.dtype, B.dtype)
        if self._cache_key != key:
            self._cached_update = (A @ B) * self.scaling
            self._cache_key = key
        return self._cached_update[:length]

    def real_token_positions(self, attention_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Index of each token among its row's real tokens (pads get 0), and the longest row's length.

        Raises if a row exceeds max_length. The length is the forward's one device-to-host sync.
        """
        lengths = attention_mask.sum(dim=1)
        longest = int(lengths.max()) if lengths.numel() else 0
        if longest > self.max_length:
            raise InputTooLongError(
                f"An input has {longest} tokens but the adapter's max_length is {self.max_length}. Truncate inputs "
                f"to max_length (the pipelines set the tokenizer's max_length from the adapter config), or train an "
                f"adapter with a larger max_length."
            )
        return (attention_mask.cumsum(dim=1) - 1).clamp(min=0), longest

    def prompt_layout(self, attention_mask: torch.Tensor, prompt_first: bool = False) -> torch.Tensor | None:
        """Gather index (batch, m + seq) from `[P ; tokens]` to the output order, or None when they agree.

        Rows with k leading pads become `[pads(k) ; P ; rest]`; right-padded rows need no reordering.
        """
        if prompt_first:
            return None
        return prompt_layout(attention_mask, self.num_virtual_tokens, self.num_virtual_tokens)

    @staticmethod
    def place(prompt_part: torch.Tensor, tokens: torch.Tensor, layout: torch.Tensor | None) -> torch.Tensor:
        """Concatenate a per-prompt-position and a per-token tensor along dim 1, in the layout's order."""
        combined = torch.cat([prompt_part, tokens], dim=1)
        if layout is None:
            return combined
        index = layout.view(*layout.shape, *([1] * (combined.dim() - 2))).expand_as(combined)
        return combined.gather(1, index)

    def insert_prompt(
        self, per_token: torch.Tensor, attention_mask: torch.Tensor, fill_value, prompt_first: bool = False
    ) -> torch.Tensor:
        """Align a per-token tensor (labels, token types) with the output: `fill_value` at the prompt."""
        prompt_part = per_token.new_full((per_token.shape[0], self.num_virtual_tokens), fill_value)
        return self.place(prompt_part, per_token, self.prompt_layout(attention_mask, prompt_first))

    def update_tokens(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """E' = E + scaling * (A @ B)[position], (batch, seq, d), without the prompt; pads are left unchanged."""
        mask = attention_mask.to(torch.long)
        positions, longest = self.real_token_positions(mask)
        if self.r == 0:
            return inputs_embeds
        update = self.embedding_update(max(longest, 1)).to(inputs_embeds.dtype)
        return inputs_embeds + update[positions] * mask.unsqueeze(-1).to(inputs_embeds.dtype)

    def forward(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, prompt_first: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq, _ = inputs_embeds.shape
        if attention_mask is None:
            attention_mask = torch.ones(batch, seq, dtype=torch.long, device=inputs_embeds.device)
        mask = attention_mask.to(torch.long)
        inputs_embeds = self.update_tokens(inputs_embeds, mask)
        prompt = self.prompt_embeddings.to(inputs_embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        layout = self.prompt_layout(mask, prompt_first)
        embeds = self.place(prompt, inputs_embeds, layout)
        return embeds, self.place(mask.new_ones(batch, self.num_virtual_tokens), attention_mask.to(mask.dtype), layout)


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


def real_token_position_ids(attention_mask: torch.Tensor, base_config) -> torch.Tensor:
    """Positions (batch, seq) counted over the mask's real tokens, so padding never shifts them."""
    positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    if getattr(base_config, "model_type", None) in PADDING_OFFSET_MODEL_TYPES:
        positions = positions + base_config.pad_token_id + 1
    return positions
