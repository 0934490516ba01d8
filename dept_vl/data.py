"""Token ids for the task rows, the image features they need, and batches for VL-T5.

A batch holds, for `model(**batch)`:

    input_ids, attention_mask   (batch, text)                  padded to the batch's longest input
    labels                      (batch, target)                -100 over pads; left out when a row has no target
    vis_feats                   (batch, images, regions, feat_dim)
    vis_boxes                   (batch, images, regions, 4)
    vis_attention_mask          (batch, images, regions)       0 for padding regions / missing second images

and `references` (one per row) for the evaluator. Every batch has the 4-d visual layout: single-image tasks
have `images = 1` (which VL-T5 reads exactly as a 3-d input), and in a multitask batch mixing NLVR2 with
one-image tasks, the absent second images are masked out.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from dept_vl.features import (
    FeatureStore,
    GridFeatureExtractor,
    ImageFolder,
    MissingFeaturesError,
    OnTheFlyFeatures,
    UnreadableImagesError,
)

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)


class FeatureSource(Protocol):
    def __contains__(self, image_id: object) -> bool: ...

    def __getitem__(self, image_id: object) -> tuple[np.ndarray, np.ndarray]: ...


def parse_per_task(value: str | None, task_names: list[str], flag: str) -> dict[str, str]:
    """'path' (for every task) or 'vqa=path1,caption=path2' -> {task: path} for the tasks that have one.

    A path may join several feature files with '+'; each is searched in turn.
    """
    if not value:
        return {}
    if "=" not in value:
        return dict.fromkeys(task_names, value)
    mapping = {}
    for item in value.split(","):
        task, equals, path = item.partition("=")
        if not equals or not path:
            raise ValueError(f"--{flag} {value!r}: write one path, or task=path pairs separated by commas.")
        mapping[task.strip()] = path.strip()
    unknown = sorted(set(mapping) - set(task_names))
    if unknown:
        raise ValueError(f"--{flag} names task(s) {unknown} that are not in --tasks {task_names}.")
    return mapping


class ChainedFeatures:
    """Several feature stores read as one (VL-T5 ships COCO as `train2014_obj36.h5` and `val2014_obj36.h5`)."""

    def __init__(self, stores: list[FeatureStore]):
        self.stores = stores
        self.path = " + ".join(str(store.path) for store in stores)

    def __contains__(self, image_id: object) -> bool:
        return any(image_id in store for store in self.stores)

    def __getitem__(self, image_id: object) -> tuple[np.ndarray, np.ndarray]:
        for store in self.stores:
            if image_id in store:
                return store[image_id]
        raise MissingFeaturesError(f"no features for image id {image_id!r} in {self.path}")


def open_feature_files(paths: str) -> FeatureSource:
    """'a.h5' or 'train2014_obj36.h5+val2014_obj36.h5' -> one source."""
    stores = [FeatureStore(path.strip()) for path in paths.split("+")]
    return stores[0] if len(stores) == 1 else ChainedFeatures(stores)


def build_feature_sources(
    task_names: list[str],
    feature_file: str | None,
    image_dir: str | None,
    backbone: str = "resnet50",
    pretrained: bool = True,
    image_size: int | None = None,
) -> dict[str, FeatureSource]:
    """One feature source per task: a stored feature file if given for it, else features from its raw images."""
    files = parse_per_task(feature_file, task_names, "feature_file")
    image_dirs = parse_per_task(image_dir, task_names, "image_dir")
    missing = [task for task in task_names if task not in files and task not in image_dirs]
    if missing:
        raise ValueError(
            f"No image features for task(s) {missing}: pass --feature_file (features extracted with "
            "scripts/extract_features.py, or VL-T5's .h5 files) or --image_dir (raw images, features on the fly)."
        )
    sources: dict[str, FeatureSource] = {}
    opened: dict[str, FeatureSource] = {}  # one reader (and one backbone) per distinct path
    extractor = None
    for task in task_names:
        if task in files:
            path = files[task]
            if path not in opened:
                opened[path] = open_feature_files(path)
            sources[task] = opened[path]
        else:
            path = image_dirs[task]
            if path not in opened:
                if extractor is None:
                    extractor = GridFeatureExtractor(backbone, pretrained=pretrained, image_size=image_size)
                opened[path] = OnTheFlyFeatures(path, extractor)
            sources[task] = opened[path]
    return sources


def feature_dim(source: FeatureSource, example_id: str | None = None) -> int:
    """The feature size of a source: from its extractor, its file attributes, or one stored image."""
    if isinstance(source, OnTheFlyFeatures):
        return source.extractor.feat_dim
    if isinstance(source, ChainedFeatures):
        return feature_dim(source.stores[0])
    if isinstance(source, FeatureStore):
        if source.attrs.get("feat_dim"):
            return int(source.attrs["feat_dim"])
        ids = source.image_ids()
        if not ids:
            raise ValueError(f"The feature store {source.path} holds no image.")
        return int(source[ids[0]][0].shape[1])
    return int(source[example_id][0].shape[1])


def check_features_cover(dataset: datasets.Dataset, sources: Mapping[str, FeatureSource], split: str) -> None:
    """Fail before training if any row's image has no features, naming the image id and where it was looked for."""
    for task, image_ids in zip(dataset["task"], dataset["image_ids"]):
        for image_id in image_ids:
            if image_id not in sources[task]:
                where = getattr(sources[task], "path", None) or getattr(sources[task], "image_dir", "")
                raise MissingFeaturesError(
                    f"{task} {split}: no features for image id {image_id!r} in {where}. Extract features for it "
                    "(scripts/extract_features.py) or point --feature_file / --image_dir at the right place."
                )


def check_images_load(datasets_by_split: Mapping[str, datasets.Dataset], sources: Mapping[str, FeatureSource]) -> None:
    """Before training on raw images (`--image_dir`, with or without `--vision_backbone`), load every image a row
    refers to, and report all that fail at once, counted, by path (as `scripts/extract_features.py` does), instead
    of stopping at the first one."""
    wanted: dict[str, list[str]] = {}
    for rows in datasets_by_split.values():
        for task, image_ids in zip(rows["task"], rows["image_ids"]):
            if isinstance(sources[task], ImageFolder):
                wanted.setdefault(task, []).extend(image_ids)
    failures, checked = [], 0
    for task, image_ids in wanted.items():
        checked += len(set(image_ids))
        failures += sources[task].unreadable(image_ids)
    if failures:
        raise UnreadableImagesError.listing(
            failures, checked, "images the data refers to cannot be loaded",
            "Replace or remove these files (or the rows that use them), then run again.")


def tokenize_vl_rows(
    dataset: datasets.Dataset, tokenizer, max_length: int, max_target_length: int, split_name: str = ""
) -> datasets.Dataset:
    """Add `input_ids`, `labels` and `length`; drop the text. Inputs are cut at `max_length` tokens (DePT's s)."""

    def encode(batch):
        inputs = tokenizer(batch["source"], truncation=True, max_length=max_length)["input_ids"]
        targets = tokenizer(batch["target"], truncation=True, max_length=max_target_length)["input_ids"]
        labels = [ids if text else [] for ids, text in zip(targets, batch["target"])]
        return {"input_ids": inputs, "labels": labels, "length": [len(ids) for ids in inputs]}

    return dataset.map(encode, batched=True, remove_columns=["source", "target"],
                       desc=f"Tokenizing {split_name}".strip())


def _pad(sequences: list[list[int]], value: int) -> torch.Tensor:
    longest = max(len(s) for s in sequences)
    return torch.tensor([s + [value] * (longest - len(s)) for s in sequences], dtype=torch.long)


@dataclass
class VLCollator:
    """Batches tokenized rows with their images' region features (see the module docstring for the shapes).

    Args:
        tokenizer: gives the pad id.
        features: task name -> feature source (`FeatureStore` or `OnTheFlyFeatures`).
    """

    tokenizer: object
    features: Mapping[str, FeatureSource]

    def __call__(self, rows: list[dict]) -> dict:
        batch = {
            "input_ids": _pad([r["input_ids"] for r in rows], self.tokenizer.pad_token_id),
            "attention_mask": _pad([[1] * len(r["input_ids"]) for r in rows], 0),
        }
        if all(r["labels"] for r in rows):  # rows without a target (unlabelled test data) get no loss
            batch["labels"] = _pad([r["labels"] for r in rows], -100)
        batch.update(self._visual_inputs(rows))
        batch["references"] = [r["references"] for r in rows]
        return batch

    def _visual_inputs(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return visual_inputs([[self.features[r["task"]][image_id] for image_id in r["image_ids"]] for r in rows])


def visual_inputs(per_row: list[list[tuple[np.ndarray, np.ndarray]]]) -> dict[str, torch.Tensor]:
    """`vis_feats`, `vis_boxes` and `vis_attention_mask` for rows of (features, boxes) pairs, one pair per image
    (see the module docstring for the shapes); rows with fewer images or regions get masked zeros."""
    n_images = max(len(images) for images in per_row)
    n_regions = max(features.shape[0] for images in per_row for features, _ in images)
    dims = {features.shape[1] for images in per_row for features, _ in images}
    if len(dims) != 1:
        raise ValueError(f"One batch mixes feature sizes {sorted(dims)}: every task needs features of one size.")
    feat_dim = dims.pop()
    vis_feats = torch.zeros(len(per_row), n_images, n_regions, feat_dim)
    vis_boxes = torch.zeros(len(per_row), n_images, n_regions, 4)
    vis_mask = torch.zeros(len(per_row), n_images, n_regions, dtype=torch.long)
    for i, images in enumerate(per_row):
        for j, (features, boxes) in enumerate(images):
            vis_feats[i, j, : len(features)] = torch.from_numpy(features)
            vis_boxes[i, j, : len(boxes)] = torch.from_numpy(boxes)
            vis_mask[i, j, : len(features)] = 1
    return {"vis_feats": vis_feats, "vis_boxes": vis_boxes, "vis_attention_mask": vis_mask}


@dataclass
class VLImageCollator(VLCollator):
    """`VLCollator` for a backbone inside the model: `pixel_values` (batch, images, 3, S, S) from `ImagePixels`
    sources instead of `vis_feats` / `vis_boxes`, and `vis_attention_mask` (batch, images, n_regions) as for
    features (0 for a missing second image), `n_regions` being the backbone's grid cells."""

    n_regions: int = 0

    def _visual_inputs(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        per_row = [[self.features[r["task"]][image_id] for image_id in r["image_ids"]] for r in rows]
        n_images = max(len(images) for images in per_row)
        pixel_values = torch.zeros(len(rows), n_images, *per_row[0][0].shape)
        vis_mask = torch.zeros(len(rows), n_images, self.n_regions, dtype=torch.long)
        for i, images in enumerate(per_row):
            pixel_values[i, : len(images)] = torch.stack(images)
            vis_mask[i, : len(images)] = 1
        return {"pixel_values": pixel_values, "vis_attention_mask": vis_mask}


def task_file_paths(root: str | Path) -> dict[str, str]:
    """The per-task data flags for a directory laid out as `scripts.synthetic_vl_data` writes it (and as in the docs)."""
    root = Path(root)
    return {"vqa_dir": str(root / "vqa"), "gqa_dir": str(root / "gqa" / "questions"),
            "nlvr_dir": str(root / "nlvr2" / "data"), "caption_file": str(root / "coco" / "dataset_coco.json")}
