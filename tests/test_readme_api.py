"""The Python API shown in the README, with the same calls, on a tiny T5 and adapters trained offline here.

The README loads `t5-base` and `outputs/sst2`; this test loads a tiny T5 saved to disk and adapters trained by
`dept-train`, through the same `from_pretrained` paths.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from dept import DePTModel, MultiAdapterModel
from dept_nlp.cli import train as dept_train
from dept_nlp.tasks import get_task
from tests.conftest import hub_row, save_tiny_model, text_train_argv, write_task_fixture

pytestmark = pytest.mark.xdist_group("readme_api")  # shares module-scoped runs: one worker (--dist loadgroup)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """A tiny T5 ("t5-base") with two sst2 adapters (150 and 4 steps) and what their runs predicted on validation."""
    root = tmp_path_factory.mktemp("readme")
    texts = [get_task("sst2").format_example(hub_row("sst2", i))[0] for i in range(40)]
    files = write_task_fixture("sst2", root / "data", n_train=16, n_val=8, n_test=8)
    base_dir = save_tiny_model("seq2seq", root / "t5-base", texts)
    for name, steps in (("sst2", 150), ("sst2_early", 4)):
        dept_train(text_train_argv(str(base_dir), root / name, "sst2", files, steps=steps, learning_rate=1.0,
                          lora_embedding_lr=0.05, per_device_train_batch_size=8, generation_max_length=3))
    validation = [json.loads(line) for line in open(files["validation_file"])]
    predicted = {name: [json.loads(line)["prediction"] for line in open(root / name / "predictions_eval.jsonl")]
                 for name in ("sst2", "sst2_early")}
    return {"base": str(base_dir), "sst2": str(root / "sst2"), "sst2_early": str(root / "sst2_early"),
            "validation": validation, "predicted_in_training": predicted}


def test_readme_single_adapter_generate_reads_the_answer(outputs):
    base_path, adapter_dir = outputs["base"], outputs["sst2"]  # README: "t5-base", "outputs/sst2"
    # --- README code ---
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    base = AutoModelForSeq2SeqLM.from_pretrained(base_path)
    model = DePTModel.from_pretrained(base, adapter_dir)  # ours, or an official DePT checkpoint directory
    inputs = tokenizer("sentence: " + outputs["validation"][0]["sentence"], return_tensors="pt",
                       truncation=True, max_length=model.config.max_length)
    output_ids = model.generate(**inputs, max_new_tokens=3)
    answer = tokenizer.decode(output_ids[0], skip_special_tokens=True)  # "0" (negative) or "1" (positive)
    # --- end ---
    assert answer in ("0", "1")
    assert answer == outputs["predicted_in_training"]["sst2"][0]  # what the training run's evaluation predicted


def test_readme_mixed_adapters_answer_as_each_adapter_alone(outputs):
    base_path = outputs["base"]
    sentences = ["sentence: " + row["sentence"] for row in outputs["validation"][:4]]
    # --- README code ---
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    base = AutoModelForSeq2SeqLM.from_pretrained(base_path)
    multi = MultiAdapterModel(base, {"sst2": outputs["sst2"], "sst2_early": outputs["sst2_early"]})
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    output_ids = multi.generate(**batch, adapter_names=["sst2", "sst2_early", "sst2", "sst2_early"],
                                max_new_tokens=3)
    answers = tokenizer.batch_decode(output_ids, skip_special_tokens=True)
    # --- end ---
    alone = []
    for sentence, name in zip(sentences, ["sst2", "sst2_early", "sst2", "sst2_early"], strict=True):
        model = DePTModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(base_path), outputs[name])
        alone.append(tokenizer.decode(model.generate(**tokenizer(sentence, return_tensors="pt"), max_new_tokens=3)[0],
                                      skip_special_tokens=True))
    assert answers == alone
    predicted = outputs["predicted_in_training"]
    assert answers == [predicted["sst2"][0], predicted["sst2_early"][1], predicted["sst2"][2], predicted["sst2_early"][3]]
