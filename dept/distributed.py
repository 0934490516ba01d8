"""What DePT needs to know about sharded parameters (DeepSpeed ZeRO-3, FSDP 1 and 2), in one place.

- A ZeRO-3 parameter is a size-0 shard on each rank, with its full shape in `ds_shape`; reading it needs
  `deepspeed.zero.GatheredParameters`.
- P, A and B must be saved as whole fp32 tensors whatever the engine: ZeRO keeps the fp32 master copy in its
  optimizer (`safe_get_full_fp32_param`), FSDP gathers with `get_model_state_dict(full_state_dict=True)`.
- `generate` on parameters sharded across ranks must keep every rank stepping until all are done
  (`synced_gpus`), and FSDP needs its root unit's parameters gathered to run anything but the root's forward.

deepspeed is imported only when a parameter or the accelerator says it is in use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from accelerate.utils import DistributedType
from torch import nn


def is_zero3_partitioned(parameter: torch.Tensor) -> bool:
    """True for a parameter that DeepSpeed ZeRO-3 has partitioned (it carries `ds_shape`)."""
    return getattr(parameter, "ds_shape", None) is not None


def full_shape(parameter: torch.Tensor) -> torch.Size:
    """The parameter's whole shape, also for a ZeRO-3 shard (whose own shape is (0,))."""
    ds_shape = getattr(parameter, "ds_shape", None)  # set by ZeRO-3 on the parameters it partitions
    return parameter.shape if ds_shape is None else torch.Size(ds_shape)


@contextlib.contextmanager
def gathered_parameters(parameters: Iterable[torch.Tensor]) -> Iterator[None]:
    """Make ZeRO-3 shards whole for reading inside the block (every rank must enter it); a no-op otherwise."""
    partitioned = [p for p in parameters if is_zero3_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def uses_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def uses_fsdp(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def is_fsdp_module(module: nn.Module) -> bool:
    """An FSDP 1 wrapper or an FSDP 2 (`fully_shard`) module."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return isinstance(module, (FullyShardedDataParallel, FSDPModule))


def needs_synced_generation(model: nn.Module) -> bool:
    """Whether `generate` must run `synced_gpus`: parameters sharded over more than one rank.

    A rank that finished its batch early must keep taking part in the other ranks' gathers.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    if torch.distributed.get_world_size() < 2:
        return False
    return any(is_zero3_partitioned(p) or hasattr(p, "ds_id") for p in model.parameters()) or any(
        is_fsdp_module(m) for m in model.modules()
    )


def full_trainable_state_dict(accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> whole fp32 CPU tensor of every trainable parameter, named as in the unwrapped model.

    Every process must call it (the engines gather). Under FSDP only the main process gets the tensors (the
    others get an empty dict); without an engine this is a plain copy.
    """
    unwrapped = accelerator.unwrap_model(model)
    trainable = [(name, p) for name, p in unwrapped.named_parameters() if p.requires_grad]
    if uses_deepspeed(accelerator):
        from deepspeed.utils import safe_get_full_fp32_param

        # The optimizer's fp32 master copy: the module's own weights may be bf16 casts of it.
        return {name: safe_get_full_fp32_param(p).detach().float().cpu().clone() for name, p in trainable}
    if uses_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        several = accelerator.num_processes > 1  # FSDP refuses CPU offload of a full state dict on one rank
        options = StateDictOptions(full_state_dict=True, cpu_offload=several, ignore_frozen_params=True)
        state = get_model_state_dict(model, options=options)
        names = {name for name, _ in trainable}
        return {name: t.detach().float().cpu().clone() for name, t in state.items()
                if name in names and isinstance(t, torch.Tensor)}
    return {name: p.detach().cpu().clone().contiguous() for name, p in trainable}


@contextlib.contextmanager
def whole_parameters_for_evaluation(accelerator, model: nn.Module) -> Iterator[None]:
    """Let the unwrapped model run `forward` and `generate` under FSDP, which only the root's forward can.

    Only the root unit (embeddings, P, A, B, head) is gathered, without writeback: each wrapped block still
    gathers itself in its own forward, which a full `summon_full_params` would undo by resharding inside it.
    FSDP 1: `summon_full_params(recurse=False)`; FSDP 2: the root's `unshard()`. Other engines need nothing.
    (Not run on a GPU yet: scripts/gpu_check.sh checks it.)
    """
    if not uses_fsdp(accelerator):
        yield
        return
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False):
            yield
    elif isinstance(model, FSDPModule):
        model.unshard()
        try:
            yield
        finally:
            model.reshard()
    else:
        yield


def save_state_kwargs(accelerator) -> dict:
    """Extra arguments for `accelerator.save_state`: DeepSpeed leaves the frozen base out of its files."""
    return {"exclude_frozen_parameters": True} if uses_deepspeed(accelerator) else {}


def load_state_kwargs(accelerator) -> dict:
    """Extra arguments for `accelerator.load_state`: the DeepSpeed files hold only the trainable weights."""
    return {"load_module_strict": False} if uses_deepspeed(accelerator) else {}
