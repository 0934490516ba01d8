"""Image classification on the shared trainer: image folders and datasets, timm transforms, top-1/top-5, runs."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dept.config import ConfigError, DePTConfig
from dept_vl.image_classification import (
    DEFAULT_HEAD_LEARNING_RATE,
    ImageClassificationEvaluator,
    ImageDataArguments,
    class_names,
    image_transforms,
    load_image_splits,
    main,
    select_splits,
    train,
    with_pixel_values,
)
from dept_vl.images import ImageLoadError
from tests.conftest import IMAGE_CLASSES, VISION_MODEL_FLAGS, free_port, write_image_folder
from tests.vl.conftest import tiny_vit

REPO_ROOT = Path(__file__).resolve().parents[2]



@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"), {"train": 16, "validation": 4, "test": 4})


def data_args(**kwargs) -> ImageDataArguments:
    return ImageDataArguments(**{"do_train": True, "do_eval": True, **kwargs})


def test_image_folder_splits_and_separate_folders_share_one_set_of_class_names(image_folder, tmp_path):
    splits = load_image_splits(data_args(data_dir=str(image_folder)))
    assert sorted(splits) == ["test", "train", "validation"] and len(splits["train"]) == 48
    assert class_names(splits, "label") == list(IMAGE_CLASSES)

    only_red = write_image_folder(tmp_path, {"test": 1})
    for name in ("blue", "green"):
        for path in (only_red / "test" / name).iterdir():
            path.unlink()
        (only_red / "test" / name).rmdir()
    separate = load_image_splits(data_args(train_dir=str(image_folder / "train"), test_dir=str(only_red / "test")))
    assert class_names(separate, "label") == list(IMAGE_CLASSES)
    assert {separate["test"][i]["label"] for i in range(len(separate["test"]))} == {IMAGE_CLASSES.index("red")}


def test_validation_is_held_out_from_train_when_missing_stratified_and_seeded(image_folder):
    args = data_args(train_dir=str(image_folder / "train"), train_val_split=0.25)
    selected = select_splits(load_image_splits(args), args)
    assert len(selected["train"]) == 36 and len(selected["validation"]) == 12
    assert sorted(selected["validation"]["label"]) == [0] * 4 + [1] * 4 + [2] * 4
    again = select_splits(load_image_splits(args), args)
    assert again["validation"]["label"] == selected["validation"]["label"]


def test_data_must_be_named_exactly_once_and_columns_must_exist(image_folder):
    with pytest.raises(ValueError, match="Name the data once"):
        data_args()
    with pytest.raises(ValueError, match="Name the data once"):
        data_args(data_dir=str(image_folder), train_dir=str(image_folder / "train"))
    with pytest.raises(ValueError, match=r"no column \['picture'\].*--image_column"):
        load_image_splits(data_args(data_dir=str(image_folder), image_column="picture"))


def test_transforms_are_timms_own_at_the_models_input_size():
    vit = tiny_vit()
    train_transform, eval_transform = image_transforms(vit)
    image = Image.new("RGB", (50, 70), (255, 0, 0))
    assert eval_transform(image).shape == train_transform(image).shape == (3, 32, 32)
    # vit_tiny's pretrained config normalises with mean = std = 0.5: pure red is (1, -1, -1)
    torch.testing.assert_close(eval_transform(image)[:, 16, 16], torch.tensor([1.0, -1.0, -1.0]))


def test_top1_and_top5_accuracy_are_counted_by_class_name():
    names = [f"c{i}" for i in range(7)]
    evaluator = ImageClassificationEvaluator(names)

    class Logits(torch.nn.Module):
        def forward(self, pixel_values):
            return type("Output", (), {"logits": pixel_values})()

    logits = torch.tensor([[7.0, 6, 5, 4, 3, 2, 1], [1.0, 2, 3, 4, 5, 6, 7]])
    predictions = evaluator.predict_step(Logits(), {"pixel_values": logits})
    assert predictions[0] == {"label": "c0", "top5": ["c0", "c1", "c2", "c3", "c4"]}
    # gold c0: top-1 right; gold c2 for the second row: in its top 5 (c6 c5 c4 c3 c2), not top-1
    assert evaluator.compute_metrics(predictions, ["c0", "c2"]) == {"accuracy": 50.0, "top5_accuracy": 100.0}
    assert evaluator.compute_metrics(predictions, ["c4", "c1"]) == {"accuracy": 0.0, "top5_accuracy": 50.0}


def run_flags(image_folder: Path, output_dir: Path, *extra: str) -> list[str]:
    return [*VISION_MODEL_FLAGS, "--data_dir", str(image_folder), "--output_dir", str(output_dir),
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--report_to", "none",
            "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false", "--logging_steps", "5", "--seed", "3", *extra]


@pytest.mark.slow
def test_end_to_end_loss_falls_and_a_reloaded_adapter_gives_the_same_accuracy(image_folder, tmp_path):
    trained_dir = tmp_path / "dept"
    results = train(run_flags(image_folder, trained_dir, "--do_train", "--do_eval", "--do_predict",
                             "--prefix_length", "4", "--r", "4", "--max_steps", "40", "--learning_rate", "0.1",
                             "--lora_embedding_lr", "0.02", "--head_learning_rate", "0.02"))

    losses = [entry["loss"] for entry in json.loads((trained_dir / "trainer_state.json").read_text())["log_history"]
              if "loss" in entry]
    assert len(losses) == 8 and max(losses[-2:]) < 0.7 * losses[0], losses
    assert results["eval_accuracy"] > 100 / 3 and results["eval_top5_accuracy"] == 100.0
    record = json.loads((trained_dir / "image_classification.json").read_text())
    assert record["class_names"] == list(IMAGE_CLASSES)
    assert record["trainable_parameters"] == {"prompt": 4 * 32, "lora_embedding": 16 * 4 + 4 * 32,
                                              "head": 32 * 3 + 3, "total": 419, "other": 0}
    predictions = [json.loads(line) for line in (trained_dir / "predictions_test.jsonl").read_text().splitlines()]
    assert len(predictions) == 12 and predictions[0]["prediction"]["label"] in IMAGE_CLASSES

    reloaded = train(run_flags(image_folder, tmp_path / "reloaded", "--do_eval", "--do_predict",
                              "--peft_model_id", str(trained_dir)))
    for key in ("eval_accuracy", "eval_top5_accuracy", "test_accuracy"):
        assert reloaded[key] == results[key]
    assert reloaded["eval_loss"] == pytest.approx(results["eval_loss"], abs=1e-6)


@pytest.mark.slow
def test_vpt_and_lora_baselines_run_through_the_same_pipeline(image_folder, tmp_path):
    for peft_type in ("PROMPT_TUNING", "LORA"):
        prompt = ["--prefix_length", "4"] if peft_type == "PROMPT_TUNING" else []  # LORA refuses a prompt size
        results = train(run_flags(image_folder, tmp_path / peft_type, "--do_train", "--do_eval",
                                 "--peft_type", peft_type, *prompt, "--max_steps", "2", "--max_eval_samples", "6"))
        assert results["total_steps"] == 2 and results["eval_samples"] == 6
        record = json.loads((tmp_path / peft_type / "image_classification.json").read_text())
        assert record["trainable_parameters"]["head"] == 99
    assert record["trainable_parameters"]["other"] > 0  # LoRA's A and B on qkv


def adapter_for_other_classes(adapter: Path) -> Path:
    """An adapter directory whose run record names other classes than the image folder's."""
    DePTConfig(num_virtual_tokens=4, r=4, max_length=16).save_pretrained(adapter)
    (adapter / "image_classification.json").write_text(json.dumps(
        {"model_name_or_path": "vit_tiny_patch16_224", "class_names": ["cat", "dog"]}))
    return adapter


def test_an_adapter_for_other_classes_is_refused_before_any_compute(image_folder, tmp_path):
    adapter = adapter_for_other_classes(tmp_path / "adapter")
    with pytest.raises(ConfigError, match=r"trained on the classes \['cat', 'dog'\]"):
        train(run_flags(image_folder, tmp_path / "out", "--do_eval", "--peft_model_id", str(adapter)))


def test_the_console_entry_reports_a_refused_adapter_in_one_line_with_exit_status_2(image_folder, tmp_path, capsys):
    adapter = adapter_for_other_classes(tmp_path / "adapter")
    status = main(run_flags(image_folder, tmp_path / "out", "--do_eval", "--peft_model_id", str(adapter)))
    err = capsys.readouterr().err
    assert status == 2
    assert "dept-train-vision: error:" in err and "trained on the classes ['cat', 'dog']" in err
    assert "Traceback" not in err


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_under_accelerate_launch_train_and_match_the_one_process_evaluation(image_folder, tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate's launcher is not installed next to this Python"
    output_dir = tmp_path / "two"
    flags = run_flags(image_folder, output_dir, "--do_train", "--do_eval", "--prefix_length", "4", "--r", "4",
                      "--max_steps", "3", "--per_device_train_batch_size", "4",
                      "--per_device_eval_batch_size", "6")  # 12 images: one batch per process, none repeated
    # --multi_gpu: accelerate's --cpu starts one process here; on CPU the trainer joins the gloo group itself.
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO_ROOT / "scripts" / "train_vision.py"), *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO_ROOT)}
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert finished.returncode == 0, finished.stderr[-3000:]

    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["data_order"]["num_processes"] == 2 and state["global_step"] == 3
    two_process = json.loads((output_dir / "all_results.json").read_text())
    one_process = train(run_flags(image_folder, tmp_path / "one", "--do_eval", "--peft_model_id", str(output_dir)))
    assert one_process["eval_samples"] == two_process["eval_samples"] == 12
    assert one_process["eval_accuracy"] == pytest.approx(two_process["eval_accuracy"])
    assert one_process["eval_loss"] == pytest.approx(two_process["eval_loss"], rel=1e-5)  # FLOAT32_PATHS


# ------------------------------------------------------------------------------------- user errors, at the console


def run_console(capsys, argv: list[str]) -> tuple[int, str]:
    status = main(argv)
    return status, capsys.readouterr().err


def assert_refused(status: int, err: str, *fragments: str) -> str:
    """Exit status 2, no traceback, and one error line holding every fragment; returns that line."""
    assert status == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("dept-train-vision: error:")]
    assert len(lines) == 1, err[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def encoded(image_format: str, size: int = 40) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    return buffer.getvalue()


def test_every_unreadable_image_is_reported_at_once_with_a_count_before_anything_trains(image_folder, tmp_path,
                                                                                        capsys):
    data = Path(shutil.copytree(image_folder, tmp_path / "data"))
    bad = {data / "train" / "red" / "empty.png": b"",
           data / "train" / "green" / "notes.png": b"not an image, whatever the name says",
           data / "train" / "blue" / "truncated.png": encoded("PNG")[:500],
           data / "validation" / "red" / "truncated.jpg": encoded("JPEG")[:700]}
    for path, content in bad.items():
        path.write_bytes(content)
    output_dir = tmp_path / "out"
    status, err = run_console(capsys, run_flags(data, output_dir, "--do_train", "--do_eval", "--max_steps", "2",
                                                "--save_strategy", "steps", "--save_steps", "1"))
    line = assert_refused(status, err, "4 of the 64 images cannot be read")  # 48 + 3 train, 12 + 1 validation
    for path in bad:
        assert str(path) in line
    assert not output_dir.exists()  # refused before the trainer made anything


def test_an_image_that_breaks_after_the_check_names_its_file_when_it_is_read(image_folder, tmp_path):
    data = Path(shutil.copytree(image_folder / "test", tmp_path / "test"))
    splits = load_image_splits(data_args(test_dir=str(data), do_train=False, do_eval=False, do_predict=True))
    (data / "blue" / "0.png").write_bytes(encoded("PNG")[:300])
    rows = with_pixel_values(splits["test"], lambda image: torch.zeros(1), "image", "label")
    with pytest.raises(ImageLoadError) as error:
        rows[0]
    assert error.value.path == data / "blue" / "0.png"


def test_do_predict_on_class_folders_without_a_test_folder_is_refused_naming_the_layout(image_folder, tmp_path,
                                                                                        capsys):
    flat = Path(shutil.copytree(image_folder / "train", tmp_path / "flat"))  # the README's layout: DIR/<class>/
    status, err = run_console(capsys, run_flags(flat, tmp_path / "out", "--do_train", "--do_predict"))
    assert_refused(status, err, "--do_predict scores the test split", f"{flat}/test/<class>/", f"{flat}/train/<class>/",
                   "or drop --do_predict")
    assert not (tmp_path / "out").exists()


def write_labelled_metadata(folder: Path, labels: list) -> Path:
    """An imagefolder with its labels in metadata.jsonl's `class` column (as a Hub dataset may hold them)."""
    (folder / "x").mkdir(parents=True)
    with open(folder / "metadata.jsonl", "w") as rows:
        for index, label in enumerate(labels):
            Image.new("RGB", (8, 8), (index * 40, 0, 0)).save(folder / "x" / f"{index}.png")
            rows.write(json.dumps({"file_name": f"x/{index}.png", "class": label}) + "\n")
    return folder


@pytest.mark.parametrize("case", ["no_column", "labels_not_indices", "labels_not_integers", "no_validation_split",
                                  "validation_cannot_be_held_out", "one_class_folder", "not_a_directory"])
def test_each_data_error_exits_2_in_one_line_naming_the_fix(image_folder, tmp_path, capsys, case):
    data, extra, expected = image_folder, ["--do_train"], []
    if case == "no_column":
        extra, expected = ["--do_eval", "--label_column", "kind"], ["no column ['kind']", "--label_column"]
    elif case in ("labels_not_indices", "labels_not_integers"):
        labels = [3, 7, 7, 3] if case == "labels_not_indices" else ["cat", "dog", "cat", "dog"]
        data = write_labelled_metadata(tmp_path / "meta", labels)
        extra = ["--do_eval", "--dataset_name", "imagefolder", "--label_column", "class"]
        expected = (["class indices 0..n-1", "[3, 7]"] if case == "labels_not_indices"
                    else ["not class indices", "'cat'", "ClassLabel"])
    elif case == "no_validation_split":
        flags = run_flags(image_folder, tmp_path / "out", "--do_eval")
        flags[flags.index("--data_dir"):flags.index("--data_dir") + 2] = ["--test_dir", str(image_folder / "test")]
        status, err = run_console(capsys, flags)
        assert_refused(status, err, "no validation split", "drop --do_eval")
        return
    elif case == "validation_cannot_be_held_out":
        data = Path(shutil.copytree(image_folder / "train", tmp_path / "flat"))
        for path in sorted((data / "red").iterdir())[1:]:
            path.unlink()  # one red image: a stratified hold-out cannot split it
        expected = ["holding out 15% of train", "only 1 member", "--validation_dir"]
    elif case == "one_class_folder":
        data = tmp_path / "one"
        shutil.copytree(image_folder / "train" / "red", data / "red")
        expected = ["at least two classes", "['red']"]
    elif case == "not_a_directory":
        data, expected = tmp_path / "missing", [f"--data_dir {tmp_path / 'missing'} is not a directory"]
    status, err = run_console(capsys, run_flags(data, tmp_path / "out", *extra))
    assert_refused(status, err, *expected)


@pytest.mark.parametrize(("flags", "expected"), [
    (["--model_name_or_path", "resnet18", "--img_size", "32"], ["resnet18 is a ResNet, not a ViT", "vit_base_patch16"]),
    (["--model_kwargs", "{img_size:32}"], ["gives no value to ['img_size:32']", "space after each colon"]),
    (["--model_kwargs", "{img_size: 32, pos_embed_kind: learned}"], ["refused the arguments", "pos_embed_kind"]),
])
def test_a_model_timm_cannot_build_as_a_vit_is_refused_before_the_data_loads(tmp_path, capsys, flags, expected):
    status, err = run_console(capsys, run_flags(tmp_path / "no-such-data", tmp_path / "out", "--do_train", *flags))
    assert_refused(status, err, *expected)  # the data folder does not exist: the model is checked first


def test_an_empty_class_folder_warns_and_a_class_missing_from_training_is_refused(image_folder, tmp_path, capsys,
                                                                                   caplog):
    data = Path(shutil.copytree(image_folder, tmp_path / "data"))
    for path in (data / "test" / "green").iterdir():
        path.unlink()
    with caplog.at_level("WARNING", logger="dept_vl.image_classification"):
        splits = load_image_splits(data_args(data_dir=str(data)))
    assert f"hold no images, so they are no class and no split: {data / 'test' / 'green'}" in caplog.text
    assert class_names(splits, "label") == list(IMAGE_CLASSES)  # green still comes from train and validation

    for path in (data / "train" / "red").iterdir():
        path.unlink()
    status, err = run_console(capsys, run_flags(data, tmp_path / "out", "--do_train", "--do_eval"))
    assert_refused(status, err, "No training images for 1 of the 3 classes: ['red'] (found in validation)")


def test_a_cut_training_set_is_drawn_at_random_so_a_class_folder_order_does_not_decide_it(image_folder):
    args = data_args(data_dir=str(image_folder), max_train_samples=9, max_eval_samples=6)
    selected = select_splits(load_image_splits(args), args)
    assert len(selected["train"]) == 9 and len(selected["validation"]) == 6
    assert len(set(selected["train"]["label"])) == 3  # the first 9 rows would all be "blue"
    assert selected["train"]["label"] == select_splits(load_image_splits(args), args)["train"]["label"]


# ------------------------------------------------------------------------------------- reloading onto the backbone


@pytest.fixture(scope="module")
def trained_adapter(image_folder, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("trained") / "dept"
    train(run_flags(image_folder, output_dir, "--do_train", "--prefix_length", "4", "--r", "4", "--max_steps", "1"))
    return output_dir


@pytest.mark.parametrize(("flags", "expected"), [
    (["--model_kwargs", "{img_size: 32, patch_size: 8, embed_dim: 32, depth: 3, num_heads: 2}"],
     ["built with {'img_size': 32, 'patch_size': 8, 'embed_dim': 32, 'depth': 2", "'depth': 3", "--model_kwargs '{"]),
    (["--seed", "4"], ["frozen weights of vit_tiny_patch16_224 differ", "pass --seed 3"]),
    (["--train_head", "false"], ["trained with --train_head true", "pass --train_head true"]),
])
def test_an_adapter_is_refused_on_a_backbone_built_otherwise_or_with_other_weights(image_folder, trained_adapter,
                                                                                   tmp_path, capsys, flags, expected):
    record = json.loads((trained_adapter / "image_classification.json").read_text())
    assert record["model_kwargs"]["depth"] == 2 and len(record["weights_sha256"]) == 64 and record["seed"] == 3
    status, err = run_console(capsys, run_flags(image_folder, tmp_path / "out", "--do_eval", "--peft_model_id",
                                                str(trained_adapter), *flags))
    assert_refused(status, err, *expected)


def test_an_adapter_reloads_onto_the_backbone_it_was_trained_on(image_folder, trained_adapter, tmp_path, capsys):
    status = main(run_flags(image_folder, tmp_path / "out", "--do_eval", "--peft_model_id", str(trained_adapter)))
    assert status == 0, capsys.readouterr().err[-3000:]


# ------------------------------------------------------------------------------------- preprocessing, learning rates


def log_history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def zero_rate_run(image_folder: Path, output_dir: Path, *extra: str) -> tuple[float, float]:
    """(training loss, evaluation loss) of one full-batch step at learning rate 0 on the same 12 images."""
    flags = run_flags(image_folder, output_dir, "--do_train", "--do_eval", "--max_steps", "1", "--logging_steps", "1",
                      "--per_device_train_batch_size", "12", "--per_device_eval_batch_size", "12",
                      "--learning_rate", "0", "--lora_embedding_lr", "0", "--head_learning_rate", "0",
                      "--prefix_length", "2", "--r", "2", *extra)
    flags[flags.index("--data_dir"):flags.index("--data_dir") + 2] = [
        "--train_dir", str(image_folder / "validation"), "--validation_dir", str(image_folder / "validation")]
    results = train(flags)
    return log_history(output_dir)[0]["loss"], results["eval_loss"]


def test_training_images_get_the_evaluation_transform_unless_timm_augmentation_is_asked_for(image_folder, tmp_path):
    train_loss, eval_loss = zero_rate_run(image_folder, tmp_path / "default")
    assert train_loss == pytest.approx(eval_loss, rel=1e-5)  # the same images, the same preprocessing

    train_loss, eval_loss = zero_rate_run(image_folder, tmp_path / "timm", "--train_augmentation", "timm")
    assert abs(train_loss - eval_loss) > 1e-3  # random crops, flips and colour jitter change what the model sees

    train_transform, eval_transform = image_transforms(tiny_vit(), "timm")
    image = Image.new("RGB", (40, 40), (200, 30, 30))
    assert train_transform is not eval_transform and eval_transform(image).shape == train_transform(image).shape


def test_the_head_trains_at_its_own_learning_rate(image_folder, tmp_path):
    rates = {}
    flags = {"default": [], "flag": ["--head_learning_rate", "0.02"], "alias": ["--head_lr", "0.02"]}
    for name, extra in flags.items():
        train(run_flags(image_folder, tmp_path / name, "--do_train", "--max_steps", "2", "--logging_steps", "1",
                        "--prefix_length", "2", "--r", "2", "--lora_embedding_lr", "1e-4", *extra))
        first = log_history(tmp_path / name)[0]
        rates[name] = first["learning_rate_modules_to_save"] / first["learning_rate_prompt"]  # one schedule for all
    assert rates["default"] == pytest.approx(DEFAULT_HEAD_LEARNING_RATE / 0.3)  # not --lora_embedding_lr's 1e-4
    assert rates["flag"] == rates["alias"] == pytest.approx(0.02 / 0.3)


def test_the_head_learning_rate_is_refused_where_the_head_trains_with_the_rest(image_folder, tmp_path, capsys):
    status, err = run_console(capsys, run_flags(image_folder, tmp_path / "out", "--do_train", "--peft_type", "LORA",
                                                "--head_learning_rate", "0.01"))
    assert_refused(status, err, "--head_learning_rate applies to DePT and VPT", "--learning_rate")


def test_help_says_what_lora_adapts_and_documents_the_new_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "fused qkv projection" in text and "q and v" not in text
    assert f"--learning_rate. Unset: {DEFAULT_HEAD_LEARNING_RATE}." in text and "--head_lr" in text
    assert "--train_augmentation {none,timm}" in text and "random-resized crop" in text
