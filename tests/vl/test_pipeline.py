"""The vision-language pipeline end to end on a tiny VL-T5: every task trains, evaluates, predicts, saves and reloads.

The data are `scripts/synthetic_vl_data.py` images with annotations in each official schema (VQAv2, GQA, NLVR2, Karpathy
COCO); the features come from a random-weight resnet18 at 64 px (a 2 x 2 grid of 512-d regions).
"""

from __future__ import annotations

import json

import h5py
import pytest
from safetensors import safe_open
from transformers import AutoTokenizer

from dept.trainer import Trainer
from dept.training_args import TrainingArguments
from dept_vl.arguments import VLDataArguments
from dept_vl.cli import train as main
from dept_vl.data import task_file_paths
from dept_vl.evaluate import VLEvaluator, build_vl_eval_components
from dept_vl.features import MissingFeaturesError
from dept_vl.model import load_dept_vl_model
from dept_vl.modeling import load_vl_base_model
from dept_vl.tasks import TASKS, TaskSources, load_task_splits, read_vqa
from tests.conftest import flags_the_method_reads
from tests.vl.conftest import predictions, read_json

TASK_METRICS = {name: [f"{name}_{metric}" for metric in spec.metrics] for name, spec in TASKS.items()}


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("task", list(TASKS))
def test_each_task_trains_evaluates_predicts_and_its_saved_adapter_predicts_the_same(vl_fixture, tmp_path, task):
    output_dir = tmp_path / "run"
    results = main(vl_fixture.argv(task, output_dir))

    for split in ("eval", "test"):
        for metric in TASK_METRICS[task]:
            assert 0.0 <= results[f"{split}_{metric}"] <= (1000.0 if metric.endswith("cider") else 100.0)
    for name in ("adapter_model.safetensors", "adapter_config.json", "all_results.json", "train_results.json",
                 "eval_results.json", "test_results.json", "predictions_test.jsonl", "training_task.json"):
        assert (output_dir / name).is_file(), name
    record = read_json(output_dir / "training_task.json")
    assert record["task_names"] == [task] and record["modality"] == "vl" and record["feat_dim"] == 512
    assert record["trainable_parameters"]["visual_embedding"] > 0

    reloaded_dir = tmp_path / "reloaded"
    reloaded = main(vl_fixture.argv(task, reloaded_dir, "--peft_model_id", str(output_dir), "--do_train", "false",
                                    "--do_eval", "false"))
    assert predictions(reloaded_dir) == predictions(output_dir)
    assert reloaded["test_loss"] == pytest.approx(results["test_loss"], abs=1e-6)  # sensitive to every parameter
    for metric in TASK_METRICS[task]:
        assert reloaded[f"test_{metric}"] == pytest.approx(results[f"test_{metric}"])


def test_multitask_mixture_scores_each_task_and_averages_their_main_metrics(vl_fixture, tmp_path):
    results = main(vl_fixture.argv("vqa,gqa,nlvr,caption", tmp_path / "run", "--max_steps", "2",
                                   "--do_predict", "false"))
    for metric in (metric for metrics in TASK_METRICS.values() for metric in metrics):
        assert f"eval_{metric}" in results
    mains = [results[f"eval_{task}_{spec.main_metric}"] for task, spec in TASKS.items()]
    assert results["eval_average"] == pytest.approx(sum(mains) / 4)
    train_rows = sum(len(load_task_splits([task], TaskSources(**task_file_paths(vl_fixture.root)), ["train"])["train"])
                     for task in TASKS)
    assert results["train_samples"] == train_rows


def test_dept_training_lowers_the_vqa_loss(vl_fixture, tmp_path):
    output_dir = tmp_path / "run"
    main(vl_fixture.argv("vqa", output_dir, "--max_steps", "12", "--eval_steps", "12", "--save_steps", "12",
                         "--do_predict", "false", "--lora_embedding_lr", "0.05"))
    losses = [entry["loss"] for entry in read_json(output_dir / "trainer_state.json")["log_history"] if "loss" in entry]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


@pytest.mark.parametrize("peft_type", ["PROMPT_TUNING", "LORA", "FULL"])
def test_baselines_run_through_the_same_pipeline(vl_fixture, tmp_path, peft_type):
    output_dir = tmp_path / "run"
    argv = vl_fixture.argv("gqa", output_dir, "--peft_type", peft_type, "--max_steps", "2", "--learning_rate",
                           "0.001", "--do_predict", "false")
    results = main(flags_the_method_reads(argv, peft_type))
    assert "eval_gqa_accuracy" in results
    trainable = read_json(output_dir / "training_task.json")["trainable_parameters"]
    assert trainable["visual_embedding"] > 0
    if peft_type == "PROMPT_TUNING":
        assert trainable["lora_embedding"] == 0 and trainable["prompt"] == 4 * 32
    if peft_type == "FULL":  # a whole model, loadable with its tokenizer
        assert (output_dir / "config.json").is_file() and (output_dir / "tokenizer.json").is_file()


def test_visual_embedding_can_stay_frozen_and_is_then_not_saved(vl_fixture, tmp_path):
    output_dir = tmp_path / "run"
    main(vl_fixture.argv("gqa", output_dir, "--train_visual_embedding", "false", "--max_steps", "2",
                         "--do_predict", "false"))
    trainable = read_json(output_dir / "training_task.json")["trainable_parameters"]
    assert trainable["visual_embedding"] == 0 and trainable["total"] == trainable["prompt"] + trainable["lora_embedding"]
    with safe_open(str(output_dir / "adapter_model.safetensors"), framework="pt") as handle:
        assert not any("visual_embedding" in key for key in handle.keys())


def test_visual_lr_sets_the_visual_projection_learning_rate(vl_fixture, tmp_path):
    output_dir = tmp_path / "run"
    main(vl_fixture.argv("gqa", output_dir, "--visual_lr", "0.0025", "--lr_scheduler_type", "constant",
                         "--max_steps", "2", "--do_eval", "false", "--do_predict", "false", "--eval_strategy", "no",
                         "--save_strategy", "no", "--load_best_model_at_end", "false"))
    logged = [e for e in read_json(output_dir / "trainer_state.json")["log_history"] if "loss" in e]
    assert logged[0]["learning_rate_modules_to_save"] == 0.0025
    assert logged[0]["learning_rate_prompt"] == 0.3 and logged[0]["learning_rate_lora_embedding"] == 0.01


def test_features_computed_on_the_fly_from_raw_images(vl_fixture, tmp_path):
    results = main(vl_fixture.argv("vqa", tmp_path / "run", "--feature_file", "", "--image_dir",
                                   str(vl_fixture.root / "coco" / "images"), "--backbone", "resnet18",
                                   "--pretrained", "false", "--image_size", "64", "--max_steps", "2",
                                   "--do_predict", "false"))
    assert "eval_vqa_accuracy" in results


def test_eval_components_reproduce_the_pipeline_evaluation_of_a_saved_adapter(vl_fixture, tmp_path):
    output_dir = tmp_path / "run"
    results = main(vl_fixture.argv("nlvr", output_dir, "--max_steps", "2", "--do_predict", "false"))

    data_args = VLDataArguments(tasks="nlvr", **task_file_paths(vl_fixture.root), feature_file=str(vl_fixture.feature_file),
                                max_target_length=24, generation_max_length=12, do_eval=True)
    tokenizer = AutoTokenizer.from_pretrained(vl_fixture.model_dir)
    model = load_dept_vl_model(load_vl_base_model(str(vl_fixture.model_dir), feat_dim=512), output_dir)
    dataset, collate_fn, evaluator = build_vl_eval_components("nlvr", tokenizer, model, max_length=24,
                                                              split="validation", data_args=data_args)
    args = TrainingArguments(output_dir=str(tmp_path / "eval"), per_device_eval_batch_size=16, report_to="none",
                             load_best_model_at_end=False)
    metrics = Trainer(model, args, collate_fn=collate_fn, evaluator=evaluator).evaluate(dataset, split="eval")
    for name in ("eval_nlvr_accuracy", "eval_nlvr_consistency", "eval_loss"):
        assert metrics[name] == pytest.approx(results[name], abs=1e-6), name


# ------------------------------------------------------------------------------------------------ bad input


def test_a_missing_image_is_named_before_training(vl_fixture, tmp_path):
    partial = tmp_path / "partial.h5"
    with h5py.File(vl_fixture.feature_file) as source, h5py.File(partial, "w") as target:
        for image_id in source:
            if image_id != "COCO_train2014_000000000100":
                source.copy(source[image_id], target, name=image_id)
    with pytest.raises(MissingFeaturesError, match="COCO_train2014_000000000100"):
        main(vl_fixture.argv("vqa", tmp_path / "run", "--feature_file", str(partial)))
    assert not (tmp_path / "run").exists()


def test_a_task_without_its_data_flag_is_refused(vl_fixture, tmp_path):
    with pytest.raises(ValueError, match="--nlvr_dir"):
        main(vl_fixture.argv("nlvr", tmp_path / "run", "--nlvr_dir", ""))


# ------------------------------------------------------------------------------------------------ formats and metrics


def test_vqa_target_is_the_most_common_normalised_answer_without_multiple_choice_answer(tmp_path):
    questions = {"data_subtype": "val2014", "questions": [{"image_id": 7, "question": "How many?", "question_id": 70}]}
    human = ["two", "2", "2", "3", "Two", "two.", "3", "3", "4", "3"]  # "2" normalises 5 times, "3" 4 times
    annotations = {"annotations": [{"question_id": 70, "image_id": 7, "answers": [
        {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(human)]}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    [row] = read_vqa(tmp_path / "q.json", tmp_path / "a.json")
    assert row["target"] == "2"
    assert row["image_ids"] == ["COCO_val2014_000000000007"]
    assert row["references"]["answers"] == human


def test_vqa_rows_carry_the_answer_type_and_the_evaluator_reports_each_type(tmp_path):
    questions = {"data_subtype": "val2014", "questions": [
        {"question_id": 1, "image_id": 7, "question": "Is it red?"},
        {"question_id": 2, "image_id": 7, "question": "How many?"},
        {"question_id": 3, "image_id": 8, "question": "What color?"},
    ]}
    annotations = {"annotations": [
        {"question_id": 1, "answer_type": "yes/no", "multiple_choice_answer": "yes",
         "answers": [{"answer": "yes"}] * 10},
        {"question_id": 2, "answer_type": "number", "multiple_choice_answer": "2",
         "answers": [{"answer": "2"}] * 3 + [{"answer": "3"}] * 7},
        {"question_id": 3, "answer_type": "other", "multiple_choice_answer": "red",
         "answers": [{"answer": "red"}] * 10},
    ]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    rows = read_vqa(tmp_path / "q.json", tmp_path / "a.json")
    assert [row["references"]["answer_type"] for row in rows] == ["yes/no", "number", "other"]
    metrics = VLEvaluator(["vqa"], tokenizer=None).compute_metrics(["yes", "two", "blue"],
                                                                 [row["references"] for row in rows])
    # yes: 10 humans -> 1.0; "two" -> "2", 3 humans -> 0.9; blue: no human -> 0.
    assert metrics == pytest.approx({"vqa_accuracy": 100 * 1.9 / 3, "vqa_accuracy_yes_no": 100.0,
                                     "vqa_accuracy_number": 90.0, "vqa_accuracy_other": 0.0})


def test_evaluator_scores_each_task_by_hand():
    evaluator = VLEvaluator(["vqa", "nlvr"], tokenizer=None)
    ten = ["red"] * 2 + ["blue"] * 8
    references = [
        {"task": "vqa", "answers": ten, "example_id": "1"},  # "red": 2 humans -> 0.6 over the 10 leave-one-outs
        {"task": "vqa", "answers": ten, "example_id": "2"},  # "blue": 1.0
        {"task": "nlvr", "answers": ["true"], "example_id": "dev-1-0-0"},
        {"task": "nlvr", "answers": ["false"], "example_id": "dev-1-1-0"},  # same sentence as the one above
        {"task": "nlvr", "answers": ["true"], "example_id": "dev-1-0-1"},
    ]
    predictions = ["red", "blue", "true", "true", "true"]
    metrics = evaluator.compute_metrics(predictions, references)
    # red: 8 of the 10 leave-one-out subsets keep both "red" answers (2/3), 2 keep one (1/3) -> (8*2/3 + 2/3)/10 = 0.6
    assert metrics["vqa_accuracy"] == pytest.approx(100 * (0.6 + 1.0) / 2)
    assert metrics["nlvr_accuracy"] == pytest.approx(100 * 2 / 3)
    assert metrics["nlvr_consistency"] == pytest.approx(50.0)  # sentence 0 has a wrong pair, sentence 1 does not
    assert metrics["average"] == pytest.approx((metrics["vqa_accuracy"] + metrics["nlvr_accuracy"]) / 2)
    assert evaluator.main_metric == "average"
