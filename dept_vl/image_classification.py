"""Image classification with visual DePT (or VPT, LoRA, full fine-tuning) on a timm ViT, on the shared trainer.

    from dept_vl.image_classification import run
    results = run(model_args, data_args, method_args, training_args)   # the CLI fills these from flags

Data: an image folder with one subfolder per class (and optionally `train/`, `validation/`, `test/` above
them), separate `--train_dir/--validation_dir/--test_dir` folders, or a Hugging Face dataset with `image` and
`label` columns; all through `datasets.load_dataset` (`"imagefolder"` for folders). Images are preprocessed
by timm's own transforms for the model (`resolve_data_config` + `create_transform`: its mean, std,
interpolation and crop; random-resized-crop and flip when training). Metrics: accuracy and top-5 accuracy
(x100). The run writes the trainer's files, `predictions_<split>.jsonl` and the adapter (P, A, B and the head
in `adapter_model.safetensors`), plus `image_classification.json`, which records the base model and the class
names so that `--peft_model_id DIR` can reload the adapter for evaluation.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import yaml
from accelerate.utils import set_seed
from datasets import ClassLabel, DatasetDict, load_dataset
from PIL import ImageOps
from timm.data import create_transform, resolve_data_config

from dept.command_line import MethodArguments, RunStages, config_flag, run_command_line, run_console
from dept.config import ConfigError
from dept.model import DePTModel
from dept.trainer import Trainer
from dept.training_args import TrainingArguments
from dept_vl.images import to_rgb
from dept_vl.vit import check_vision_transformer, num_patches, prepare_vit_model, trainable_parameter_report

logger = logging.getLogger(__name__)

RUN_FILE = "image_classification.json"  # the base model and class names an adapter was trained with
SPLIT_ALIASES = {"validation": ("validation", "valid", "val", "dev")}
TOP_K = 5


@dataclass
class ImageModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "A timm ViT name (vit_base_patch16_224), or hf-hub:ORG/NAME for timm weights on the Hub."}
    )
    pretrained: bool = field(default=True, metadata={"help": "Load the model's pretrained weights."})
    model_kwargs: str | None = field(
        default=None,
        metadata={"help": "More timm.create_model arguments as a YAML/JSON mapping, e.g. '{drop_path_rate: 0.1}'."},
    )
    img_size: int | None = field(default=None, metadata={"help": "Input size (the position embedding is resampled)."})
    dynamic_img_size: bool = field(
        default=False, metadata={"help": "Accept other image sizes: position embedding and A @ B follow the grid."}
    )
    train_head: bool = field(default=True, metadata={"help": "Train the classification head with the method."})
    head_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the head (DePT/VPT); default lora_embedding_lr."}
    )

    def create_kwargs(self) -> dict:
        kwargs = yaml.safe_load(self.model_kwargs) if self.model_kwargs else {}
        if not isinstance(kwargs, dict):
            raise ConfigError(f"--model_kwargs must be a mapping such as '{{drop_path_rate: 0.1}}', got {kwargs!r}.")
        if self.img_size is not None:
            kwargs["img_size"] = self.img_size
        if self.dynamic_img_size:
            kwargs["dynamic_img_size"] = True
        return kwargs


@dataclass
class ImageDataArguments(RunStages):
    dataset_name: str | None = field(
        default=None, metadata={"help": "A Hugging Face dataset with image and label columns (or 'imagefolder')."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    data_dir: str | None = field(
        default=None, metadata={"help": "Image folder: one subfolder per class, optionally under train/validation/test."}
    )
    train_dir: str | None = field(default=None, metadata={"help": "Training images, one subfolder per class."})
    validation_dir: str | None = field(default=None, metadata={"help": "Validation images, one subfolder per class."})
    test_dir: str | None = field(default=None, metadata={"help": "Test images, one subfolder per class."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding the class labels."})
    train_val_split: float = field(
        default=0.15, metadata={"help": "Share of the training set held out for validation when there is none."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Cut the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cut the validation and test sets."})
    data_seed: int = field(default=42, metadata={"help": "Seed of the validation hold-out."})

    def __post_init__(self):
        super().__post_init__()
        folders = [self.train_dir, self.validation_dir, self.test_dir]
        given = [bool(self.dataset_name), bool(self.data_dir) and not self.dataset_name, any(folders)]
        if sum(given) != 1:
            raise ValueError(
                "Name the data once: --dataset_name NAME (a Hub dataset, or imagefolder with --data_dir), --data_dir DIR "
                "(an image folder), or --train_dir/--validation_dir/--test_dir."
            )
        if not 0 < self.train_val_split < 1:
            raise ValueError(f"--train_val_split must be between 0 and 1, got {self.train_val_split}.")


@dataclass
class VisionMethodArguments(MethodArguments):
    """The shared method flags; P starts as VPT's prompts, since images have no vocabulary to copy from."""

    prompt_init: str = config_flag("prompt_init", default="random")


# --------------------------------------------------------------------------------------------------- the data


def load_image_splits(data_args: ImageDataArguments) -> DatasetDict:
    """The dataset's splits, named train / validation / test, with the label column as a `ClassLabel`."""
    if data_args.dataset_name:
        splits = load_dataset(data_args.dataset_name, data_args.dataset_config_name, data_dir=data_args.data_dir)
    elif data_args.data_dir:
        splits = load_dataset("imagefolder", data_dir=data_args.data_dir)
    else:  # one load for all folders, so every split gets the same class names
        folders = {"train": data_args.train_dir, "validation": data_args.validation_dir, "test": data_args.test_dir}
        for split, folder in folders.items():
            if folder and not Path(folder).is_dir():
                raise FileNotFoundError(f"--{split}_dir {folder} is not a directory.")
        splits = load_dataset("imagefolder", data_files={s: str(Path(f) / "**") for s, f in folders.items() if f})
    splits = DatasetDict(splits)
    for name, aliases in SPLIT_ALIASES.items():
        found = next((alias for alias in aliases if alias in splits), None)
        if found and found != name:
            splits[name] = splits.pop(found)
    for split, dataset in splits.items():
        missing = [c for c in (data_args.image_column, data_args.label_column) if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"The {split} split has no column {missing} (columns: {dataset.column_names}). Name the columns "
                "with --image_column and --label_column."
            )
    return splits


def class_names(splits: DatasetDict, label_column: str) -> list[str]:
    feature = next(iter(splits.values())).features[label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    labels = sorted({int(label) for dataset in splits.values() for label in dataset[label_column]})
    if labels and (labels[0] < 0 or labels != list(range(labels[-1] + 1))):
        raise ValueError(f"Labels in {label_column!r} must be class indices 0..n-1, got {labels[:10]}.")
    return [str(label) for label in labels]


def select_splits(splits: DatasetDict, data_args: ImageDataArguments) -> dict:
    """The splits this run needs, holding out validation from train when the dataset has none."""
    needed = {"train": data_args.do_train, "validation": data_args.do_train or data_args.do_eval,
              "test": data_args.do_predict}
    if needed["validation"] and "validation" not in splits and "train" in splits:
        stratify = data_args.label_column if isinstance(splits["train"].features[data_args.label_column],
                                                        ClassLabel) else None
        held_out = splits["train"].train_test_split(test_size=data_args.train_val_split, seed=data_args.data_seed,
                                                    stratify_by_column=stratify)
        splits = DatasetDict({**splits, "train": held_out["train"], "validation": held_out["test"]})
        logger.info("No validation split: %d training images held out for validation.", len(held_out["test"]))
    selected = {}
    for split, wanted in needed.items():
        if not wanted:
            continue
        if split not in splits:
            raise ValueError(f"The data has no {split} split (it has {sorted(splits)}): give one or drop its --do_ flag.")
        limit = data_args.max_train_samples if split == "train" else data_args.max_eval_samples
        dataset = splits[split]
        selected[split] = dataset.select(range(min(limit, len(dataset)))) if limit is not None else dataset
    return selected


def image_transforms(model: torch.nn.Module) -> tuple:
    """timm's (train, eval) transforms for `model`, at its own input size."""
    vit = check_vision_transformer(model)
    input_size = (vit.patch_embed.proj.in_channels, *vit.patch_embed.img_size)
    data_config = resolve_data_config(args={"input_size": input_size}, model=vit)
    return create_transform(**data_config, is_training=True), create_transform(**data_config, is_training=False)


def with_pixel_values(dataset, transform, image_column: str, label_column: str):
    """The dataset with `pixel_values` computed on access (RGB, upright, then `transform`) and `labels`."""

    def apply(batch):
        images = [to_rgb(ImageOps.exif_transpose(image)) for image in batch[image_column]]
        return {"pixel_values": [transform(image) for image in images], "labels": batch[label_column]}

    return dataset.with_transform(apply)


@dataclass
class ImageClassificationCollator:
    class_names: list[str]

    def __call__(self, rows: list[dict]) -> dict:
        labels = [int(row["labels"]) for row in rows]
        return {"pixel_values": torch.stack([row["pixel_values"] for row in rows]),
                "labels": torch.tensor(labels), "references": [self.class_names[label] for label in labels]}


class ImageClassificationEvaluator:
    """Top-1 and top-5 accuracy (x100); a prediction is the top class and the top-5 list, by name.

    With fewer than 5 classes, top-5 is over all classes (so it is 100).
    """

    main_metric = "accuracy"
    greater_is_better = True

    def __init__(self, class_names: list[str]):
        self.class_names = class_names

    @torch.no_grad()
    def predict_step(self, model, batch: dict) -> list[dict]:
        logits = model(pixel_values=batch["pixel_values"]).logits
        top = logits.topk(min(TOP_K, logits.shape[-1]), dim=-1).indices.tolist()
        return [{"label": self.class_names[row[0]], f"top{TOP_K}": [self.class_names[i] for i in row]} for row in top]

    def compute_metrics(self, predictions: list[dict], references: list[str]) -> dict[str, float]:
        n = max(len(references), 1)
        top1 = sum(p["label"] == gold for p, gold in zip(predictions, references, strict=True))
        topk = sum(gold in p[f"top{TOP_K}"] for p, gold in zip(predictions, references, strict=True))
        return {"accuracy": 100.0 * top1 / n, f"top{TOP_K}_accuracy": 100.0 * topk / n}


# --------------------------------------------------------------------------------------------------- the model


def create_vit(model_args: ImageModelArguments, num_classes: int) -> torch.nn.Module:
    """The timm model with a fresh `num_classes` head, through `timm.create_model`."""
    if not (model_args.model_name_or_path.startswith("hf-hub:") or timm.is_model(model_args.model_name_or_path)):
        close = timm.list_models(f"*{model_args.model_name_or_path.split('_')[0]}*")[:8]
        raise ConfigError(f"Unknown timm model {model_args.model_name_or_path!r}; similar names: {close}.")
    model = timm.create_model(model_args.model_name_or_path, pretrained=model_args.pretrained,
                              num_classes=num_classes, **model_args.create_kwargs())
    return check_vision_transformer(model)


def build_image_model(model_args: ImageModelArguments, method_args: MethodArguments, vit, seed: int):
    dept_config = None  # a saved adapter brings its own (its A is checked against the patch grid)
    if not method_args.peft_model_id and method_args.peft_type in ("PROMPT_TUNING_LORA", "PROMPT_TUNING"):
        dept_config = method_args.dept_config(num_patches(vit), "cls", model_args.model_name_or_path, seed)
    model = prepare_vit_model(vit, method_args.peft_type, dept_config=dept_config,
                              peft_model_id=method_args.peft_model_id, lora_r=method_args.lora_r,
                              train_head=model_args.train_head)
    if model_args.head_lr is not None:
        if not isinstance(model, DePTModel):
            raise ConfigError(f"--head_lr applies to DePT and VPT, not to --peft_type {method_args.peft_type}.")
        model.optimizer_param_groups = functools.partial(model.optimizer_param_groups, modules_lr=model_args.head_lr)
    return model


def check_adapter_run(adapter_dir: str, model_args: ImageModelArguments, names: list[str]) -> None:
    """Refuse an adapter trained on other classes or another base model, before any compute."""
    path = Path(adapter_dir, RUN_FILE)
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    if saved.get("class_names") != names:
        raise ConfigError(f"{adapter_dir} was trained on the classes {saved.get('class_names')}, but this data has "
                          f"{names}: its head would name the wrong classes.")
    if saved.get("model_name_or_path") != model_args.model_name_or_path:
        raise ConfigError(f"{adapter_dir} was trained on {saved.get('model_name_or_path')}, not on "
                          f"{model_args.model_name_or_path}: pass --model_name_or_path {saved.get('model_name_or_path')}.")


# --------------------------------------------------------------------------------------------------- the run


def run(model_args: ImageModelArguments, data_args: ImageDataArguments, method_args: MethodArguments,
        training_args: TrainingArguments) -> dict[str, float]:
    all_splits = load_image_splits(data_args)
    names = class_names(all_splits, data_args.label_column)
    splits = select_splits(all_splits, data_args)
    if method_args.peft_model_id:
        check_adapter_run(method_args.peft_model_id, model_args, names)

    set_seed(training_args.seed)  # a base without pretrained weights is then the same on every load
    vit = create_vit(model_args, len(names))
    model = build_image_model(model_args, method_args, vit, training_args.seed)
    trainable = trainable_parameter_report(model)
    logger.info("Trainable parameters: %s", trainable)

    train_transform, eval_transform = image_transforms(vit)
    datasets = {
        split: with_pixel_values(dataset, train_transform if split == "train" else eval_transform,
                                 data_args.image_column, data_args.label_column)
        for split, dataset in splits.items()
    }
    trainer = Trainer(
        model, training_args, collate_fn=ImageClassificationCollator(names),
        evaluator=ImageClassificationEvaluator(names), train_dataset=datasets.get("train"),
        eval_dataset=datasets.get("validation"), test_dataset=datasets.get("test"),
    )
    results: dict[str, float] = {}
    if data_args.do_train:
        results.update(trainer.train())
        if trainer.accelerator.is_main_process:
            record = {"model_name_or_path": model_args.model_name_or_path, "model_kwargs": model_args.create_kwargs(),
                      "class_names": names, "peft_type": method_args.peft_type, "trainable_parameters": trainable}
            Path(training_args.output_dir, RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")
    if data_args.do_eval:
        results.update(trainer.evaluate(datasets["validation"], split="eval"))
    if data_args.do_predict:
        results.update(trainer.predict(datasets["test"], split="test")[1])
    return results


def train(argv: list[str] | None = None) -> dict[str, float]:
    """`scripts/train_vision.py` for Python callers: return the results, raise errors as they are.

        accelerate launch scripts/train_vision.py --model_name_or_path vit_base_patch16_224 \\
            --data_dir data/flowers --peft_type PROMPT_TUNING_LORA --prefix_length 60 --r 31 \\
            --learning_rate 1e-1 --lora_embedding_lr 1e-3 --do_train --do_eval --output_dir outputs/flowers
    """
    return run_command_line((ImageModelArguments, ImageDataArguments, VisionMethodArguments, TrainingArguments),
                            run, argv)


def main(argv: list[str] | None = None) -> int:
    """`dept-train-vision`: the results as JSON once on stdout and exit status 0, or a one-line message and status 2
    (see `dept.command_line.console`)."""
    return run_console("dept-train-vision", train, argv)
