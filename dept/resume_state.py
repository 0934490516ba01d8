"""Training checkpoints that hold only what training changes, written atomically.

A checkpoint is a directory `checkpoint-<step>` in the run's output directory. accelerate's `save_state` writes
what each engine shards or keeps per process, each process its own part:

    optimizer.bin                      plain and DDP runs (the trainer keeps the model weights out of it)
    pytorch_model/                     DeepSpeed: its ZeRO shards, trainable weights only
    optimizer_0/, pytorch_model_fsdp*  FSDP: its optimizer and model state, as fsdp_state_dict_type says
    random_states_<i>.pkl              process i's python / numpy / torch / cuda RNG (and accelerate's step)
    scaler.pt                          the fp16 gradient scaler

and the main process adds what accelerate either does not save or would save differently:

    trainable_parameters.safetensors   every parameter with requires_grad=True, whole and fp32 whatever the
                                       engine (never the frozen base): what the best-model reload reads
    scheduler.pt                       the schedule, stepped by hand once per optimizer step (accelerate's
                                       prepared scheduler would step once per process, and DeepSpeed skips it)
    trainer_state.json                 step, epoch, data-order position, best metric, log history (last)

accelerate writes straight into its directory, so everything goes under `checkpoint-<step>.tmp-<pid>`, is
fsync'd, and renamed to `checkpoint-<step>` only when complete. A directory named `checkpoint-<step>` is therefore
complete; `complete_checkpoints` still checks the files, so that a directory left by hand or by another tool is
never resumed from.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dept.errors import UserError

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TRAINABLE_PARAMETERS_NAME = "trainable_parameters.safetensors"
OPTIMIZER_NAME = "optimizer.bin"  # accelerate's name, for runs without DeepSpeed or FSDP
SCHEDULER_NAME = "scheduler.pt"
TRAINER_STATE_NAME = "trainer_state.json"
# The engine's own files differ by engine; trainer_state.json, written last, vouches for them.
CHECKPOINT_FILES = (TRAINABLE_PARAMETERS_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME)
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
_TEMPORARY_CHECKPOINT_DIR = re.compile(r"^checkpoint-\d+\.tmp-\d+$")


class CheckpointWriteError(UserError, RuntimeError):
    """A checkpoint or result file could not be written (disk full, read-only directory, ...)."""


@dataclass
class Checkpoint:
    """The contents of one checkpoint directory, loaded on the CPU."""

    path: Path
    trainable_parameters: dict[str, torch.Tensor]
    scheduler: dict
    trainer_state: dict
    optimizer: dict | None = None  # accelerate's optimizer.bin, when the run had no DeepSpeed or FSDP


# ----------------------------------------------------------------------------------------------- parameters


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> CPU copy of every parameter that requires a gradient."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the model's trainable parameters; names and shapes must match exactly."""
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(parameters) - set(state)), sorted(set(state) - set(parameters))
    if missing or unexpected:
        raise ValueError(
            f"The checkpoint does not match the model's trainable parameters: missing {missing}, "
            f"unexpected {unexpected}. Was it written for another adapter configuration?"
        )
    for name, tensor in state.items():
        if tensor.shape != parameters[name].shape:
            raise ValueError(
                f"Shape of {name!r} differs: checkpoint {tuple(tensor.shape)}, model {tuple(parameters[name].shape)}."
            )
        parameters[name].copy_(tensor)


# ----------------------------------------------------------------------------------------------- RNG


def rng_state_file(checkpoint: str | Path, process_index: int) -> Path:
    """accelerate's per-process RNG file in `checkpoint`, which `load_state` restores from.

    Raises:
        FileNotFoundError: when it is missing (accelerate itself would only log that at info level and go on with
            another RNG state, so the resumed run would silently differ).
    """
    path = Path(checkpoint) / f"random_states_{process_index}.pkl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{checkpoint} has no RNG state for process {process_index} ({path.name}): it was written by fewer "
            "processes, or not by dept.trainer. Resume with the number of processes that wrote it."
        )
    return path


# ----------------------------------------------------------------------------------------------- writing


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_torch(obj, path: Path) -> None:
    torch.save(obj, path)
    _fsync(path)


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path))
    _fsync(path)


def _write_text(text: str, path: Path) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename, so readers never see half a file.

    Raises:
        CheckpointWriteError: naming the path and the OS error, when the file cannot be written.
    """
    path = Path(path)
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        _write_text(text, temporary)
        os.replace(temporary, path)
    except OSError as err:
        temporary.unlink(missing_ok=True)
        raise CheckpointWriteError(
            f"Could not write {path}: {err.strerror or err}. Free disk space or make {path.parent} writable, "
            "then run again."
        ) from err


def temporary_checkpoint_dir(output_dir: str | Path, step: int, pid: int | None = None) -> Path:
    """Where `checkpoint-<step>` is written before its rename (`pid`: the main process's, shared by all ranks)."""
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}.tmp-{os.getpid() if pid is None else pid}"


def write_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    trainable_parameters: dict[str, torch.Tensor],
    scheduler: dict,
    trainer_state: dict,
    temporary: Path | None = None,
    engine_error: BaseException | None = None,
) -> Path:
    """Add the trainer's files to `temporary` (which may already hold the engine's, from `save_state`), fsync
    everything, rename it to `checkpoint-<step>` in `output_dir` and return that path.

    Raises:
        CheckpointWriteError: when any file cannot be written, or `engine_error` says the engine's could not.
            The partial directory is removed and every earlier checkpoint is left as it was.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    temporary = temporary_checkpoint_dir(output_dir, step) if temporary is None else Path(temporary)
    writes: list[tuple[str, Callable[[Path], None]]] = [
        (TRAINABLE_PARAMETERS_NAME, lambda p: _write_safetensors(trainable_parameters, p)),
        (SCHEDULER_NAME, lambda p: _write_torch(scheduler, p)),
        # Last, so that any directory holding trainer_state.json got every other file first.
        (TRAINER_STATE_NAME, lambda p: _write_text(json.dumps(trainer_state, indent=2) + "\n", p)),
    ]
    current = temporary
    try:
        if engine_error is not None:
            current = Path(getattr(engine_error, "filename", None) or temporary)
            raise engine_error
        temporary.mkdir(parents=True, exist_ok=True)
        for name, write in writes:
            current = temporary / name
            write(current)
        current = temporary
        _fsync_tree(temporary)  # the engine's files too: accelerate does not fsync
        _replace_directory(temporary, final)
        current = output_dir
        _fsync(output_dir)
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
        shutil.rmtree(temporary, ignore_errors=True)
        last = latest_checkpoint(output_dir)
        kept = f"The last complete checkpoint, {last}, is intact" if last else "No complete checkpoint exists yet"
        resume = f"then resume with --resume_from_checkpoint {last}" if last else "then start the run again"
        reason = getattr(err, "strerror", None) or err
        raise CheckpointWriteError(
            f"Could not write checkpoint {final}: writing {current} failed with {reason}. {kept}. "
            f"Free disk space or make {output_dir} writable, {resume}."
        ) from err
    return final


def _fsync_tree(directory: Path) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def _replace_directory(source: Path, target: Path) -> None:
    # A run resumed from an earlier checkpoint saves again under names a later (killed) run already used.
    if target.exists():
        logger.warning("Replacing %s, written by an earlier attempt of this run.", target)
        stale = target.with_name(f"{target.name}.replaced-{os.getpid()}")
        os.rename(target, stale)
        os.rename(source, target)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.rename(source, target)


# ----------------------------------------------------------------------------------------------- reading


def checkpoint_step(path: str | Path) -> int:
    match = _CHECKPOINT_DIR.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not named checkpoint-<step>.")
    return int(match.group(1))


def is_complete_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    if not (_CHECKPOINT_DIR.match(path.name) and path.is_dir()):
        return False
    if not all((path / name).is_file() for name in CHECKPOINT_FILES):
        return False
    try:
        return json.loads((path / TRAINER_STATE_NAME).read_text()).get("global_step") == checkpoint_step(path)
    except (OSError, ValueError):
        return False


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete `checkpoint-<step>` directories in `output_dir`, oldest first; partial and `.tmp` ones are skipped."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [path for path in output_dir.iterdir() if is_complete_checkpoint(path)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None; logs the directories it had to skip."""
    checkpoints = complete_checkpoints(output_dir)
    skipped = sorted(
        path.name
        for path in (Path(output_dir).iterdir() if Path(output_dir).is_dir() else ())
        if path.name.startswith(CHECKPOINT_PREFIX) and path not in checkpoints
    )
    if skipped:
        logger.warning("Skipping incomplete checkpoints (interrupted or foreign writes): %s", ", ".join(skipped))
    return checkpoints[-1] if checkpoints else None


def is_temporary_checkpoint(path: str | Path) -> bool:
    """A `checkpoint-<step>.tmp-<pid>` directory: a write that never finished (it is renamed once complete)."""
    return bool(_TEMPORARY_CHECKPOINT_DIR.match(Path(path).name))


def remove_temporary_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete the `.tmp-*` checkpoint directories that interrupted runs left in `output_dir`; return them."""
    output_dir = Path(output_dir)
    stale = sorted(p for p in output_dir.iterdir() if is_temporary_checkpoint(p)) if output_dir.is_dir() else []
    for path in stale:
        logger.warning("Removing %s, a checkpoint whose write was interrupted.", path)
        shutil.rmtree(path, ignore_errors=True)
    return stale


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Load a complete checkpoint on the CPU; `.pt` files are read with `weights_only=True`."""
    path = Path(path)
    if not is_complete_checkpoint(path):
        missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
        raise FileNotFoundError(
            f"{path} is not a complete checkpoint (missing: {missing or 'none; trainer_state.json does not match'}). "
            "Pass a checkpoint-<step> directory written by dept.trainer, or resume_from_checkpoint='auto'."
        )

    def load(name: str):
        return torch.load(path / name, map_location="cpu", weights_only=True)

    return Checkpoint(
        path=path,
        trainable_parameters=load_file(str(path / TRAINABLE_PARAMETERS_NAME)),
        scheduler=load(SCHEDULER_NAME),
        trainer_state=json.loads((path / TRAINER_STATE_NAME).read_text()),
        optimizer=load(OPTIMIZER_NAME) if (path / OPTIMIZER_NAME).is_file() else None,
    )


# ----------------------------------------------------------------------------------------------- rotation


def rotate_checkpoints(output_dir: str | Path, save_total_limit: int | None, best: str | Path | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `save_total_limit`; never the best one, never the newest.

    Returns the deleted directories.
    """
    if save_total_limit is None:
        return []
    checkpoints = complete_checkpoints(output_dir)
    protected = {checkpoints[-1].resolve()} if checkpoints else set()
    if best is not None:
        protected.add(Path(best).resolve())
    deletable = [path for path in checkpoints if path.resolve() not in protected]
    excess = max(0, len(checkpoints) - max(save_total_limit, len(protected)))
    deleted = deletable[:excess]
    for path in deleted:
        shutil.rmtree(path)
    return deleted
