"""The rule that keeps eval caches from going stale, written once.

A cached value (the `scaling * A @ B` table, the prompt KV cache) is dropped at every train()/eval() call,
`load_state_dict`, move or cast (`_apply`), and whenever a call builds a graph through the trainable weights (an
optimizer step may follow). It is never keyed on tensor version counters, which fused and foreach optimizers do
not bump. After any other in-place change of the weights in eval mode, call `invalidate_caches()`.
"""

from __future__ import annotations

import torch
from torch import nn


def builds_graph(module: nn.Module, *parameters: torch.Tensor) -> bool:
    """Whether a call would build a graph through `parameters` (every parameter of `module` when none are
    given): in training mode, or with autograd on and one of them trainable. An optimizer step may follow."""
    if module.training:
        return True
    return torch.is_grad_enabled() and any(p.requires_grad for p in (parameters or module.parameters()))


class EvalCachingModule(nn.Module):
    """An `nn.Module` whose `invalidate_caches()` runs at every train()/eval() call, move or cast, and
    `load_state_dict` (of this module or of one that holds it). Subclasses drop their caches there."""

    def __init__(self) -> None:
        super().__init__()
        self.register_load_state_dict_post_hook(_invalidate_after_load)

    def invalidate_caches(self) -> None:
        """Drop every cached value; the next eval call recomputes it from the current weights."""

    def train(self, mode: bool = True):
        super().train(mode)
        self.invalidate_caches()
        return self

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        self.invalidate_caches()  # a move or a cast
        return result


def _invalidate_after_load(module: EvalCachingModule, incompatible_keys) -> None:
    module.invalidate_caches()  # whatever was loaded
