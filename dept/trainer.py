"""ONE training loop for every DePT model, text or vision-language, on top of accelerate.

The loop knows no task and no modality. It needs:

- a model whose `forward(**inputs)` returns an object with `.loss` (and, optionally, `optimizer_param_groups`
  and `save_pretrained`, see `parameter_groups` and `Trainer.train`);
- a `collate_fn` that turns a list of examples into a dict of tensors for `model(**inputs)`, plus optional
  non-tensor entries such as `"references"` (one gold item per row), which are popped before the forward;
- an `Evaluator` that turns a batch into decoded predictions and predictions into metrics.

`Trainer.train` reads top to bottom, as accelerate's `nlp_example.py`: build the data order, optimizer and
schedule, maybe resume, then one loop over batches: `_training_step` (forward, backward, and at the end of an
accumulation window the optimizer step), then `_log_evaluate_and_save`, the one place that decides logging,
evaluation and checkpoints. The loss stays on the device between logs (`StepLosses`): a step costs no host sync.
A run killed at any moment resumes from its latest checkpoint and ends bit-identical to an uninterrupted run
(same seed, same hardware).

Distribution is accelerate's. Checkpoints go through `accelerator.save_state` / `load_state`, so DeepSpeed and
FSDP write and read their own optimizer shards; the trainable weights are saved whole next to them, and the
frozen base never is (`dept.resume_state`). What sharded parameters need is in `dept.distributed`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm
from transformers import get_scheduler
from transformers.trainer_pt_utils import get_length_grouped_indices

from dept.distributed import (
    full_trainable_state_dict,
    load_state_kwargs,
    save_state_kwargs,
    uses_deepspeed,
    uses_fsdp,
    whole_parameters_for_evaluation,
)
from dept.errors import UserError
from dept.resume_state import (
    CHECKPOINT_PREFIX,
    TRAINER_STATE_NAME,
    CheckpointWriteError,
    complete_checkpoints,
    latest_checkpoint,
    load_trainable_state_dict,
    read_checkpoint,
    remove_temporary_checkpoints,
    rng_state_file,
    rotate_checkpoints,
    temporary_checkpoint_dir,
    write_checkpoint,
    write_text_atomically,
)
from dept.training_args import TrainingArguments

logger = get_logger(__name__)

RESULT_FILES = ("all_results.json", "train_results.json", "eval_results.json", "test_results.json")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
FALLBACK_ADAPTER_NAME = "adapter_model.safetensors"  # for models without save_pretrained


class Evaluator(Protocol):
    """Turns batches into predictions and predictions into metrics, for one task.

    Attributes:
        main_metric: the metric that picks the best checkpoint, without the `eval_` prefix (e.g. "accuracy").
        greater_is_better: whether a larger `main_metric` is better.
    """

    main_metric: str
    greater_is_better: bool

    def predict_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> list:
        """One decoded prediction per row of `batch` (the collated tensors and non-tensor extras, without
        `references`).

        `model` is the unwrapped model: call `generate` or take an argmax on it.
        """
        ...

    def compute_metrics(self, predictions: list, references: list) -> dict[str, float]:
        """Metrics over the whole split, without prefix, e.g. {"accuracy": 91.3}."""
        ...


class NonFiniteLossError(UserError, FloatingPointError):
    """The training loss became NaN or infinite and `skip_nan_steps` is off."""


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
        first = dataset[0] if len(dataset) else {}
        if isinstance(first, Mapping) and "length" in first:
            return [int(dataset[i]["length"]) for i in range(len(dataset))]
        if isinstance(first, Mapping) and "input_ids" in first:
            return [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    raise ValueError(
        "group_by_length needs a 'length' or 'input_ids' entry in every training example; add one "
        "(e.g. dataset.map(lambda ex: {'length': len(ex['input_ids'])})) or set group_by_length=False."
    )


def split_batch(batch: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors for `model(**inputs)`, everything else such as `references`)."""
    inputs = {key: value for key, value in batch.items() if isinstance(value, torch.Tensor)}
    extras = {key: value for key, value in batch.items() if not isinstance(value, torch.Tensor)}
    return inputs, extras


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on Hugging Face gradient checkpointing in the (possibly wrapped) base model.

    Non-reentrant checkpointing: the frozen base's inputs need not require grad (the prompt's gradient
    reaches P, A and B anyway).
    """
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing_enable") and getattr(module, "supports_gradient_checkpointing", False):
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return
    raise ValueError(f"{type(model).__name__} holds no Hugging Face model that supports gradient checkpointing.")


# ----------------------------------------------------------------------------------------------- optimizer, schedule
# DePT trains two kinds of parameters at very different learning rates: the prompt P (about 3e-1) and the
# low-rank pair A, B (about 1e-4). A model that knows its groups says so through
# `optimizer_param_groups(learning_rate, lora_embedding_lr, weight_decay)`; any other model trains every
# parameter that requires a gradient at `learning_rate`. One warmup/decay schedule scales every group.


def parameter_groups(model: nn.Module, args: TrainingArguments) -> list[dict]:
    """The model's own groups, or one group of every trainable parameter at `args.learning_rate`.

    Each group is a dict for `torch.optim.AdamW` with `params`, `lr`, `weight_decay` and a `name` used in logs.
    """
    if hasattr(model, "optimizer_param_groups"):
        groups = model.optimizer_param_groups(
            learning_rate=args.learning_rate,
            lora_embedding_lr=args.lora_embedding_lr,
            weight_decay=args.weight_decay,
        )
    else:
        groups = [{"params": _trainable_parameters(model), "lr": args.learning_rate, "weight_decay": args.weight_decay}]
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
    return get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.warmup_steps,
        num_training_steps=num_training_steps,
    )


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current learning rate of each named group, e.g. {"prompt": 0.3, "lora_embedding": 1e-4}."""
    return {group.get("name", f"group_{i}"): group["lr"] for i, group in enumerate(optimizer.param_groups)}


# ----------------------------------------------------------------------------------------------- the loss, on device


class StepLosses:
    """Training losses summed on the device, so that a step costs no host sync and no collective.

    Per micro-batch `add_micro_batch(loss)`; per optimizer step `end_window()` (the window's mean) and
    `add_step(step_loss, step)`; `collect(accelerator)` brings the sum to the host when the trainer logs, evaluates
    or saves. The figures equal a per-step `.item()` of the mean over processes: a mean over processes of sums is
    the sum of the means. Sums are float64, as Python's floats were.
    """

    def __init__(self):
        self._window: torch.Tensor | None = None
        self._window_size = 0
        self._steps_sum: torch.Tensor | None = None
        self._first_non_finite: torch.Tensor | None = None  # the lowest step with a NaN/inf loss; inf if none
        self._steps = 0

    def add_micro_batch(self, loss: torch.Tensor) -> None:
        loss = loss.detach().to(torch.float64)
        self._window = loss if self._window is None else self._window + loss
        self._window_size += 1

    def end_window(self) -> torch.Tensor:
        """The mean loss of the micro-batches since the last call (one optimizer step's)."""
        mean = self._window / self._window_size
        self._window, self._window_size = None, 0
        return mean

    def add_step(self, step_loss: torch.Tensor, step: int) -> None:
        non_finite_at = torch.where(torch.isfinite(step_loss), math.inf, float(step))
        if self._steps_sum is None:
            self._steps_sum, self._first_non_finite = step_loss, non_finite_at
        else:
            self._steps_sum = self._steps_sum + step_loss
            self._first_non_finite = torch.minimum(self._first_non_finite, non_finite_at)
        self._steps += 1

    def collect(self, accelerator: Accelerator) -> tuple[float, int, int | None]:
        """(the step losses added since the last call, summed and averaged over processes; how many steps; the
        first step with a NaN/inf loss on any process, or None). One gather and one host sync, on every process
        at once (the step counts agree, so all skip it together when nothing was added)."""
        if self._steps == 0:
            return 0.0, 0, None
        gathered = accelerator.gather(torch.stack([self._steps_sum, self._first_non_finite])).tolist()
        sums, first = gathered[0::2], min(gathered[1::2])
        steps, self._steps_sum, self._first_non_finite, self._steps = self._steps, None, None, 0
        return sum(sums) / len(sums), steps, None if math.isinf(first) else int(first)


class Trainer:
    """Train, evaluate and predict with one accelerate loop.

    Args:
        model: an `nn.Module` whose `forward(**inputs)` returns an object with `.loss`.
        args: the run's `TrainingArguments`.
        collate_fn: list of examples -> dict of tensors (+ optional `references` and other non-tensor entries).
        evaluator: an `Evaluator`; without one, evaluation reports only `eval_loss`.
        train_dataset, eval_dataset, test_dataset: map-style datasets of examples for `collate_fn`.
        accelerator: an `Accelerator` to use; by default one is made from `args`.
        on_evaluate: called as `on_evaluate(global_step, metrics)` after each evaluation during training, on every
            process. It may raise to stop the run (a hyperparameter search's pruner raises `optuna.TrialPruned`);
            the checkpoints written so far stay, so the run can resume, and `trainer_state.json` holds the log up
            to this evaluation.

    Example:
        >>> trainer = Trainer(model, TrainingArguments(output_dir="out"), collate_fn=collate,  # doctest: +SKIP
        ...                   evaluator=evaluator, train_dataset=train, eval_dataset=validation)
        >>> trainer.train()  # writes out/adapter_*, train_results.json, ...  # doctest: +SKIP
        >>> trainer.evaluate(test, split="test")  # {"test_accuracy": ..., "test_loss": ...}  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments,
        *,
        collate_fn,
        evaluator: Evaluator | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | None = None,
        test_dataset: Dataset | None = None,
        accelerator: Accelerator | None = None,
        on_evaluate: Callable[[int, dict[str, float]], None] | None = None,
    ):
        self.model = model
        self.args = args
        self.collate_fn = collate_fn
        self.evaluator = evaluator
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.test_dataset = test_dataset
        self.on_evaluate = on_evaluate
        self.output_dir = Path(args.output_dir)
        self.accelerator = accelerator or Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            log_with="tensorboard" if args.report_to == "tensorboard" else None,
            project_dir=args.output_dir,
        )
        if self.accelerator.gradient_accumulation_steps != args.gradient_accumulation_steps:
            raise ValueError(
                f"The accelerator accumulates {self.accelerator.gradient_accumulation_steps} steps but "
                f"args.gradient_accumulation_steps={args.gradient_accumulation_steps}: make them equal."
            )
        # The trainer saves the trainable weights itself, whole; accelerate must not add the full model.
        self.accelerator.register_save_state_pre_hook(_keep_model_weights_out_of_save_state)
        self.accelerator.register_load_state_pre_hook(_keep_model_weights_out_of_load_state)
        self.metric_for_best_model, self.greater_is_better = self._best_model_criterion()
        self.state = TrainerState()
        self._prepared_model: nn.Module | None = None
        self._last_evaluation: tuple[int, dict[str, float]] | None = None
        self._eval_dataloaders: dict[int, tuple[Dataset, DataLoader]] = {}
        self._batches_per_epoch = 0
        self._losses = StepLosses()

    # ------------------------------------------------------------------------------------------- training

    def train(self) -> dict[str, float]:
        """Train for `max_steps` (or `num_train_epochs`), then write the adapter and the result files.

        Returns the training metrics, also written to `train_results.json`: `train_loss`, `train_runtime`,
        `train_samples_per_second`, `train_steps_per_second`, `epoch`, `nan_steps_skipped`, ...
        """
        args, accelerator = self.args, self.accelerator
        self._check_can_train()
        resume_from = self._resolve_resume_checkpoint()
        self._check_output_dir(resuming=resume_from is not None)
        set_seed(args.seed)

        train_dataloader, sampler = self._train_dataloader()
        if args.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        base_optimizer = build_optimizer(self.model, args)
        model, optimizer, train_dataloader = accelerator.prepare(self.model, base_optimizer, train_dataloader)
        self._prepared_model, self._batches_per_epoch = model, len(train_dataloader)
        total_steps = self._total_steps()
        # Stepped by hand, once per optimizer step. On the torch optimizer itself: DeepSpeed's ZeRO optimizer
        # is no torch Optimizer, but it steps with these same param_groups (and their learning rates).
        scheduler = build_scheduler(base_optimizer, args, total_steps)
        self.state, self._losses = TrainerState(max_steps=total_steps, data_order=self._data_order()), StepLosses()
        if args.report_to != "none":
            accelerator.init_trackers("runs", config=_hparams(args))
        # After everything that may draw from the RNG: load_state puts each process's RNG back where it was saved.
        self._resume(resume_from, scheduler)
        self._log_run_start(total_steps)

        start_time, start_step = time.perf_counter(), self.state.global_step
        model.train()
        with self._progress_bar(total_steps) as progress:
            while self.state.global_step < total_steps:
                for batch in self._epoch_batches(train_dataloader, sampler):
                    if not self._training_step(model, optimizer, batch):
                        continue  # inside an accumulation window
                    scheduler.step()
                    progress.update(1)
                    self._log_evaluate_and_save("steps", model, optimizer, scheduler, progress)
                    if self.state.global_step >= total_steps:
                        break
                if self._end_epoch_if_finished():
                    self._log_evaluate_and_save("epoch", model, optimizer, scheduler, progress)
        self._collect_losses(optimizer)  # the NaN check before anything is written, and the last steps' losses
        runtime = time.perf_counter() - start_time

        if args.load_best_model_at_end and self.state.best_model_checkpoint:
            self._load_best_model()
        metrics = self._train_metrics(runtime, self.state.global_step - start_step)
        self._save_final(metrics)
        if args.report_to != "none":
            self._finish_trackers()
        return metrics

    def _training_step(self, model: nn.Module, optimizer, batch: Mapping[str, Any]) -> bool:
        """Forward and backward one micro-batch; at the end of its accumulation window, step the optimizer.

        Returns whether an optimizer step ended here (taken, or skipped for a NaN/inf loss). The loss stays on
        the device: no host sync and no collective, unless `skip_nan_steps` must decide on the step.
        """
        inputs, _ = split_batch(batch)
        with self.accelerator.accumulate(model):
            loss = model(**inputs).loss
            self.accelerator.backward(loss)
            self._losses.add_micro_batch(loss)
            if self.accelerator.sync_gradients:
                self._optimizer_step(model, optimizer)
            optimizer.zero_grad()  # accelerate zeroes only once the accumulation window is done
        self.state.batches_seen_in_epoch += 1
        return self.accelerator.sync_gradients

    def _optimizer_step(self, model: nn.Module, optimizer) -> None:
        """Clip and step, or skip a window whose loss is NaN/inf on any process (`skip_nan_steps`)."""
        step_loss = self._losses.end_window()
        self.state.global_step += 1
        if self.args.skip_nan_steps and not self._finite_on_every_process(step_loss):
            self.state.nan_steps_skipped += 1
            logger.warning(f"Skipped optimizer step {self.state.global_step}: NaN/inf loss.")
            return
        if self.args.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(_trainable_parameters(model), self.args.max_grad_norm)
        optimizer.step()
        self._losses.add_step(step_loss, self.state.global_step)

    def _finite_on_every_process(self, loss: torch.Tensor) -> bool:
        # One collective and one host sync per optimizer step: the price of deciding before the step.
        return math.isfinite(self.accelerator.reduce(loss.clone(), reduction="sum").item())

    def _log_evaluate_and_save(self, event: str, model: nn.Module, optimizer, scheduler, progress: tqdm) -> None:
        """Every trigger, written once. `event` is "steps" (an optimizer step ended) or "epoch" (an epoch did)."""
        args = self.args
        if self._is_due("steps", args.logging_steps, event):
            self._log_training(optimizer, progress)
        if self._is_due(args.eval_strategy, args.eval_steps, event):
            self._evaluate_during_training(model, optimizer)
        if self._is_due(args.save_strategy, args.save_steps, event):
            self.save_checkpoint(optimizer, scheduler)

    def _is_due(self, strategy: str, every: int, event: str) -> bool:
        return strategy == event and (event == "epoch" or self.state.global_step % every == 0)

    def _end_epoch_if_finished(self) -> bool:
        """Count the epoch as done if its last batch was consumed (not when max_steps cut it short)."""
        if self.state.batches_seen_in_epoch < self._batches_per_epoch:
            return False
        self.state.epoch += 1
        self.state.batches_seen_in_epoch = 0
        return True

    def _epoch_batches(self, train_dataloader: DataLoader, sampler: EpochSampler):
        """The batches of the current epoch that this run has not consumed yet (all of them, unless resuming)."""
        epoch, skip = self.state.epoch, self.state.batches_seen_in_epoch
        sampler.set_epoch(epoch)
        train_dataloader.set_epoch(epoch)
        if skip == 0:
            return train_dataloader
        if skip >= len(train_dataloader):
            return ()  # the checkpoint was taken after the epoch's last step, before its end-of-epoch work
        batches = self.accelerator.skip_first_batches(train_dataloader, skip)
        batches.set_epoch(epoch)
        return batches

    def _collect_losses(self, optimizer) -> None:
        """Bring the step losses since the last call to the host (one collective, one sync) into the state.

        Called when logging, evaluating, saving and at the end, so no checkpoint, evaluation or adapter ever
        comes after a NaN/inf step: the run stops there with `NonFiniteLossError`.
        """
        total, steps, first_non_finite = self._losses.collect(self.accelerator)
        if first_non_finite is not None:
            raise NonFiniteLossError(self._non_finite_loss_message(total, first_non_finite, optimizer))
        state = self.state
        state.total_loss += total
        state.trained_steps += steps
        state.loss_since_log += total
        state.steps_since_log += steps

    def _resume(self, checkpoint: Path | None, scheduler) -> None:
        """Load parameters, optimizer, schedule, RNG and progress from `checkpoint` (nothing when None)."""
        if checkpoint is None:
            return
        logger.info(f"Resuming from {checkpoint}.", main_process_only=True)
        saved = read_checkpoint(checkpoint)
        state = TrainerState(**saved.trainer_state)
        expected = self._data_order()
        changed = {k: (state.data_order.get(k), v) for k, v in expected.items() if state.data_order.get(k) != v}
        if changed:
            raise ValueError(
                f"Cannot resume from {checkpoint}: the data order would differ, because these settings changed "
                f"(checkpoint, now): {changed}. Resume with the same settings, or start a new run in a new output_dir."
            )
        rng_state_file(saved.path, self.accelerator.process_index)
        self._load_checkpoint_state(saved.path, saved.trainable_parameters)
        scheduler.load_state_dict(saved.scheduler)
        state.max_steps = self.state.max_steps
        self.state = state

    def _load_checkpoint_state(self, path: Path, trainable_parameters: dict[str, torch.Tensor]) -> None:
        """Optimizer, scaler and RNG through `accelerator.load_state`, each engine reading its own shards; the
        trainable weights from the engine's files (DeepSpeed, FSDP) or from our whole copy."""
        self.accelerator.load_state(str(path), **load_state_kwargs(self.accelerator))
        if not (uses_deepspeed(self.accelerator) or uses_fsdp(self.accelerator)):
            load_trainable_state_dict(self.model, trainable_parameters)

    def save_checkpoint(self, optimizer, scheduler) -> Path:
        """Write `checkpoint-<global_step>` atomically, then rotate old checkpoints.

        Every process writes its engine's shards and its RNG state with `accelerator.save_state` into one
        temporary directory; the main process adds the whole trainable weights, the schedule and the trainer
        state, then renames it. If this step was just evaluated, the checkpoint may become the best one. On a
        write failure every process stops with `CheckpointWriteError`, and the previous checkpoints stay intact.
        """
        self._collect_losses(optimizer)
        accelerator, state = self.accelerator, self.state
        path = self.output_dir / f"{CHECKPOINT_PREFIX}{state.global_step}"
        previous_best = (state.best_metric, state.best_model_checkpoint)
        if self._last_evaluation is not None and self._last_evaluation[0] == state.global_step:
            self._update_best(self._last_evaluation[1], path)
        main_pid = [os.getpid()]
        broadcast_object_list(main_pid)
        temporary = temporary_checkpoint_dir(self.output_dir, state.global_step, main_pid[0])
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)  # left by an attempt killed mid-save
        accelerator.wait_for_everyone()

        engine_error = None
        try:
            accelerator.save_state(str(temporary), **save_state_kwargs(accelerator))
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
            engine_error = err
        failures = gather_object([None if engine_error is None else (str(engine_error), _filename(engine_error))])
        failure = next((f for f in failures if f is not None), None)
        if failure is not None and engine_error is None:
            engine_error = OSError(failure[0]) if failure[1] is None else OSError(0, failure[0], failure[1])
        trainable = None if failure is not None else full_trainable_state_dict(accelerator, self._prepared_model)

        def write() -> None:
            write_checkpoint(
                self.output_dir,
                state.global_step,
                trainable_parameters=trainable,
                scheduler=scheduler.state_dict(),
                trainer_state=dataclasses.asdict(state),
                temporary=temporary,
                engine_error=engine_error,
            )
            for old in rotate_checkpoints(self.output_dir, self.args.save_total_limit, state.best_model_checkpoint):
                logger.info(f"Deleted {old} (save_total_limit={self.args.save_total_limit}).")

        try:
            self._write_on_main_process(write)
        except CheckpointWriteError:
            state.best_metric, state.best_model_checkpoint = previous_best
            raise
        return path

    # ------------------------------------------------------------------------------------------- evaluation

    def evaluate(self, dataset: Dataset | None = None, split: str = "eval") -> dict[str, float]:
        """Metrics on `dataset` (default: the eval or test dataset, by `split`), keys prefixed `<split>_`.

        Writes `<split>_results.json`, updates `all_results.json` and writes `predictions_<split>.jsonl`.
        """
        return self._evaluate_and_write(dataset, split)[1]

    def predict(self, dataset: Dataset, split: str = "test") -> tuple[list, dict[str, float]]:
        """(one prediction per example, in dataset order; metrics, when the batches carry references)."""
        return self._evaluate_and_write(dataset, split)

    def _evaluate_and_write(self, dataset: Dataset | None, split: str) -> tuple[list, dict[str, float]]:
        if dataset is None:
            dataset = self.test_dataset if split == "test" else self.eval_dataset
        if dataset is None:
            raise ValueError(f"No dataset to evaluate for split {split!r}: pass one, or give the Trainer one.")
        model = self._model_for_evaluation()
        predictions, references, metrics = self._evaluation_loop(model, dataset, prefix=split)

        def write() -> None:
            self._write_results(split, metrics)
            self._write_predictions(split, predictions, references)

        self._write_on_main_process(write)
        return predictions, metrics

    @torch.no_grad()
    def _evaluation_loop(self, model: nn.Module, dataset: Dataset, prefix: str) -> tuple[list, list, dict]:
        """Predictions, references and `<prefix>_*` metrics, gathered from every process without duplicates.

        Under several processes accelerate keeps batches even by padding the last one with wrap-around examples.
        Predictions and references drop them exactly (`gather_for_metrics`); `<prefix>_loss`, a mean of batch
        means as in HF's Trainer, then includes their share of that last batch.
        """
        accelerator = self.accelerator
        dataloader = self._eval_dataloader(dataset)
        unwrapped = accelerator.unwrap_model(model)
        was_training = unwrapped.training
        unwrapped.eval()
        predictions, references, losses = [], [], []
        start_time = time.perf_counter()
        # Under FSDP the unwrapped model needs its root unit gathered (dept.distributed).
        with whole_parameters_for_evaluation(accelerator, model):
            # Nested in the train bar; on a stderr that is no terminal (None: off) its cursor moves would be junk.
            for batch in tqdm(dataloader, desc=prefix, leave=False, disable=None if accelerator.is_local_main_process
                              else True):
                inputs, extras = split_batch(batch)
                loss = unwrapped(**inputs).loss if "labels" in inputs else None
                if loss is not None:
                    rows = len(inputs["labels"])
                    losses.append(accelerator.gather_for_metrics(loss.detach().float().repeat(rows)).cpu())
                if self.evaluator is not None:
                    # Non-tensor extras (e.g. left-padded generation inputs of decoder-only models) reach the
                    # evaluator, never the forward; the gold references stay out of its reach.
                    prediction_batch = {**inputs, **{k: v for k, v in extras.items() if k != "references"}}
                    predictions += accelerator.gather_for_metrics(
                        self.evaluator.predict_step(unwrapped, prediction_batch), use_gather_object=True
                    )
                if "references" in extras:
                    references += accelerator.gather_for_metrics(list(extras["references"]), use_gather_object=True)
        unwrapped.train(was_training)
        runtime = time.perf_counter() - start_time

        metrics = {}
        if self.evaluator is not None and references:
            if len(references) != len(predictions):
                raise ValueError(f"Got {len(predictions)} predictions for {len(references)} references.")
            metrics.update(self.evaluator.compute_metrics(predictions, references))
        if losses:
            metrics["loss"] = torch.cat(losses).mean().item()
        num_samples = len(dataset)
        metrics.update(
            runtime=round(runtime, 4),
            samples=num_samples,
            samples_per_second=round(num_samples / runtime, 3) if runtime > 0 else 0.0,
            steps_per_second=round(len(dataloader) / runtime, 3) if runtime > 0 else 0.0,
        )
        return predictions, references, {f"{prefix}_{key}": value for key, value in metrics.items()}

    def _evaluate_during_training(self, model: nn.Module, optimizer) -> dict[str, float]:
        if self.eval_dataset is None:
            return {}
        self._collect_losses(optimizer)  # never evaluate parameters that a NaN/inf step has touched
        _, _, metrics = self._evaluation_loop(model, self.eval_dataset, prefix="eval")
        self._last_evaluation = (self.state.global_step, metrics)
        self.state.log_history.append({**metrics, "step": self.state.global_step, "epoch": self._epoch_float()})
        self.accelerator.log({f"eval/{k[len('eval_') :]}": v for k, v in metrics.items()}, step=self.state.global_step)
        main = metrics.get(self.metric_for_best_model)
        logger.info(f"step {self.state.global_step}: {self.metric_for_best_model} = {main}", main_process_only=True)
        if self.on_evaluate is not None:
            try:
                self.on_evaluate(self.state.global_step, metrics)
            except Exception:  # the caller stops the run here (a pruner): keep its log up to this evaluation
                if self.accelerator.is_main_process:
                    self.output_dir.mkdir(parents=True, exist_ok=True)
                    state = json.dumps(dataclasses.asdict(self.state), indent=2) + "\n"
                    write_text_atomically(self.output_dir / TRAINER_STATE_NAME, state)
                raise
        return metrics

    # ------------------------------------------------------------------------------------------- helpers

    def _check_can_train(self) -> None:
        if self.train_dataset is None or len(self.train_dataset) == 0:
            raise ValueError("Trainer.train needs a non-empty train_dataset.")
        if self.args.eval_strategy != "no" and self.eval_dataset is None:
            raise ValueError(
                f"eval_strategy={self.args.eval_strategy!r} needs an eval_dataset: pass one or set eval_strategy='no'."
            )

    def _best_model_criterion(self) -> tuple[str, bool]:
        """("eval_<metric>", greater_is_better) for picking the best checkpoint: `args.best_model_criterion`."""
        if self.evaluator is None:
            return self.args.best_model_criterion()
        return self.args.best_model_criterion(self.evaluator.main_metric, self.evaluator.greater_is_better)

    def _update_best(self, metrics: dict[str, float], checkpoint: Path) -> None:
        if self.metric_for_best_model not in metrics:
            raise ValueError(
                f"metric_for_best_model={self.metric_for_best_model!r} is not among the evaluation metrics "
                f"{sorted(metrics)}. Set metric_for_best_model to one of them."
            )
        value = metrics[self.metric_for_best_model]
        best = self.state.best_metric
        if best is None or (value > best if self.greater_is_better else value < best):
            self.state.best_metric = value
            self.state.best_model_checkpoint = str(checkpoint)

    def _resolve_resume_checkpoint(self) -> Path | None:
        wanted = self.args.resume_from_checkpoint
        if wanted is None:
            return None
        if wanted == "auto":
            found = latest_checkpoint(self.output_dir)
            if self.accelerator.is_main_process:
                remove_temporary_checkpoints(self.output_dir)  # never complete, so never resumed or kept
            self.accelerator.wait_for_everyone()
            if found is None:
                logger.info(f"No complete checkpoint in {self.output_dir}: starting from scratch.")
            return found
        path = Path(wanted)
        if not path.is_dir():
            raise FileNotFoundError(
                f"resume_from_checkpoint={wanted!r} is not a directory. Pass a checkpoint-<step> directory, or 'auto'."
            )
        return path

    def _check_output_dir(self, resuming: bool) -> None:
        """Refuse to train into a directory holding another run's outputs, unless overwriting or resuming."""
        if resuming or not self.output_dir.is_dir():
            return
        names = {*RESULT_FILES, *ADAPTER_FILES, TRAINER_STATE_NAME}
        existing = sorted(
            path.name
            for path in self.output_dir.iterdir()
            if path.name in names or path.name.startswith(CHECKPOINT_PREFIX) or path.name.startswith("predictions_")
        )
        if not existing:
            return
        if not self.args.overwrite_output_dir:
            raise OutputDirExistsError(
                f"{self.output_dir} already holds the outputs of a run ({', '.join(existing[:5])}"
                f"{', ...' if len(existing) > 5 else ''}). Pass overwrite_output_dir=True to replace them, "
                "resume_from_checkpoint='auto' to continue that run, or choose another output_dir."
            )
        if self.accelerator.is_main_process:
            for checkpoint in complete_checkpoints(self.output_dir):
                logger.warning(f"overwrite_output_dir: deleting the old checkpoint {checkpoint}.")
                shutil.rmtree(checkpoint)
        self.accelerator.wait_for_everyone()

    def _train_dataloader(self) -> tuple[DataLoader, EpochSampler]:
        args = self.args
        lengths = example_lengths(self.train_dataset) if args.group_by_length else None
        sampler = EpochSampler(len(self.train_dataset), args.seed, lengths, args.per_device_train_batch_size)
        dataloader = DataLoader(
            self.train_dataset,
            batch_size=args.per_device_train_batch_size,
            sampler=sampler,
            collate_fn=self.collate_fn,
            num_workers=args.dataloader_num_workers,
            generator=torch.Generator().manual_seed(args.seed),  # keeps the global RNG for the model alone
        )
        return dataloader, sampler

    def _eval_dataloader(self, dataset: Dataset) -> DataLoader:
        # Prepared once per dataset: accelerate keeps a reference to every dataloader it prepares.
        if id(dataset) not in self._eval_dataloaders:
            dataloader = DataLoader(
                dataset,
                batch_size=self.args.per_device_eval_batch_size,
                shuffle=False,
                collate_fn=self.collate_fn,
                num_workers=self.args.dataloader_num_workers,
                generator=torch.Generator(),  # do not draw from the global RNG that training resumes
            )
            self._eval_dataloaders[id(dataset)] = (dataset, self.accelerator.prepare_data_loader(dataloader))
        return self._eval_dataloaders[id(dataset)][1]

    def _data_order(self) -> dict:
        """The settings that fix which batch comes at which step; a resume must not change them."""
        args = self.args
        return {
            "seed": args.seed,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "group_by_length": args.group_by_length,
            "num_processes": self.accelerator.num_processes,
            "num_train_examples": len(self.train_dataset),
        }

    def _model_for_evaluation(self) -> nn.Module:
        if self._prepared_model is None:
            self._prepared_model = self.accelerator.prepare_model(self.model, evaluation_mode=True)
        return self._prepared_model

    def _epoch_float(self) -> float:
        fraction = self.state.batches_seen_in_epoch / self._batches_per_epoch if self._batches_per_epoch else 0.0
        return round(self.state.epoch + fraction, 4)

    def _total_steps(self) -> int:
        args = self.args
        if args.max_steps > 0:
            return args.max_steps
        steps_per_epoch = math.ceil(self._batches_per_epoch / args.gradient_accumulation_steps)
        return math.ceil(args.num_train_epochs * steps_per_epoch)

    def _progress_bar(self, total_steps: int) -> tqdm:
        return tqdm(total=total_steps, initial=self.state.global_step, desc="train",
                    disable=not self.accelerator.is_local_main_process)  # fmt: skip

    def _log_training(self, optimizer, progress: tqdm) -> None:
        self._collect_losses(optimizer)
        state = self.state
        loss = state.loss_since_log / state.steps_since_log if state.steps_since_log else float("nan")
        rates = learning_rates(optimizer)
        entry = {"loss": loss, **{f"learning_rate_{name}": lr for name, lr in rates.items()}}
        state.log_history.append({**entry, "step": state.global_step, "epoch": self._epoch_float()})
        self.accelerator.log(
            {"train/loss": loss, **{f"train/learning_rate/{name}": lr for name, lr in rates.items()}},
            step=state.global_step,
        )
        progress.set_postfix(loss=f"{loss:.4f}")
        state.loss_since_log, state.steps_since_log = 0.0, 0

    def _non_finite_loss_message(self, loss: float, step: int, optimizer) -> str:
        rates = ", ".join(f"{name}={lr:.3g}" for name, lr in learning_rates(optimizer).items())
        last = latest_checkpoint(self.output_dir)
        kept = (
            f"The last good checkpoint, {last}, is intact: resume from it with --resume_from_checkpoint {last} "
            if last
            else "No checkpoint was written yet: restart "
        )
        return (
            f"The training loss is {loss} at optimizer step {step}: found at step {self.state.global_step} (epoch "
            f"{self._epoch_float()}, learning rates {rates}), before any evaluation, checkpoint or adapter after "
            f"it was written. {kept}after lowering the learning rates (or with mixed_precision='no'), or set "
            "skip_nan_steps=True to skip such steps (checked before each optimizer step)."
        )

    def _log_run_start(self, total_steps: int) -> None:
        unwrapped = self.accelerator.unwrap_model(self._prepared_model)
        trainable = sum(p.numel() for p in unwrapped.parameters() if p.requires_grad)
        total = sum(p.numel() for p in unwrapped.parameters())
        logger.info(
            f"Training {trainable:,} of {total:,} parameters for {total_steps} optimizer steps "
            f"({self._batches_per_epoch} batches per epoch and process, {self.accelerator.num_processes} processes), "
            f"starting at step {self.state.global_step}.",
            main_process_only=True,
        )

    def _finish_trackers(self) -> None:
        # Not accelerator.end_training(): it also destroys the process group that evaluate() still needs.
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers = []

    def _load_best_model(self) -> None:
        best = Path(self.state.best_model_checkpoint)
        logger.info(f"Loading the best checkpoint {best} ({self.metric_for_best_model}={self.state.best_metric}).")
        trainable = read_checkpoint(best).trainable_parameters
        if uses_deepspeed(self.accelerator) or uses_fsdp(self.accelerator):
            self._load_checkpoint_state(best, trainable)  # the engine's own copy, fp32 master weights included
        else:
            load_trainable_state_dict(self.model, trainable)

    def _train_metrics(self, runtime: float, steps_run: int) -> dict[str, float]:
        args, state = self.args, self.state
        samples_run = steps_run * args.gradient_accumulation_steps * args.per_device_train_batch_size
        samples_run *= self.accelerator.num_processes
        return {
            "epoch": self._epoch_float(),
            "train_loss": state.total_loss / state.trained_steps if state.trained_steps else float("nan"),
            "train_runtime": round(runtime, 4),
            "train_samples": len(self.train_dataset),
            "train_samples_per_second": round(samples_run / runtime, 3) if runtime > 0 else 0.0,
            "train_steps_per_second": round(steps_run / runtime, 3) if runtime > 0 else 0.0,
            "total_steps": state.global_step,
            "nan_steps_skipped": state.nan_steps_skipped,
        }

    def _save_final(self, metrics: dict[str, float]) -> None:
        """The adapter, train_results.json, all_results.json and trainer_state.json, written once."""
        accelerator = self.accelerator
        unwrapped = accelerator.unwrap_model(self._prepared_model)
        # Whole tensors, the same file as a single-process run writes: gathered from the engine's shards.
        trainable = full_trainable_state_dict(accelerator, self._prepared_model)
        sharded = uses_deepspeed(accelerator) or uses_fsdp(accelerator)

        def write() -> None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if hasattr(unwrapped, "save_pretrained"):
                if sharded:  # the model's own tensors may be shards or bf16 casts of the fp32 master weights
                    unwrapped.save_pretrained(str(self.output_dir), state_dict=trainable)
                else:
                    unwrapped.save_pretrained(str(self.output_dir))
            else:
                save_file(trainable, str(self.output_dir / FALLBACK_ADAPTER_NAME))
            self._write_results("train", metrics)
            state = json.dumps(dataclasses.asdict(self.state), indent=2) + "\n"
            write_text_atomically(self.output_dir / TRAINER_STATE_NAME, state)

        self._write_on_main_process(write)

    def _write_on_main_process(self, write: Callable[[], None]) -> None:
        """Run `write` on the main process only, then sync; if it fails, every process stops with the error."""
        error, message = None, [None]
        if self.accelerator.is_main_process:
            try:
                write()
            except (CheckpointWriteError, OSError) as err:
                error = err
                message = [
                    str(err)
                    if isinstance(err, CheckpointWriteError)
                    else f"Could not write to {self.output_dir}: {err}. The checkpoints there are intact: free disk "
                    "space or make the directory writable, then resume with --resume_from_checkpoint auto."
                ]
        broadcast_object_list(message)
        if isinstance(error, CheckpointWriteError):
            raise error
        if message[0] is not None:
            raise CheckpointWriteError(message[0]) from error
        self.accelerator.wait_for_everyone()

    def _write_results(self, split: str, metrics: dict[str, float]) -> None:
        path = self.output_dir / f"{split}_results.json"
        if path.exists() and split != "train":
            logger.warning(f"Replacing {path} with the results of this evaluation.")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomically(path, json.dumps(metrics, indent=4, sort_keys=True) + "\n")
        combined_path = self.output_dir / "all_results.json"
        combined = json.loads(combined_path.read_text()) if combined_path.exists() else {}
        combined.update(metrics)
        write_text_atomically(combined_path, json.dumps(combined, indent=4, sort_keys=True) + "\n")

    def _write_predictions(self, split: str, predictions: list, references: list) -> None:
        if not predictions:
            return
        rows = (
            [{"prediction": p, "reference": r} for p, r in zip(predictions, references, strict=True)]
            if references
            else [{"prediction": p} for p in predictions]
        )
        text = "".join(json.dumps(row, default=str) + "\n" for row in rows)
        write_text_atomically(self.output_dir / f"predictions_{split}.jsonl", text)


def _keep_model_weights_out_of_save_state(models, weights, output_dir) -> None:
    """accelerate's save_state pre-hook: drop the full model state dict of runs without DeepSpeed or FSDP
    (those engines save their own, trainable-only or sharded); the trainer saves the trainable weights."""
    weights.clear()


def _keep_model_weights_out_of_load_state(models, input_dir) -> None:
    """accelerate's load_state pre-hook: the models left to accelerate (no DeepSpeed or FSDP) get their trainable
    weights from the trainer, so accelerate must not look for a model file."""
    models.clear()


def _filename(error: BaseException) -> str | None:
    return getattr(error, "filename", None)


def _trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _hparams(args: TrainingArguments) -> dict:
    """TrainingArguments as TensorBoard hparams (which accept only bool, int, float and str)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in args.to_dict().items()}
