"""The text side of dept-eval reads a saved adapter as its training run made it: the task type (by its current
name, or the name older files used) and the causal template."""

from __future__ import annotations

import argparse

import pytest

from dept_eval.cli import build_parser
from dept_nlp.data_files import load_task_datasets
from dept_nlp.evaluate import TextEvaluation
from dept_nlp.modeling import load_tokenizer, resolve_task_type
from dept_nlp.preprocess import CAUSAL_TEMPLATE, tokenize_rows
from tests.conftest import save_tiny_model, write_task_fixture

pytestmark = pytest.mark.xdist_group("nlp_evaluate")  # shares module-scoped runs: one worker (--dist loadgroup)

WORDS = ["sentence", "good", "bad", "movie", "Answer", "Label", ":", "0", "1"]


@pytest.fixture(scope="module")
def causal_model(tmp_path_factory):
    return save_tiny_model("causal", tmp_path_factory.mktemp("llama"), WORDS)


def test_the_flag_wins_then_the_recorded_task_type_then_the_models_config(causal_model):
    assert resolve_task_type(causal_model) == "causal"  # detected from config.json
    assert resolve_task_type(causal_model, training_task={"task_type": "cls"}) == "cls"
    assert resolve_task_type(causal_model, training_task={"model_family": "cls"}) == "cls"  # an older file
    assert resolve_task_type(causal_model, "seq2seq", training_task={"task_type": "cls"}) == "seq2seq"
    assert resolve_task_type(causal_model, training_task={"task_names": ["sst2"]}) == "causal"


def _eval_args(model_dir, files, *flags) -> argparse.Namespace:
    parser = build_parser()
    TextEvaluation().add_arguments(parser)
    return parser.parse_args(["--model_name_or_path", str(model_dir), "--validation_file",
                              str(files["validation_file"]), *flags])


@pytest.mark.parametrize("given", [None, "{source} Label : "])
def test_a_causal_adapter_is_evaluated_with_the_template_it_was_trained_with(causal_model, tmp_path, given):
    files = write_task_fixture("sst2", tmp_path / "data", n_train=2, n_val=3, n_test=2)
    trained_with = "sentence: {source} Answer: "
    training_task = {"task_names": ["sst2"], "modality": "text", "label_words": ["0", "1"], "task_type": "causal",
                     "causal_template": trained_with}
    args = _eval_args(causal_model, files, *(["--causal_template", given] if given else []))
    modality = TextEvaluation()
    tokenizer = modality.load_tokenizer(args, training_task)
    dataset, _, evaluator = modality.build_eval_components("sst2", tokenizer, None, max_length=32,
                                                           split="validation", args=args, training_task=training_task)
    assert evaluator.task_type == "causal" and args.task_type is None  # resolved per adapter, the flags untouched
    rows = load_task_datasets("sst2", **files, splits=("validation",))["validation"]
    expected = tokenize_rows(rows, load_tokenizer(str(causal_model)), "causal", 32, 20, "validation",
                             causal_template=given or trained_with)
    assert dataset["input_ids"] == expected["input_ids"]
    official = tokenize_rows(rows, load_tokenizer(str(causal_model)), "causal", 32, 20, "validation",
                             causal_template=CAUSAL_TEMPLATE)
    assert (dataset["input_ids"] == official["input_ids"]) == (given == CAUSAL_TEMPLATE)
