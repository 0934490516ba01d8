"""`dept-eval` end to end on tiny models: the numbers of training, mixed batches, comparison, official checkpoints,
and mismatches refused before anything is evaluated."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import T5ForConditionalGeneration

from dept import AdapterMismatchError, DePTConfig, get_dept_model
from dept.errors import TaskMismatchError
from dept_eval.cli import evaluate as dept_eval
from dept_eval.cli import main as dept_eval_main
from dept_nlp.cli import train as dept_train
from dept_nlp.evaluate import TextEvaluator
from dept_nlp.tasks import get_task
from dept_vl.cli import train as vl_train
from dept_vl.data import task_file_paths
from dept_vl.evaluate import VLEvaluator
from tests.conftest import (
    OFFICIAL_CHECKPOINTS,
    T5_TOKENIZER_DIR,
    TASK_TYPES,
    hub_row,
    save_tiny_model,
    text_train_argv,
    tiny_t5_config,
    write_task_fixture,
)

pytestmark = pytest.mark.xdist_group("evaluate_cli")  # shares module-scoped runs: one worker (--dist loadgroup)

TASKS = ("sst2", "rte")
GENERATION = ["--generation_max_length", "3"]


def _texts() -> list[str]:
    texts = []
    for task_name in TASKS:
        for i in range(40):
            row = hub_row(task_name, i)
            texts += [str(v) for v in row.values()] + [get_task(task_name).format_example(row)[0]]
    return texts


def _train(model_dir, out, task_name, files, steps):
    dept_train(text_train_argv(str(model_dir), out, task_name, files, steps=steps, learning_rate=1.0, lora_embedding_lr=0.05,
                      per_device_train_batch_size=8, generation_max_length=3))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny T5 and three adapters: sst2 trained well (150 steps), rte, and sst2 barely trained (4 steps)."""
    root = tmp_path_factory.mktemp("dept_eval")
    files = {task: write_task_fixture(task, root / "data", n_train=16, n_val=8, n_test=8) for task in TASKS}
    model_dir = save_tiny_model("seq2seq", root / "t5", _texts())
    adapters = {
        "sst2": _train(model_dir, root / "sst2", "sst2", files["sst2"], 150),
        "rte": _train(model_dir, root / "rte", "rte", files["rte"], 60),
        "sst2_weak": _train(model_dir, root / "sst2_weak", "sst2", files["sst2"], 4),
    }
    return {"root": root, "files": files, "model": model_dir, "adapters": adapters}


def _file_flags(files: dict, split: str) -> list[str]:
    key = f"{split}_file"
    return [f"--{key}", str(files[key])]


def _eval(model_dir, pairs, split, output_dir, *extra) -> dict:
    """dept-eval on `pairs` [(adapter dir, task, files)] as DIR:TASK, reading the first pair's local files (the
    text flags name one file per split, so the pairs of one run share a task's data)."""
    argv = ["--model_name_or_path", str(model_dir), "--split", split, "--output_dir", str(output_dir),
            "--per_device_eval_batch_size", "3", *GENERATION, *extra]
    for adapter, task, _ in pairs:
        argv += ["--adapter", f"{adapter}:{task}"]
    return dept_eval(argv + _file_flags(pairs[0][2], split))


@pytest.mark.parametrize("split", ["validation", "test"])
def test_evaluation_reproduces_the_training_runs_metrics(trained, tmp_path, split):
    adapter, files = trained["adapters"]["sst2"], trained["files"]["sst2"]
    report = _eval(trained["model"], [(adapter, "sst2", files)], split, tmp_path / "eval")
    prefix = "eval" if split == "validation" else "test"
    expected = json.loads((adapter / f"{prefix}_results.json").read_text())
    (result,) = report["results"]
    assert result["metrics"]["accuracy"] == expected[f"{prefix}_accuracy"]
    assert result["num_examples"] == expected[f"{prefix}_samples"] == 8
    config = DePTConfig.from_pretrained(adapter)
    assert result["trainable_parameters"] == config.num_parameters()  # m*d + s*r + r*d
    assert result["examples_per_second"] > 0

    written = json.loads((tmp_path / "eval" / f"dept_eval_{split}.json").read_text())
    assert written == report
    table = (tmp_path / "eval" / f"dept_eval_{split}.md").read_text()
    assert f"| {result['name']} | sst2 | accuracy {expected[f'{prefix}_accuracy']:.2f} | 8 |" in table
    training_predictions = [json.loads(line)["prediction"]
                            for line in (adapter / f"predictions_{prefix}.jsonl").read_text().splitlines()]
    predictions = [json.loads(line)["prediction"]
                   for line in (tmp_path / "eval" / f"dept_eval_{split}_predictions.jsonl").read_text().splitlines()]
    assert predictions == training_predictions

    with pytest.raises(FileExistsError, match="already exists"):
        _eval(trained["model"], [(adapter, "sst2", files)], split, tmp_path / "eval")


def test_adapters_and_tasks_pair_up_in_order(trained, tmp_path):
    adapters = trained["adapters"]
    report = dept_eval(["--model_name_or_path", str(trained["model"]), "--adapter", str(adapters["sst2"]),
                        "--adapter", str(adapters["sst2_weak"]), "--task", "sst2", "--task", "sst2",
                        *_file_flags(trained["files"]["sst2"], "validation"), *GENERATION])
    assert [r["adapter"] for r in report["results"]] == [str(adapters["sst2"]), str(adapters["sst2_weak"])]
    assert [r["task"] for r in report["results"]] == ["sst2", "sst2"]


def _predictions(path: Path) -> dict[str, list]:
    by_name: dict[str, list] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        by_name.setdefault(row["name"], []).append(row["prediction"])
    return by_name


def _assert_mixed_matches_one_at_a_time(model_dir, pairs, tmp_path):
    single = _eval(model_dir, pairs, "validation", tmp_path / "single")
    mixed = _eval(model_dir, pairs, "validation", tmp_path / "mixed", "--mixed")
    assert mixed["mixed"] and not single["mixed"]
    assert [r["metrics"] for r in mixed["results"]] == [r["metrics"] for r in single["results"]]
    assert [r["num_examples"] for r in mixed["results"]] == [r["num_examples"] for r in single["results"]]
    assert _predictions(tmp_path / "mixed" / "dept_eval_validation_mixed_predictions.jsonl") == \
        _predictions(tmp_path / "single" / "dept_eval_validation_predictions.jsonl")
    return single


def test_mixed_batches_give_the_same_predictions_and_metrics_on_t5(trained, tmp_path):
    files = trained["files"]["sst2"]
    pairs = [(trained["adapters"]["sst2"], "sst2", files), (trained["adapters"]["sst2_weak"], "sst2", files),
             (trained["adapters"]["rte"], "sst2", files)]  # rte's labels are sst2's: 0 and 1
    single = _assert_mixed_matches_one_at_a_time(trained["model"], pairs, tmp_path)
    accuracies = [r["metrics"]["accuracy"] for r in single["results"]]
    assert accuracies[0] != accuracies[1]  # the adapters really differ, so a mix-up would show


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_mixed_batches_give_the_same_predictions_and_metrics_on_other_task_types(tmp_path, kind):
    files = write_task_fixture("sst2", tmp_path / "data", n_train=8, n_val=7, n_test=4)
    model_dir = save_tiny_model(TASK_TYPES[kind], tmp_path / kind, _texts())
    first = _train(model_dir, tmp_path / "a", "sst2", files, 6)
    second = _train(model_dir, tmp_path / "b", "sst2", files, 2)
    _assert_mixed_matches_one_at_a_time(model_dir, [(first, "sst2", files), (second, "sst2", files)], tmp_path)


def test_compare_shows_each_metric_side_by_side_with_the_difference(trained, tmp_path, capsys):
    files = trained["files"]["sst2"]
    a = _eval(trained["model"], [(trained["adapters"]["sst2_weak"], "sst2", files)], "validation", tmp_path / "a")
    b = _eval(trained["model"], [(trained["adapters"]["sst2"], "sst2", files)], "validation", tmp_path / "b")
    capsys.readouterr()
    compare = ["--compare", str(tmp_path / "a"), str(tmp_path / "b" / "dept_eval_validation.json")]
    table = dept_eval(compare)
    assert dept_eval_main([*compare, "--output_dir", str(tmp_path / "cmp")]) == 0  # the console prints it
    accuracy_a, accuracy_b = a["results"][0]["metrics"]["accuracy"], b["results"][0]["metrics"]["accuracy"]
    assert accuracy_a != accuracy_b
    row = (f"| sst2 | {a['results'][0]['name']} | {b['results'][0]['name']} | accuracy | {accuracy_a:.2f} | "
           f"{accuracy_b:.2f} | {accuracy_b - accuracy_a:+.2f} |")
    assert row in table
    assert capsys.readouterr().out == table + "\n"  # the table alone, once
    assert row in (tmp_path / "cmp" / "dept_eval_comparison.md").read_text()


@pytest.fixture
def no_evaluation(monkeypatch):
    """Records every prediction step; a refused run must make none."""
    calls = []
    original = TextEvaluator.predict_step
    monkeypatch.setattr(TextEvaluator, "predict_step", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    return calls


def test_adapter_for_another_width_stops_before_evaluating_any_pair(trained, tmp_path, no_evaluation):
    tokenizer_vocab = T5ForConditionalGeneration.from_pretrained(trained["model"]).config.vocab_size
    torch.manual_seed(0)
    wider = T5ForConditionalGeneration(tiny_t5_config(tokenizer_vocab, d_model=48))
    get_dept_model(wider, DePTConfig(num_virtual_tokens=4, r=2, max_length=64, prompt_init="vocab")).save_pretrained(
        tmp_path / "wide")
    files = trained["files"]["sst2"]
    pairs = [(trained["adapters"]["sst2"], "sst2", files), (tmp_path / "wide", "sst2", files)]
    with pytest.raises(AdapterMismatchError, match=r"wide.*token_dim=48.*Nothing was evaluated"):
        _eval(trained["model"], pairs, "validation", tmp_path / "eval")
    assert no_evaluation == []
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize(("task_name", "needs"), [("mnli", r"the labels \['0', '1', '2'\]"), ("nq", "extracted answers")])
def test_task_with_other_labels_stops_before_evaluating_any_pair(trained, tmp_path, no_evaluation, task_name, needs):
    argv = ["--model_name_or_path", str(trained["model"]), "--adapter", f"{trained['adapters']['sst2']}:sst2",
            "--adapter", f"{trained['adapters']['sst2']}:{task_name}", "--output_dir", str(tmp_path / "eval"),
            *_file_flags(trained["files"]["sst2"], "validation")]
    with pytest.raises(TaskMismatchError, match=rf"trained on \['sst2'\].*{task_name} needs {needs}"):
        dept_eval(argv)
    assert no_evaluation == []
    assert not (tmp_path / "eval").exists()


def test_an_adapter_evaluated_as_another_modality_stops_before_evaluating(trained, tmp_path, no_evaluation):
    argv = ["--model_name_or_path", str(trained["model"]), "--adapter", f"{trained['adapters']['sst2']}:vqa",
            "--modality", "vl", "--output_dir", str(tmp_path / "eval")]
    with pytest.raises(TaskMismatchError, match=r"trained on text tasks \['sst2'\], not vl\. Nothing was evaluated"):
        dept_eval(argv)
    assert no_evaluation == []
    assert not (tmp_path / "eval").exists()


@pytest.mark.skipif(not (OFFICIAL_CHECKPOINTS / "sst2").is_dir() or not T5_TOKENIZER_DIR.is_dir(),
                    reason="the official DePT sst2 checkpoint or the T5 tokenizer is not in ../shared/reference")
def test_official_checkpoint_evaluates_on_a_model_with_t5_base_dims(tmp_path):
    config = tiny_t5_config(32128, d_model=768, d_kv=16, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
                            tie_word_embeddings=True)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5-base-dims")
    for name in T5_TOKENIZER_DIR.iterdir():
        shutil.copy(name, tmp_path / "t5-base-dims" / name.name)
    files = write_task_fixture("sst2", tmp_path / "data", n_train=2, n_val=5, n_test=2)
    report = dept_eval(["--model_name_or_path", str(tmp_path / "t5-base-dims"), "--adapter",
                        str(OFFICIAL_CHECKPOINTS / "sst2"), "--task", "sst2", "--split", "validation",
                        *_file_flags(files, "validation"), *GENERATION])
    (result,) = report["results"]
    official = json.loads((OFFICIAL_CHECKPOINTS / "sst2" / "adapter_config.json").read_text())
    assert result["max_length"] == official["max_length"] == 256
    m, r, s, d = official["num_virtual_tokens"], official["r"], official["max_length"], official["token_dim"]
    assert result["trainable_parameters"] == m * d + s * r + r * d == 76_800
    assert result["num_examples"] == 5 and 0.0 <= result["metrics"]["accuracy"] <= 100.0


@pytest.fixture(scope="module")
def trained_vl(vl_fixture, tmp_path_factory):
    """The synthetic VL data and features, a tiny T5, and a DePT adapter trained on vqa for 4 steps."""
    output_dir = tmp_path_factory.mktemp("dept_eval_vl") / "vqa"
    vl_train(vl_fixture.argv("vqa", output_dir, "--do_predict", "false"))
    return vl_fixture, output_dir


def _vl_eval_argv(fixture, pairs: list[str], output_dir) -> list[str]:
    data = [word for flag, path in task_file_paths(fixture.root).items() for word in (f"--{flag}", path)]
    argv = ["--model_name_or_path", str(fixture.model_dir), "--split", "validation", "--output_dir", str(output_dir),
            "--per_device_eval_batch_size", "16", "--feature_file", str(fixture.feature_file),
            "--max_target_length", "24", "--generation_max_length", "12", *data]
    return argv + [word for pair in pairs for word in ("--adapter", pair)]


def test_vl_adapter_reproduces_the_training_runs_metrics_through_its_plugin(trained_vl, tmp_path):
    fixture, adapter = trained_vl
    report = dept_eval(_vl_eval_argv(fixture, [f"{adapter}:vqa"], tmp_path / "eval"))
    expected = json.loads((adapter / "eval_results.json").read_text())
    (result,) = report["results"]
    assert result["modality"] == "vl" and result["max_length"] == 24
    # The official overall accuracy and its per-answer-type figures, exactly those of the training run.
    assert set(result["metrics"]) == {"vqa_accuracy", "vqa_accuracy_yes_no", "vqa_accuracy_number",
                                      "vqa_accuracy_other"}
    assert result["metrics"] == {name: expected[f"eval_{name}"] for name in result["metrics"]}
    assert result["num_examples"] == expected["eval_samples"] > 0
    trained = json.loads((adapter / "training_task.json").read_text())["trainable_parameters"]
    assert trained["visual_embedding"] > 0  # the saved projection is part of the adapter and counted
    assert result["trainable_parameters"] == trained["total"]

    assert json.loads((tmp_path / "eval" / "dept_eval_validation.json").read_text()) == report
    table = (tmp_path / "eval" / "dept_eval_validation.md").read_text()
    shown = ", ".join(f"{name} {expected[f'eval_{name}']:.2f}" for name in result["metrics"])
    row = f"| {result['name']} | vqa | {shown} | {expected['eval_samples']} |"
    assert row in table
    # At this size the accuracy is 0 either way; the generated answers tell a wrong prompt or projection apart.
    training_predictions = [json.loads(line)["prediction"]
                            for line in (adapter / "predictions_eval.jsonl").read_text().splitlines()]
    predictions = [json.loads(line)["prediction"]
                   for line in (tmp_path / "eval" / "dept_eval_validation_predictions.jsonl").read_text().splitlines()]
    assert predictions == training_predictions and len(set(predictions)) > 1


def test_vl_adapter_on_a_task_it_was_not_trained_on_stops_before_evaluating(trained_vl, tmp_path, monkeypatch):
    fixture, adapter = trained_vl
    calls = []
    original = VLEvaluator.predict_step
    monkeypatch.setattr(VLEvaluator, "predict_step", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    argv = _vl_eval_argv(fixture, [f"{adapter}:vqa", f"{adapter}:gqa"], tmp_path / "eval")
    with pytest.raises(TaskMismatchError, match=r"trained on \['vqa'\], not on gqa.*Nothing was evaluated"):
        dept_eval(argv)
    assert calls == []
    assert not (tmp_path / "eval").exists()
