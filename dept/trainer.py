"""ONE training loop for every DePT model, text or vision-language, on top of accelerate.

The loop knows no task and no modality. It needs a model whose `forward(**inputs)` returns an object with `.loss`
(and, optionally, `optimizer_param_groups` and `save_pretrained`), a `collate_fn` from a list of examples to a dict
of tensors for `model(**inputs)` (plus non-tensor entries such as `"references"`, kept out of the forward), and an
`Evaluator` from batches to decoded predictions and from predictions to metrics.

`Trainer.train` reads top to bottom, as accelerate's `nlp_example.py`: build the data order, optimizer and
schedule, maybe resume, then one loop over batches: `_training_step` (forward, backward, and at the end of an
accumulation window the optimizer step), then `_log_evaluate_and_save`, the one place that decides logging,
evaluation and checkpoints. A run killed at any moment resumes from its latest checkpoint and ends bit-identical to
an uninterrupted run (same seed, same hardware). Around the loop, a module each: `dept.optim` (AdamW over P's and
A·B's groups, one schedule), `dept.checkpoint` (checkpoints, resume, the data order, the output directory),
`dept.train_loss` (the loss kept on the device, the NaN policy), `dept.results` (result files, the adapter, the best
checkpoint), `dept.distributed` (what DeepSpeed's and FSDP's sharded parameters need).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.state import AcceleratorState, is_initialized
from accelerate.utils import DistributedType, set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dept import checkpoint, results
from dept.distributed import whole_parameters_for_evaluation
from dept.optim import build_optimizer, build_scheduler, learning_rates, total_optimizer_steps, trainable_parameters
from dept.train_loss import StepLosses, finite_on_every_process, non_finite_loss_error
from dept.training_args import TrainingArguments

logger = get_logger(__name__)


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
        `references`), from the unwrapped `model`: call `generate` or take an argmax on it."""
        ...

    def compute_metrics(self, predictions: list, references: list) -> dict[str, float]:
        """Metrics over the whole split, without prefix, e.g. {"accuracy": 91.3}."""
        ...


def new_accelerator(args: TrainingArguments) -> Accelerator:
    """The run's Accelerator, in the precision `args.mixed_precision` names, else the launcher's (`accelerate
    launch` sets ACCELERATE_MIXED_PRECISION), else "no". accelerate keeps one precision per process: one left by
    an earlier run in this process (transformers' Trainer with bf16=True, in a notebook) is dropped first, as
    transformers' Trainer does, so that it never sets this run's precision unasked."""
    mixed_precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if is_initialized():
        state = AcceleratorState()
        if state.mixed_precision != mixed_precision and state.distributed_type != DistributedType.DEEPSPEED:
            AcceleratorState._reset_state()
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with="tensorboard" if args.report_to == "tensorboard" else None,
        project_dir=args.output_dir,
    )


class Trainer:
    """Train, evaluate and predict with one accelerate loop.

    Args:
        model: an `nn.Module` whose `forward(**inputs)` returns an object with `.loss`.
        args: the run's `TrainingArguments`.
        collate_fn: list of examples -> dict of tensors (+ optional `references` and other non-tensor entries).
        evaluator: an `Evaluator`; without one, evaluation reports only `eval_loss`.
        train_dataset, eval_dataset, test_dataset: map-style datasets of examples for `collate_fn`. Without an
            `eval_dataset` a run evaluates nothing and keeps the adapter of its last step.
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

    def __init__(self, model: nn.Module, args: TrainingArguments, *, collate_fn, evaluator: Evaluator | None = None,
                 train_dataset: Dataset | None = None, eval_dataset: Dataset | None = None,
                 test_dataset: Dataset | None = None, accelerator: Accelerator | None = None,
                 on_evaluate: Callable[[int, dict[str, float]], None] | None = None):
        self.model, self.args, self.collate_fn, self.evaluator = model, args, collate_fn, evaluator
        self.train_dataset, self.eval_dataset, self.test_dataset = train_dataset, eval_dataset, test_dataset
        self.on_evaluate = on_evaluate
        self.output_dir = Path(args.output_dir)
        self.accelerator = accelerator or new_accelerator(args)
        if self.accelerator.gradient_accumulation_steps != args.gradient_accumulation_steps:
            raise ValueError(
                f"The accelerator accumulates {self.accelerator.gradient_accumulation_steps} steps but "
                f"args.gradient_accumulation_steps={args.gradient_accumulation_steps}: make them equal."
            )
        checkpoint.keep_frozen_weights_out_of_checkpoints(self.accelerator)  # the trainable ones are saved whole
        self.best = results.BestModel(args, evaluator)
        self.state = checkpoint.TrainerState()
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
        args, accelerator, output_dir = self.args, self.accelerator, self.output_dir
        if self.train_dataset is None or checkpoint.num_examples(self.train_dataset) == 0:
            raise ValueError("Trainer.train needs a non-empty train_dataset.")
        load_best_at_end = args.best_model_at_end(has_eval_data=self.eval_dataset is not None)
        resume_from = checkpoint.resolve_resume_checkpoint(accelerator, output_dir, args.resume_from_checkpoint)
        checkpoint.check_output_dir(accelerator, output_dir, args.overwrite_output_dir, resuming=resume_from is not None)
        set_seed(args.seed)

        # Data, model, optimizer and schedule, as accelerate's examples build them.
        dataloader, sampler = checkpoint.train_dataloader(self.train_dataset, args, self.collate_fn)
        if args.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        base_optimizer = build_optimizer(self.model, args)
        model, optimizer, dataloader = accelerator.prepare(self.model, base_optimizer, dataloader)
        self._prepared_model, self._batches_per_epoch = model, len(dataloader)
        total_steps = total_optimizer_steps(args, len(dataloader))
        # Stepped by hand, once per optimizer step. On the torch optimizer itself: DeepSpeed's ZeRO optimizer
        # is no torch Optimizer, but it steps with these same param_groups (and their learning rates).
        scheduler = build_scheduler(base_optimizer, args, total_steps)
        order = checkpoint.data_order(args, accelerator.num_processes, checkpoint.num_examples(self.train_dataset))
        self.state, self._losses = checkpoint.TrainerState(max_steps=total_steps, data_order=order), StepLosses()
        if args.report_to != "none":
            accelerator.init_trackers("runs", config=_hparams(args))
        if resume_from is not None:  # last: load_state puts each process's RNG back where it was saved
            self.state = checkpoint.resume(accelerator, self.model, scheduler, resume_from, self.state)
        logger.info(_run_summary(accelerator, model, self.state, total_steps, len(dataloader)), main_process_only=True)
        if self.eval_dataset is None:
            logger.info("No evaluation data: this run evaluates nothing and saves the adapter of its last step "
                        "(give it validation data to evaluate and keep the best checkpoint).", main_process_only=True)

        start_time, start_step = time.perf_counter(), self.state.global_step
        model.train()
        progress = tqdm(total=total_steps, initial=start_step, desc="train",
                        disable=not accelerator.is_local_main_process)  # fmt: skip
        with progress:
            while self.state.global_step < total_steps:
                for batch in checkpoint.remaining_batches(accelerator, dataloader, sampler, self.state):
                    if not self._training_step(model, optimizer, batch):
                        continue  # inside an accumulation window
                    scheduler.step()
                    progress.update(1)
                    self._log_evaluate_and_save("steps", model, optimizer, scheduler, progress)
                    if self.state.global_step >= total_steps:
                        break
                if self.state.end_epoch_if_finished(len(dataloader)):
                    self._log_evaluate_and_save("epoch", model, optimizer, scheduler, progress)
        self._collect_losses(optimizer)  # the NaN check before anything is written, and the last steps' losses
        runtime = time.perf_counter() - start_time

        best = self.state.best_model_checkpoint
        if load_best_at_end and best:
            logger.info(f"Loading the best checkpoint {best} ({self.best.metric}={self.state.best_metric}).")
            checkpoint.load_best_weights(accelerator, self.model, Path(best))
        metrics = results.train_metrics(self.state, args, runtime=runtime, steps_run=self.state.global_step - start_step,
                                        num_examples=checkpoint.num_examples(self.train_dataset),
                                        num_processes=accelerator.num_processes,
                                        epoch=self._epoch())  # fmt: skip
        results.write_final_outputs(accelerator, model, output_dir, self.state, metrics)
        if args.report_to != "none":  # not accelerator.end_training(): evaluate() still needs the process group
            for tracker in accelerator.trackers:
                tracker.finish()
            accelerator.trackers = []
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
        if self.args.skip_nan_steps and not finite_on_every_process(self.accelerator, step_loss):
            self.state.nan_steps_skipped += 1
            logger.warning(f"Skipped optimizer step {self.state.global_step}: NaN/inf loss.")
            return
        if self.args.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(trainable_parameters(model), self.args.max_grad_norm)
        optimizer.step()
        self._losses.add_step(step_loss, self.state.global_step)

    def _log_evaluate_and_save(self, event: str, model: nn.Module, optimizer, scheduler, progress: tqdm) -> None:
        """Every trigger, written once. `event` is "steps" (an optimizer step ended) or "epoch" (an epoch did)."""
        args, step = self.args, self.state.global_step

        def due(strategy: str, every: int) -> bool:
            return strategy == event and (event == "epoch" or step % every == 0)

        if due("steps", args.logging_steps):
            self._log_training(optimizer, progress)
        if due(args.eval_strategy, args.eval_steps) and self.eval_dataset is not None:
            self._collect_losses(optimizer)  # never evaluate parameters that a NaN/inf step has touched
            self._evaluate_during_training(model, self.eval_dataset)
        if due(args.save_strategy, args.save_steps):
            self._save_checkpoint(model, optimizer, scheduler)

    def _collect_losses(self, optimizer) -> None:
        """Bring the step losses since the last call to the host (one collective, one sync) into the state.

        Called when logging, evaluating, saving and at the end, so no checkpoint, evaluation or adapter ever
        comes after a NaN/inf step: the run stops there with `NonFiniteLossError`.
        """
        total, steps, first_non_finite = self._losses.collect(self.accelerator)
        if first_non_finite is not None:
            raise non_finite_loss_error(
                total, first_non_finite, found_at_step=self.state.global_step, epoch=self._epoch(),
                learning_rates=learning_rates(optimizer), last_checkpoint=checkpoint.latest_checkpoint(self.output_dir),
            )
        self.state.record_losses(total, steps)

    def _log_training(self, optimizer, progress: tqdm) -> None:
        self._collect_losses(optimizer)
        state = self.state
        loss = state.loss_since_log / state.steps_since_log if state.steps_since_log else float("nan")
        rates = learning_rates(optimizer)
        entry = {"loss": loss, **{f"learning_rate_{name}": lr for name, lr in rates.items()}}
        state.log_history.append({**entry, "step": state.global_step, "epoch": self._epoch()})
        self.accelerator.log(
            {"train/loss": loss, **{f"train/learning_rate/{name}": lr for name, lr in rates.items()}},
            step=state.global_step,
        )
        progress.set_postfix(loss=f"{loss:.4f}")
        state.loss_since_log, state.steps_since_log = 0.0, 0

    def _evaluate_during_training(self, model: nn.Module, eval_dataset: Dataset) -> None:
        step = self.state.global_step
        _, _, metrics = self._evaluation_loop(model, eval_dataset, prefix="eval")
        self._last_evaluation = (step, metrics)
        self.state.log_history.append({**metrics, "step": step, "epoch": self._epoch()})
        self.accelerator.log({f"eval/{k[len('eval_') :]}": v for k, v in metrics.items()}, step=step)
        logger.info(f"step {step}: {self.best.metric} = {metrics.get(self.best.metric)}", main_process_only=True)
        if self.on_evaluate is not None:
            try:
                self.on_evaluate(step, metrics)
            except Exception:  # the caller stops the run here (a pruner): keep its log up to this evaluation
                if self.accelerator.is_main_process:
                    checkpoint.write_trainer_state(self.output_dir, self.state)
                raise

    def _save_checkpoint(self, model: nn.Module, optimizer, scheduler) -> Path:
        """`checkpoint-<global_step>` (`dept.checkpoint.save_checkpoint`), which becomes the best one if this step's
        evaluation beats the best so far; if its write fails, the best stays what it was."""
        self._collect_losses(optimizer)
        state, path = self.state, checkpoint.checkpoint_dir(self.output_dir, self.state.global_step)
        best_before = (state.best_metric, state.best_model_checkpoint)
        if self._last_evaluation is not None and self._last_evaluation[0] == state.global_step:
            self.best.update(state, self._last_evaluation[1], path)
        try:
            checkpoint.save_checkpoint(self.accelerator, model, scheduler, state, self.output_dir,
                                       self.args.save_total_limit)  # fmt: skip
        except checkpoint.CheckpointWriteError:
            state.best_metric, state.best_model_checkpoint = best_before
            raise
        return path

    def _epoch(self) -> float:
        return self.state.epoch_progress(self._batches_per_epoch)

    # ------------------------------------------------------------------------------------------- evaluation

    def evaluate(self, dataset: Dataset | None = None, split: str = "eval") -> dict[str, float]:
        """Metrics on `dataset` (default: the eval or test dataset, by `split`), keys prefixed `<split>_`.

        Writes `<split>_results.json`, updates `all_results.json` and writes `predictions_<split>.jsonl`.
        """
        return self.predict(dataset, split)[1]

    def predict(self, dataset: Dataset | None = None, split: str = "test") -> tuple[list, dict[str, float]]:
        """(one prediction per example, in dataset order; metrics, when the batches carry references), written
        as `evaluate` writes them."""
        if dataset is None:
            dataset = self.test_dataset if split == "test" else self.eval_dataset
        if dataset is None:
            raise ValueError(f"No dataset to evaluate for split {split!r}: pass one, or give the Trainer one.")
        if self._prepared_model is None:
            self._prepared_model = self.accelerator.prepare_model(self.model, evaluation_mode=True)
        predictions, references, metrics = self._evaluation_loop(self._prepared_model, dataset, prefix=split)

        def write() -> None:
            results.write_results(self.output_dir, split, metrics)
            results.write_predictions(self.output_dir, split, predictions, references)

        checkpoint.write_on_main_process(self.accelerator, self.output_dir, write)
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

        metrics = results.evaluation_metrics(self.evaluator, predictions, references, losses, runtime=runtime,
                                             num_samples=checkpoint.num_examples(dataset), num_batches=len(dataloader),
                                             prefix=prefix)
        return predictions, references, metrics

    def _eval_dataloader(self, dataset: Dataset) -> DataLoader:
        # Prepared once per dataset: accelerate keeps a reference to every dataloader it prepares.
        if id(dataset) not in self._eval_dataloaders:
            dataloader = DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size, shuffle=False,
                                    collate_fn=self.collate_fn, num_workers=self.args.dataloader_num_workers,
                                    generator=torch.Generator())  # not the global RNG, which training resumes
            self._eval_dataloaders[id(dataset)] = (dataset, self.accelerator.prepare_data_loader(dataloader))
        return self._eval_dataloaders[id(dataset)][1]


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
        enable = getattr(module, "gradient_checkpointing_enable", None)
        if enable is not None and getattr(module, "supports_gradient_checkpointing", False):
            enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return
    raise ValueError(f"{type(model).__name__} holds no Hugging Face model that supports gradient checkpointing.")


def _run_summary(accelerator: Accelerator, model: nn.Module, state: checkpoint.TrainerState, total_steps: int,
                 batches_per_epoch: int) -> str:
    parameters = list(accelerator.unwrap_model(model).parameters())
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    return (f"Training {trainable:,} of {sum(p.numel() for p in parameters):,} parameters for {total_steps} optimizer "
            f"steps ({batches_per_epoch} batches per epoch and process, {accelerator.num_processes} processes), "
            f"starting at step {state.global_step}.")


def _hparams(args: TrainingArguments) -> dict:
    """TrainingArguments as TensorBoard hparams (which accept only bool, int, float and str)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in args.to_dict().items()}
