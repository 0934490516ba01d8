"""The optimizer and the schedule of a DePT run: AdamW over the model's parameter groups, one warmup/decay schedule.

DePT trains two kinds of parameters at very different learning rates: the prompt P (about 3e-1) and the low-rank
pair A, B (about 1e-4). A model that knows its groups says so through
`optimizer_param_groups(learning_rate, lora_embedding_lr, weight_decay)`; any other model trains every parameter
that requires a gradient at `learning_rate`. One schedule scales every group.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dept.training_args import TrainingArguments


def parameter_groups(model: nn.Module, args: TrainingArguments) -> list[dict]:
    """The model's own groups, or one group of every trainable parameter at `args.learning_rate`.

    Each group is a dict for `torch.optim.AdamW` with `params`, `lr`, `weight_decay` and a `name` used in logs.
    """
    own_groups = getattr(model, "optimizer_param_groups", None)
    if own_groups is not None:
        groups = own_groups(
            learning_rate=args.learning_rate,
            lora_embedding_lr=args.lora_embedding_lr,
            weight_decay=args.weight_decay,
        )
    else:
        groups = [{"params": trainable_parameters(model), "lr": args.learning_rate, "weight_decay": args.weight_decay}]
    groups = [dict(group, params=list(group["params"])) for group in groups]
    groups = [group for group in groups if group["params"]]  # e.g. r = 0 leaves the A/B group empty
    if not groups:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameter: every parameter has requires_grad=False. "
            "Attach an adapter (or unfreeze something) before training."
        )
    grouped = {id(p) for group in groups for p in group["params"]}
    # An empty tensor (P with num_virtual_tokens=0) has nothing to update and needs no group.
    left_out = [
        name for name, p in model.named_parameters() if p.requires_grad and p.numel() > 0 and id(p) not in grouped
    ]
    if left_out:
        raise ValueError(
            f"{type(model).__name__}.optimizer_param_groups leaves trainable parameters out of every group, so they "
            f"would never be updated: {left_out[:5]}. Put them in a group, or set requires_grad=False on them."
        )
    for index, group in enumerate(groups):
        group.setdefault("name", f"group_{index}")
        group.setdefault("weight_decay", args.weight_decay)
        if any(not p.requires_grad for p in group["params"]):
            raise ValueError(f"Parameter group {group['name']!r} holds a frozen parameter (requires_grad=False).")
    return groups


def build_optimizer(model: nn.Module, args: TrainingArguments) -> torch.optim.AdamW:
    """AdamW over `parameter_groups(model, args)`; each group keeps its own learning rate."""
    return torch.optim.AdamW(parameter_groups(model, args), lr=args.learning_rate, weight_decay=args.weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, args: TrainingArguments, num_training_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """One schedule (linear warmup over `args.warmup_steps`, then `args.lr_scheduler_type`) scaling every group.

    `num_training_steps` counts optimizer steps, not micro-steps. The scheduler is stepped once per optimizer step.
    """
    if num_training_steps < 1:
        raise ValueError(f"num_training_steps must be >= 1, got {num_training_steps}.")
    from transformers import get_scheduler  # here: transformers.optimization imports its Trainer's utilities

    return get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.warmup_steps,
        num_training_steps=num_training_steps,
    )


def total_optimizer_steps(args: TrainingArguments, batches_per_epoch: int) -> int:
    """`args.max_steps`, or the optimizer steps of `args.num_train_epochs` epochs of `batches_per_epoch` batches."""
    if args.max_steps > 0:
        return args.max_steps
    return math.ceil(args.num_train_epochs * math.ceil(batches_per_epoch / args.gradient_accumulation_steps))


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current learning rate of each named group, e.g. {"prompt": 0.3, "lora_embedding": 1e-4}."""
    return {group.get("name", f"group_{i}"): group["lr"] for i, group in enumerate(optimizer.param_groups)}


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
