"""ONE training loop for every DePT model, text or vision-language, on top of accelerate.

The loop knows no task and no modality. It needs:

- a model whose `forward(**inputs)` returns an object with `.loss` (and, optionally, `optimizer_param_groups`
  and `save_pretrained`, see `dept.optim` and `Trainer.train`);
- a `collate_fn` that turns a list of examples into a dict of tensors for `model(**inputs)`, plus optional
  non-tensor entries such as `"references"` (one gold item per row), which are popped before the forward;
- an `Evaluator` that turns a batch into decoded predictions and predictions into metrics.

`Trainer.train` reads top to bottom: build the data order, optimizer and schedule, maybe resume, then loop over
optimizer steps, evaluating and saving a checkpoint every so often. A run killed at any moment resumes from its
latest checkpoint and ends bit-identical to an uninterrupted run (same seed, same hardware).

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
from dept.optim import build_optimizer, build_scheduler, learning_rates
from dept.resume_state import (
    CHECKPOINT_PREFIX,
    TRAINER_STATE_NAME,
    CheckpointWriteError,
    capture_rng_state,
    complete_checkpoints,
    latest_checkpoint,
    load_trainable_state_dict,
    read_checkpoint,
    remove_temporary_checkpoints,
    restore_rng_state,
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
            the checkpoints written so far stay, so the run can resume.

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
        self._prepared_model = model
        batches_per_epoch = self._batches_per_epoch = len(train_dataloader)
        steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
        total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
        # Stepped by hand, once per optimizer step. On the torch optimizer itself: DeepSpeed's ZeRO optimizer
        # is no torch Optimizer, but it steps with these same param_groups (and their learning rates).
        scheduler = build_scheduler(base_optimizer, args, total_steps)

        self.state = TrainerState(max_steps=total_steps, data_order=self._data_order())
        rng_state = self.maybe_resume(resume_from, optimizer, scheduler)
        if args.report_to != "none":
            accelerator.init_trackers("runs", config=_hparams(args))
        self._log_run_start(total_steps, batches_per_epoch)

        start_time, start_step = time.perf_counter(), self.state.global_step
        if rng_state is not None:
            restore_rng_state(rng_state)  # last, right before the first step, exactly where it was saved
        model.train()
        progress = tqdm(
            total=total_steps, initial=start_step, desc="train", disable=not accelerator.is_local_main_process
        )
        with progress:
            while self.state.global_step < total_steps:
                window_losses, window_is_finite = [], True
                for batch in self._epoch_batches(train_dataloader, sampler):
                    inputs, _ = split_batch(batch)
                    with accelerator.accumulate(model):
                        loss = model(**inputs).loss
                        # The mean over processes, so that every process takes the same NaN decision.
                        mean_loss = accelerator.reduce(loss.detach().float(), reduction="mean").item()
                        if math.isfinite(mean_loss):
                            accelerator.backward(loss)
                            window_losses.append(mean_loss)
                        elif args.skip_nan_steps:
                            window_is_finite = False
                        else:
                            raise NonFiniteLossError(self._non_finite_loss_message(mean_loss, optimizer))
                        if accelerator.sync_gradients and window_is_finite:
                            if args.max_grad_norm > 0:
                                accelerator.clip_grad_norm_(_trainable_parameters(model), args.max_grad_norm)
                            optimizer.step()
                        optimizer.zero_grad()  # accelerate zeroes only once the accumulation window is done
                    self.state.batches_seen_in_epoch += 1
                    if not accelerator.sync_gradients:
                        continue

                    # One optimizer step is done (or skipped for a NaN/inf loss); it counts either way.
                    self.state.global_step += 1
                    scheduler.step()
                    if window_is_finite:
                        self._record_step_loss(sum(window_losses) / len(window_losses))
                    else:
                        self.state.nan_steps_skipped += 1
                        logger.warning(f"Skipped optimizer step {self.state.global_step}: NaN/inf loss.")
                    window_losses, window_is_finite = [], True
                    progress.update(1)

                    if self.state.global_step % args.logging_steps == 0:
                        self._log_training(optimizer, progress)
                    if args.eval_strategy == "steps" and self.state.global_step % args.eval_steps == 0:
                        self._evaluate_during_training(model)
                    if args.save_strategy == "steps" and self.state.global_step % args.save_steps == 0:
                        self.save_checkpoint(optimizer, scheduler)
                    if self.state.global_step >= total_steps:
                        break

                if self.state.batches_seen_in_epoch >= batches_per_epoch:  # the epoch ran to its end
                    self.state.epoch += 1
                    self.state.batches_seen_in_epoch = 0
                    if args.eval_strategy == "epoch":
                        self._evaluate_during_training(model)
                    if args.save_strategy == "epoch":
                        self.save_checkpoint(optimizer, scheduler)
        runtime = time.perf_counter() - start_time

        if args.load_best_model_at_end and self.state.best_model_checkpoint:
            self._load_best_model()
        metrics = self._train_metrics(runtime, self.state.global_step - start_step)
        self._save_final(metrics)
        if args.report_to != "none":
            self._finish_trackers()
        return metrics

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

    def maybe_resume(self, checkpoint: Path | None, optimizer, scheduler) -> dict | None:
        """Load parameters, optimizer, schedule and progress from `checkpoint`; return this process's RNG state.

        The RNG state is restored by the caller right before the first step, where the interrupted run saved it.
        Without a checkpoint, nothing happens and None is returned.
        """
        if checkpoint is None:
            return None
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
        self._load_checkpoint_state(saved.path, saved.trainable_parameters)
        scheduler.load_state_dict(saved.scheduler)
        state.max_steps = self.state.max_steps
        self.state = state
        process = self.accelerator.process_index
        return saved.rng_states[process]

    def _load_checkpoint_state(self, path: Path, trainable_parameters: dict[str, torch.Tensor]) -> None:
        """Optimizer (and scaler) through `accelerator.load_state`, each engine reading its own shards; the
        trainable weights from the engine's files (DeepSpeed, FSDP) or from our whole copy."""
        self.accelerator.load_state(str(path), **load_state_kwargs(self.accelerator))
        if not (uses_deepspeed(self.accelerator) or uses_fsdp(self.accelerator)):
            load_trainable_state_dict(self.model, trainable_parameters)

    def save_checkpoint(self, optimizer, scheduler) -> Path:
        """Write `checkpoint-<global_step>` atomically, then rotate old checkpoints.

        Every process writes its engine's shards with `accelerator.save_state` into one temporary directory; the
        main process adds the whole trainable weights, the schedule, every process's RNG state and the trainer
        state, then renames it. If this step was just evaluated, the checkpoint may become the best one. On a
        write failure every process stops with `CheckpointWriteError`, and the previous checkpoints stay intact.
        """
        accelerator, state = self.accelerator, self.state
        path = self.output_dir / f"{CHECKPOINT_PREFIX}{state.global_step}"
        previous_best = (state.best_metric, state.best_model_checkpoint)
        if self._last_evaluation is not None and self._last_evaluation[0] == state.global_step:
            self._update_best(self._last_evaluation[1], path)
        rng_states = gather_object([capture_rng_state()])  # one per process, in process order, before any save
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
                rng_states=rng_states,
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
            for batch in tqdm(dataloader, desc=prefix, leave=False, disable=not accelerator.is_local_main_process):
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

    def _evaluate_during_training(self, model: nn.Module) -> dict[str, float]:
        if self.eval_dataset is None:
            return {}
        _, _, metrics = self._evaluation_loop(model, self.eval_dataset, prefix="eval")
        self._last_evaluation = (self.state.global_step, metrics)
        self.state.log_history.append({**metrics, "step": self.state.global_step, "epoch": self._epoch_float()})
        self.accelerator.log({f"eval/{k[len('eval_') :]}": v for k, v in metrics.items()}, step=self.state.global_step)
        main = metrics.get(self.metric_for_best_model)
        logger.info(f"step {self.state.global_step}: {self.metric_for_best_model} = {main}", main_process_only=True)
        if self.on_evaluate is not None:
            self.on_evaluate(self.state.global_step, metrics)
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
        """("eval_<metric>", greater_is_better) for picking the best checkpoint."""
        name = self.args.metric_for_best_model
        if name is None:
            name = self.evaluator.main_metric if self.evaluator is not None else "loss"
        name = name if name.startswith("eval_") else f"eval_{name}"
        greater = self.args.greater_is_better
        if greater is None:
            if self.evaluator is not None and name == f"eval_{self.evaluator.main_metric}":
                greater = self.evaluator.greater_is_better
            else:
                greater = not name.endswith("loss")
        return name, greater

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

    def _record_step_loss(self, loss: float) -> None:
        self.state.total_loss += loss
        self.state.trained_steps += 1
        self.state.loss_since_log += loss
        self.state.steps_since_log += 1

    def _log_training(self, optimizer, progress: tqdm) -> None:
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

    def _non_finite_loss_message(self, loss: float, optimizer) -> str:
        step = self.state.global_step + 1
        rates = ", ".join(f"{name}={lr:.3g}" for name, lr in learning_rates(optimizer).items())
        last = latest_checkpoint(self.output_dir)
        kept = (
            f"The last good checkpoint, {last}, is intact: resume from it with --resume_from_checkpoint {last} "
            if last
            else "No checkpoint was written yet: restart "
        )
        return (
            f"The training loss is {loss} at optimizer step {step} (epoch {self._epoch_float()}), with learning "
            f"rates {rates}. No parameter was updated with it. {kept}after lowering the learning rates (or with "
            "mixed_precision='no'), or set skip_nan_steps=True to skip such steps."
        )

    def _log_run_start(self, total_steps: int, batches_per_epoch: int) -> None:
        unwrapped = self.accelerator.unwrap_model(self._prepared_model)
        trainable = sum(p.numel() for p in unwrapped.parameters() if p.requires_grad)
        total = sum(p.numel() for p in unwrapped.parameters())
        logger.info(
            f"Training {trainable:,} of {total:,} parameters for {total_steps} optimizer steps "
            f"({batches_per_epoch} batches per epoch and process, {self.accelerator.num_processes} processes), "
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
