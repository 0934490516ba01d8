"""The text pipeline end to end, through the official CLI flags, on tiny models and local files."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dept_nlp.cli import train as main
from dept_nlp.data_files import sample_sst2_files
from tests.conftest import (
    REPO_ROOT,
    TASK_TYPES,
    flags_the_method_reads,
    free_port,
    hub_row,
    hub_rows,
    save_tiny_model,
    text_train_argv,
    write_task_fixture,
)


def _vocabulary(task_name: str) -> list[str]:
    rows = hub_rows(task_name, 20)
    return [" ".join(str(v) for v in row.values() if isinstance(v, (str, int, float))) for row in rows] + [
        " ".join(a for row in rows for a in row.get("answers", []))
    ]


def _model(tmp_path, kind: str, task_name: str) -> str:
    from dept_nlp.tasks import get_task

    texts = _vocabulary(task_name) + [get_task(task_name).format_example(hub_row(task_name, i))[0] for i in range(20)]
    return str(save_tiny_model(TASK_TYPES[kind], tmp_path / f"{kind}-model", texts))


@pytest.mark.parametrize(
    ("task_name", "metric"),
    [("sst2", "accuracy"), ("rte", "accuracy"), ("stsb", "pearson"), ("superglue-multirc", "f1"),
     ("superglue-wsc.fixed", "accuracy"), ("nq", "f1")],
)
def test_each_input_format_runs_end_to_end_on_t5(tmp_path, task_name, metric):
    files = write_task_fixture(task_name, tmp_path / "data", n_train=8, n_val=4, n_test=4)
    results = main(text_train_argv(_model(tmp_path, "t5", task_name), tmp_path / "out", task_name, files))
    assert f"eval_{metric}" in results and f"test_{metric}" in results
    out = tmp_path / "out"
    for name in ("adapter_config.json", "adapter_model.safetensors", "all_results.json", "eval_results.json",
                 "test_results.json", "predictions_test.jsonl", "training_task.json"):
        assert (out / name).is_file(), name
    lines = (out / "predictions_test.jsonl").read_text().splitlines()
    assert len(lines) == 4 and {"prediction", "reference"} <= json.loads(lines[0]).keys()


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_classification_runs_on_decoder_only_and_encoder_classifier(tmp_path, kind):
    files = write_task_fixture("rte", tmp_path / "data", n_train=8, n_val=4, n_test=4)
    results = main(text_train_argv(_model(tmp_path, kind, "rte"), tmp_path / "out", "rte", files))
    assert 0.0 <= results["test_accuracy"] <= 100.0
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["task_type"] == TASK_TYPES[kind]
    if kind == "bert":  # the head is saved with the adapter
        assert any(key.startswith("modules.classifier") for key in load_file(tmp_path / "out" / "adapter_model.safetensors"))


def test_training_loss_clearly_falls(tmp_path):
    files = sample_sst2_files()
    texts = [json.loads(line)["sentence"] for path in files.values() for line in open(path)]
    model_dir = save_tiny_model("seq2seq", tmp_path / "model", texts)
    main(text_train_argv(str(model_dir), tmp_path / "out", "sst2", files, steps=60, logging_steps=10, prefix_length=8, r=4,
                max_eval_samples=8, per_device_train_batch_size=16, learning_rate=1.0, lora_embedding_lr=0.05,
                warmup_steps=5))
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 6
    # ln(vocabulary) ~ 6.4 is the loss of a uniform guess; the frozen random base starts far above it.
    assert losses[-1] < 0.4 * losses[0] and losses[-1] < 4.0, losses


@pytest.mark.parametrize("peft_type", ["PROMPT_TUNING", "LORA", "FULL"])
def test_baselines_run_through_the_same_trainer_and_train_what_their_method_trains(tmp_path, peft_type):
    files = write_task_fixture("sst2", tmp_path / "data", n_train=8, n_val=4, n_test=4)
    model_dir = _model(tmp_path, "t5", "sst2")
    out = tmp_path / "out"
    argv = text_train_argv(model_dir, out, "sst2", files, peft_type=peft_type, lora_embedding_lr=0.3)
    results = main(flags_the_method_reads(argv, peft_type))
    assert "test_accuracy" in results
    base = load_file(os.path.join(model_dir, "model.safetensors"))
    d_model = base["shared.weight"].shape[1]
    if peft_type == "PROMPT_TUNING":  # P only: m x d, A and B empty (r = 0), the base is not saved
        saved = load_file(out / "adapter_model.safetensors")
        assert json.loads((out / "adapter_config.json").read_text())["r"] == 0
        assert saved["prompt_embeddings"].shape == (4, d_model)
        assert saved["lora_embedding_A"].numel() == saved["lora_embedding_B"].numel() == 0
        assert not (out / "model.safetensors").exists()
    elif peft_type == "LORA":  # rank-r (--r 2) LoRA on q and v of every attention, B trained away from zero
        saved = load_file(out / "adapter_model.safetensors")
        attention_qv = [key for key in base if re.search(r"(SelfAttention|EncDecAttention)\.(q|v)\.weight$", key)]
        assert len(saved) == 2 * len(attention_qv) > 0
        assert all(re.search(r"\.(q|v)\.lora_(A|B)\.weight$", key) for key in saved)
        assert {saved[key].shape for key in saved if ".lora_A." in key} == {(2, d_model)}
        assert {saved[key].shape for key in saved if ".lora_B." in key} == {(d_model, 2)}
        assert all(saved[key].abs().sum() > 0 for key in saved if ".lora_B." in key)
        assert not any("prompt" in key for key in saved) and not (out / "model.safetensors").exists()
    else:  # every weight of the base is trained and saved
        saved = load_file(out / "model.safetensors")
        assert saved.keys() == base.keys()
        changed = [key for key in base if not torch.equal(saved[key], base[key])]
        assert any(".SelfAttention.q." in key for key in changed) and any("layer_norm" in key for key in changed)
        assert not (out / "adapter_model.safetensors").exists()


def test_lora_rank_comes_from_r_and_a_disagreeing_lora_r_is_refused(tmp_path):
    from dept.command_line import MethodArguments

    assert MethodArguments(peft_type="LORA", r=16).lora_r == 16
    assert MethodArguments(peft_type="LORA", lora_r=4).lora_r == 4
    assert MethodArguments(peft_type="LORA").lora_r == 8  # the paper's LoRA baseline
    assert MethodArguments().r == 30  # DePT's own default is unchanged
    files = write_task_fixture("sst2", tmp_path / "data", n_train=8, n_val=4, n_test=4)
    with pytest.raises(ValueError, match="--r 16 and --lora_r 8 disagree"):
        main(text_train_argv(_model(tmp_path, "t5", "sst2"), tmp_path / "out", "sst2", files, peft_type="LORA", r=16,
                    lora_r=8))


def test_transfer_from_a_saved_adapter(tmp_path):
    files = write_task_fixture("sst2", tmp_path / "data", n_train=8, n_val=4, n_test=4)
    model_dir = _model(tmp_path, "t5", "sst2")
    main(text_train_argv(model_dir, tmp_path / "source", "sst2", files))
    main(text_train_argv(model_dir, tmp_path / "target", "sst2", files, steps=1, peft_model_id=tmp_path / "source",
                learning_rate=0.0, lora_embedding_lr=0.0))
    source = load_file(tmp_path / "source" / "adapter_model.safetensors")
    target = load_file(tmp_path / "target" / "adapter_model.safetensors")
    for key in source:  # learning rates 0: the transferred adapter comes out unchanged
        assert torch.equal(source[key], target[key]), key


def test_k_shot_flag_accepts_the_readme_spelling(tmp_path):
    files = write_task_fixture("sst2", tmp_path / "data", n_train=12, n_val=4, n_test=4)
    results = main(text_train_argv(_model(tmp_path, "t5", "sst2"), tmp_path / "out", "sst2", files, k_shot_example=4))
    assert results["train_samples"] == 4


def test_yaml_config_with_flag_overrides(tmp_path):
    files = write_task_fixture("sst2", tmp_path / "data", n_train=8, n_val=4, n_test=4)
    argv = text_train_argv(_model(tmp_path, "t5", "sst2"), tmp_path / "out", "sst2", files)
    for flag in ("--prefix_length", "--r", "--max_steps"):  # these come from the file below
        index = argv.index(flag)
        del argv[index:index + 2]
    config = tmp_path / "recipe.yaml"
    config.write_text("prefix_length: 9\nr: 3\nmax_steps: 2\n")
    main(["--config", str(config), *argv, "--max_steps", "4"])  # the flag overrides the file's max_steps
    adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert (adapter["num_virtual_tokens"], adapter["r"], state["global_step"]) == (9, 3, 4)


def test_resumed_run_ends_with_the_same_adapter(tmp_path):
    files = write_task_fixture("sst2", tmp_path / "data", n_train=16, n_val=4, n_test=4)
    model_dir = _model(tmp_path, "t5", "sst2")
    extra = dict(save_total_limit=5, eval_steps=4, save_steps=4)
    main(text_train_argv(model_dir, tmp_path / "straight", "sst2", files, steps=8, **extra))
    interrupted = tmp_path / "interrupted"
    main(text_train_argv(model_dir, interrupted, "sst2", files, steps=8, **extra))
    # Keep only checkpoint-4, as if the run had been killed right after writing it.
    shutil.rmtree(interrupted / "checkpoint-8", ignore_errors=True)
    for path in interrupted.iterdir():
        if path.is_file():
            path.unlink()
    assert [p.name for p in interrupted.iterdir()] == ["checkpoint-4"]
    argv = text_train_argv(model_dir, interrupted, "sst2", files, steps=8, **extra)
    main(argv[:] + ["--resume_from_checkpoint", "auto"])
    straight = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    resumed = load_file(interrupted / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


@pytest.mark.multiprocess
def test_two_processes_give_the_same_eval_metric(tmp_path, caplog):
    files = sample_sst2_files()
    texts = [json.loads(line)["sentence"] for path in files.values() for line in open(path)]
    model_dir = save_tiny_model("seq2seq", tmp_path / "model", texts)
    main(text_train_argv(str(model_dir), tmp_path / "adapter", "sst2", files, steps=20, max_eval_samples=10))

    def evaluation_argv(output_dir):
        argv = text_train_argv(str(model_dir), output_dir, "sst2", files, peft_model_id=tmp_path / "adapter",
                      max_eval_samples=30)
        argv = [a for a in argv if a not in ("--do_train", "--do_predict", "--load_best_model_at_end")]
        return [*argv, "--load_best_model_at_end", "false"]

    def results(output_dir):
        return json.loads((output_dir / "eval_results.json").read_text())

    # One process: this one (a fresh interpreter would only add its start-up).
    with caplog.at_level(logging.INFO, logger="dept_nlp.pipeline"):
        main(evaluation_argv(tmp_path / "one"))
    log_one, one = caplog.text, results(tmp_path / "one")
    # `accelerate launch --cpu --num_processes 2` starts one process; --multi_gpu starts two, and the trainer
    # makes them CPU processes (gloo) when CUDA is absent.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port())]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([*launcher, str(REPO_ROOT / "scripts" / "train_nlp.py"), *evaluation_argv(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    log_two, two = run.stderr + run.stdout, results(tmp_path / "two")
    assert "on 1 process(es)" in log_one and "on 2 process(es)" in log_two
    assert one["eval_samples"] == two["eval_samples"] == 30
    assert one["eval_accuracy"] == two["eval_accuracy"]
