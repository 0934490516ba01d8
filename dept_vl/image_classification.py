"""Image classification with visual DePT (or VPT, LoRA, full fine-tuning) on a timm ViT, on the shared trainer.

    from dept_vl.image_classification import run
    results = run(model_args, data_args, method_args, training_args)   # the CLI fills these from flags

Data: an image folder with one subfolder per class (and optionally `train/`, `validation/`, `test/` above
them), separate `--train_dir/--validation_dir/--test_dir` folders, or a Hugging Face dataset with `image` and
`label` columns; all through `datasets.load_dataset` (`"imagefolder"` for folders). Before anything trains,
every image the run reads is checked (`dept_vl.images.check_image`) and all unreadable ones are reported at
once. Images are preprocessed by timm's own transforms for the model (`resolve_data_config` +
`create_transform`: its mean, std, interpolation and crop); training images get the same, or with
`--train_augmentation timm` timm's training augmentation. Metrics: accuracy and top-5 accuracy (x100). The run
writes the trainer's files, `predictions_<split>.jsonl` and the adapter (P, A, B and the head in
`adapter_model.safetensors`), plus `image_classification.json`, which records what shapes the model (the timm
name, `pretrained`, the `timm.create_model` arguments, the class names, whether the head trained) and a SHA-256
of the frozen weights, so that `--peft_model_id DIR` reloads the adapter only onto the backbone it was trained on.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from accelerate.utils import set_seed
from PIL import ImageOps
from tqdm.auto import tqdm

from dept.command_line import MethodArguments, RunStages, config_flag, run_command_line, run_console
from dept.config import ConfigError
from dept.errors import UserError
from dept.extras import LazyModule
from dept.model import DePTModel
from dept.trainer import Trainer
from dept.training_args import TrainingArguments
from dept_vl.features import UnreadableImagesError, weights_fingerprint
from dept_vl.images import ImageLoadError, check_image, decode_image, load_image, to_rgb
from dept_vl.vit import (
    HEAD_MODULE,
    LORA_TARGET_MODULES,
    check_vision_transformer,
    num_patches,
    prepare_vit_model,
    trainable_parameter_report,
)

if TYPE_CHECKING:
    from datasets import DatasetDict

logger = logging.getLogger(__name__)
timm = LazyModule("timm")  # imported on first use: it costs more than `import torch` at start-up

RUN_FILE = "image_classification.json"  # what shapes the model an adapter was trained on (see check_adapter_run)
SPLIT_ALIASES = {"validation": ("validation", "valid", "val", "dev")}
TOP_K = 5
DEFAULT_HEAD_LEARNING_RATE = 1e-3
TRAIN_AUGMENTATIONS = ("none", "timm")


class ImageDataError(UserError, ValueError):
    """The image data cannot train or evaluate a classifier as asked: a split or a column is missing, there are
    fewer than two classes, a class has no training images, or labels are not class indices."""


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
    head_learning_rate: float | None = field(
        default=None,
        metadata={"aliases": ["--head_lr"],
                  "help": "Learning rate of the classification head with DePT and VPT, apart from P's "
                          "--learning_rate and A, B's --lora_embedding_lr (the head is a fresh linear layer). LoRA "
                          "and FULL train the head with the rest, at --learning_rate. "
                          f"Unset: {DEFAULT_HEAD_LEARNING_RATE}."},
    )

    def create_kwargs(self) -> dict:
        """The `timm.create_model` arguments beyond the name: --model_kwargs, then --img_size and --dynamic_img_size."""
        kwargs = yaml.safe_load(self.model_kwargs) if self.model_kwargs else {}
        if not isinstance(kwargs, dict):
            raise ConfigError(f"--model_kwargs must be a mapping such as '{{drop_path_rate: 0.1}}', got {kwargs!r}.")
        empty = [key for key, value in kwargs.items() if value is None]
        if empty:  # '{img_size:32}' is YAML for {"img_size:32": None}, which timm would silently drop
            raise ConfigError(f"--model_kwargs {self.model_kwargs!r} gives no value to {empty}: write a space after "
                              "each colon, e.g. '{img_size: 32, drop_path_rate: 0.1}'.")
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
        default=None,
        metadata={"help": "Image folder: one subfolder per class, optionally under train/, validation/ and test/ "
                          "(--do_predict needs test/)."},
    )
    train_dir: str | None = field(default=None, metadata={"help": "Training images, one subfolder per class."})
    validation_dir: str | None = field(default=None, metadata={"help": "Validation images, one subfolder per class."})
    test_dir: str | None = field(default=None, metadata={"help": "Test images, one subfolder per class."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding the class labels."})
    train_val_split: float = field(
        default=0.15, metadata={"help": "Share of the training set held out for validation when there is none."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Cut the training set to this many images, drawn at random (--data_seed)."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Cut the validation and test sets to this many images, drawn at random."})
    data_seed: int = field(default=42, metadata={"help": "Seed of the validation hold-out and of the cuts."})
    train_augmentation: str = field(
        default="none",
        metadata={"choices": list(TRAIN_AUGMENTATIONS),
                  "help": "Training images' preprocessing. none: the evaluation transform (timm's resize, centre crop "
                          "and normalisation for the model), as VPT on VTAB; timm: timm's training augmentation "
                          "(random-resized crop at scale 0.08-1, horizontal flip, colour jitter 0.4), for "
                          "large data sets: it can hurt small ones, and flips change digits and text."},
    )

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
        if self.train_augmentation not in TRAIN_AUGMENTATIONS:
            raise ValueError(f"--train_augmentation {self.train_augmentation!r}: choose one of {TRAIN_AUGMENTATIONS}.")


@dataclass
class VisionMethodArguments(MethodArguments):
    """The shared method flags; P starts as VPT's prompts, since images have no vocabulary to copy from."""

    prompt_init: str = config_flag("prompt_init", default="random")
    lora_r: int | None = field(
        default=None,
        metadata={"help": f"Rank of the LoRA baseline on every block's fused {LORA_TARGET_MODULES[0]} projection "
                          "(timm's one Linear for q, k and v together, so all three are adapted); the same as --r "
                          "with --peft_type LORA."},
    )


# --------------------------------------------------------------------------------------------------- the data


def image_folder_roots(data_args: ImageDataArguments) -> dict[str, Path]:
    """The folders the images are read from, by flag (`--data_dir`, `--train_dir`, ...); none for a Hub dataset."""
    if data_args.dataset_name and data_args.dataset_name != "imagefolder":
        return {}
    flags = {"data_dir": data_args.data_dir, "train_dir": data_args.train_dir,
             "validation_dir": data_args.validation_dir, "test_dir": data_args.test_dir}
    return {flag: Path(folder) for flag, folder in flags.items() if folder}


def check_image_folders(roots: dict[str, Path]) -> None:
    """Refuse a folder that does not exist or holds no image; warn for each folder without images (an empty class
    folder is no class at all, for `datasets`), naming them. Hidden folders are skipped, as `datasets` skips them."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder  # here: datasets is slow to import

    for flag, root in roots.items():
        if not root.is_dir():
            raise ImageDataError(f"--{flag} {root} is not a directory.")
        has_images: dict[Path, bool] = {}
        for folder, subfolders, files in os.walk(root, topdown=False, followlinks=True):
            folder = Path(folder)
            subfolders = [folder / name for name in subfolders if not name.startswith((".", "__"))]
            has_images[folder] = (any(Path(name).suffix.lower() in ImageFolder.EXTENSIONS for name in files)
                                  or any(has_images.get(sub, False) for sub in subfolders))
        if not has_images[root]:
            raise ImageDataError(
                f"--{flag} {root} holds no image files (none with an extension that datasets' imagefolder reads: "
                ".jpg, .jpeg, .png, .webp, ...): put each class's images in a subfolder of its own, e.g. "
                "DIR/cat/1.jpg, DIR/dog/2.jpg.")
        empty = [folder for folder, found in has_images.items()
                 if not found and has_images.get(folder.parent) and folder != root
                 and not folder.name.startswith((".", "__"))]
        if empty:
            logger.warning("%d folder(s) under --%s %s hold no images, so they are no class and no split: %s.",
                           len(empty), flag, root, ", ".join(str(folder) for folder in sorted(empty)))


def load_image_splits(data_args: ImageDataArguments) -> DatasetDict:
    """The dataset's splits, named train / validation / test, with the label column as a `ClassLabel`."""
    from datasets import DatasetDict, load_dataset  # here: datasets is slow to import

    check_image_folders(image_folder_roots(data_args))
    if data_args.dataset_name:
        splits = load_dataset(data_args.dataset_name, data_args.dataset_config_name, data_dir=data_args.data_dir)
    elif data_args.data_dir:  # drop_labels=False: one class folder gives one class, so the count can be refused
        splits = load_dataset("imagefolder", data_dir=data_args.data_dir, drop_labels=False)
    else:  # one load for all folders, so every split gets the same class names
        folders = {"train": data_args.train_dir, "validation": data_args.validation_dir, "test": data_args.test_dir}
        splits = load_dataset("imagefolder", data_files={s: str(Path(f) / "**") for s, f in folders.items() if f},
                              drop_labels=False)
    splits = DatasetDict(splits)
    for name, aliases in SPLIT_ALIASES.items():
        found = next((alias for alias in aliases if alias in splits), None)
        if found and found != name:
            splits[name] = splits.pop(found)
    for split, dataset in splits.items():
        missing = [c for c in (data_args.image_column, data_args.label_column) if c not in dataset.column_names]
        if missing:
            raise ImageDataError(
                f"The {split} split has no column {missing} (columns: {dataset.column_names}). Name the columns "
                "with --image_column and --label_column."
            )
    return splits


def class_names(splits: DatasetDict, label_column: str) -> list[str]:
    """The class names (a `ClassLabel`'s, or the indices 0..n-1 as strings); at least two."""
    from datasets import ClassLabel

    feature = next(iter(splits.values())).features[label_column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
    else:
        values = {label for dataset in splits.values() for label in dataset.unique(label_column)}
        if not all(isinstance(label, int) and not isinstance(label, bool) for label in values):
            examples = sorted(map(repr, values))[:5]
            raise ImageDataError(
                f"The labels in {label_column!r} are not class indices ({', '.join(examples)}, ...): use a dataset "
                "whose label column is a ClassLabel or holds the integers 0..n-1, or name that column with "
                "--label_column.")
        labels = sorted(values)
        if labels and (labels[0] < 0 or labels != list(range(labels[-1] + 1))):
            raise ImageDataError(
                f"The labels in {label_column!r} must be the class indices 0..n-1, each used at least once; got "
                f"{labels[:10]}{' ...' if len(labels) > 10 else ''}. Renumber them 0..n-1.")
        names = [str(label) for label in labels]
    if len(names) < 2:
        raise ImageDataError(
            f"A classifier needs at least two classes; the data has {len(names)} ({names}). With an image folder, "
            "put each class's images in a subfolder of its own (DIR/cat/*.jpg, DIR/dog/*.jpg).")
    return names


def select_splits(splits: DatasetDict, data_args: ImageDataArguments) -> dict:
    """The splits this run needs, holding out validation from train when the dataset has none; `--max_*_samples`
    keep that many images drawn at random (`--data_seed`), since image folders list one class after another."""
    from datasets import ClassLabel, DatasetDict

    needed = {"train": data_args.do_train, "validation": data_args.do_train or data_args.do_eval,
              "test": data_args.do_predict}
    if needed["test"] and "test" not in splits:
        fix = (f"put the test images in {data_args.data_dir}/test/<class>/ and the training images in "
               f"{data_args.data_dir}/train/<class>/ (the class folders directly in --data_dir are the train split)"
               if data_args.data_dir and not data_args.dataset_name else "give a test split (--test_dir DIR)")
        raise ImageDataError(
            f"--do_predict scores the test split, but the data has none (it has {sorted(splits)}): {fix}, or drop "
            "--do_predict.")
    if needed["validation"] and "validation" not in splits and "train" in splits:
        stratify = data_args.label_column if isinstance(splits["train"].features[data_args.label_column],
                                                        ClassLabel) else None
        try:
            held_out = splits["train"].train_test_split(test_size=data_args.train_val_split, seed=data_args.data_seed,
                                                        stratify_by_column=stratify)
        except ValueError as error:  # e.g. a class with a single image cannot be split stratified
            raise ImageDataError(
                f"The data has no validation split, and holding out {data_args.train_val_split:.0%} of train for it "
                f"failed: {error}. Give a validation split (a validation/ folder, or --validation_dir), or change "
                "--train_val_split.") from None
        splits = DatasetDict({**splits, "train": held_out["train"], "validation": held_out["test"]})
        logger.info("No validation split: %d training images held out for validation.", len(held_out["test"]))
    selected = {}
    for split, wanted in needed.items():
        if not wanted:
            continue
        if split not in splits:
            raise ImageDataError(f"The data has no {split} split (it has {sorted(splits)}): give one, or drop "
                                 f"--do_{'eval' if split == 'validation' else split}.")
        limit = data_args.max_train_samples if split == "train" else data_args.max_eval_samples
        dataset = splits[split]
        if limit is not None and limit < len(dataset):
            dataset = dataset.shuffle(seed=data_args.data_seed).select(range(limit))
        selected[split] = dataset
    return selected


def check_every_class_trains(selected: dict, names: list[str], data_args: ImageDataArguments) -> None:
    """Refuse classes with no training image that other splits hold: the head could never predict them, yet they
    would be scored."""
    trained = set(selected["train"][data_args.label_column])  # not unique(): it would copy a split with an index map
    untrained = {index for index in range(len(names)) if index not in trained}
    if not untrained:
        return
    found_in = [split for split, dataset in selected.items()
                if split != "train" and untrained & set(dataset[data_args.label_column])]
    cut = (f", or raise --max_train_samples {data_args.max_train_samples}"
           if data_args.max_train_samples is not None else "")
    where = f" (found in {', '.join(found_in)})" if found_in else ""
    raise ImageDataError(
        f"No training images for {len(untrained)} of the {len(names)} classes: "
        f"{[names[index] for index in sorted(untrained)]}{where}. The head would never learn them: add training "
        f"images of these classes, or remove them from every split{cut}.")


def image_sources(dataset, image_column: str) -> tuple:
    """The dataset with its images undecoded ({"path", "bytes"} per row), and whether they were `Image` features
    (else the column already holds PIL images, and is left as it is)."""
    from datasets import Image

    if not isinstance(dataset.features[image_column], Image):
        return dataset, False
    return dataset.cast_column(image_column, Image(decode=False)), True


def read_image(source: dict):
    """A stored image ({"path", "bytes"}) as upright 8-bit RGB, through `dept_vl.images` (errors name the file)."""
    if source.get("bytes") is not None:
        return decode_image(source["bytes"], source.get("path") or "<image bytes>")
    return load_image(source["path"])


def _check_source(source: dict) -> ImageLoadError | None:
    data = source.get("bytes")
    try:
        check_image(data if data is not None else source["path"], source.get("path") or "<image bytes>")
    except ImageLoadError as error:
        return error
    return None


def check_images(selected: dict, image_column: str, batch_size: int = 256) -> None:
    """Check every image the run reads (`dept_vl.images.check_image`: not empty, a known header, compressed data
    whole to its end) before anything trains, and report all that fail at once, counted, by path. A file that
    several rows name is checked once."""
    failures: list[ImageLoadError] = []
    seen: set[str] = set()
    checked = 0
    show = int(os.environ.get("LOCAL_RANK", "0")) == 0
    total = sum(len(dataset) for dataset in selected.values())
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool, \
            tqdm(total=total, desc="Checking images", unit="image", disable=not show, leave=False) as progress:
        for dataset in selected.values():
            dataset, stored = image_sources(dataset, image_column)
            batches = dataset.iter(batch_size=batch_size) if stored else ()
            for batch in batches:
                files = [source["path"] if source.get("bytes") is None else None for source in batch[image_column]]
                sources = [source for source, file in zip(batch[image_column], files, strict=True)
                           if file is None or file not in seen]
                seen.update(file for file in files if file)
                failures += [error for error in pool.map(_check_source, sources) if error is not None]
                checked += len(sources)
                progress.update(len(batch[image_column]))
    if failures:
        raise UnreadableImagesError.listing(failures, checked, "images cannot be read",
                                            "Replace or remove these files, then run again.")


def image_transforms(model: torch.nn.Module, train_augmentation: str = "none") -> tuple:
    """timm's (train, eval) transforms for `model`, at its own input size; train is eval's unless
    `train_augmentation="timm"` (timm's training transform: random-resized crop, flip, colour jitter)."""
    vit = check_vision_transformer(model)
    input_size = (vit.patch_embed.proj.in_channels, *vit.patch_embed.img_size)
    data_config = timm.data.resolve_data_config(args={"input_size": input_size}, model=vit)
    eval_transform = timm.data.create_transform(**data_config, is_training=False)
    if train_augmentation == "timm":
        return timm.data.create_transform(**data_config, is_training=True), eval_transform
    return eval_transform, eval_transform


def with_pixel_values(dataset, transform, image_column: str, label_column: str):
    """The dataset with `pixel_values` computed on access (RGB, upright, then `transform`) and `labels`."""
    dataset, stored = image_sources(dataset, image_column)

    def apply(batch):
        images = [read_image(image) if stored else to_rgb(ImageOps.exif_transpose(image))
                  for image in batch[image_column]]
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


def check_model_flags(model_args: ImageModelArguments, method_args: MethodArguments) -> None:
    """Refuse, before any data loads, a name timm does not know, a model that is not a ViT, `timm.create_model`
    arguments it does not take, and a head learning rate for a method that has none of its own. The model is built
    on the meta device (no weights, no memory): first without --model_kwargs, which a non-ViT would refuse with a
    TypeError of its own (`img_size`), then with them."""
    name = model_args.model_name_or_path
    if not (name.startswith("hf-hub:") or timm.is_model(name)):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ConfigError(f"Unknown timm model {name!r}; similar names: {close}.")
    model = on_meta_device(lambda: timm.create_model(name, pretrained=False))
    if model is not None and not isinstance(model, timm.models.VisionTransformer):
        raise ConfigError(
            f"--model_name_or_path {name} is a {type(model).__name__}, not a ViT: visual DePT puts P and A @ B on a "
            "ViT's patch embeddings, so it needs timm's VisionTransformer (patch_embed, class token, position "
            "embedding). Pick a ViT, e.g. vit_base_patch16_224 (timm.list_models('vit_*')).")
    on_meta_device(lambda: create_vit(model_args, num_classes=2, pretrained=False))
    if model_args.head_learning_rate is not None and method_args.peft_type not in ("PROMPT_TUNING_LORA",
                                                                                   "PROMPT_TUNING"):
        raise ConfigError(f"--head_learning_rate applies to DePT and VPT; --peft_type {method_args.peft_type} "
                          "trains the head with the rest, at --learning_rate. Drop it.")


def on_meta_device(build):
    """`build()` on the meta device, or None where a model's initialisation needs real tensors (the real build then
    makes the same checks, only later)."""
    try:
        with torch.device("meta"):
            return build()
    except (NotImplementedError, RuntimeError):
        return None


def create_vit(model_args: ImageModelArguments, num_classes: int, pretrained: bool | None = None) -> torch.nn.Module:
    """The timm ViT with a fresh `num_classes` head, through `timm.create_model` (`pretrained`: default the flag's)."""
    kwargs = model_args.create_kwargs()
    pretrained = model_args.pretrained if pretrained is None else pretrained
    try:
        model = timm.create_model(model_args.model_name_or_path, pretrained=pretrained, num_classes=num_classes,
                                  **kwargs)
    except TypeError as error:  # an argument the model does not take
        raise ConfigError(f"timm.create_model({model_args.model_name_or_path!r}) refused the arguments {kwargs} "
                          f"(from --model_kwargs, --img_size, --dynamic_img_size): {error}.") from error
    return check_vision_transformer(model)


def frozen_weights_fingerprint(vit: torch.nn.Module, train_head: bool) -> str:
    """SHA-256 (`dept_vl.features.weights_fingerprint`) of the weights an adapter does not hold: the ViT without its
    head when the head trains (the adapter saves it), with it when it stays as built."""
    return weights_fingerprint(vit, skip=(f"{HEAD_MODULE}.",) if train_head else ())


def build_image_model(model_args: ImageModelArguments, method_args: MethodArguments, vit, seed: int):
    dept_config = None  # a saved adapter brings its own (its A is checked against the patch grid)
    if not method_args.peft_model_id and method_args.peft_type in ("PROMPT_TUNING_LORA", "PROMPT_TUNING"):
        dept_config = method_args.dept_config(num_patches(vit), "cls", model_args.model_name_or_path, seed)
    model = prepare_vit_model(vit, method_args.peft_type, dept_config=dept_config,
                              peft_model_id=method_args.peft_model_id, lora_r=method_args.lora_r,
                              train_head=model_args.train_head)
    if isinstance(model, DePTModel):
        head_lr = model_args.head_learning_rate
        model.optimizer_param_groups = functools.partial(
            model.optimizer_param_groups, modules_lr=DEFAULT_HEAD_LEARNING_RATE if head_lr is None else head_lr)
    return model


def run_record(model_args: ImageModelArguments, names: list[str], seed: int, weights_sha256: str) -> dict:
    """What shapes the model (checked by `check_adapter_run`), in `image_classification.json`."""
    return {"model_name_or_path": model_args.model_name_or_path, "pretrained": model_args.pretrained,
            "model_kwargs": model_args.create_kwargs(), "train_head": model_args.train_head, "class_names": names,
            "seed": seed, "weights_sha256": weights_sha256}


def read_adapter_run(adapter_dir: str | None) -> dict | None:
    path = Path(adapter_dir, RUN_FILE) if adapter_dir else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def check_adapter_run(adapter_dir: str, model_args: ImageModelArguments, names: list[str]) -> None:
    """Refuse, before any compute, an adapter trained on other classes or a model built otherwise: another timm
    name, other `timm.create_model` arguments (depth, image size, ...), other pretrained weights, or a head that
    was trained where it now would not be loaded (or the reverse). Its frozen weights are compared once the ViT is
    built (`check_adapter_weights`). A record without a field (written by an older version) skips that field."""
    saved = read_adapter_run(adapter_dir)
    if saved is None:
        return
    if saved.get("class_names") != names:
        raise ConfigError(f"{adapter_dir} was trained on the classes {saved.get('class_names')}, but this data has "
                          f"{names}: its head would name the wrong classes.")
    if saved.get("model_name_or_path") != model_args.model_name_or_path:
        raise ConfigError(f"{adapter_dir} was trained on {saved.get('model_name_or_path')}, not on "
                          f"{model_args.model_name_or_path}: pass --model_name_or_path {saved.get('model_name_or_path')}.")
    kwargs = model_args.create_kwargs()
    if saved.get("model_kwargs", kwargs) != kwargs:
        raise ConfigError(
            f"{adapter_dir} was trained on {saved['model_name_or_path']} built with {saved['model_kwargs']}, not "
            f"{kwargs} (--model_kwargs, --img_size, --dynamic_img_size): pass --model_kwargs "
            f"'{json.dumps(saved['model_kwargs'])}' and no --img_size or --dynamic_img_size.")
    for flag, own in (("pretrained", model_args.pretrained), ("train_head", model_args.train_head)):
        if saved.get(flag, own) != own:
            raise ConfigError(f"{adapter_dir} was trained with --{flag} {str(saved[flag]).lower()}, not "
                              f"{str(own).lower()}: pass --{flag} {str(saved[flag]).lower()}.")


def check_adapter_weights(adapter_dir: str, weights_sha256: str) -> None:
    """Refuse a ViT whose frozen weights differ from those the adapter was trained on (`frozen_weights_fingerprint`):
    the same name and arguments can still give other weights (another --seed without pretrained weights, or a
    changed checkpoint), and P, A and B would then read other features."""
    saved = read_adapter_run(adapter_dir) or {}
    if saved.get("weights_sha256", weights_sha256) == weights_sha256:
        return
    fix = (f"without pretrained weights they are drawn from --seed: pass --seed {saved.get('seed')}"
           if not saved.get("pretrained", True) else "load the checkpoint it was trained on")
    raise ConfigError(
        f"The frozen weights of {saved.get('model_name_or_path')} differ from those {adapter_dir} was trained on "
        f"(SHA-256 {weights_sha256[:12]}..., not {saved['weights_sha256'][:12]}...): {fix}.")


# --------------------------------------------------------------------------------------------------- the run


def run(model_args: ImageModelArguments, data_args: ImageDataArguments, method_args: MethodArguments,
        training_args: TrainingArguments) -> dict[str, float]:
    check_model_flags(model_args, method_args)
    all_splits = load_image_splits(data_args)
    names = class_names(all_splits, data_args.label_column)
    splits = select_splits(all_splits, data_args)
    if data_args.do_train:
        check_every_class_trains(splits, names, data_args)
    if method_args.peft_model_id:
        check_adapter_run(method_args.peft_model_id, model_args, names)
    check_images(splits, data_args.image_column)

    set_seed(training_args.seed)  # a base without pretrained weights is then the same on every load
    vit = create_vit(model_args, len(names))
    weights_sha256 = frozen_weights_fingerprint(vit, model_args.train_head)
    if method_args.peft_model_id:
        check_adapter_weights(method_args.peft_model_id, weights_sha256)
    model = build_image_model(model_args, method_args, vit, training_args.seed)
    trainable = trainable_parameter_report(model)
    logger.info("Trainable parameters: %s", trainable)

    train_transform, eval_transform = image_transforms(vit, data_args.train_augmentation)
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
            record = {**run_record(model_args, names, training_args.seed, weights_sha256),
                      "peft_type": method_args.peft_type, "trainable_parameters": trainable}
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
