import importlib.util
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dept_vl.features import (
    FeatureStore,
    FeatureStoreError,
    GridFeatureExtractor,
    MissingFeaturesError,
    OnTheFlyFeatures,
    extract_to_h5,
    grid_boxes,
    weights_fingerprint,
)
from dept_vl.images import load_image
from tests.conftest import float32_paths

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return GridFeatureExtractor("resnet18", pretrained=False, image_size=64)  # 64 / 32 -> 2 x 2 grid, 512-d


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return GridFeatureExtractor("vit_tiny_patch16_224", pretrained=False, image_size=32)  # 2 x 2 patches, 192-d


def _image(seed: int, size=(48, 40)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _image_dir(root: Path, n: int, start: int = 0) -> Path:
    root.mkdir(exist_ok=True)
    for i in range(start, start + n):
        _image(i, size=(40 + 8 * i, 32 + 4 * i)).save(root / f"img{i}.png")
    return root


class _CountingExtractor:
    """Wraps `extract_batch` to count how many images reach the backbone."""

    def __init__(self, extractor, fail_on_call: int | None = None):
        self.extractor, self.fail_on_call = extractor, fail_on_call
        self.calls, self.images = 0, 0

    def __enter__(self):
        original = self.extractor.extract_batch

        def counted(pixel_values):
            self.calls += 1
            if self.calls == self.fail_on_call:
                raise KeyboardInterrupt  # as if the user pressed Ctrl-C in the middle of a run
            self.images += len(pixel_values)
            return original(pixel_values)

        self.extractor.extract_batch = counted
        return self

    def __exit__(self, *exc):
        del self.extractor.extract_batch  # back to the class method


# ---- grid features --------------------------------------------------------------------------------------------


def test_grid_boxes_tile_the_unit_square():
    assert np.array_equal(grid_boxes(2, 2), [[0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5], [0, 0.5, 0.5, 1], [0.5, 0.5, 1, 1]])
    boxes = grid_boxes(3, 4).astype(np.float64)
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert np.isclose((widths * heights).sum(), 1.0)  # areas add up to the square ...
    for i in range(len(boxes)):  # ... and no two cells overlap, so together they cover it exactly
        for j in range(i + 1, len(boxes)):
            overlap_w = min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0])
            overlap_h = min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1])
            assert overlap_w <= 1e-9 or overlap_h <= 1e-9
    assert boxes.min() == 0.0 and boxes.max() == 1.0


def test_cnn_regions_are_feature_map_cells_in_row_major_order(resnet):
    image = _image(0)
    features, boxes = resnet([image])[0]
    assert features.shape == (4, 512) and features.dtype == np.float32
    assert boxes.shape == (4, 4) and boxes.dtype == np.float32
    with torch.inference_mode():
        feature_map = resnet.model.forward_features(resnet.transform(image)[None])[0]  # (512, 2, 2)
    assert feature_map.shape == (512, 2, 2)
    for row in range(2):
        for col in range(2):
            region = row * 2 + col
            expected = feature_map[:, row, col]
            torch.testing.assert_close(torch.from_numpy(features[region]), expected, **float32_paths(expected))
            assert np.allclose(boxes[region], [col / 2, row / 2, (col + 1) / 2, (row + 1) / 2])


def test_vit_regions_are_patch_tokens_without_the_class_token(vit):
    image = _image(1)
    features, boxes = vit([image])[0]
    assert vit.model.num_prefix_tokens == 1
    assert features.shape == (4, 192) and np.array_equal(boxes, grid_boxes(2, 2))
    with torch.inference_mode():
        tokens = vit.model.forward_features(vit.transform(image)[None])[0]  # (1 + 4, 192)
    torch.testing.assert_close(torch.from_numpy(features), tokens[1:], **float32_paths(tokens[1:]))


def test_preprocessing_keeps_the_whole_image(resnet):
    image = Image.new("RGB", (100, 50), (128, 128, 128))
    image.paste((0, 255, 0), (95, 0, 100, 50))  # a green stripe at the right edge, which a centre crop would cut
    pixels = resnet.transform(image)
    assert pixels.shape == (3, 64, 64)
    mean = torch.tensor(resnet.data_config["mean"])[:, None]
    std = torch.tensor(resnet.data_config["std"])[:, None]
    right_column = pixels[:, :, -1] * std + mean  # (3, 64) back in [0, 1]
    assert (right_column[1] > 0.9).all() and (right_column[0] < 0.1).all()


def test_batched_extraction_matches_one_image_at_a_time(resnet):
    images = [_image(2), _image(3, size=(30, 70))]
    batched = resnet(images)
    for image, (features, _) in zip(images, batched):
        expected = resnet([image])[0][0]
        np.testing.assert_allclose(features, expected, **float32_paths(expected))


def test_unknown_backbone_is_refused_with_its_name():
    with pytest.raises(ValueError, match="unknown timm backbone 'resnet_does_not_exist'"):
        GridFeatureExtractor("resnet_does_not_exist", pretrained=False)


# ---- feature stores --------------------------------------------------------------------------------------------


def _write_vlt5_h5(path: Path, features: np.ndarray, pixel_boxes: np.ndarray, img_h: int, img_w: int) -> None:
    """The layout of VL-T5's `*_obj36.h5` files, extra Faster R-CNN fields included."""
    with h5py.File(path, "w") as h5:
        group = h5.create_group("COCO_val2014_000000000042")
        group["features"] = features
        group["boxes"] = pixel_boxes
        group["img_h"], group["img_w"] = img_h, img_w
        group["obj_id"] = np.zeros(len(features), dtype=np.int64)
        group["obj_conf"] = np.ones(len(features), dtype=np.float32)
        group["num_boxes"] = len(features)


def _vlt5_entry():
    features = np.random.default_rng(0).standard_normal((36, 2048)).astype(np.float32)
    pixel_boxes = np.tile(np.array([[64.0, 48.0, 640.0, 480.0]], dtype=np.float32), (36, 1))
    pixel_boxes[1] = [0, 0, 320, 240]
    return features, pixel_boxes


def test_store_reads_vlt5_h5_layout_and_normalises_pixel_boxes(tmp_path):
    features, pixel_boxes = _vlt5_entry()
    path = tmp_path / "val2014_obj36.h5"
    _write_vlt5_h5(path, features, pixel_boxes, img_h=480, img_w=640)
    store = FeatureStore(path, feat_dim=2048, n_regions=36)
    read_features, boxes = store["COCO_val2014_000000000042"]
    assert np.array_equal(read_features, features)
    np.testing.assert_allclose(boxes[0], [0.1, 0.1, 1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(boxes[1], [0.0, 0.0, 0.5, 0.5], atol=1e-6)
    assert store.image_ids() == ["COCO_val2014_000000000042"] and len(store) == 1


def test_store_reads_npz_directory_and_npy_structured_array(tmp_path):
    features, pixel_boxes = _vlt5_entry()
    npz_dir = tmp_path / "npz"
    npz_dir.mkdir()
    np.savez(npz_dir / "42.npz", features=features, boxes=pixel_boxes, img_h=480, img_w=640)  # pixel boxes
    np.savez(npz_dir / "7.npz", features=features[:4], boxes=grid_boxes(2, 2))  # already normalised
    npz_store = FeatureStore(npz_dir)
    np.testing.assert_allclose(npz_store[42][1][0], [0.1, 0.1, 1.0, 1.0], atol=1e-6)  # int ids are looked up as str
    assert np.array_equal(npz_store["7"][1], grid_boxes(2, 2)) and npz_store.image_ids() == ["42", "7"]

    rows = np.zeros(2, dtype=[("image_id", "U32"), ("features", "f4", (36, 2048)), ("boxes", "f4", (36, 4))])
    rows["image_id"] = ["a", "b"]
    rows["features"][1] = features
    rows["boxes"][1] = pixel_boxes / np.array([640, 480, 640, 480], dtype=np.float32)
    np.save(tmp_path / "features.npy", rows)
    npy_store = FeatureStore(tmp_path / "features.npy", feat_dim=2048)
    read_features, boxes = npy_store["b"]
    assert np.array_equal(read_features, features)
    np.testing.assert_allclose(boxes[0], [0.1, 0.1, 1.0, 1.0], atol=1e-6)
    assert "a" in npy_store and "c" not in npy_store


def test_npy_store_refuses_pickled_objects(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"features": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(FeatureStoreError, match="no pickles"):
        FeatureStore(tmp_path / "objects.npy")["0"]


def test_store_errors_name_the_image_id(tmp_path):
    features, pixel_boxes = _vlt5_entry()
    path = tmp_path / "f.h5"
    _write_vlt5_h5(path, features, pixel_boxes, img_h=480, img_w=640)
    image_id = "COCO_val2014_000000000042"
    with pytest.raises(MissingFeaturesError, match="'COCO_val2014_000000000099'") as missing:
        FeatureStore(path)["COCO_val2014_000000000099"]
    assert isinstance(missing.value, KeyError)
    with pytest.raises(FeatureStoreError, match=f"'{image_id}'.*feat_dim is 2048, expected 768"):
        FeatureStore(path, feat_dim=768)[image_id]
    with pytest.raises(FeatureStoreError, match=f"'{image_id}'.*36 regions, expected 49"):
        FeatureStore(path, n_regions=49)[image_id]

    npz_dir = tmp_path / "npz"
    npz_dir.mkdir()
    np.savez(npz_dir / "pixels.npz", features=features, boxes=pixel_boxes)  # pixel boxes without img_h / img_w
    with pytest.raises(FeatureStoreError, match="'pixels'.*outside \\[0, 1\\]"):
        FeatureStore(npz_dir)["pixels"]
    np.savez(npz_dir / "short.npz", features=features, boxes=grid_boxes(2, 2))
    with pytest.raises(FeatureStoreError, match="'short'.*boxes have shape \\(4, 4\\), expected \\(36, 4\\)"):
        FeatureStore(npz_dir)["short"]


def test_npz_store_refuses_ids_that_escape_its_directory(tmp_path):
    (tmp_path / "store").mkdir()
    np.savez(tmp_path / "outside.npz", features=np.zeros((1, 2)), boxes=np.zeros((1, 4)))
    with pytest.raises(ValueError, match="outside the image root"):
        FeatureStore(tmp_path / "store")["../outside"]


def test_store_pickles_without_its_handle_and_reopens_in_dataloader_workers(tmp_path):
    features, pixel_boxes = _vlt5_entry()
    path = tmp_path / "f.h5"
    _write_vlt5_h5(path, features, pixel_boxes, img_h=480, img_w=640)
    store = FeatureStore(path)
    expected = store["COCO_val2014_000000000042"]  # opens the file in this process
    clone = pickle.loads(pickle.dumps(store))
    assert clone._reader._handle is None
    np.testing.assert_array_equal(clone["COCO_val2014_000000000042"][0], expected[0])

    class Lookup(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return store["COCO_val2014_000000000042"][0]

    for batch in DataLoader(Lookup(), batch_size=2, num_workers=2):
        np.testing.assert_array_equal(batch.numpy(), np.stack([expected[0]] * 2))


# ---- extraction to h5 ------------------------------------------------------------------------------------------


def test_extraction_writes_vlt5_layout_that_the_store_reads_back(tmp_path, resnet):
    image_dir = _image_dir(tmp_path / "images", 3)
    output = tmp_path / "features.h5"
    report = extract_to_h5(image_dir, output, resnet, batch_size=2, progress=False)
    assert (report.n_images, report.n_skipped, report.n_extracted, report.failures) == (3, 0, 3, [])
    with h5py.File(output, "r") as h5:
        assert sorted(h5) == ["img0", "img1", "img2"]
        assert (h5["img2"]["img_w"][()], h5["img2"]["img_h"][()]) == (56, 40)
        np.testing.assert_allclose(h5["img2"]["boxes"][1], [28, 0, 56, 20])  # top-right cell, in pixels
        assert h5.attrs["backbone"] == "resnet18" and h5.attrs["feat_dim"] == 512 and h5.attrs["n_regions"] == 4
    store = FeatureStore(output, feat_dim=512, n_regions=4)
    for i in range(3):
        features, boxes = store[f"img{i}"]
        expected = resnet([load_image(image_dir / f"img{i}.png")])[0][0]
        np.testing.assert_allclose(features, expected, **float32_paths(expected))
        np.testing.assert_allclose(boxes, grid_boxes(2, 2), atol=1e-6)


def test_resumed_extraction_does_not_redo_finished_images(tmp_path, resnet):
    image_dir = _image_dir(tmp_path / "images", 3)
    output = tmp_path / "features.h5"
    extract_to_h5(image_dir, output, resnet, batch_size=2, progress=False)
    with h5py.File(output, "r") as h5:
        before = {image_id: h5[image_id]["features"][()] for image_id in h5}
    _image_dir(image_dir, 2, start=3)
    with _CountingExtractor(resnet) as counter:
        report = extract_to_h5(image_dir, output, resnet, batch_size=2, progress=False)
    assert counter.images == 2
    assert (report.n_skipped, report.n_extracted) == (3, 2)
    with h5py.File(output, "r") as h5:
        assert len(h5) == 5
        for image_id, features in before.items():
            assert np.array_equal(h5[image_id]["features"][()], features)


def test_interrupted_extraction_loses_at_most_one_batch(tmp_path, resnet):
    image_dir = _image_dir(tmp_path / "images", 5)
    output = tmp_path / "features.h5"
    with _CountingExtractor(resnet, fail_on_call=2), pytest.raises(KeyboardInterrupt):
        extract_to_h5(image_dir, output, resnet, batch_size=2, progress=False)
    with h5py.File(output, "a") as h5:
        assert sorted(h5) == ["img0", "img1"]  # the first batch was flushed before the interruption
        h5.create_group("img2")["features"] = np.zeros((4, 512), np.float32)  # as if killed mid-write
    with _CountingExtractor(resnet) as counter:
        report = extract_to_h5(image_dir, output, resnet, batch_size=2, progress=False)
    assert counter.images == 3 and report.n_skipped == 2  # the partial group was redone, not trusted
    assert len(FeatureStore(output, n_regions=4).image_ids()) == 5
    expected = resnet([load_image(image_dir / "img2.png")])[0][0]
    np.testing.assert_allclose(
        FeatureStore(output)["img2"][0], expected, **float32_paths(expected)
    )


def test_unreadable_images_are_reported_by_path_and_counted(tmp_path, resnet):
    image_dir = _image_dir(tmp_path / "images", 2)
    truncated, empty = image_dir / "truncated.jpg", image_dir / "empty.jpg"
    _image(9, size=(64, 64)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    empty.write_bytes(b"")
    output = tmp_path / "features.h5"
    report = extract_to_h5(image_dir, output, resnet, batch_size=4, num_workers=1, progress=False)
    assert sorted(failure.path for failure in report.failures) == sorted([empty, truncated])
    assert (report.n_images, report.n_extracted) == (4, 2)
    assert "2 unreadable" in report.summary() and str(truncated) in report.summary()
    errors = report.errors_path.read_text()
    assert report.errors_path == tmp_path / "features.h5.errors.txt"
    assert str(truncated) in errors and str(empty) in errors
    assert sorted(FeatureStore(output).image_ids()) == ["img0", "img1"]


def test_extraction_refuses_an_output_made_by_another_backbone(tmp_path, resnet, vit):
    image_dir = _image_dir(tmp_path / "images", 1)
    output = tmp_path / "features.h5"
    extract_to_h5(image_dir, output, resnet, progress=False)
    _image_dir(image_dir, 1, start=1)
    with pytest.raises(FeatureStoreError, match="backbone: file has 'resnet18', this run 'vit_tiny_patch16_224'"):
        extract_to_h5(image_dir, output, vit, progress=False)
    assert FeatureStore(output).image_ids() == ["img0"]


# ---- on-the-fly features ---------------------------------------------------------------------------------------


def test_on_the_fly_features_compute_once_and_match_the_extractor(tmp_path, vit):
    image_dir = _image_dir(tmp_path / "images", 2)
    source = OnTheFlyFeatures(image_dir, vit)
    with _CountingExtractor(vit) as counter:
        features, boxes = source["img1"]
        features[:] = 0  # a caller changing its copy must not change the cache
        again, _ = source["img1"]
    assert counter.calls == 1
    expected = vit([load_image(image_dir / "img1.png")])[0][0]
    np.testing.assert_allclose(again, expected, **float32_paths(expected))
    assert np.array_equal(boxes, grid_boxes(2, 2)) and "img0" in source and len(source) == 2
    with pytest.raises(MissingFeaturesError, match="'img7'"):
        source["img7"]


# ---- command line ----------------------------------------------------------------------------------------------


def _cli():
    spec = importlib.util.spec_from_file_location("extract_features_cli", REPO_ROOT / "scripts" / "extract_features.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_extracts_resumes_and_reports_unreadable_images(tmp_path, capsys):
    image_dir = _image_dir(tmp_path / "images", 2)
    output = tmp_path / "out" / "features.h5"
    args = ["--image_dir", str(image_dir), "--output", str(output), "--backbone", "resnet18", "--no-pretrained"]
    args += ["--image_size", "64", "--batch_size", "2", "--device", "cpu", "--num_workers", "0"]
    assert _cli().main(args) == 0
    assert FeatureStore(output, feat_dim=512, n_regions=4).image_ids() == ["img0", "img1"]

    (image_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    capsys.readouterr()
    assert _cli().main(args) == 1  # some images could not be read
    out = capsys.readouterr()
    assert "2 already in" in out.out and "0 extracted" in out.out and "1 unreadable" in out.out
    assert str(image_dir / "broken.png") in out.out


def test_cli_no_pretrained_is_seeded_and_refuses_to_resume_with_other_weights(tmp_path):
    image_dir = _image_dir(tmp_path / "images", 2)

    def run(output, seed):
        args = ["--image_dir", str(image_dir), "--output", str(output), "--backbone", "resnet18", "--no-pretrained",
                "--image_size", "64", "--device", "cpu", "--num_workers", "0", "--seed", str(seed)]
        return _cli().main(args)

    def features(output):
        store = FeatureStore(output)
        return {image_id: store[image_id][0] for image_id in store.image_ids()}

    assert run(tmp_path / "a.h5", 3) == 0 and run(tmp_path / "b.h5", 3) == 0 and run(tmp_path / "c.h5", 4) == 0
    a, b, c = features(tmp_path / "a.h5"), features(tmp_path / "b.h5"), features(tmp_path / "c.h5")
    assert all(np.array_equal(a[key], b[key]) for key in a)  # same seed, same random backbone
    assert not np.allclose(a["img0"], c["img0"])
    with h5py.File(tmp_path / "a.h5", "r") as h5:
        fingerprint = h5.attrs["weights_sha256"]
    with h5py.File(tmp_path / "c.h5", "r") as h5:
        assert h5.attrs["weights_sha256"] != fingerprint

    _image_dir(image_dir, 1, start=2)
    with pytest.raises(SystemExit, match=r"weights_sha256: file has '[0-9a-f]{64}', this run '[0-9a-f]{64}'"):
        run(tmp_path / "a.h5", 4)  # other random weights: refused, nothing mixed in
    assert sorted(features(tmp_path / "a.h5")) == ["img0", "img1"]
    assert run(tmp_path / "a.h5", 3) == 0  # the same weights resume
    assert sorted(features(tmp_path / "a.h5")) == ["img0", "img1", "img2"]


def test_weights_fingerprint_follows_the_weights_and_the_seed_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = GridFeatureExtractor("resnet18", pretrained=False, image_size=32, seed=5)
    assert torch.equal(torch.rand(3), expected_next)
    again = GridFeatureExtractor("resnet18", pretrained=False, image_size=32, seed=5)
    assert first.weights_sha256 == again.weights_sha256 == weights_fingerprint(again.model)
    with torch.no_grad():
        next(again.model.parameters()).view(-1)[0] += 1.0
    assert weights_fingerprint(again.model) != first.weights_sha256
