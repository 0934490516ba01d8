"""What a run reports, as the official DePT code writes it: the result files, the predictions, the adapter, and the
best checkpoint by one evaluation metric.

    all_results.json           every split's metrics, merged
    <split>_results.json       train_results.json, eval_results.json, test_results.json
    predictions_<split>.jsonl  one line per example: {"prediction": ..., "reference": ...}
    adapter_config.json, adapter_model.safetensors   the model's `save_pretrained`

Each file is written atomically (`dept.checkpoint.write_text_atomically`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from dept.checkpoint import TrainerState, write_on_main_process, write_text_atomically, write_trainer_state
from dept.distributed import full_trainable_state_dict, uses_deepspeed, uses_fsdp
from dept.training_args import TrainingArguments

logger = logging.getLogger(__name__)

FALLBACK_ADAPTER_NAME = "adapter_model.safetensors"  # for models without save_pretrained


def write_results(output_dir: Path, split: str, metrics: dict[str, float]) -> None:
    """`<split>_results.json`, and the same metrics merged into `all_results.json`."""
    path = output_dir / f"{split}_results.json"
    if path.exists() and split != "train":
        logger.warning("Replacing %s with the results of this evaluation.", path)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(metrics, indent=4, sort_keys=True) + "\n")
    combined_path = output_dir / "all_results.json"
    combined = json.loads(combined_path.read_text()) if combined_path.exists() else {}
    combined.update(metrics)
    write_text_atomically(combined_path, json.dumps(combined, indent=4, sort_keys=True) + "\n")


def write_predictions(output_dir: Path, split: str, predictions: list, references: list) -> None:
    """`predictions_<split>.jsonl`: each prediction next to its reference (when the data had references)."""
    if not predictions:
        return
    rows = (
        [{"prediction": p, "reference": r} for p, r in zip(predictions, references, strict=True)]
        if references
        else [{"prediction": p} for p in predictions]
    )
    text = "".join(json.dumps(row, default=str) + "\n" for row in rows)
    write_text_atomically(output_dir / f"predictions_{split}.jsonl", text)


def write_adapter(model: nn.Module, output_dir: Path, trainable: dict[str, torch.Tensor], *, sharded: bool) -> None:
    """The model's `save_pretrained`; given the whole fp32 `trainable` tensors when `sharded` (under DeepSpeed or
    FSDP the model's own tensors may be shards or bf16 casts of the master weights). A model without
    `save_pretrained` gets `trainable` in `adapter_model.safetensors`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    save_pretrained = getattr(model, "save_pretrained", None)
    if save_pretrained is None:
        save_file(trainable, str(output_dir / FALLBACK_ADAPTER_NAME))
    elif sharded:
        save_pretrained(str(output_dir), state_dict=trainable)
    else:
        save_pretrained(str(output_dir))


def write_final_outputs(accelerator, model: nn.Module, output_dir: Path, state: TrainerState,
                        metrics: dict[str, float]) -> None:
    """The adapter of the prepared `model`, train_results.json, all_results.json and trainer_state.json, written
    once by the main process; every process calls it (the engines gather the trainable weights)."""
    unwrapped = accelerator.unwrap_model(model)
    # Whole tensors, the same file as a single-process run writes: gathered from the engine's shards.
    trainable = full_trainable_state_dict(accelerator, model)
    sharded = uses_deepspeed(accelerator) or uses_fsdp(accelerator)

    def write() -> None:
        write_adapter(unwrapped, output_dir, trainable, sharded=sharded)
        write_results(output_dir, "train", metrics)
        write_trainer_state(output_dir, state)

    write_on_main_process(accelerator, output_dir, write)


def evaluation_metrics(evaluator, predictions: list, references: list, losses: list[torch.Tensor], *,
                       runtime: float, num_samples: int, num_batches: int, prefix: str) -> dict[str, float]:
    """`<prefix>_*` metrics of one pass over a split: the evaluator's, the mean loss (of `losses`, one tensor of
    per-row batch losses per batch), and the pass's speed."""
    metrics = {}
    if evaluator is not None and references:
        if len(references) != len(predictions):
            raise ValueError(f"Got {len(predictions)} predictions for {len(references)} references.")
        metrics.update(evaluator.compute_metrics(predictions, references))
    if losses:
        metrics["loss"] = torch.cat(losses).mean().item()
    metrics.update(
        runtime=round(runtime, 4),
        samples=num_samples,
        samples_per_second=round(num_samples / runtime, 3) if runtime > 0 else 0.0,
        steps_per_second=round(num_batches / runtime, 3) if runtime > 0 else 0.0,
    )
    return {f"{prefix}_{key}": value for key, value in metrics.items()}


def train_metrics(state: TrainerState, args: TrainingArguments, *, runtime: float, steps_run: int,
                  num_examples: int, num_processes: int, epoch: float) -> dict[str, float]:
    """train_results.json: the mean loss, the throughput of this process's steps, the epoch, skipped steps."""
    samples_run = steps_run * args.gradient_accumulation_steps * args.per_device_train_batch_size * num_processes
    return {
        "epoch": epoch,
        "train_loss": state.total_loss / state.trained_steps if state.trained_steps else float("nan"),
        "train_runtime": round(runtime, 4),
        "train_samples": num_examples,
        "train_samples_per_second": round(samples_run / runtime, 3) if runtime > 0 else 0.0,
        "train_steps_per_second": round(steps_run / runtime, 3) if runtime > 0 else 0.0,
        "total_steps": state.global_step,
        "nan_steps_skipped": state.nan_steps_skipped,
    }


class BestModel:
    """The best checkpoint by one evaluation metric, kept in the run's `TrainerState` (`best_metric`,
    `best_model_checkpoint`) so that it is saved with each checkpoint and goes on after a resume. The metric and
    its direction are `TrainingArguments.best_model_criterion`'s, given the evaluator's main metric."""

    def __init__(self, args: TrainingArguments, evaluator):
        if evaluator is None:
            self.metric, self.greater_is_better = args.best_model_criterion()
        else:
            self.metric, self.greater_is_better = args.best_model_criterion(evaluator.main_metric,
                                                                            evaluator.greater_is_better)

    def update(self, state: TrainerState, metrics: dict[str, float], checkpoint: Path) -> None:
        """Make `checkpoint` the best one if its evaluation `metrics` beat the best so far."""
        if self.metric not in metrics:
            raise ValueError(
                f"metric_for_best_model={self.metric!r} is not among the evaluation metrics {sorted(metrics)}. "
                "Set metric_for_best_model to one of them."
            )
        value, best = metrics[self.metric], state.best_metric
        if best is None or (value > best if self.greater_is_better else value < best):
            state.best_metric, state.best_model_checkpoint = value, str(checkpoint)
