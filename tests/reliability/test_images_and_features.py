"""Bad images and bad feature files: each failure names the file or the image id, and is counted, never dropped.

Already covered in tests/vl: truncated/empty/not-an-image/missing files (test_images.py), grayscale, 16-bit PNG,
CMYK, RGBA, palette (with transparency) and EXIF orientation 6 (test_images.py); unreadable images counted during
extraction, a missing image id, wrong feat_dim or region count, pixel boxes without the image size, and a pickled
`.npy` store (test_features.py). These are the remaining cases.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from dept_vl.features import FeatureStore, FeatureStoreError, GridFeatureExtractor, extract_to_h5, grid_boxes
from dept_vl.images import ImageLoadError, check_image, load_image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _noise_image(size=(64, 64), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(*size[::-1], 3), dtype=np.uint8))


def _encoded(image: Image.Image, image_format: str) -> bytearray:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return bytearray(buffer.getvalue())


def _jpeg_with_zero_size_header() -> bytes:
    data = _encoded(_noise_image(), "JPEG")
    start_of_frame = data.find(b"\xff\xc0")
    data[start_of_frame + 5 : start_of_frame + 9] = bytes(4)  # height = width = 0
    return bytes(data)


def _png_with_a_flipped_data_byte() -> bytes:
    data = _encoded(_noise_image(), "PNG")
    data[len(data) // 2] ^= 0xFF  # inside the compressed pixel data, so the zlib stream breaks
    return bytes(data)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("zero_size_header.jpg", _jpeg_with_zero_size_header()),
        ("corrupt_pixels.png", _png_with_a_flipped_data_byte()),
        ("only_the_header.png", bytes(_encoded(_noise_image(), "PNG")[:60])),
        ("a_png_named_jpg.jpg", None),  # valid PNG bytes under a .jpg name: must load, not fail
    ],
)
def test_corrupt_images_raise_an_error_naming_the_file(tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        path.write_bytes(bytes(_encoded(_noise_image(), "PNG")))
        assert load_image(path).size == (64, 64)
        check_image(path)  # the check before training passes what loads
        return
    path.write_bytes(content)
    with pytest.raises(ImageLoadError) as error:
        load_image(path)
    assert error.value.path == path and str(path) in str(error.value)
    with pytest.raises(ImageLoadError) as error:  # and the check before training refuses it, by name
        check_image(path)
    assert error.value.path == path


def test_a_directory_or_a_dangling_symlink_in_place_of_an_image_names_the_path(tmp_path):
    (tmp_path / "folder.jpg").mkdir()
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    for name, reason in [("folder.jpg", "Is a directory"), ("dangling.jpg", "no such file")]:
        with pytest.raises(ImageLoadError, match=reason) as error:
            load_image(tmp_path / name)
        assert error.value.path == tmp_path / name


def test_an_image_too_large_to_decode_safely_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels is more than twice the limit
    with pytest.raises(ImageLoadError, match="bomb.png"):
        load_image(path)


# ---------------------------------------------------------------------------------------------------------------
# Modes and orientations not covered in tests/vl/test_images.py


def test_grayscale_with_alpha_is_composited_on_white(tmp_path):
    image = Image.new("LA", (2, 1))
    image.putdata([(50, 0), (50, 255)])
    path = tmp_path / "la.png"
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert [loaded.getpixel((x, 0)) for x in range(2)] == [WHITE, (50, 50, 50)]


def test_one_bit_image_becomes_black_and_white_rgb(tmp_path):
    image = Image.new("1", (2, 1))
    image.putpixel((1, 0), 1)
    path = tmp_path / "bits.png"
    image.save(path)
    assert [load_image(path).getpixel((x, 0)) for x in range(2)] == [(0, 0, 0), WHITE]


def test_sixteen_bit_tiff_big_endian_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 65535]], dtype=">u2")
    image = Image.frombytes("I;16B", (3, 1), values.tobytes())
    path = tmp_path / "deep.tif"
    image.save(path)
    assert [load_image(path).getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (100, 100, 100), WHITE]


@pytest.mark.parametrize(
    ("orientation", "top_left_colour", "size"),
    [(1, RED, (40, 20)), (3, BLUE, (40, 20)), (8, BLUE, (20, 40)), (2, BLUE, (40, 20))],
)
def test_every_exif_orientation_comes_out_upright(tmp_path, orientation, top_left_colour, size):
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 20, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"orientation_{orientation}.jpg"
    stored.save(path, exif=exif.tobytes(), quality=95)
    image = load_image(path)
    assert image.size == size
    assert np.abs(np.asarray(image)[2, 2].astype(int) - top_left_colour).max() < 30


# ---------------------------------------------------------------------------------------------------------------
# Missing images are counted during extraction


def test_extraction_counts_a_dangling_symlink_instead_of_skipping_it(tmp_path):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    _noise_image((48, 40)).save(image_dir / "present.png")
    os.symlink(tmp_path / "unmounted" / "lost.jpg", image_dir / "lost.jpg")
    extractor = GridFeatureExtractor("resnet18", pretrained=False, image_size=64)
    report = extract_to_h5(image_dir, tmp_path / "features.h5", extractor, batch_size=2, progress=False)
    assert (report.n_images, report.n_extracted) == (2, 1)
    assert [failure.path for failure in report.failures] == [image_dir / "lost.jpg"]
    assert "1 unreadable" in report.summary() and "lost.jpg" in report.errors_path.read_text()


# ---------------------------------------------------------------------------------------------------------------
# Feature files


def _store_with(tmp_path, image_id: str, **arrays) -> FeatureStore:
    np.savez(tmp_path / f"{image_id}.npz", **arrays)
    return FeatureStore(tmp_path)


GOOD_FEATURES = np.ones((4, 8), dtype=np.float32)


@pytest.mark.parametrize(
    ("arrays", "problem"),
    [
        ({"features": GOOD_FEATURES}, "lacks boxes"),
        ({"boxes": grid_boxes(2, 2)}, "lacks features"),
        ({"features": np.ones(8), "boxes": grid_boxes(2, 2)}, r"features have shape \(8,\)"),
        ({"features": np.ones((4, 8, 1)), "boxes": grid_boxes(2, 2)}, r"features have shape \(4, 8, 1\)"),
        ({"features": np.full((4, 8), np.nan), "boxes": grid_boxes(2, 2)}, "NaN or infinity"),
        ({"features": np.full((4, 8), np.inf), "boxes": grid_boxes(2, 2)}, "NaN or infinity"),
        ({"features": GOOD_FEATURES, "boxes": grid_boxes(2, 2)[:, ::-1]}, "x2 < x1"),
        ({"features": GOOD_FEATURES, "boxes": grid_boxes(2, 2) - 0.5}, r"outside \[0, 1\]"),
        ({"features": GOOD_FEATURES, "boxes": grid_boxes(2, 2)[:, :3]}, r"boxes have shape \(4, 3\)"),
        (
            {"features": GOOD_FEATURES, "boxes": grid_boxes(2, 2) * 1000, "img_h": 100, "img_w": 100},
            r"outside \[0, 1\]",
        ),
    ],
)
def test_bad_stored_features_name_the_image_id(tmp_path, arrays, problem):
    store = _store_with(tmp_path, "COCO_val2014_000000000042", **arrays)
    with pytest.raises(FeatureStoreError, match=f"'COCO_val2014_000000000042'.*{problem}"):
        store["COCO_val2014_000000000042"]


def test_a_pickled_array_in_a_feature_directory_is_refused_naming_the_id(tmp_path):
    store = _store_with(tmp_path, "img7", features=np.array([{"x": 1}], dtype=object), boxes=np.zeros((1, 4)))
    with pytest.raises(FeatureStoreError, match="'img7'.*Python objects"):
        store["img7"]


def test_boxes_on_the_image_border_are_accepted_within_rounding(tmp_path):
    boxes = grid_boxes(2, 2)
    boxes[-1, 2:] = 1 + 1e-6  # float32 pixel / size rounding, as VL-T5's reader tolerates
    store = _store_with(tmp_path, "edge", features=GOOD_FEATURES, boxes=boxes)
    assert store["edge"][1].max() == 1.0
