"""Checkpoints and resume, in one module: the atomic directory, `save_total_limit`, the trainable weights, the data
order, and the output directory they live in.

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

Everything goes under `checkpoint-<step>.tmp-<pid>`, is fsync'd, and is renamed to `checkpoint-<step>` only when
complete. A directory named `checkpoint-<step>` is therefore complete; `complete_checkpoints` still checks the
files, so that a directory left by hand or by another tool is never resumed from.

The data order is a pure function of `(seed, epoch)` (`EpochSampler`), and `trainer_state.json` records the epoch
and the batches consumed in it: a resumed run skips those batches (accelerate's `skip_first_batches`) and sees the
same batches in the same order, with each process's RNG restored by `load_state`.

What accelerate 1.16 gives is used where it gives the same guarantee: `save_state`/`load_state` for every engine's
files and the RNG, `skip_first_batches`, the save/load pre-hooks. Where it falls short, this module keeps its own
code, and a test shows why (T = tests/dept/test_trainer.py, F = tests/reliability/test_trainer_faults.py):

- `ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=N)` counts folders and deletes the oldest
  *before* the new one is written, and knows no best checkpoint. Here rotation runs after a complete write and
  never deletes the best or the newest one:
      T::test_load_best_model_at_end_restores_the_best_checkpoint
      T::test_rotation_deletes_oldest_checkpoints_but_never_the_best_or_newest
      F::test_full_disk_stops_with_a_clear_message_and_keeps_the_last_checkpoint
- accelerate writes straight into the final folder, and `load_state()` under automatic naming takes the
  highest-numbered folder whatever it holds. Here a checkpoint is renamed into place when complete, and only
  complete ones are resumed:
      F::test_auto_resume_ignores_partial_and_temporary_checkpoints
      F::test_sigkilled_run_resumes_to_the_same_adapter_and_metrics
- `DataLoaderConfiguration(use_seedable_sampler=True)` shuffles exactly as `EpochSampler` does (a permutation
  seeded with seed + epoch), but it cannot group by length, and it applies only to an Accelerator built with it.
  One sampler here serves both orders, whoever built the Accelerator:
      T::test_group_by_length_batches_similar_lengths_and_covers_every_example
      F::test_sigkilled_run_resumes_to_the_same_adapter_and_metrics (a length-grouped run)
      tests/dept/test_deepspeed_cpu.py (resumes under the Accelerator its launcher builds)
- `save_state` saves the whole model of plain and DDP runs, the frozen base included: a pre-hook keeps it out,
  and the trainable weights are saved whole:
      T::test_dept_t5_trains_through_the_loop_and_checkpoints_only_its_adapter
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from dept.distributed import full_trainable_state_dict, load_state_kwargs, save_state_kwargs, uses_deepspeed, uses_fsdp
from dept.errors import UserError
from dept.training_args import TrainingArguments

if TYPE_CHECKING:
    from accelerate.data_loader import DataLoaderShard

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
_NEARLY_FULL_BYTES = 1 << 20  # a file system with less free space than this after a failed write is full
# What a finished run leaves in its output directory besides checkpoints (`dept.results` writes them).
RESULT_FILES = ("all_results.json", "train_results.json", "eval_results.json", "test_results.json")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


class CheckpointWriteError(UserError, RuntimeError):
    """A checkpoint or result file could not be written (disk full, read-only directory, ...)."""


class OutputDirExistsError(UserError, FileExistsError):
    """`output_dir` holds the results of another run and neither overwriting nor resuming was asked for."""


@dataclass
class TrainerState:
    """Everything about a run's progress that a resume needs, saved as `trainer_state.json`.

    `epoch` counts finished epochs and `batches_seen_in_epoch` the per-process batches consumed in the current
    one; with the seed they fix the data order. `total_loss` sums the loss of every trained step.
    """

    global_step: int = 0
    max_steps: int = 0
    epoch: int = 0
    batches_seen_in_epoch: int = 0
    total_loss: float = 0.0
    trained_steps: int = 0
    nan_steps_skipped: int = 0
    loss_since_log: float = 0.0
    steps_since_log: int = 0
    best_metric: float | None = None
    best_model_checkpoint: str | None = None
    data_order: dict = field(default_factory=dict)
    log_history: list[dict] = field(default_factory=list)

    def epoch_progress(self, batches_per_epoch: int) -> float:
        """Finished epochs plus the consumed fraction of the current one, e.g. 1.6."""
        fraction = self.batches_seen_in_epoch / batches_per_epoch if batches_per_epoch else 0.0
        return round(self.epoch + fraction, 4)

    def end_epoch_if_finished(self, batches_per_epoch: int) -> bool:
        """Count the epoch as done if its last batch was consumed (not when max_steps cut it short)."""
        if self.batches_seen_in_epoch < batches_per_epoch:
            return False
        self.epoch, self.batches_seen_in_epoch = self.epoch + 1, 0
        return True

    def record_losses(self, total: float, steps: int) -> None:
        """Add the summed loss of `steps` optimizer steps, for the next log entry and the run's mean."""
        self.total_loss += total
        self.trained_steps += steps
        self.loss_since_log += total
        self.steps_since_log += steps

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"


# ----------------------------------------------------------------------------------------------- the data order


class EpochSampler(Sampler[int]):
    """A shuffled (or length-grouped) order of the dataset that is a pure function of `(seed, epoch)`.

    Because no hidden generator state carries over between epochs, a resumed run rebuilds the exact order of
    any epoch and skips the batches it already consumed.

    Args:
        num_examples: size of the dataset.
        seed: base seed; epoch `e` is shuffled with `seed + e`.
        lengths: per-example lengths; when given, batches of `batch_size` consecutive indices have similar
            lengths (`transformers`' mega-batch grouping).
        batch_size: batch size the grouping is made for.
    """

    def __init__(self, num_examples: int, seed: int, lengths: Sequence[int] | None = None, batch_size: int = 1):
        if lengths is not None and len(lengths) != num_examples:
            raise ValueError(f"Got {len(lengths)} lengths for {num_examples} examples.")
        self.num_examples = num_examples
        self.seed = seed
        self.lengths = list(lengths) if lengths is not None else None
        self.batch_size = batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_examples

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.lengths is None:
            return iter(torch.randperm(self.num_examples, generator=generator).tolist())
        from transformers.trainer_pt_utils import get_length_grouped_indices  # here: it imports the Trainer's stack

        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


def example_lengths(dataset: Dataset) -> list[int]:
    """Length of each example, from a `length` entry or the length of `input_ids`, for `group_by_length`."""
    columns = getattr(dataset, "column_names", None)
    if columns is not None:  # a datasets.Dataset: read whole columns, not row by row
        if "length" in columns:
            return [int(n) for n in dataset["length"]]
        if "input_ids" in columns:
            return [len(ids) for ids in dataset["input_ids"]]
    else:
        size = num_examples(dataset)
        first = dataset[0] if size else {}
        if isinstance(first, Mapping) and "length" in first:
            return [int(dataset[i]["length"]) for i in range(size)]
        if isinstance(first, Mapping) and "input_ids" in first:
            return [len(dataset[i]["input_ids"]) for i in range(size)]
    raise ValueError(
        "group_by_length needs a 'length' or 'input_ids' entry in every training example; add one "
        "(e.g. dataset.map(lambda ex: {'length': len(ex['input_ids'])})) or set group_by_length=False."
    )


def num_examples(dataset: Dataset) -> int:
    """The length of a map-style dataset; an iterable one has none, and epochs and resume need it."""
    if not isinstance(dataset, Sized):
        raise TypeError(f"{type(dataset).__name__} has no length: the trainer reads map-style datasets "
                        "(a datasets.Dataset, or a torch Dataset with __len__ and __getitem__).")
    return len(dataset)


def train_dataloader(dataset: Dataset, args: TrainingArguments, collate_fn) -> tuple[DataLoader, EpochSampler]:
    """The training batches in the order `EpochSampler` fixes from `args.seed` (length-grouped if asked)."""
    lengths = example_lengths(dataset) if args.group_by_length else None
    sampler = EpochSampler(num_examples(dataset), args.seed, lengths, args.per_device_train_batch_size)
    dataloader = DataLoader(
        dataset,
        batch_size=args.per_device_train_batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),  # keeps the global RNG for the model alone
    )
    return dataloader, sampler


def data_order(args: TrainingArguments, num_processes: int, num_train_examples: int) -> dict:
    """The settings that fix which batch comes at which step; a resume must not change them."""
    return {
        "seed": args.seed,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "group_by_length": args.group_by_length,
        "num_processes": num_processes,
        "num_train_examples": num_train_examples,
    }


def remaining_batches(accelerator: Accelerator, dataloader: DataLoaderShard, sampler: EpochSampler, state: TrainerState):
    """The batches of the current epoch that this run has not consumed yet (all of them, unless resuming)."""
    epoch, skip = state.epoch, state.batches_seen_in_epoch
    sampler.set_epoch(epoch)
    dataloader.set_epoch(epoch)
    if skip == 0:
        return dataloader
    if skip >= len(dataloader):
        return ()  # the checkpoint was taken after the epoch's last step, before its end-of-epoch work
    batches = accelerator.skip_first_batches(dataloader, skip)
    batches.set_epoch(epoch)
    return batches


# ----------------------------------------------------------------------------------------------- the trainable weights


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


def keep_frozen_weights_out_of_checkpoints(accelerator: Accelerator) -> None:
    """Stop `save_state`/`load_state` from writing or reading the whole model of runs without DeepSpeed or FSDP
    (those engines save their own, trainable-only or sharded files): `save_checkpoint` saves the trainable weights
    whole, and `load_checkpoint_state` loads them."""

    def drop_weights(models, weights, output_dir) -> None:
        weights.clear()

    def drop_models(models, input_dir) -> None:
        models.clear()

    accelerator.register_save_state_pre_hook(drop_weights)
    accelerator.register_load_state_pre_hook(drop_models)


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


def _write_bytes(data: bytes, path: Path) -> None:
    with open(path, "wb") as handle:  # Python's write: a full disk raises OSError(ENOSPC), naming the path
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _write_text(text: str, path: Path) -> None:
    _write_bytes(text.encode(), path)


def write_failure_reason(error: BaseException, path: str | Path) -> str:
    """Why a write under `path` failed, in the operating system's words.

    An `OSError` says it itself. torch reports a short write in its own terms ("[enforce fail at
    inline_container.cc:672] . unexpected pos ..."), and safetensors wraps the OS error in its own type: when the
    file system under `path` is then (nearly) full, that is the reason given, with the space left.
    """
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return str(error)
    if free < _NEARLY_FULL_BYTES:
        return f"{os.strerror(errno.ENOSPC)} ({free:,} bytes free on the file system of {existing})"
    return str(error)


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


def write_trainer_state(output_dir: Path, state: TrainerState) -> None:
    """`trainer_state.json` in `output_dir` (the run's progress and log), atomically."""
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output_dir / TRAINER_STATE_NAME, state.to_json())


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"


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
    final = checkpoint_dir(output_dir, step)
    temporary = temporary_checkpoint_dir(output_dir, step) if temporary is None else Path(temporary)
    writes: list[tuple[str, Callable[[Path], None]]] = [
        (TRAINABLE_PARAMETERS_NAME, lambda p: _write_bytes(safetensors_bytes(trainable_parameters), p)),
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
        reason = write_failure_reason(err, current)  # before the partial files go, while the disk is still full
        shutil.rmtree(temporary, ignore_errors=True)
        last = latest_checkpoint(output_dir)
        kept = f"The last complete checkpoint, {last}, is intact" if last else "No complete checkpoint exists yet"
        resume_hint = f"then resume with --resume_from_checkpoint {last}" if last else "then start the run again"
        raise CheckpointWriteError(
            f"Could not write checkpoint {final}: writing {current} failed: {reason}. {kept}. "
            f"Free disk space or make {output_dir} writable, {resume_hint}."
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


def write_on_main_process(accelerator: Accelerator, output_dir: Path, write: Callable[[], None]) -> None:
    """Run `write` on the main process only, then sync; if it fails, every process stops with the error."""
    error: BaseException | None = None
    message: list[str | None] = [None]
    if accelerator.is_main_process:
        try:
            write()
        except (CheckpointWriteError, OSError, SafetensorError) as err:
            error = err
            message = [
                str(err)
                if isinstance(err, CheckpointWriteError)
                else f"Could not write to {output_dir}: {write_failure_reason(err, output_dir)}. The checkpoints "
                "there are intact: free disk space or make the directory writable, then resume with "
                "--resume_from_checkpoint auto."
            ]
    broadcast_object_list(message)
    if isinstance(error, CheckpointWriteError):
        raise error
    if message[0] is not None:
        raise CheckpointWriteError(message[0]) from error
    accelerator.wait_for_everyone()


def save_checkpoint(accelerator: Accelerator, model: nn.Module, scheduler, state: TrainerState, output_dir: Path,
                    save_total_limit: int | None) -> Path:
    """Write `checkpoint-<global_step>` atomically, then rotate old checkpoints; every process calls it.

    Every process writes its engine's shards and its RNG state with `accelerator.save_state` into one temporary
    directory; the main process adds the whole trainable weights (of the prepared `model`), the schedule and
    `state`, then renames it. On a write failure every process stops with `CheckpointWriteError`, and the
    previous checkpoints stay intact.
    """
    main_pid = [os.getpid()]
    broadcast_object_list(main_pid)
    temporary = temporary_checkpoint_dir(output_dir, state.global_step, main_pid[0])
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)  # left by an attempt killed mid-save
    accelerator.wait_for_everyone()

    failure = None
    try:
        accelerator.save_state(str(temporary), **save_state_kwargs(accelerator))
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
        failure = (write_failure_reason(err, temporary), getattr(err, "filename", None))  # while the disk is full
    failure = next((f for f in gather_object([failure]) if f is not None), None)
    engine_error = None if failure is None else OSError(0, failure[0], failure[1] or str(temporary))
    # After an engine failure nothing is written: write_checkpoint raises `engine_error` first.
    trainable = {} if failure is not None else full_trainable_state_dict(accelerator, model)

    def write() -> None:
        write_checkpoint(output_dir, state.global_step, trainable_parameters=trainable,
                         scheduler=scheduler.state_dict(), trainer_state=dataclasses.asdict(state),
                         temporary=temporary, engine_error=engine_error)  # fmt: skip
        for old in rotate_checkpoints(output_dir, save_total_limit, state.best_model_checkpoint):
            logger.info("Deleted %s (save_total_limit=%s).", old, save_total_limit)

    write_on_main_process(accelerator, output_dir, write)
    return checkpoint_dir(output_dir, state.global_step)


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


@dataclass
class Checkpoint:
    """The contents of one checkpoint directory, loaded on the CPU."""

    path: Path
    trainable_parameters: dict[str, torch.Tensor]
    scheduler: dict
    trainer_state: dict
    optimizer: dict | None = None  # accelerate's optimizer.bin, when the run had no DeepSpeed or FSDP


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


# ----------------------------------------------------------------------------------------------- starting a run


def check_output_dir(accelerator: Accelerator, output_dir: Path, overwrite: bool, *, resuming: bool) -> None:
    """Refuse to train into a directory holding another run's outputs, unless overwriting (which deletes its old
    checkpoints, so that they are never resumed or rotated by mistake) or resuming."""
    if resuming or not output_dir.is_dir():
        return
    names = {*RESULT_FILES, *ADAPTER_FILES, TRAINER_STATE_NAME}
    existing = sorted(
        path.name
        for path in output_dir.iterdir()
        if path.name in names or path.name.startswith(CHECKPOINT_PREFIX) or path.name.startswith("predictions_")
    )
    if not existing:
        return
    if not overwrite:
        # One wording for the command lines and the Python API: each option by its flag, then its argument.
        raise OutputDirExistsError(
            f"{output_dir} already holds the outputs of a run ({', '.join(existing[:5])}"
            f"{', ...' if len(existing) > 5 else ''}). Pass --overwrite_output_dir (overwrite_output_dir=True) to "
            "replace them, --resume_from_checkpoint auto (resume_from_checkpoint='auto') to continue that run, or "
            "choose another --output_dir."
        )
    if accelerator.is_main_process:
        for checkpoint in complete_checkpoints(output_dir):
            logger.warning("overwrite_output_dir: deleting the old checkpoint %s.", checkpoint)
            shutil.rmtree(checkpoint)
    accelerator.wait_for_everyone()


def resolve_resume_checkpoint(accelerator: Accelerator, output_dir: Path, wanted: str | None) -> Path | None:
    """The checkpoint `resume_from_checkpoint` names: None, a directory, or with "auto" the latest complete one in
    `output_dir` (None when there is none; unfinished `.tmp` checkpoints are removed)."""
    if wanted is None:
        return None
    if wanted == "auto":
        found = latest_checkpoint(output_dir)
        if accelerator.is_main_process:
            remove_temporary_checkpoints(output_dir)  # never complete, so never resumed or kept
        accelerator.wait_for_everyone()
        if found is None:
            logger.info("No complete checkpoint in %s: starting from scratch.", output_dir)
        return found
    path = Path(wanted)
    if not path.is_dir():
        raise FileNotFoundError(
            f"resume_from_checkpoint={wanted!r} is not a directory. Pass a checkpoint-<step> directory, or 'auto'."
        )
    return path


def load_checkpoint_state(accelerator: Accelerator, model: nn.Module, path: Path,
                          trainable_parameters: dict[str, torch.Tensor]) -> None:
    """Optimizer, scaler and RNG through `accelerator.load_state`, each engine reading its own shards; the
    trainable weights from the engine's files (DeepSpeed, FSDP) or from our whole copy into `model`."""
    accelerator.load_state(str(path), **load_state_kwargs(accelerator))
    if not (uses_deepspeed(accelerator) or uses_fsdp(accelerator)):
        load_trainable_state_dict(model, trainable_parameters)


def resume(accelerator: Accelerator, model: nn.Module, scheduler, checkpoint: Path, fresh: TrainerState
           ) -> TrainerState:
    """Load parameters, optimizer, schedule and RNG from `checkpoint`, and return its progress.

    `fresh` is the new run's state: its data order must be the checkpoint's (else the batches would differ), and
    its `max_steps` is kept.
    """
    if accelerator.is_main_process:
        logger.info("Resuming from %s.", checkpoint)
    saved = read_checkpoint(checkpoint)
    state = TrainerState(**saved.trainer_state)
    changed = {k: (state.data_order.get(k), v) for k, v in fresh.data_order.items() if state.data_order.get(k) != v}
    if changed:
        raise ValueError(
            f"Cannot resume from {checkpoint}: the data order would differ, because these settings changed "
            f"(checkpoint, now): {changed}. Resume with the same settings, or start a new run in a new output_dir."
        )
    rng_state_file(saved.path, accelerator.process_index)
    load_checkpoint_state(accelerator, model, saved.path, saved.trainable_parameters)
    scheduler.load_state_dict(saved.scheduler)
    state.max_steps = fresh.max_steps
    return state


def load_best_weights(accelerator: Accelerator, model: nn.Module, checkpoint: Path) -> None:
    """The trainable weights of `checkpoint` into `model`; DeepSpeed and FSDP load their own copy (with the fp32
    master weights) through `load_state`."""
    trainable = read_checkpoint(checkpoint).trainable_parameters
    if uses_deepspeed(accelerator) or uses_fsdp(accelerator):
        load_checkpoint_state(accelerator, model, checkpoint, trainable)
    else:
        load_trainable_state_dict(model, trainable)
