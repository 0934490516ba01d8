"""A bank of DePT adapters for mixed batches: each row of a batch through its own adapter, in one forward.

The bank stacks the n adapters' P as (n, m_max, d), A as (n, s_max, r_max) and B as (n, r_max, d), each
adapter's slice zero-padded: the zero rows and columns of A and B leave each A_a @ B_a exact, and a row's prompt
slots beyond its own m_a are masked. `scaling_a * (A_a @ B_a)` is one (n, s_max, d) table. Each row then takes
the steps of `dept.embedding` (the same functions), with its adapter's P, table row and max_length:

    E'_i = E_i + scaling_a * (A_a @ B_a)[i]      a = the row's adapter, i < s <= max_length_a
    X    = [P_a ; E']                            width = the longest m_a of the batch, empty slots masked

The bank serves saved adapters (`dept.MultiAdapterModel`): it is rebuilt on every add or remove
(`AdapterBank.stack`) and never trained, though gradients flow through it as through a single adapter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .caching import EvalCachingModule, builds_graph
from .config import DePTConfig
from .embedding import (
    ADAPTER_KEYS,
    PromptRouting,
    add_update,
    initialize_adapter,
    input_too_long,
    low_rank_update,
    prompt_layout,
    real_token_positions,
)


def check_row_lengths(lengths: torch.Tensor, max_lengths: torch.Tensor, adapter_index: torch.Tensor,
                      names: Sequence[str]) -> None:
    """Refuse a row with more real tokens than its own adapter's max_length (one device-to-host sync)."""
    too_long = lengths > max_lengths
    if bool(too_long.any()):
        row = int(too_long.nonzero()[0, 0])
        raise input_too_long(row, int(lengths[row]), int(max_lengths[row]), names[int(adapter_index[row])])


@dataclass
class BankRouting(PromptRouting):
    """Where each row's prompt goes when the rows have their own adapters.

    Attributes:
        adapter_index: (batch,) each row's adapter in the bank.
        num_virtual_tokens: each row's m_i, (batch,).
        prompt_width: the batch's prompt slots, max m_i; a row with a shorter prompt gets masked empty slots.
    """

    num_virtual_tokens: torch.Tensor  # type: ignore[assignment]  # a bank's m is per row: (batch,), not one int
    adapter_index: torch.Tensor
    prompt_width: int

    @property
    def width(self) -> int:
        return self.prompt_width

    def prompt_mask(self, like: torch.Tensor) -> torch.Tensor:
        slots = torch.arange(self.width, device=like.device)
        return (slots.unsqueeze(0) < self.num_virtual_tokens.unsqueeze(1)).to(like.dtype)

    def select_states(self, states, batch: int, expand: int = 1):
        return states.select(self.adapter_index.repeat_interleave(expand), self.width)


class AdapterBank(EvalCachingModule):
    """n DePT adapters stacked (see the module docstring), applied to already-embedded inputs row by row.

    Shapes:
        inputs_embeds: (batch, seq, d); attention_mask: (batch, seq) of 0/1; adapter_index: (batch,).
        returns (batch, width + seq, d) embeddings and a (batch, width + seq) mask, width = the rows' longest m.

    Example:
        >>> from dept import DePTConfig
        >>> bank = AdapterBank([DePTConfig(num_virtual_tokens=4, r=2, max_length=16),
        ...                     DePTConfig(num_virtual_tokens=0, r=3, max_length=8)], 8, names=["a", "b"])
        >>> tuple(bank.prompt_embeddings.shape), tuple(bank.embedding_update().shape)
        ((2, 4, 8), (2, 16, 8))
        >>> embeds, mask = bank(torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.long), torch.tensor([1, 0, 1]))
        >>> mask.tolist()[0]  # adapter "b" has no prompt: its 4 slots are masked
        [0, 0, 0, 0, 1, 1, 1, 1, 1]
    """

    scaling: torch.Tensor  # buffers, (n, 1, 1) and (n,)
    adapter_num_virtual_tokens: torch.Tensor
    adapter_max_lengths: torch.Tensor

    def __init__(self, configs: Sequence[DePTConfig], token_dim: int, names: Sequence[str]):
        super().__init__()
        if len(names) != len(configs):
            raise ValueError(f"A bank of {len(configs)} adapters needs {len(configs)} names, got {list(names)}.")
        self.configs, self.names, self.token_dim = list(configs), list(names), token_dim
        # The bank's widths: the longest m, s_max and r of its adapters.
        self.num_virtual_tokens = max((c.num_virtual_tokens for c in configs), default=0)
        self.max_length = max((c.max_length for c in configs), default=0)
        self.r = max((c.r for c in configs), default=0)
        n = len(configs)
        self.prompt_embeddings = nn.Parameter(torch.zeros(n, self.num_virtual_tokens, token_dim))
        self.lora_embedding_A = nn.Parameter(torch.zeros(n, self.max_length, self.r))
        self.lora_embedding_B = nn.Parameter(torch.zeros(n, self.r, token_dim))
        self.register_buffer("scaling", torch.tensor([c.scaling for c in configs]).view(-1, 1, 1), persistent=False)
        self.register_buffer("adapter_num_virtual_tokens", torch.tensor(
            [c.num_virtual_tokens for c in configs], dtype=torch.long), persistent=False)
        self.register_buffer("adapter_max_lengths", torch.tensor([c.max_length for c in configs], dtype=torch.long),
                             persistent=False)
        self._cached_update: torch.Tensor | None = None

    @classmethod
    @torch.no_grad()
    def stack(cls, adapters: Sequence[tuple[str, DePTConfig, Mapping[str, torch.Tensor]]],
              token_dim: int) -> AdapterBank:
        """A frozen bank holding `adapters` (name, config, P/A/B tensors under the file keys)."""
        bank = cls([config for _, config, _ in adapters], token_dim, [name for name, _, _ in adapters])
        for index, (_, _, tensors) in enumerate(adapters):
            for key, target in bank.adapter_tensors(index).items():
                target.copy_(tensors[key])
        return bank.requires_grad_(False)

    @property
    def num_adapters(self) -> int:
        return len(self.configs)

    def adapter_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """Adapter `index`'s P (m, d), A (max_length, r) and B (r, d): views into the bank, under the file keys."""
        config = self.configs[index]
        m, s, r = config.num_virtual_tokens, config.max_length, config.r
        P, A, B = self.prompt_embeddings[index], self.lora_embedding_A[index], self.lora_embedding_B[index]
        return dict(zip(ADAPTER_KEYS, (P[:m], A[:s, :r], B[:r])))

    def initialize(self, word_embeddings: torch.Tensor | None = None, tokenizer=None,
                   prompt_bound: float | None = None) -> None:
        """Each adapter initialised as it would be alone (`dept.embedding.initialize_adapter`)."""
        for index, config in enumerate(self.configs):
            initialize_adapter(self.adapter_tensors(index), config, word_embeddings, tokenizer, prompt_bound)

    # ----------------------------------------------------------------------------------------------------------
    # The update table, cached by the rule of `DePTEmbedding`
    def embedding_update(self) -> torch.Tensor:
        """scaling_a * (A_a @ B_a) for every adapter a, (n, s_max, d)."""
        A, B = self.lora_embedding_A, self.lora_embedding_B
        if builds_graph(self, A, B):
            self._cached_update = None
            return low_rank_update(A, B, self.scaling)
        if self._cached_update is None:
            self._cached_update = low_rank_update(A, B, self.scaling)
        return self._cached_update

    def invalidate_caches(self) -> None:
        self._cached_update = None

    # ----------------------------------------------------------------------------------------------------------
    # The forward, in the three steps of a single adapter, row by row
    def route(self, attention_mask: torch.Tensor, adapter_index: torch.Tensor,
              prompt_first: bool = False) -> BankRouting:
        """Each row's adapter and where its prompt goes, for a (batch, seq) attention mask."""
        num_virtual_tokens = self.adapter_num_virtual_tokens[adapter_index]
        width = int(num_virtual_tokens.max()) if num_virtual_tokens.numel() else 0
        layout = prompt_layout(attention_mask.long(), num_virtual_tokens, width, prompt_first)
        return BankRouting(num_virtual_tokens, layout, adapter_index, width)

    def update_tokens(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                      routing: BankRouting) -> torch.Tensor:
        """E' = E + scaling_a * (A_a @ B_a)[position] for each row's adapter a, (batch, seq, d)."""
        mask, index = attention_mask.long(), routing.adapter_index
        check_row_lengths(mask.sum(dim=1), self.adapter_max_lengths[index], index, self.names)
        if self.r == 0:
            return inputs_embeds
        return add_update(inputs_embeds, self.embedding_update()[index.unsqueeze(1), real_token_positions(mask)], mask)

    def with_prompts(self, tokens: torch.Tensor, attention_mask: torch.Tensor,
                     routing: BankRouting) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's P in front of its E': (batch, width + seq, d) and the mask, empty slots masked."""
        prompts = self.prompt_embeddings[routing.adapter_index, : routing.width].to(tokens.dtype)
        return routing.place(prompts, tokens), routing.prompted_mask(attention_mask.long())

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, adapter_index: torch.Tensor,
                prompt_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        routing = self.route(attention_mask, adapter_index, prompt_first)
        return self.with_prompts(self.update_tokens(inputs_embeds, attention_mask, routing), attention_mask, routing)
