"""Image classification on the shared trainer: image folders and datasets, timm transforms, top-1/top-5, runs."""

from __future__ import annotations

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
    ImageClassificationEvaluator,
    ImageDataArguments,
    class_names,
    image_transforms,
    load_image_splits,
    main,
    select_splits,
    train,
)
from tests.conftest import free_port
from tests.vl.test_vit import tiny_vit

REPO_ROOT = Path(__file__).resolve().parents[2]

CLASSES = ("blue", "green", "red")  # imagefolder sorts class folders by name
MODEL_FLAGS = ["--model_name_or_path", "vit_tiny_patch16_224", "--pretrained", "false",
               "--model_kwargs", "{img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}"]


def write_image_folder(root: Path, per_class: dict[str, int], seed: int = 0, size: int = 40) -> Path:
    """Noisy images whose dominant colour is the class, one subfolder per class (grayscale and RGBA among them)."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for channel, name in zip((2, 1, 0), CLASSES, strict=True):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
                pixels[..., channel] = rng.integers(160, 256, size=(size, size), dtype=np.uint8)
                image = Image.fromarray(pixels)
                if index == 0:
                    image = image.convert("RGBA")  # other modes become RGB
                image.save(folder / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"), {"train": 16, "validation": 4, "test": 4})


def data_args(**kwargs) -> ImageDataArguments:
    return ImageDataArguments(**{"do_train": True, "do_eval": True, **kwargs})


def test_image_folder_splits_and_separate_folders_share_one_set_of_class_names(image_folder, tmp_path):
    splits = load_image_splits(data_args(data_dir=str(image_folder)))
    assert sorted(splits) == ["test", "train", "validation"] and len(splits["train"]) == 48
    assert class_names(splits, "label") == list(CLASSES)

    only_red = write_image_folder(tmp_path, {"test": 1})
    for name in ("blue", "green"):
        for path in (only_red / "test" / name).iterdir():
            path.unlink()
        (only_red / "test" / name).rmdir()
    separate = load_image_splits(data_args(train_dir=str(image_folder / "train"), test_dir=str(only_red / "test")))
    assert class_names(separate, "label") == list(CLASSES)
    assert {separate["test"][i]["label"] for i in range(len(separate["test"]))} == {CLASSES.index("red")}


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
    return [*MODEL_FLAGS, "--data_dir", str(image_folder), "--output_dir", str(output_dir),
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--report_to", "none",
            "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false", "--logging_steps", "5", "--seed", "3", *extra]


@pytest.mark.slow
def test_end_to_end_loss_falls_and_a_reloaded_adapter_gives_the_same_accuracy(image_folder, tmp_path):
    trained_dir = tmp_path / "dept"
    results = train(run_flags(image_folder, trained_dir, "--do_train", "--do_eval", "--do_predict",
                             "--prefix_length", "4", "--r", "4", "--max_steps", "40", "--learning_rate", "0.1",
                             "--lora_embedding_lr", "0.02"))

    losses = [entry["loss"] for entry in json.loads((trained_dir / "trainer_state.json").read_text())["log_history"]
              if "loss" in entry]
    assert len(losses) == 8 and max(losses[-2:]) < 0.7 * losses[0], losses
    assert results["eval_accuracy"] > 100 / 3 and results["eval_top5_accuracy"] == 100.0
    record = json.loads((trained_dir / "image_classification.json").read_text())
    assert record["class_names"] == list(CLASSES)
    assert record["trainable_parameters"] == {"prompt": 4 * 32, "lora_embedding": 16 * 4 + 4 * 32,
                                              "head": 32 * 3 + 3, "total": 419, "other": 0}
    predictions = [json.loads(line) for line in (trained_dir / "predictions_test.jsonl").read_text().splitlines()]
    assert len(predictions) == 12 and predictions[0]["prediction"]["label"] in CLASSES

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
    assert one_process["eval_loss"] == pytest.approx(two_process["eval_loss"], abs=1e-5)
