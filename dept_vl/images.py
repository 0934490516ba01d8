"""Safe image paths and robust RGB image loading with Pillow.

Every way an image can fail to load (missing, empty, truncated, not an image, too large) raises one error type,
`ImageLoadError`, which names the file. Code that processes many images catches it, reports the path and counts
the failures; it never drops an image silently.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from dept.errors import UserError

__all__ = ["IMAGE_EXTENSIONS", "ImageLoadError", "ImagePathError", "check_image", "decode_image", "load_image",
           "resolve_image_path", "to_rgb"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_BACKGROUND = (255, 255, 255)


class ImagePathError(UserError, ValueError):
    """An image path from an annotation file points outside the image root."""


class ImageLoadError(UserError):
    """An image file is missing, empty, truncated, corrupt or not an image. `path` names the file."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot load image {self.path}: {reason}")

    def __reduce__(self):  # DataLoader workers send these back to the main process
        return type(self), (self.path, self.reason)


def resolve_image_path(root: str | Path, relative: str | Path) -> Path:
    """Join an image path taken from an annotation file onto `root`, refusing paths that leave `root`.

    `../` escapes and absolute paths outside `root` raise `ImagePathError`. The check is on the normalised path,
    not on the resolved one, so symlinks that the user placed inside `root` (e.g. `root/train2014 -> /data/coco`)
    keep working.
    """
    root_abs = Path(os.path.abspath(root))
    candidate = Path(os.path.normpath(root_abs / relative))
    if candidate != root_abs and root_abs not in candidate.parents:
        raise ImagePathError(
            f"image path {str(relative)!r} resolves to {candidate}, which is outside the image root {root_abs}; "
            "annotation files must name images relative to the image root, without '..'"
        )
    return candidate


def load_image(path: str | Path) -> Image.Image:
    """Load an image file as an 8-bit RGB `PIL.Image`, upright as a viewer would show it.

    Applies the EXIF orientation, then converts any mode to RGB (see `to_rgb`). Raises `ImageLoadError`
    naming `path` for a missing, empty, truncated or unreadable file.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageLoadError(path, "the file is empty (0 bytes)")
    except FileNotFoundError as error:
        raise ImageLoadError(path, "no such file") from error
    return _decode(path, path)


def decode_image(data: bytes, name: str = "<upload>") -> Image.Image:
    """`load_image` for the bytes of an image file (an upload), `name` standing for the path in errors."""
    if not data:
        raise ImageLoadError(name, "the image is empty (0 bytes)")
    return _decode(io.BytesIO(data), name)


def check_image(source: str | Path | bytes, name: str | Path | None = None) -> None:
    """Raise `ImageLoadError` unless `source` (a path, or an image file's bytes called `name` in errors) holds a
    whole image; a fraction of `load_image`'s cost, for checking a data set before training.

    What is checked: the file exists and is not empty; Pillow recognises its header (format, size, mode, and not a
    decompression bomb); and its compressed data reads to the end without error: a PNG through Pillow's `verify`
    (every chunk's CRC, up to IEND), a JPEG decoded at 1/8 scale (`draft`: every entropy-coded byte is still read,
    so a truncated file fails), any other format decoded. Not done: the EXIF rotation and colour conversion that
    `load_image` applies after decoding, and (for PNG) decompressing the pixels, whose checksums `verify` reads.
    """
    if isinstance(source, bytes):
        name = Path(name or "<bytes>")
        if not source:
            raise ImageLoadError(name, "the image is empty (0 bytes)")
        source = io.BytesIO(source)
    else:
        name = Path(name or source)
        try:
            if Path(source).stat().st_size == 0:
                raise ImageLoadError(name, "the file is empty (0 bytes)")
        except FileNotFoundError as error:
            raise ImageLoadError(name, "no such file") from error
    try:
        with Image.open(source) as image:
            if image.format == "PNG":
                image.verify()
            else:
                image.draft(None, (1, 1))  # JPEG only: the smallest DCT scale; a no-op for other formats
                image.load()
    except FileNotFoundError as error:
        raise ImageLoadError(name, "no such file") from error
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageLoadError(name, f"{type(error).__name__}: {error}") from error


def _decode(source, path: str | Path) -> Image.Image:
    try:
        with Image.open(source) as image:
            image.load()  # decode now, so a truncated file fails here and not later in a worker
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except FileNotFoundError as error:
        raise ImageLoadError(path, "no such file") from error
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        # Pillow reports truncated/corrupt data as OSError, some bad headers as SyntaxError or ValueError.
        raise ImageLoadError(path, f"{type(error).__name__}: {error}") from error


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an image of any Pillow mode to 8-bit RGB.

    - 16-bit grayscale (`I;16*`, and `I`, which is how Pillow decodes 16-bit files) is scaled from
      [0, 65535] to [0, 255]; Pillow's own `convert` would clip every value above 255 to white.
    - Transparent images (RGBA, LA, palette with transparency) are composited on white: the colour of fully
      transparent pixels is undefined (often black), and white is how viewers and browsers show them.
    - CMYK, grayscale, 1-bit, YCbCr and the rest use Pillow's conversion.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        eight_bit = np.clip(np.rint(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(eight_bit).convert("RGB")
    if "transparency" in image.info or image.mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGB":
        return image.copy()
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, _BACKGROUND)
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")
