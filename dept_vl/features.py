"""Region features for VL-T5: grid features from a timm backbone, and readers for stored features.

Every feature source answers one question, `source[image_id] -> (features, boxes)`:

    features: (n_regions, feat_dim) float32
    boxes:    (n_regions, 4) float32, (x1, y1, x2, y2) normalised to [0, 1] by the image width and height

Sources:
- `FeatureStore`: features stored on disk, either VL-T5's `*.h5` files (36 x 2048 Faster R-CNN regions) or
  the files written by `extract_to_h5` / `scripts/extract_features.py`, which use the same layout; or `.npz`/`.npy`.
- `OnTheFlyFeatures`: computes grid features from raw images when asked, for small runs.

`ImagePixels` gives the preprocessed images instead, for a backbone tuned inside the model
(`dept_vl.vision_backbone`), which turns its output into the same grid features with `feature_grid`.

The HDF5 layout is VL-T5's: one group per image id, holding `features` (n_regions, feat_dim), `boxes`
(n_regions, 4) in **pixels**, and the scalars `img_h` and `img_w`. Readers divide the boxes by the image size.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dept.config import ConfigError
from dept.errors import UserError
from dept.extras import LazyModule
from dept_vl.images import IMAGE_EXTENSIONS, ImageLoadError, load_image, resolve_image_path

h5py = LazyModule("h5py", extra="vl")  # the feature files only: on-the-fly features need none
timm = LazyModule("timm")  # imported on first use: it costs more than `import torch` at start-up

__all__ = [
    "ExtractionReport",
    "FeatureStore",
    "FeatureStoreError",
    "GridFeatureExtractor",
    "ImageFolder",
    "ImagePixels",
    "MissingFeaturesError",
    "OnTheFlyFeatures",
    "create_backbone",
    "extract_to_h5",
    "feature_grid",
    "find_images",
    "grid_boxes",
    "grid_transform",
]

_BOX_TOLERANCE = 1e-5  # VL-T5's reader asserts the same bound before clamping to [0, 1]
_PROVENANCE_KEYS = ("backbone", "pretrained", "feat_dim", "n_regions")


class FeatureStoreError(UserError, ValueError):
    """Stored features are malformed (wrong shape, boxes out of range) or the store is unusable."""


class UnreadableImagesError(FeatureStoreError):
    """Images that rows of the data refer to and that cannot be loaded; `failures` holds one error per image."""

    SHOWN = 20  # images listed by path in the message; the count covers all

    def __init__(self, message: str, failures: Sequence[ImageLoadError]):
        super().__init__(message)
        self.failures = list(failures)

    @classmethod
    def listing(cls, failures: Sequence[ImageLoadError], checked: int, what: str, fix: str) -> UnreadableImagesError:
        """'N of the `checked` `what` cannot be loaded: path: reason; ... `fix`', the first SHOWN by path."""
        listed = "; ".join(f"{failure.path}: {failure.reason}" for failure in failures[:cls.SHOWN])
        more = f"; ... and {len(failures) - cls.SHOWN} more" if len(failures) > cls.SHOWN else ""
        return cls(f"{len(failures)} of the {checked} {what}: {listed}{more}. {fix}", failures)


class MissingFeaturesError(FeatureStoreError, KeyError):
    """No features for the requested image id."""

    def __str__(self) -> str:  # KeyError would show the message as a quoted repr
        return str(self.args[0])


def grid_boxes(grid_height: int, grid_width: int) -> np.ndarray:
    """Boxes of the cells of an H x W grid over the unit square, in row-major order (as `flatten` orders them).

    Returns (grid_height * grid_width, 4) float32 rows (x1, y1, x2, y2); the cells tile [0, 1]^2 exactly.
    """
    rows, cols = np.meshgrid(np.arange(grid_height), np.arange(grid_width), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    boxes = np.stack([cols / grid_width, rows / grid_height, (cols + 1) / grid_width, (rows + 1) / grid_height], 1)
    return boxes.astype(np.float32)


def weights_fingerprint(model: torch.nn.Module, skip: tuple[str, ...] = ()) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and bytes, buffers included): same weights, same hash.

    `skip`: name prefixes left out (e.g. `("head.",)` for a head that an adapter saves itself)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(skip):
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def resolve_backbone_name(backbone: str) -> str:
    """A timm model name, `hf-hub:ORG/NAME`, `local-dir:DIR`, or a directory saved by timm (read as `local-dir:`)."""
    if ":" not in backbone and Path(backbone).expanduser().is_dir():
        return f"local-dir:{Path(backbone).expanduser()}"
    return backbone


def _architecture(backbone: str) -> str:
    """The timm architecture behind a (possibly `hf-hub:` / `local-dir:`) backbone name, read from its config."""
    source, model_id = timm.models.parse_model_name(backbone)
    if source == "hf-hub":
        return timm.models.load_model_config_from_hf(model_id)[1]
    if source == "local-dir":
        config = Path(model_id) / "config.json"
        if not config.is_file():
            raise ConfigError(f"{model_id} has no config.json: save the backbone there with timm's save_for_hf")
        return json.loads(config.read_text())["architecture"]
    return backbone


def create_backbone(backbone: str, pretrained: bool = True, image_size: int | None = None, seed: int | None = None,
                    **kwargs) -> torch.nn.Module:
    """`timm.create_model(backbone, pretrained, num_classes=0)`, at `image_size` for models whose input size is
    fixed at build (ViTs size their position embedding and patch grid then).

    `backbone`: see `resolve_backbone_name`. `seed`: with `pretrained=False`, the seed of the random weights (None:
    the global RNG as it is); the global RNG is left as it was.
    """
    backbone = resolve_backbone_name(backbone)
    architecture = _architecture(backbone)
    if not timm.is_model(architecture):
        close = timm.list_models(f"*{architecture.split('_')[0]}*")[:8]
        raise ConfigError(f"unknown timm backbone {architecture!r}; similar names: {close}")
    if image_size is not None and timm.models.get_pretrained_cfg_value(architecture, "fixed_input_size"):
        kwargs["img_size"] = image_size
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = timm.create_model(backbone, pretrained=pretrained, num_classes=0, **kwargs)
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and hasattr(patch_embed, "img_size") and patch_embed.img_size is not None:
        size, patch = tuple(patch_embed.img_size), tuple(patch_embed.patch_size)
        if size[0] % patch[0] or size[1] % patch[1]:
            raise ConfigError(
                f"{backbone}: the input size {size[0]} x {size[1]} is not a multiple of the patch size "
                f"{patch[0]} x {patch[1]}, so the patch grid would leave part of every image out; choose an image "
                f"size that is a multiple of {patch[0]}"
            )
    return model


def grid_transform(model: torch.nn.Module, image_size: int | tuple[int, int] | None = None) -> tuple[dict, object]:
    """(data config, eval transform) of timm for `model`, resized to the input size without cropping, so that
    the grid cells tile the whole image and the cell boxes are true image coordinates.

    `image_size`: the input size, square for an int; None keeps the model's default (its pretrained config's).
    """
    overrides = {"crop_pct": 1.0, "crop_mode": "squash"}  # no crop: grid cells must cover the whole image
    if image_size is not None:
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        overrides["input_size"] = (3, height, width)
    data_config = timm.data.resolve_data_config(args=overrides, model=model)
    return data_config, timm.data.create_transform(**data_config, is_training=False)


def feature_grid(model: torch.nn.Module, output: torch.Tensor, name: str = "") -> torch.Tensor:
    """The output of `model.forward_features` (or of a prompted ViT's, without its prompt outputs) laid out as
    its grid of regions: (B, H, W, feat_dim).

    A CNN's (B, C, H, W) map is moved to channels last; a ViT's (B, tokens, C) sequence loses its class and
    register tokens (`model.num_prefix_tokens`) and its patch tokens go on the patch grid, in row-major order.
    """
    name = name or type(model).__name__
    if output.ndim == 4:
        return output if getattr(model, "output_fmt", "NCHW") == "NHWC" else output.permute(0, 2, 3, 1)
    if output.ndim == 3:
        patches = output[:, getattr(model, "num_prefix_tokens", 0) :]
        height, width = getattr(getattr(model, "patch_embed", None), "grid_size", (0, 0))
        if height * width != patches.shape[1]:
            raise ValueError(f"{name}: {patches.shape[1]} patch tokens do not match the patch grid {height}x{width}")
        return patches.reshape(patches.shape[0], height, width, patches.shape[2])
    raise ValueError(
        f"{name}: forward_features returned shape {tuple(output.shape)}; only CNN feature maps "
        "(B, C, H, W) and ViT token sequences (B, tokens, C) are supported"
    )


class GridFeatureExtractor:
    """Grid features from a timm backbone: each cell of the last feature map is one region.

    - CNNs (e.g. `resnet50`): `forward_features` gives a (C, H, W) map; its H*W cells are the regions.
    - ViTs (e.g. `vit_base_patch16_clip_224`): the patch tokens, without the class/register tokens
      (`model.num_prefix_tokens`), laid out on the patch grid.

    Preprocessing is timm's own eval transform for the model (its mean, std and interpolation), except that the
    image is resized to the input size without cropping, so that the grid cells tile the whole image and the cell
    boxes are true image coordinates.

    Args:
        backbone: a timm model name, `hf-hub:ORG/NAME` or a directory saved by timm (see `create_backbone`).
        pretrained: load timm's pretrained weights (the default for real use; tests use random weights offline).
        image_size: square input size; None keeps the model's default (224 for the models above).
        device: where the backbone runs.
        seed: with `pretrained=False`, the seed of the random weights (None: the global RNG as it is). The
            global RNG is left as it was.

    Example:
        >>> extractor = GridFeatureExtractor("resnet18", pretrained=False, image_size=64)
        >>> features, boxes = extractor([Image.new("RGB", (80, 60))])[0]
        >>> features.shape, boxes.shape  # 64 / 32 = 2, so a 2 x 2 grid
        ((4, 512), (4, 4))
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        pretrained: bool = True,
        image_size: int | None = None,
        device: str | torch.device = "cpu",
        seed: int | None = None,
    ):
        self.backbone = backbone
        self.pretrained = pretrained
        self.device = torch.device(device)
        self.model = create_backbone(backbone, pretrained=pretrained, image_size=image_size, seed=seed)
        self.weights_sha256 = weights_fingerprint(self.model)
        self.model.eval().to(self.device)
        self.data_config, self.transform = grid_transform(self.model, image_size)

        probe = torch.zeros(1, *self.data_config["input_size"])
        grid = self._feature_grid(probe)
        self.grid_size: tuple[int, int] = (grid.shape[1], grid.shape[2])
        self.feat_dim: int = grid.shape[3]
        self.boxes = grid_boxes(*self.grid_size)

    @property
    def n_regions(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @torch.inference_mode()
    def _feature_grid(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, H, W, feat_dim) on the model's device."""
        return feature_grid(self.model, self.model.forward_features(pixel_values.to(self.device)), self.backbone)

    def extract_batch(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed images -> (B, n_regions, feat_dim) float32 features on the CPU."""
        return self._feature_grid(pixel_values).flatten(1, 2).float().cpu()

    def __call__(self, images: Sequence[Image.Image]) -> list[tuple[np.ndarray, np.ndarray]]:
        """RGB images of any size -> one (features, boxes) pair per image."""
        pixel_values = torch.stack([self.transform(image) for image in images])
        return [(features, self.boxes.copy()) for features in self.extract_batch(pixel_values).numpy()]


# ----------------------------------------------------------------------------------------------------------------
# Reading stored features


def _plain_attrs(attrs: h5py.AttributeManager) -> dict:
    """h5 attributes as plain Python values (h5py returns numpy scalars)."""
    return {key: value.item() if isinstance(value, np.generic) else value for key, value in attrs.items()}


class _LazyFile:
    """Opens a file on first use in each process: h5py handles and memory maps must not cross `fork()`, so each
    DataLoader worker opens its own, and pickling (for `spawn` workers) carries only the path."""

    def __init__(self, path: Path):
        self.path = path
        self._handle = None
        self._pid: int | None = None

    def _open(self):
        raise NotImplementedError

    @property
    def handle(self):
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = self._open(), os.getpid()
        return self._handle

    def __getstate__(self):
        return {**self.__dict__, "_handle": None, "_pid": None}


class _H5Reader(_LazyFile):
    def _open(self):
        return h5py.File(self.path, "r")

    def image_ids(self) -> list[str]:
        return list(self.handle.keys())

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.handle

    def read(self, image_id: str) -> dict[str, np.ndarray]:
        group = self.handle[image_id]
        return {key: group[key][()] for key in ("features", "boxes", "img_h", "img_w") if key in group}

    def attrs(self) -> dict:
        return _plain_attrs(self.handle.attrs)


class _NpyReader(_LazyFile):
    """One `.npy` structured array, one row per image, fields `image_id`, `features`, `boxes` (+ `img_h`, `img_w`)."""

    def _open(self) -> tuple[np.ndarray, dict[str, int]]:
        try:
            array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except ValueError as error:  # object arrays need pickle, which can run arbitrary code
            raise FeatureStoreError(
                f"{self.path} holds Python objects, which are not loaded (no pickles); save a structured array "
                "with fields image_id, features, boxes instead"
            ) from error
        missing = {"image_id", "features", "boxes"} - set(array.dtype.names or ())
        if missing:
            raise FeatureStoreError(
                f"{self.path} is not a feature array: it lacks the fields {sorted(missing)}; expected a structured "
                "array with fields image_id, features (n_regions, feat_dim), boxes (n_regions, 4)"
            )
        return array, {str(image_id): row for row, image_id in enumerate(array["image_id"])}

    def image_ids(self) -> list[str]:
        return list(self.handle[1])

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.handle[1]

    def read(self, image_id: str) -> dict[str, np.ndarray]:
        array, rows = self.handle
        row = array[rows[image_id]]
        return {key: np.array(row[key]) for key in array.dtype.names if key != "image_id"}

    def attrs(self) -> dict:
        return {}


class _NpzDirectoryReader:
    """A directory of `<image_id>.npz` files, each with `features`, `boxes` (+ `img_h`, `img_w`)."""

    def __init__(self, path: Path):
        self.path = path

    def _file(self, image_id: str) -> Path:
        return resolve_image_path(self.path, f"{image_id}.npz")

    def image_ids(self) -> list[str]:
        return sorted(file.stem for file in self.path.glob("*.npz"))

    def __contains__(self, image_id: str) -> bool:
        return self._file(image_id).is_file()

    def read(self, image_id: str) -> dict[str, np.ndarray]:
        path = self._file(image_id)
        with np.load(path, allow_pickle=False) as data:
            try:
                return {key: data[key] for key in data.files}
            except ValueError as error:  # an object array, which only pickle could load
                raise FeatureStoreError(
                    f"image {image_id!r} in {path} holds Python objects, which are not loaded (no pickles); "
                    "save plain numeric arrays features and boxes"
                ) from error

    def attrs(self) -> dict:
        return {}


class FeatureStore:
    """Read stored region features: `store[image_id] -> (features, boxes)`.

    Formats (chosen by the path):
    - `*.h5` / `*.hdf5`: VL-T5's layout, one group per image id with `features` (n_regions, feat_dim),
      `boxes` (n_regions, 4) in pixels, and scalars `img_h`, `img_w`. This reads VL-T5's released files
      (`train2014_obj36.h5`, 36 x 2048) and the output of `scripts/extract_features.py` alike.
    - a directory of `<image_id>.npz` files, each holding `features` and `boxes`, plus optional `img_h` and
      `img_w`.
    - one `*.npy` structured array (no pickles), one row per image, with fields `image_id` (string), `features`
      (n_regions, feat_dim), `boxes` (n_regions, 4), plus optional `img_h` and `img_w`.
    In the `.npz` and `.npy` formats the boxes are in pixels when `img_h` and `img_w` are given (as in the h5
    layout), and already normalised to [0, 1] when they are not.

    Args:
        path: the file or directory.
        feat_dim: if given, every image must have this feature size (e.g. 2048 for VL-T5's files).
        n_regions: if given, every image must have this many regions (e.g. 36).

    The store opens its file lazily in each process, so it can be handed to DataLoader workers.
    """

    def __init__(self, path: str | Path, feat_dim: int | None = None, n_regions: int | None = None):
        self.path = Path(path)
        self.feat_dim = feat_dim
        self.n_regions = n_regions
        if self.path.is_dir():
            self._reader = _NpzDirectoryReader(self.path)
        elif not self.path.exists():
            raise FileNotFoundError(f"feature store {self.path} does not exist")
        elif self.path.suffix in (".h5", ".hdf5"):
            self._reader = _H5Reader(self.path)
        elif self.path.suffix == ".npy":
            self._reader = _NpyReader(self.path)
        else:
            raise FeatureStoreError(
                f"cannot read features from {self.path}: expected a .h5/.hdf5 file, a .npy structured array, "
                "or a directory of <image_id>.npz files"
            )

    @property
    def attrs(self) -> dict:
        """File attributes (backbone, feat_dim, ... for files written by `extract_to_h5`; empty for others)."""
        return self._reader.attrs()

    def image_ids(self) -> list[str]:
        return self._reader.image_ids()

    def __len__(self) -> int:
        return len(self.image_ids())

    def __contains__(self, image_id: object) -> bool:
        return str(image_id) in self._reader

    def __getitem__(self, image_id: object) -> tuple[np.ndarray, np.ndarray]:
        image_id = str(image_id)
        if image_id not in self._reader:
            raise MissingFeaturesError(
                f"no features for image id {image_id!r} in {self.path}; extract features for this image or check "
                "that the annotation's image ids match the store's keys (e.g. 'COCO_val2014_000000391895')"
            )
        return self._validated(image_id, self._reader.read(image_id))

    def _validated(self, image_id: str, entry: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        where = f"image {image_id!r} in {self.path}"
        if "features" not in entry or "boxes" not in entry:
            raise FeatureStoreError(f"{where} lacks {'features' if 'features' not in entry else 'boxes'}")
        features = np.asarray(entry["features"], dtype=np.float32)
        boxes = np.array(entry["boxes"], dtype=np.float32)
        if features.ndim != 2:
            raise FeatureStoreError(f"{where}: features have shape {features.shape}, expected (n_regions, feat_dim)")
        if self.feat_dim is not None and features.shape[1] != self.feat_dim:
            raise FeatureStoreError(
                f"{where}: feat_dim is {features.shape[1]}, expected {self.feat_dim}; were these features made "
                "by another backbone? Set the model's feat_dim to match the store"
            )
        if self.n_regions is not None and features.shape[0] != self.n_regions:
            raise FeatureStoreError(f"{where}: {features.shape[0]} regions, expected {self.n_regions}")
        if boxes.shape != (features.shape[0], 4):
            raise FeatureStoreError(f"{where}: boxes have shape {boxes.shape}, expected ({features.shape[0]}, 4)")
        if not np.isfinite(features).all():
            raise FeatureStoreError(f"{where}: features contain NaN or infinity")
        if "img_h" in entry and "img_w" in entry:
            height, width = float(entry["img_h"]), float(entry["img_w"])
            boxes /= np.array([width, height, width, height], dtype=np.float32)
        if not (boxes.min() >= -_BOX_TOLERANCE and boxes.max() <= 1 + _BOX_TOLERANCE):
            raise FeatureStoreError(
                f"{where}: boxes span [{boxes.min():.4g}, {boxes.max():.4g}] after normalisation, outside [0, 1]; "
                "pixel boxes need img_h and img_w next to them"
            )
        if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
            raise FeatureStoreError(f"{where}: some boxes have x2 < x1 or y2 < y1; expected (x1, y1, x2, y2)")
        return features, np.clip(boxes, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Computing features from raw images


def find_images(image_dir: str | Path) -> dict[str, Path]:
    """Map image id (the file stem) -> path for every image file under `image_dir`, searched recursively.

    Two files with the same stem (e.g. `a.jpg` and `sub/a.png`) would share one id, so they raise an error.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image directory {image_dir} does not exist")
    images: dict[str, Path] = {}
    for path in sorted(image_dir.rglob("*")):
        # A dangling symlink is kept, so that loading it fails and it is counted, not silently skipped.
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not (path.is_file() or path.is_symlink()):
            continue
        if path.stem in images:
            raise ValueError(f"two images share the id {path.stem!r}: {images[path.stem]} and {path}; rename one")
        images[path.stem] = path
    return images


class ImageFolder:
    """The images under a directory, by id (the file stem, searched recursively), as the feature sources see them.

    `source[image_id]` is for the subclasses to define (features, or pixels for a backbone inside the model).
    """

    def __init__(self, image_dir: str | Path):
        self.image_dir = Path(image_dir)
        self.images = find_images(image_dir)

    def image_ids(self) -> list[str]:
        return list(self.images)

    def __len__(self) -> int:
        return len(self.images)

    def __contains__(self, image_id: object) -> bool:
        return str(image_id) in self.images

    def load(self, image_id: object) -> Image.Image:
        image_id = str(image_id)
        if image_id not in self.images:
            raise MissingFeaturesError(f"no image with id {image_id!r} (file stem) under {self.image_dir}")
        return load_image(self.images[image_id])

    def unreadable(self, image_ids: Sequence[str]) -> list[ImageLoadError]:
        """Load each of `image_ids` once (without the backbone) and return the errors of those that fail."""
        failures = []
        for image_id in dict.fromkeys(map(str, image_ids)):
            try:
                load_image(self.images[image_id])
            except ImageLoadError as error:
                failures.append(error)
        return failures


class OnTheFlyFeatures(ImageFolder):
    """Grid features computed from raw images when first asked for, then cached in memory.

    Same interface as `FeatureStore`: `features[image_id] -> (features, boxes)`. Meant for small runs and demos;
    for full datasets extract once with `scripts/extract_features.py`. Use it with `num_workers=0`, since it runs
    the backbone in the calling process.

    Args:
        image_dir: images, found recursively; the image id is the file stem.
        extractor: the backbone that computes the features.
    """

    def __init__(self, image_dir: str | Path, extractor: GridFeatureExtractor):
        super().__init__(image_dir)
        self.extractor = extractor
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __getitem__(self, image_id: object) -> tuple[np.ndarray, np.ndarray]:
        image_id = str(image_id)
        if image_id not in self._cache:
            self._cache[image_id] = self.extractor([self.load(image_id)])[0]
        features, boxes = self._cache[image_id]
        return features.copy(), boxes.copy()  # copies, so a caller cannot change the cache


class ImagePixels(ImageFolder):
    """`pixels[image_id] -> (3, S, S)` float tensor: an image through `transform`, for a backbone that runs
    inside the model (`dept_vl.vision_backbone`), so it can be tuned.

    Args:
        image_dir: images, found recursively; the image id is the file stem.
        transform: the backbone's `grid_transform`, the same one `GridFeatureExtractor` applies.
    """

    def __init__(self, image_dir: str | Path, transform):
        super().__init__(image_dir)
        self.transform = transform

    def __getitem__(self, image_id: object) -> torch.Tensor:
        return self.transform(self.load(image_id))


# ----------------------------------------------------------------------------------------------------------------
# Extracting a directory of images into an h5 file (resumable)


@dataclass
class ExtractionReport:
    output: Path
    n_images: int  # image files found
    n_skipped: int  # already in the output from an earlier run
    n_extracted: int  # written by this run
    failures: list[ImageLoadError] = field(default_factory=list)  # unreadable images, by path
    errors_path: Path | None = None

    def summary(self) -> str:
        lines = [
            f"{self.n_images} images found, {self.n_skipped} already in {self.output}, {self.n_extracted} extracted, "
            f"{len(self.failures)} unreadable"
        ]
        lines += [f"  unreadable: {failure.path}: {failure.reason}" for failure in self.failures[:20]]
        if len(self.failures) > 20:
            lines.append(f"  ... and {len(self.failures) - 20} more")
        if self.failures:
            lines.append(f"the full list is in {self.errors_path}")
        return "\n".join(lines)


class _ImageFiles(Dataset):
    """(image id, path) pairs -> (id, pixel_values (3, S, S) or None, (height, width) or None, error or None)."""

    def __init__(self, items: Sequence[tuple[str, Path]], transform):
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        image_id, path = self.items[index]
        try:
            image = load_image(path)
        except ImageLoadError as error:
            return image_id, None, None, error
        return image_id, self.transform(image), (image.height, image.width), None


def _collate(batch):
    """Stack the images that loaded; pass the load errors on, to be reported."""
    loaded = [(image_id, pixels, size) for image_id, pixels, size, error in batch if error is None]
    errors = [error for *_, error in batch if error is not None]
    pixel_values = torch.stack([pixels for _, pixels, _ in loaded]) if loaded else None
    return [image_id for image_id, _, _ in loaded], pixel_values, [size for _, _, size in loaded], errors


def _provenance(extractor: GridFeatureExtractor) -> dict:
    return {
        "backbone": extractor.backbone,
        "pretrained": bool(extractor.pretrained),
        "feat_dim": int(extractor.feat_dim),
        "n_regions": int(extractor.n_regions),
        "weights_sha256": extractor.weights_sha256,  # two random (or differently trained) backbones never mix
    }


def _check_provenance(h5: h5py.File, output: Path, wanted: Mapping) -> None:
    """Stamp a new file with how its features were made, or refuse to mix features from another backbone."""
    if len(h5) == 0 and not h5.attrs:
        h5.attrs.update(wanted)
        return
    found = _plain_attrs(h5.attrs)
    mismatched = {key: (found.get(key), value) for key, value in wanted.items() if found.get(key) != value}
    if mismatched:
        details = ", ".join(f"{key}: file has {old!r}, this run {new!r}" for key, (old, new) in mismatched.items())
        raise FeatureStoreError(
            f"refusing to add features to {output}: it was made differently ({details}); "
            "choose another --output or delete the file to start over"
        )


def _complete_ids(h5: h5py.File) -> set[str]:
    """Ids whose group holds all four datasets. A kill during a write can leave a partial group; it is redone."""
    done = {image_id for image_id, group in h5.items() if {"features", "boxes", "img_h", "img_w"} <= set(group)}
    for image_id in set(h5) - done:
        del h5[image_id]
    return done


def _write_errors(report: ExtractionReport) -> None:
    lines = [f"# {len(report.failures)} unreadable images (path<TAB>reason)"]
    lines += [f"{failure.path}\t{failure.reason}" for failure in report.failures]
    report.errors_path.write_text("\n".join(lines) + "\n")


def extract_to_h5(
    image_dir: str | Path,
    output: str | Path,
    extractor: GridFeatureExtractor,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
) -> ExtractionReport:
    """Extract grid features for every image under `image_dir` into `output` (VL-T5's h5 layout).

    Resumable: ids already in `output` are skipped, and every batch is flushed to disk, so an interrupted run
    loses at most one batch. Unreadable images are counted, listed in the report and in `<output>.errors.txt`
    (rewritten each run, since a rerun retries them), and never written. An existing `output` made by another
    backbone (or with other weights or another input size) is refused, not mixed.
    """
    output = Path(output)
    images = find_images(image_dir)
    report = ExtractionReport(output, len(images), 0, 0, errors_path=output.with_name(output.name + ".errors.txt"))
    with h5py.File(output, "a") as h5:
        _check_provenance(h5, output, _provenance(extractor))
        done = _complete_ids(h5)
        pending = [(image_id, path) for image_id, path in images.items() if image_id not in done]
        report.n_skipped = len(images) - len(pending)
        files = _ImageFiles(pending, extractor.transform)
        loader = DataLoader(files, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
        with tqdm(total=len(pending), desc=f"features ({extractor.backbone})", disable=not progress) as bar:
            for image_ids, pixel_values, sizes, failures in loader:
                report.failures.extend(failures)
                if image_ids:
                    features = extractor.extract_batch(pixel_values).numpy()
                    for image_id, image_features, (height, width) in zip(image_ids, features, sizes):
                        group = h5.create_group(image_id)
                        group["features"] = image_features
                        group["boxes"] = extractor.boxes * np.array([width, height, width, height], np.float32)
                        group["img_h"], group["img_w"] = height, width
                    h5.flush()
                    report.n_extracted += len(image_ids)
                bar.update(len(image_ids) + len(failures))
                bar.set_postfix(unreadable=len(report.failures))
    _write_errors(report)
    return report
