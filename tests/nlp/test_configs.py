"""The shipped configs: accelerate files, task recipes, the sweep script and its summary."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DistributedType
from transformers import HfArgumentParser

from dept.command_line import MethodArguments, canonical_flag, parse_arguments
from dept.training_args import TrainingArguments
from dept_nlp.arguments import DataArguments, ModelArguments
from dept_nlp.evaluate import TextEvaluator
from dept_nlp.tasks import TASKS, get_task
from tests.conftest import OFFICIAL_CHECKPOINTS, REPO_ROOT, free_port, import_script

ACCELERATE_DIR = REPO_ROOT / "configs" / "accelerate"
RECIPE_DIR = REPO_ROOT / "configs" / "nlp"
SWEEP = REPO_ROOT / "scripts" / "sweep.sh"
SUMMARIZE = REPO_ROOT / "scripts" / "summarize_sweep.py"
CLI_DATACLASSES = (ModelArguments, DataArguments, MethodArguments, TrainingArguments)
RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))

# file -> (distributed type, processes, machines, mixed precision)
ACCELERATE_CONFIGS = {
    "cpu.yaml": (DistributedType.NO, 1, 1, "no"),
    "cpu_2proc.yaml": (DistributedType.MULTI_GPU, 2, 1, "no"),
    "single_gpu.yaml": (DistributedType.NO, 1, 1, "no"),
    "ddp_8gpu.yaml": (DistributedType.MULTI_GPU, 8, 1, "bf16"),
    "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, 8, 1, "bf16"),
    "deepspeed_zero3.yaml": (DistributedType.DEEPSPEED, 8, 1, "bf16"),
    "fsdp.yaml": (DistributedType.FSDP, 8, 1, "bf16"),
    "fsdp_llama.yaml": (DistributedType.FSDP, 8, 1, "bf16"),
    "fsdp2.yaml": (DistributedType.FSDP, 8, 1, "bf16"),
    "fsdp2_llama.yaml": (DistributedType.FSDP, 8, 1, "bf16"),
    "multi_node.yaml": (DistributedType.MULTI_GPU, 16, 2, "bf16"),
}


# s of the official runs that did not use 256: MRQA (long contexts) and MultiRC.
OFFICIAL_MAX_LENGTH = {"nq": 512, "hotpotqa": 512, "newsqa": 512, "searchqa": 512, "superglue-multirc": 348}


def _recipe(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# accelerate configs


def test_accelerate_config_folder_holds_exactly_the_documented_files():
    assert sorted(path.name for path in ACCELERATE_DIR.glob("*.yaml")) == sorted(ACCELERATE_CONFIGS)


@pytest.mark.parametrize("name", sorted(ACCELERATE_CONFIGS))
def test_accelerate_config_loads_with_accelerates_loader(name):
    config = load_config_from_file(str(ACCELERATE_DIR / name))
    distributed_type, num_processes, num_machines, mixed_precision = ACCELERATE_CONFIGS[name]
    assert config.distributed_type == distributed_type
    assert (config.num_processes, config.num_machines) == (num_processes, num_machines)
    assert config.mixed_precision == mixed_precision


@pytest.mark.parametrize("name", sorted(ACCELERATE_CONFIGS))
def test_accelerate_config_sections_use_real_launch_options(name):
    # `accelerate launch` copies deepspeed_config.x to --x and fsdp_config.x to --fsdp_x; an unknown key is ignored
    # silently, so check each against the launcher's own parser.
    launch_options = {action.dest for action in launch_command_parser()._actions}
    config = load_config_from_file(str(ACCELERATE_DIR / name))
    keys = list(config.deepspeed_config)
    keys += [key if key.startswith("fsdp") else f"fsdp_{key}" for key in config.fsdp_config]
    assert [key for key in keys if key not in launch_options] == []


def test_sharded_configs_shard_as_named():
    zero2 = load_config_from_file(str(ACCELERATE_DIR / "deepspeed_zero2.yaml")).deepspeed_config
    zero3 = load_config_from_file(str(ACCELERATE_DIR / "deepspeed_zero3.yaml")).deepspeed_config
    fsdp = load_config_from_file(str(ACCELERATE_DIR / "fsdp.yaml")).fsdp_config
    assert (zero2["zero_stage"], zero3["zero_stage"]) == (2, 3)
    # Left out so that the trainer's --gradient_accumulation_steps is not overridden by the launcher.
    assert "gradient_accumulation_steps" not in zero2 and "gradient_accumulation_steps" not in zero3
    assert fsdp["fsdp_reshard_after_forward"] == "FULL_SHARD"
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "T5Block"
    assert fsdp["fsdp_use_orig_params"] is True  # frozen backbone and trainable DePT share the root unit


def test_cpu_2proc_config_starts_two_cooperating_processes(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import torch\n"
        "from accelerate import Accelerator\n"
        "accelerator = Accelerator(cpu=not torch.cuda.is_available())\n"
        "ranks = accelerator.gather(torch.tensor([accelerator.process_index])).tolist()\n"
        "print(f'rank {accelerator.process_index} of {accelerator.num_processes} gathered {ranks}', flush=True)\n"
        "accelerator.wait_for_everyone()\n"
        "torch.distributed.destroy_process_group()  # a clean exit; gloo may abort at teardown otherwise\n"
    )
    accelerate = Path(sys.executable).with_name("accelerate")
    result = subprocess.run(
        [str(accelerate), "launch", "--config_file", str(ACCELERATE_DIR / "cpu_2proc.yaml"),
         "--main_process_port", str(free_port()), str(probe)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # The two processes share stdout, so their lines may interleave: match the reports, not whole lines.
    reports = sorted(re.findall(r"rank (\d) of (\d) gathered \[0, 1\]", result.stdout))
    assert reports == [("0", "2"), ("1", "2")], result.stdout


# task recipes


def test_every_task_has_exactly_one_recipe():
    assert sorted(path.stem for path in RECIPES) == sorted(TASKS)


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.stem)
def test_recipe_keys_are_flags_of_the_training_cli(path):
    parser = HfArgumentParser(CLI_DATACLASSES)
    known = {action.dest for action in parser._actions}
    flags = [canonical_flag(f"--{key}", parser) for key in _recipe(path)]
    assert [flag for flag in flags if flag.removeprefix("--") not in known] == []


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.stem)
def test_recipe_parses_into_the_arguments_it_states(path):
    recipe = _recipe(path)
    model_args, data_args, method_args, training_args = parse_arguments(CLI_DATACLASSES, ["--config", str(path)])
    assert data_args.task_name == path.stem
    assert model_args.model_name_or_path == "t5-base"
    assert method_args.peft_type == "PROMPT_TUNING_LORA"
    assert (data_args.do_train, data_args.do_eval, data_args.do_predict) == (True, True, True)
    assert training_args.output_dir == f"outputs/{path.stem}"
    assert method_args.prefix_length == recipe["prefix_length"]
    assert method_args.r == recipe["r"]
    assert data_args.max_seq_length == recipe["max_seq_length"]
    assert training_args.learning_rate == recipe["learning_rate"]
    assert training_args.lora_embedding_lr == recipe["lora_embedding_lr"]
    assert training_args.max_steps == recipe["max_steps"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.stem)
def test_recipe_follows_the_official_training_setup(path):
    recipe = _recipe(path)
    # Every released run: global batch 32, 500 warmup steps, weight decay 1e-5, eval/save every 1000 steps,
    # one checkpoint kept; prompt lr 3e-1 or 4e-1, A/B lr in 1e-4..5e-3.
    assert recipe["per_device_train_batch_size"] * recipe["gradient_accumulation_steps"] == 32
    assert (recipe["warmup_steps"], recipe["weight_decay"]) == (500, 1e-5)
    assert (recipe["eval_steps"], recipe["save_steps"], recipe["save_total_limit"]) == (1000, 1000, 1)
    assert recipe["load_best_model_at_end"] is True
    assert recipe["learning_rate"] in (0.3, 0.4)
    assert 1e-4 <= recipe["lora_embedding_lr"] <= 5e-3
    assert recipe["max_seq_length"] == OFFICIAL_MAX_LENGTH.get(path.stem, 256)
    assert path.read_text().startswith("#"), "a recipe starts with a comment saying where its numbers come from"


# Hand-copied from the official src/metrics.py: TASK_TO_METRICS[task][0], which official train.py sets as
# metric_for_best_model (with greater_is_better=True), overriding the loss.
OFFICIAL_BEST_MODEL_METRIC = {
    "cola": "matthews_correlation", "mrpc": "accuracy", "stsb": "pearson", "sst2": "accuracy", "mnli": "accuracy",
    "qnli": "accuracy", "rte": "accuracy", "wnli": "accuracy", "qqp": "accuracy", "superglue-boolq": "accuracy",
    "superglue-cb": "f1_multiclass", "superglue-multirc": "f1", "superglue-wic": "accuracy",
    "superglue-wsc.fixed": "accuracy", "nq": "em", "hotpotqa": "em", "searchqa": "em", "newsqa": "em",
    "winogrande": "accuracy", "scitail": "accuracy", "yelp_polarity": "accuracy", "paws": "accuracy",
}


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.stem)
def test_recipe_selects_the_best_checkpoint_by_the_official_main_metric(path):
    recipe = _recipe(path)
    assert len(OFFICIAL_BEST_MODEL_METRIC) == len(RECIPES) == 22
    assert recipe["metric_for_best_model"] == OFFICIAL_BEST_MODEL_METRIC[recipe["task_name"]]
    assert recipe["metric_for_best_model"] == get_task(recipe["task_name"]).main_metric  # a metric we report
    assert "greater_is_better" not in recipe  # derived from the metric, so a --metric_for_best_model loss minimises
    *_, training_args = parse_arguments(CLI_DATACLASSES, ["--config", str(path)])
    evaluator = TextEvaluator(get_task(recipe["task_name"]), tokenizer=None, task_type="seq2seq")
    assert training_args.best_model_criterion(evaluator.main_metric, evaluator.greater_is_better) == (
        f"eval_{OFFICIAL_BEST_MODEL_METRIC[recipe['task_name']]}", True)


# Hand-copied from the official run logs (github.com/ZhengxiangShi/DePT, checkpoints/<task>/output.log):
# (learning_rate, lora_embedding_lr, m, r, max_steps).
OFFICIAL_RUNS = {
    "cola": (0.3, 5e-4, 80, 15, 40000),
    "sst2": (0.3, 5e-4, 60, 30, 30000),
    "superglue-wic": (0.3, 1e-3, 60, 30, 20000),
    "superglue-boolq": (0.3, 5e-3, 40, 45, 30000),
    "mnli": (0.3, 1e-4, 60, 30, 250000),
    "nq": (0.3, 1e-4, 60, 24, 300000),
    "hotpotqa": (0.4, 1e-4, 60, 24, 250000),
}


@pytest.mark.parametrize("task", sorted(OFFICIAL_RUNS))
def test_recipe_matches_the_official_run_log(task):
    recipe = _recipe(RECIPE_DIR / f"{task}.yaml")
    keys = ("learning_rate", "lora_embedding_lr", "prefix_length", "r", "max_steps")
    assert tuple(recipe[key] for key in keys) == pytest.approx(OFFICIAL_RUNS[task])


@pytest.mark.skipif(not OFFICIAL_CHECKPOINTS.is_dir(), reason="../shared/reference is absent")
@pytest.mark.parametrize("task", ["cola", "sst2", "superglue-wic", "nq", "hotpotqa"])
def test_recipe_matches_the_official_checkpoint_config(task):
    official = json.loads((OFFICIAL_CHECKPOINTS / task / "adapter_config.json").read_text())
    recipe = _recipe(RECIPE_DIR / f"{task}.yaml")
    assert recipe["prefix_length"] == official["num_virtual_tokens"]
    assert recipe["r"] == official["r"]
    assert recipe["max_seq_length"] == official["max_length"]
    assert recipe["lora_alpha"] == official["lora_alpha"]
    assert recipe["model_name_or_path"] == official["base_model_name_or_path"]


# sweep.sh


def _dry_run(tmp_path: Path, *args: str, **env: str) -> list[list[str]]:
    """The training commands sweep.sh prints in DRY_RUN mode, as argv lists."""
    result = subprocess.run(
        ["bash", str(SWEEP), *args], capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "DRY_RUN": "1", **env},
    )
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if "train_nlp.py" in line]


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_sweep_dry_run_prints_six_runs_per_task_with_the_official_run_names(tmp_path):
    commands = _dry_run(tmp_path, TASKS="cola nq")
    grid = [(lr, lora_lr) for lora_lr in ("5e-3", "3e-1", "5e-4") for lr in ("3e-1", "4e-1")]
    expected = [f"saved_t5-base/cola_lr{lr}_loralr{lora_lr}_pl80_r15_st40000" for lr, lora_lr in grid]
    expected += [f"saved_t5-base/nq_lr{lr}_loralr{lora_lr}_pl60_r24_st300000" for lr, lora_lr in grid]
    assert [_flag(argv, "--output_dir") for argv in commands] == expected
    assert all(argv[:2] == ["accelerate", "launch"] for argv in commands)
    assert [_flag(argv, "--config") for argv in commands] == (
        [str(RECIPE_DIR / "cola.yaml")] * 6 + [str(RECIPE_DIR / "nq.yaml")] * 6
    )


def test_sweep_commands_parse_and_override_the_recipe(tmp_path):
    commands = _dry_run(
        tmp_path, "--mixed_precision", "bf16", TASKS="rte", MODEL="google/t5-small", MAX_STEPS="40000",
        PREFIX_LENGTH="40", R="45", MAX_LENGTH="128", LAUNCHER="python",
    )
    assert len(commands) == 6
    argv = commands[-1]
    assert argv[0] == "python" and argv[1] == str(REPO_ROOT / "scripts" / "train_nlp.py")
    assert _flag(argv, "--output_dir") == "saved_t5-small/rte_lr4e-1_loralr5e-4_pl40_r45_st40000"
    model_args, data_args, method_args, training_args = parse_arguments(CLI_DATACLASSES, argv[2:])
    assert model_args.model_name_or_path == "google/t5-small"
    assert (method_args.prefix_length, method_args.r, data_args.max_seq_length) == (40, 45, 128)
    assert (training_args.learning_rate, training_args.lora_embedding_lr) == (0.4, 5e-4)
    assert (training_args.max_steps, training_args.mixed_precision) == (40000, "bf16")
    assert training_args.resume_from_checkpoint == "auto"
    assert training_args.warmup_steps == 500  # still from the rte recipe


def test_sweep_skips_runs_that_already_have_test_results(tmp_path):
    finished = tmp_path / "saved_t5-base" / "cola_lr3e-1_loralr5e-3_pl80_r15_st40000"
    finished.mkdir(parents=True)
    (finished / "test_results.json").write_text("{}")
    commands = _dry_run(tmp_path, TASKS="cola")
    assert len(commands) == 5
    assert str(finished.relative_to(tmp_path)) not in [_flag(argv, "--output_dir") for argv in commands]


def test_sweep_rejects_a_task_without_recipe(tmp_path):
    result = subprocess.run(
        ["bash", str(SWEEP)], capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "DRY_RUN": "1", "TASKS": "cola colaa"},
    )
    assert result.returncode != 0
    assert "no recipe" in result.stderr and "colaa" in result.stderr


# summarize_sweep.py


def _write_run(root: Path, name: str, eval_results: dict | None, test_results: dict | None = None) -> None:
    run = root / name
    run.mkdir(parents=True)
    if eval_results is not None:
        (run / "eval_results.json").write_text(json.dumps({"eval_loss": 0.3, "epoch": 12.0, **eval_results}))
    if test_results is not None:
        (run / "test_results.json").write_text(json.dumps({"test_loss": 0.2, "test_runtime": 5.0, **test_results}))


def _summary_rows(root: Path, capsys) -> tuple[dict[str, list[str]], str]:
    """The table scripts/summarize_sweep.py prints for `root` (its main, in this process), and its stderr."""
    status = import_script("summarize_sweep").main([str(root)])
    stdout, stderr = capsys.readouterr()
    assert status == 0, stderr
    rows = [line.strip("|").split("|") for line in stdout.splitlines()[2:]]
    return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows}, stderr


def test_summary_picks_the_best_validation_run_and_reports_its_test_scores(tmp_path, capsys):
    root = tmp_path / "saved_t5-base"
    # cola: the best validation run (58.5) is not the best test run (64.0): the test split must not choose.
    _write_run(root, "cola_lr3e-1_loralr5e-3_pl80_r15_st40000", {"eval_matthews_correlation": 50.0},
               {"test_matthews_correlation": 64.0})
    _write_run(root, "cola_lr4e-1_loralr5e-4_pl80_r15_st40000", {"eval_matthews_correlation": 58.5},
               {"test_matthews_correlation": 61.25})
    _write_run(root, "cola_lr3e-1_loralr5e-4_pl80_r15_st40000", {"eval_matthews_correlation": 55.0},
               {"test_matthews_correlation": 63.0})
    _write_run(root, "cola_lr4e-1_loralr3e-1_pl80_r15_st40000", None)  # still training
    # nq: main metric em; the run with the better F1 but the worse EM loses.
    _write_run(root, "nq_lr3e-1_loralr1e-4_pl60_r24_st300000", {"eval_em": 60.0, "eval_f1": 75.0},
               {"test_em": 61.0, "test_f1": 73.5})
    _write_run(root, "nq_lr4e-1_loralr1e-4_pl60_r24_st300000", {"eval_em": 58.0, "eval_f1": 78.0},
               {"test_em": 62.0, "test_f1": 74.0})
    # superglue-wsc.fixed: a task name with a dot, evaluated but not yet predicted.
    _write_run(root, "superglue-wsc.fixed_lr3e-1_loralr1e-4_pl60_r30_st20000", {"eval_accuracy": 67.3})
    _write_run(root, "notes", None)

    rows, stderr = _summary_rows(root, capsys)

    assert rows["cola"] == ["3", "cola_lr4e-1_loralr5e-4_pl80_r15_st40000", "matthews_correlation", "58.50",
                            "matthews_correlation 61.25"]
    assert rows["nq"] == ["2", "nq_lr3e-1_loralr1e-4_pl60_r24_st300000", "em", "60.00", "em 61.00, f1 73.50"]
    assert rows["superglue-wsc.fixed"] == ["1", "superglue-wsc.fixed_lr3e-1_loralr1e-4_pl60_r30_st20000",
                                           "accuracy", "67.30", "-"]
    assert sorted(rows) == ["cola", "nq", "superglue-wsc.fixed"]
    assert "cola_lr4e-1_loralr3e-1_pl80_r15_st40000: no eval_results.json yet" in stderr
    assert "notes: not named" in stderr


def test_summary_fails_clearly_on_a_missing_root(tmp_path):
    # The script run as a user runs it (the other summary test calls its main in this process).
    result = subprocess.run(
        [sys.executable, str(SUMMARIZE), str(tmp_path / "absent")], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "is not a directory" in result.stderr
