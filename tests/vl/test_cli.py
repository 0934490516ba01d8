"""The `dept-train-vl` command line: YAML configs with flag overrides, the shipped recipes, two processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dept.command_line import MethodArguments, parse_arguments
from dept.training_args import TrainingArguments
from dept_vl.arguments import VLDataArguments, VLModelArguments
from dept_vl.cli import train as main
from tests.conftest import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = Path(__file__).with_name("launch_two_processes.py")
CHILD_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
ARGUMENT_TYPES = (VLModelArguments, VLDataArguments, MethodArguments, TrainingArguments)


def _flags_to_mapping(argv: list[str]) -> dict:
    """['--a', '1', '--do_train', '--b', 'x'] -> {'a': '1', 'do_train': True, 'b': 'x'} for a YAML file."""
    mapping, index = {}, 0
    while index < len(argv):
        key = argv[index][2:]
        if index + 1 < len(argv) and not argv[index + 1].startswith("--"):
            mapping[key], index = argv[index + 1], index + 2
        else:
            mapping[key], index = True, index + 1
    return mapping


def test_config_file_supplies_the_flags_and_the_command_line_overrides_them(vl_fixture, tmp_path):
    output_dir = tmp_path / "run"
    config = _flags_to_mapping(vl_fixture.argv("gqa", output_dir, "--max_steps", "6", "--prefix_length", "3",
                                               "--do_predict", "false"))
    config_file = tmp_path / "gqa.yaml"
    config_file.write_text(yaml.safe_dump(config))

    results = main(["--config", str(config_file), "--max_steps", "2", "--eval_steps", "1", "--save_steps", "1"])

    assert results["total_steps"] == 2  # the flag, not the file's 6
    adapter_config = json.loads((output_dir / "adapter_config.json").read_text())
    assert adapter_config["num_virtual_tokens"] == 3  # from the file
    assert "eval_gqa_accuracy" in results and "test_gqa_accuracy" not in results


@pytest.mark.parametrize("config_file", sorted((REPO_ROOT / "configs" / "vl").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_vl_recipe_parses(config_file, tmp_path):
    extra = ["--output_dir", str(tmp_path)]
    if "model_name_or_path" not in yaml.safe_load(config_file.read_text()):
        extra += ["--model_name_or_path", "t5-small"]  # the demo adds its own tiny model
    model_args, data_args, method_args, training_args = parse_arguments(
        ARGUMENT_TYPES, ["--config", str(config_file), *extra]
    )
    assert data_args.task_names and method_args.peft_type == "PROMPT_TUNING_LORA"
    assert training_args.output_dir == str(tmp_path)  # the flag wins over the file


@pytest.mark.multiprocess
def test_two_processes_under_accelerate_launch_train_and_match_the_one_process_evaluation(vl_fixture, tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate's launcher is not installed next to this Python"
    output_dir, report = tmp_path / "two", tmp_path / "report"
    report.mkdir()
    argv = vl_fixture.argv("vqa", output_dir, "--max_steps", "2", "--eval_steps", "1", "--save_steps", "1",
                           "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "5",
                           "--do_predict", "false")
    # --multi_gpu: accelerate's --cpu starts one process here; on CPU the trainer joins the gloo group itself.
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no", str(LAUNCHER), str(report), "--", *argv]
    finished = subprocess.run(command, env=CHILD_ENV, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert finished.returncode == 0, finished.stderr[-3000:]

    reports = [json.loads((report / f"process_{i}.json").read_text()) for i in range(2)]
    assert [r["num_processes"] for r in reports] == [2, 2]
    two_process = reports[0]["results"]
    assert reports[1]["results"]["eval_vqa_accuracy"] == two_process["eval_vqa_accuracy"]

    one_process = main(vl_fixture.argv("vqa", tmp_path / "one", "--peft_model_id", str(output_dir),
                                       "--do_train", "false", "--do_predict", "false",
                                       "--per_device_eval_batch_size", "5"))
    assert one_process["eval_samples"] == two_process["eval_samples"]
    assert one_process["eval_vqa_accuracy"] == pytest.approx(two_process["eval_vqa_accuracy"])
