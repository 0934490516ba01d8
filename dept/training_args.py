"""The arguments of the shared training loop: one dataclass, checked at construction.

Every field carries its help text in `field(metadata={"help": ...})`, so `transformers.HfArgumentParser` can
build a command line from it.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from dept.errors import FlagError

EVAL_STRATEGIES = ("steps", "epoch", "no")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
REPORT_TO = ("tensorboard", "none")
# Schedules that need only (warmup, total) and whose state round-trips through a checkpoint.
LR_SCHEDULER_TYPES = ("linear", "cosine", "constant", "constant_with_warmup")


@dataclass
class TrainingArguments:
    """Settings of one training run of `dept.trainer.Trainer`.

    Args:
        output_dir: where checkpoints, the final adapter, result files, predictions and TensorBoard logs go.
        overwrite_output_dir: allow training into an `output_dir` that already holds results or checkpoints.
            Old `checkpoint-*` directories are then deleted, so that they are never resumed or rotated by mistake.
        learning_rate: learning rate of the prompt P (official DePT: 3e-1 or 4e-1).
        lora_embedding_lr: learning rate of A and B, the low-rank embedding update (official: 1e-4 to 5e-3).
        weight_decay: AdamW weight decay (official DePT: effectively 0).
        per_device_train_batch_size: training examples per process and micro-step.
        per_device_eval_batch_size: evaluation examples per process and step.
        gradient_accumulation_steps: micro-steps summed into one optimizer step.
        max_steps: number of optimizer steps; when > 0 it overrides `num_train_epochs`.
        num_train_epochs: number of passes over the training set (may be fractional) when `max_steps <= 0`.
        warmup_steps: optimizer steps of linear warmup from 0 to the learning rates.
        lr_scheduler_type: shape of the schedule after warmup, one of `LR_SCHEDULER_TYPES`.
        max_grad_norm: gradients are clipped to this global L2 norm; 0 or less disables clipping.
        eval_strategy: evaluate every `eval_steps` optimizer steps ("steps"), after each epoch ("epoch") or never
            ("no"); a run without evaluation data never evaluates.
        eval_steps: optimizer steps between evaluations when `eval_strategy="steps"`.
        save_strategy: write a checkpoint every `save_steps` ("steps"), after each epoch ("epoch") or never.
        save_steps: optimizer steps between checkpoints when `save_strategy="steps"`.
        logging_steps: optimizer steps between loss / learning-rate log entries.
        save_total_limit: keep at most this many checkpoints (the best one is never deleted); None keeps all.
        load_best_model_at_end: at the end, load the checkpoint with the best `metric_for_best_model`. None (the
            default) follows the data: on when the run evaluates (an `eval_dataset` and `eval_strategy != "no"`,
            checked when training starts), off when it has nothing to evaluate, where it keeps the adapter of its
            last step. True is checked at once, and refused without evaluation data.
        metric_for_best_model: metric that picks the best checkpoint, with or without the `eval_` prefix;
            None means the evaluator's main metric (or `loss` without an evaluator).
        greater_is_better: whether a larger `metric_for_best_model` is better; None (the default) derives it from
            the metric (see `best_model_criterion`). Set it only for a metric of your own whose direction cannot be
            derived; one that contradicts the metric (a loss maximised) is refused.
        seed: seed of the data order, of dropout and of anything else random in the run.
        mixed_precision: "no", "fp16" or "bf16", handed to accelerate; None (the default) takes the accelerate
            config's setting (`accelerate launch --config_file ...`), which is "no" without one, never a precision
            left in the process by an earlier run (see `dept.trainer.new_accelerator`).
        resume_from_checkpoint: a checkpoint directory to resume from, or "auto" for the latest complete
            checkpoint in `output_dir` (a fresh start when there is none).
        skip_nan_steps: on a NaN/inf loss, skip that optimizer step (and count it) instead of stopping the run.
        group_by_length: draw training batches of similar length (seeded, deterministic, resumable).
        gradient_checkpointing: recompute the frozen base's activations in the backward pass instead of storing
            them: less memory for more compute (for large bases; the gradients are the same).
        dataloader_num_workers: worker processes of each DataLoader; 0 loads in the main process.
        report_to: "tensorboard" to log through accelerate's TensorBoard tracker, or "none".
    """

    output_dir: str = field(metadata={"help": "Where checkpoints, the adapter, results and logs are written."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into an output_dir that already holds results; its old checkpoints are deleted."},
    )
    learning_rate: float = field(default=0.3, metadata={"help": "Learning rate of the prompt P."})
    lora_embedding_lr: float = field(default=1e-4, metadata={"help": "Learning rate of A and B."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Training batch size per process."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Evaluation batch size per process."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-steps accumulated into one optimizer step."}
    )
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps to run; > 0 overrides num_train_epochs."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Passes over the training set (max_steps <= 0)."})
    warmup_steps: int = field(default=0, metadata={"help": "Optimizer steps of linear learning-rate warmup."})
    lr_scheduler_type: str = field(
        default="linear",
        metadata={"help": "Learning-rate schedule after warmup.", "choices": list(LR_SCHEDULER_TYPES)},
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip gradients to this L2 norm (<= 0: no clip)."})
    eval_strategy: str = field(
        default="steps", metadata={"help": "When to evaluate.", "choices": list(EVAL_STRATEGIES)}
    )
    eval_steps: int = field(default=1000, metadata={"help": "Optimizer steps between evaluations."})
    save_strategy: str = field(
        default="steps", metadata={"help": "When to write a checkpoint.", "choices": list(EVAL_STRATEGIES)}
    )
    save_steps: int = field(default=1000, metadata={"help": "Optimizer steps between checkpoints."})
    logging_steps: int = field(default=50, metadata={"help": "Optimizer steps between log entries."})
    save_total_limit: int | None = field(
        default=1, metadata={"help": "Keep at most this many checkpoints (never deleting the best); None keeps all."}
    )
    load_best_model_at_end: bool | None = field(
        default=None,
        # nargs/const: a bare `--load_best_model_at_end` means True (HfArgumentParser adds them to a bool flag only
        # when its default is not None).
        metadata={"help": "Load the best checkpoint (by metric_for_best_model) at the end; default: when the run "
                          "has evaluation data.", "nargs": "?", "const": True},
    )
    metric_for_best_model: str | None = field(
        default=None, metadata={"help": "Metric picking the best checkpoint; default: the evaluator's main metric."}
    )
    greater_is_better: bool | None = field(
        default=None,
        metadata={"help": "Whether a larger metric_for_best_model is better; default: derived from the metric (a "
                          "loss is minimised, a task's metric maximised). A loss maximised is refused."},
    )
    seed: int = field(default=42, metadata={"help": "Seed of data order, dropout and initialisation."})
    mixed_precision: str | None = field(
        default=None,
        metadata={"help": "Mixed precision through accelerate; default: the accelerate config's.",
                  "choices": list(MIXED_PRECISIONS)},
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "Checkpoint directory to resume from, or 'auto' for the latest one."}
    )
    skip_nan_steps: bool = field(
        default=False, metadata={"help": "Skip optimizer steps with a NaN/inf loss instead of stopping."}
    )
    group_by_length: bool = field(default=False, metadata={"help": "Batch training examples of similar length."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass: less memory, more compute."}
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    report_to: str = field(
        default="tensorboard", metadata={"help": "Where to log metrics.", "choices": list(REPORT_TO)}
    )

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"TrainingArguments.mixed_precision must be one of {MIXED_PRECISIONS} or None, "
                             f"got {self.mixed_precision!r}.")
        if not self.output_dir:
            raise ValueError("TrainingArguments.output_dir is required: pass the directory the run writes to.")
        check_output_dir_is_writable(self.output_dir)
        for name, allowed in (
            ("eval_strategy", EVAL_STRATEGIES),
            ("save_strategy", EVAL_STRATEGIES),
            ("report_to", REPORT_TO),
            ("lr_scheduler_type", LR_SCHEDULER_TYPES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainingArguments.{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainingArguments.{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("eval_steps", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainingArguments.{name} must be >= 1, got {getattr(self, name)}.")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("Set max_steps > 0 or num_train_epochs > 0: as given, the run would train nothing.")
        if self.warmup_steps < 0 or self.dataloader_num_workers < 0:
            raise ValueError("warmup_steps and dataloader_num_workers must be >= 0.")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1 or None (keep all), got {self.save_total_limit}.")
        if self.load_best_model_at_end:
            self._check_best_model_is_saved()
        if self.metric_for_best_model is not None:
            self.best_model_criterion()  # refuses a loss maximised now, before any work

    def best_model_criterion(self, main_metric: str | None = None,
                             main_greater_is_better: bool = True) -> tuple[str, bool]:
        """("eval_<metric>", greater_is_better): the metric that picks the best checkpoint, and its direction.

        The one rule of direction, for every entry point: the metric is `metric_for_best_model`, else the
        evaluator's `main_metric`, else the loss. A loss-like metric (`is_loss_metric`) is minimised, the
        evaluator's main metric goes the evaluator's way (`main_greater_is_better`), any other metric is maximised.
        An explicit `greater_is_better` wins for a metric of your own; against a loss or the main metric it must
        agree, or it is refused. (A command line that overrides a recipe's metric also drops the recipe's
        direction: `dept.command_line.parse_arguments`.)
        """
        name = self.metric_for_best_model or main_metric or "loss"
        name = name if name.startswith("eval_") else f"eval_{name}"
        is_main = main_metric is not None and name == f"eval_{main_metric.removeprefix('eval_')}"
        known = False if is_loss_metric(name) else (main_greater_is_better if is_main else None)
        if self.greater_is_better is None:
            return name, True if known is None else known
        if known is not None and self.greater_is_better != known:
            wanted = "minimised" if not known else "maximised"
            raise FlagError(
                f"metric_for_best_model {name.removeprefix('eval_')!r} is {wanted}, but greater_is_better is "
                f"{str(self.greater_is_better).lower()}: the best checkpoint would be the worst. Drop "
                "--greater_is_better (the direction follows the metric), or choose another --metric_for_best_model."
            )
        return name, self.greater_is_better

    def best_model_at_end(self, has_eval_data: bool) -> bool:
        """Whether the run reloads its best checkpoint at the end: `load_best_model_at_end`, or by default (None)
        whenever it evaluates, which then needs the checkpoints that `_check_best_model_is_saved` asks for. Asked
        for explicitly without evaluation data, it is an error, not a silent no."""
        if self.load_best_model_at_end is None:
            if not has_eval_data or self.eval_strategy == "no":
                return False
            self._check_best_model_is_saved()
            return True
        if self.load_best_model_at_end and not has_eval_data:
            raise FlagError(
                "--load_best_model_at_end (load_best_model_at_end=True) picks the best checkpoint by evaluating, but "
                "this run has no evaluation data. Give it validation data (--validation_file; eval_dataset in "
                "Python), or leave load_best_model_at_end unset to keep the adapter of the last step."
            )
        return self.load_best_model_at_end

    def _check_best_model_is_saved(self) -> None:
        # The best model can only be reloaded if every evaluation that may be the best has a checkpoint.
        unset = " (unset, it is on when the run evaluates)" if self.load_best_model_at_end is None else ""
        off = "set load_best_model_at_end=False (--load_best_model_at_end false)"
        if self.eval_strategy == "no" or self.save_strategy == "no":
            raise FlagError(
                f"load_best_model_at_end{unset} needs evaluations and checkpoints: set eval_strategy and save_strategy "
                f"to 'steps' or 'epoch', or {off}."
            )
        if self.eval_strategy != self.save_strategy:
            raise FlagError(
                f"load_best_model_at_end{unset} needs save_strategy == eval_strategy, got save_strategy="
                f"{self.save_strategy!r} and eval_strategy={self.eval_strategy!r}; or {off}."
            )
        if self.save_strategy == "steps" and self.save_steps % self.eval_steps != 0:
            raise FlagError(
                f"load_best_model_at_end{unset} needs save_steps to be a multiple of eval_steps, got save_steps="
                f"{self.save_steps} and eval_steps={self.eval_steps}; or {off}."
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def is_loss_metric(name: str) -> bool:
    """Whether a metric is a loss, minimised whatever the task: its name ends in "loss" ("loss", "eval_nll_loss")."""
    return name.endswith("loss")


def check_output_dir_is_writable(output_dir: str, flag: str = "--output_dir") -> None:
    """Refuse an output directory that is a file, or under one, or that cannot be written, before any work."""
    path = Path(output_dir).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is under {existing}, which is a file"
        raise FlagError(f"{flag} {output_dir} {where}: pass a directory (new or existing).")
    try:  # a real write: os.access says yes to root on a read-only file system
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise FlagError(f"{flag} {output_dir}: {existing} is not writable (creating a file there failed: "
                        f"{err.strerror or err}). Choose a directory you can write to.") from None
