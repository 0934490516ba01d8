import io

import numpy as np
import pytest
from PIL import Image

from dept_vl.images import ImageLoadError, ImagePathError, check_image, decode_image, load_image, resolve_image_path

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _pixel(image: Image.Image, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(v) for v in image.getpixel((x, y)))


def test_grayscale_becomes_rgb_with_equal_channels(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (8, 6), 100).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (8, 6)
    assert _pixel(image, 3, 3) == (100, 100, 100)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16)  # 1000 * 255 / 65535 = 3.89; 32896 / 257 = 128
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    image = load_image(path)
    assert [_pixel(image, x, 0) for x in range(4)] == [(0, 0, 0), (4, 4, 4), (128, 128, 128), (255, 255, 255)]


def test_cmyk_converts_to_rgb(tmp_path):
    path = tmp_path / "cmyk.tif"  # TIFF keeps CMYK values exact, unlike lossy JPEG
    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))
    cmyk.putpixel((1, 1), (255, 0, 0, 0))  # pure cyan
    cmyk.save(path)
    image = load_image(path)
    assert _pixel(image, 0, 0) == WHITE
    assert _pixel(image, 1, 1) == (0, 255, 255)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    path = tmp_path / "alpha.png"
    rgba.save(path)
    image = load_image(path)
    assert _pixel(image, 0, 0) == WHITE  # fully transparent red shows the background
    assert _pixel(image, 1, 0) == BLUE
    assert all(abs(v - 127) <= 1 for v in _pixel(image, 2, 0))  # half-transparent black on white is mid-grey


def test_palette_and_palette_transparency_convert_to_rgb(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * (256 * 3 - 6))
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    opaque_path, transparent_path = tmp_path / "p.png", tmp_path / "p_transparent.png"
    palette.save(opaque_path)
    palette.save(transparent_path, transparency=0)
    assert [_pixel(load_image(opaque_path), x, 0) for x in range(2)] == [(0, 0, 0), (10, 20, 30)]
    assert [_pixel(load_image(transparent_path), x, 0) for x in range(2)] == [WHITE, (10, 20, 30)]


def test_exif_orientation_6_comes_out_rotated(tmp_path):
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 20, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the stored left edge becomes the top
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif.tobytes(), quality=95)
    image = load_image(path)
    assert image.size == (20, 40)
    top, bottom = np.asarray(image)[5, 10].astype(int), np.asarray(image)[35, 10].astype(int)
    assert np.abs(top - RED).max() < 30 and np.abs(bottom - BLUE).max() < 30


def _jpeg_bytes() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, content",
    [
        ("truncated.jpg", _jpeg_bytes()[:1500]),
        ("empty.jpg", b""),
        ("not_an_image.jpg", b"this is a text file"),
        ("missing.jpg", None),
    ],
)
def test_bad_files_raise_image_load_error_naming_the_path(tmp_path, name, content):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert info.value.path == path
    assert str(path) in str(info.value)


def test_valid_jpeg_bytes_load(tmp_path):
    path = tmp_path / "ok.jpg"
    path.write_bytes(_jpeg_bytes())
    assert load_image(path).size == (64, 64)


def test_relative_paths_inside_root_resolve(tmp_path):
    assert resolve_image_path(tmp_path, "train2014/a.jpg") == tmp_path / "train2014" / "a.jpg"
    assert resolve_image_path(tmp_path, "x/../b.jpg") == tmp_path / "b.jpg"
    assert resolve_image_path(tmp_path, tmp_path / "c.jpg") == tmp_path / "c.jpg"


@pytest.mark.parametrize("relative", ["../secret.jpg", "a/../../secret.jpg", "/etc/passwd"])
def test_paths_leaving_the_root_are_refused(tmp_path, relative):
    root = tmp_path / "images"
    root.mkdir()
    with pytest.raises(ImagePathError, match="outside the image root") as info:
        resolve_image_path(root, relative)
    assert relative in str(info.value)


def _encoded(image_format: str, mode: str = "RGB") -> bytes:
    noise = np.random.default_rng(1).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).convert(mode).save(buffer, format=image_format)
    return buffer.getvalue()


def _flipped_middle_byte(data: bytes) -> bytes:
    data = bytearray(data)
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


FILES = {  # name -> bytes; None: no file at all
    "ok.jpg": _encoded("JPEG"), "ok_cmyk.jpg": _encoded("JPEG", "CMYK"), "ok.png": _encoded("PNG"),
    "ok.webp": _encoded("WEBP"), "ok.gif": _encoded("GIF"), "ok.bmp": _encoded("BMP"), "ok.tiff": _encoded("TIFF"),
    "png_named.jpg": _encoded("PNG"),
    "empty.png": b"", "text.png": b"not an image", "missing.jpg": None,
    "truncated_half.jpg": _encoded("JPEG")[: len(_encoded("JPEG")) // 2],
    "truncated_end.jpg": _encoded("JPEG")[:-100],  # only the last scan data and the end marker are gone
    "truncated.png": _encoded("PNG")[:-100], "broken_byte.png": _flipped_middle_byte(_encoded("PNG")),
    "truncated.webp": _encoded("WEBP")[:-100], "truncated.bmp": _encoded("BMP")[:-100],
    "truncated.gif": _encoded("GIF")[: len(_encoded("GIF")) // 2],
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_check_image_refuses_exactly_the_files_load_image_refuses_and_names_them(tmp_path, name):
    path = tmp_path / name
    if FILES[name] is not None:
        path.write_bytes(FILES[name])
    try:
        load_image(path)
        loads = True
    except ImageLoadError:
        loads = False
    assert loads == name.startswith(("ok", "png_named")), name  # the cases are what their names say
    if loads:
        check_image(path)
        if FILES[name] is not None:
            check_image(FILES[name], name="upload.jpg")
        return
    with pytest.raises(ImageLoadError) as error:
        check_image(path)
    assert error.value.path == path and str(path) in str(error.value)
    if FILES[name] is not None:  # the bytes of the same file, as a Hub dataset stores them
        with pytest.raises(ImageLoadError) as error:
            check_image(FILES[name], name="row 7")
        assert str(error.value.path) == "row 7"
        with pytest.raises(ImageLoadError):
            decode_image(FILES[name], name="row 7")
