"""A toy DePT-shaped model and task for the trainer's tests, small enough to train in a second on one CPU.

The model is a frozen linear classifier (the "base") whose input x is changed the DePT way:
x' = x + P + x @ A @ B, with P at `learning_rate` and A, B at `lora_embedding_lr`. Labels come from a random
"teacher" linear map, so the adapter can really learn them. Dropout makes every step draw from the global RNG,
so a resume that restores the RNG wrongly shows up as different parameters.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dept.trainer import Trainer
from dept.training_args import TrainingArguments

NUM_FEATURES = 8
NUM_CLASSES = 3


@dataclass
class ToyOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor


class ToyAdapterModel(nn.Module):
    """Frozen `base` (Linear NUM_FEATURES -> NUM_CLASSES) with a trainable prompt and rank-r update of its input.

    forward(features (batch, NUM_FEATURES), labels (batch,) optional) -> ToyOutput(loss, logits (batch, NUM_CLASSES)).
    `step_delay` seconds of sleep per training forward make a run slow enough to be killed mid-way.
    """

    def __init__(self, r: int = 3, dropout: float = 0.1, seed: int = 0, step_delay: float = 0.0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.base = nn.Linear(NUM_FEATURES, NUM_CLASSES)
        with torch.no_grad():
            self.base.weight.copy_(torch.randn(NUM_CLASSES, NUM_FEATURES, generator=generator))
            self.base.bias.zero_()
        self.base.requires_grad_(False)
        self.prompt = nn.Parameter(torch.zeros(NUM_FEATURES))
        bound = 1 / math.sqrt(r)
        self.lora_embedding_A = nn.Parameter(torch.rand(NUM_FEATURES, r, generator=generator) * 2 * bound - bound)
        self.lora_embedding_B = nn.Parameter(torch.zeros(r, NUM_FEATURES))
        self.dropout = nn.Dropout(dropout)
        self.step_delay = step_delay

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> ToyOutput:
        if self.training and self.step_delay:
            time.sleep(self.step_delay)
        x = features + self.prompt + features @ self.lora_embedding_A @ self.lora_embedding_B
        logits = self.base(self.dropout(x))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ToyOutput(loss=loss, logits=logits)

    def optimizer_param_groups(self, learning_rate: float, lora_embedding_lr: float, weight_decay: float = 0.0):
        return [
            {"name": "prompt", "params": [self.prompt], "lr": learning_rate, "weight_decay": weight_decay},
            {
                "name": "lora_embedding",
                "params": [self.lora_embedding_A, self.lora_embedding_B],
                "lr": lora_embedding_lr,
                "weight_decay": weight_decay,
            },
        ]

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """`state_dict`: whole tensors by parameter name instead of the own ones (as `DePTModel.save_pretrained`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        trainable = {name: p.detach().cpu() for name, p in self.named_parameters() if p.requires_grad}
        trainable.update(state_dict or {})
        save_file(trainable, str(directory / "adapter_model.safetensors"))
        (directory / "adapter_config.json").write_text(json.dumps({"r": self.lora_embedding_A.shape[1]}))

    def load_adapter(self, directory: str | Path) -> None:
        self.load_state_dict(load_file(str(Path(directory) / "adapter_model.safetensors")), strict=False)


class LossRecordingModel(ToyAdapterModel):
    """Records every training forward's loss as a float, in order (a host sync per micro-batch: only for tests
    that check the logged losses against these)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.losses: list[float] = []

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> ToyOutput:
        output = super().forward(features, labels)
        if self.training and output.loss is not None:
            self.losses.append(output.loss.item())
        return output


def expected_log_losses(micro_batch_losses: list[list[float]], accumulation: int, logging_steps: int) -> list[float]:
    """The loss each log entry must show: per optimizer step the mean over its micro-batches and over the
    processes (one list of losses per process), then the mean over the steps since the previous entry."""
    step_losses = [
        sum(sum(losses[i : i + accumulation]) / accumulation for losses in micro_batch_losses) / len(micro_batch_losses)
        for i in range(0, len(micro_batch_losses[0]), accumulation)
    ]
    return [
        sum(step_losses[i : i + logging_steps]) / logging_steps
        for i in range(0, len(step_losses) - logging_steps + 1, logging_steps)
    ]


def make_dataset(num_examples: int, seed: int = 1, poison_index: int | None = None) -> list[dict]:
    """Examples {"features", "label", "length"} labelled by a fixed random teacher; `poison_index` gets NaN features."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(NUM_FEATURES, NUM_CLASSES, generator=torch.Generator().manual_seed(1234))
    features = torch.randn(num_examples, NUM_FEATURES, generator=generator)
    labels = (features @ teacher).argmax(-1)
    if poison_index is not None:
        features[poison_index] = float("nan")
    return [{"features": features[i], "label": int(labels[i]), "length": 1 + (7 * i) % 13} for i in range(num_examples)]


def collate(examples: list[dict]) -> dict:
    return {
        "features": torch.stack([ex["features"] for ex in examples]),
        "labels": torch.tensor([ex["label"] for ex in examples]),
        "references": [str(ex["label"]) for ex in examples],
    }


class ToyEvaluator:
    """Argmax class as a string; accuracy in percent."""

    main_metric = "accuracy"
    greater_is_better = True

    def predict_step(self, model: nn.Module, batch: dict) -> list[str]:
        return [str(i) for i in model(features=batch["features"]).logits.argmax(-1).tolist()]

    def compute_metrics(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        correct = sum(p == r for p, r in zip(predictions, references, strict=True))
        return {"accuracy": 100.0 * correct / len(references)}


def toy_args(output_dir: str | Path, **overrides) -> TrainingArguments:
    """Small-run defaults: 2 groups at different learning rates, eval and save every 4 steps, no TensorBoard."""
    options = dict(
        output_dir=str(output_dir),
        learning_rate=0.15,
        lora_embedding_lr=0.08,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=16,
        warmup_steps=2,
        eval_steps=4,
        save_steps=4,
        logging_steps=2,
        save_total_limit=2,
        report_to="none",
        seed=7,
    )
    options.update(overrides)
    return TrainingArguments(**options)


TRAIN_SIZE, EVAL_SIZE = 40, 21  # 40 / 4 = 10 batches per epoch; 21 leaves a partial last eval batch


def toy_trainer(args: TrainingArguments, model: ToyAdapterModel | None = None, **overrides) -> Trainer:
    options = dict(
        collate_fn=collate,
        evaluator=ToyEvaluator(),
        train_dataset=make_dataset(TRAIN_SIZE, seed=1),
        eval_dataset=make_dataset(EVAL_SIZE, seed=2),
    )
    options.update(overrides)
    return Trainer(model if model is not None else ToyAdapterModel(), args, **options)


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
