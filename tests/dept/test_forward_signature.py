"""`forward`'s signature names what the base model takes, so transformers' Trainer keeps every column the base needs
(`remove_unused_columns=True`, its default) and trains a DePT model as it trains a PEFT model."""

import copy
import inspect

import datasets
import pytest
import torch
from transformers import Trainer, TrainingArguments

from dept import MultiAdapterModel
from tests.conftest import attach

# What each base model takes besides input_ids and attention_mask, and must survive Trainer's column removal.
BASE_COLUMNS = {"t5": {"labels", "decoder_input_ids", "decoder_attention_mask"}, "llama": {"labels"},
                "bert": {"labels", "token_type_ids"}}


def _trainer(model, tmp_path, dataset=None, **args):
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], save_strategy="no", **args)
    return Trainer(model=model, args=args, train_dataset=dataset)


def test_trainer_keeps_the_columns_the_base_model_takes(any_model, tokenizer, tmp_path):
    kind, model = any_model
    dept_model = attach(kind, model, tokenizer)
    trainer = _trainer(dept_model, tmp_path)
    assert trainer.label_names == ["labels"]  # read from the class's forward, as for any Hugging Face model
    columns = {"input_ids": [[4, 5]], "attention_mask": [[1, 1]], "a_text_column": ["x"]}
    columns.update({name: [[0, 1]] for name in BASE_COLUMNS[kind]})
    kept = trainer._remove_unused_columns(datasets.Dataset.from_dict(columns)).column_names
    assert set(kept) == {"input_ids", "attention_mask"} | BASE_COLUMNS[kind]  # and nothing else


def test_the_signature_keeps_the_models_own_parameters_in_their_places(any_model, tokenizer):
    kind, model = any_model
    dept_model = attach(kind, model, tokenizer)
    parameters = inspect.signature(dept_model.forward).parameters
    assert list(parameters)[:3] == ["input_ids", "attention_mask", "inputs_embeds"]
    assert parameters["labels"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD  # the model's own parameter
    assert "adapter_names" not in parameters  # one adapter; a serving model takes the names (below)
    passed_on = [name for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    base_parameters = inspect.signature(model.forward).parameters
    assert passed_on and all(name in base_parameters for name in passed_on if name != "use_prompt_cache")
    batch = tokenizer(["the movie was great"], return_tensors="pt")
    extra = {"decoder_input_ids": torch.zeros(1, 2, dtype=torch.long)} if kind == "t5" else {}
    with torch.no_grad():  # positional calls reach the parameters the signature says
        torch.testing.assert_close(dept_model(batch["input_ids"], batch["attention_mask"], **extra).logits,
                                   dept_model(**batch, **extra).logits, atol=0, rtol=0)


def test_a_serving_model_names_adapter_names_and_the_base_models_arguments(t5_model, tokenizer, tmp_path):
    attach("t5", copy.deepcopy(t5_model), tokenizer).save_pretrained(tmp_path / "a")
    multi = MultiAdapterModel(t5_model, {"a": tmp_path / "a"})
    parameters = inspect.signature(multi.model.forward).parameters
    assert {"adapter_names", "labels", "decoder_input_ids"} <= set(parameters)


def test_a_deep_copy_runs_on_its_own_weights(llama_model, tokenizer):
    dept_model = attach("llama", llama_model, tokenizer).eval()
    twin = copy.deepcopy(dept_model)
    with torch.no_grad():
        twin.prompt_encoder.prompt_embeddings.mul_(-1.0)
        batch = tokenizer(["the movie was great"], return_tensors="pt")
        ours, theirs = dept_model(**batch).logits, twin(**batch).logits
    assert twin.forward.__self__ is twin
    assert not torch.allclose(ours, theirs, atol=1e-3)


def test_transformers_trainer_trains_a_t5_dept_model_with_its_default_columns(t5_model, tokenizer, tmp_path):
    """Trainer's defaults (remove_unused_columns=True) once dropped labels: "You must specify exactly one of
    input_ids or inputs_embeds"."""
    dept_model = attach("t5", t5_model, tokenizer)
    sources = tokenizer(["the movie was great", "a dull and boring film"] * 4, padding="max_length", max_length=8)
    labels = tokenizer(["1", "0"] * 4, padding="max_length", max_length=3)["input_ids"]
    dataset = datasets.Dataset.from_dict({"input_ids": sources["input_ids"],
                                          "attention_mask": sources["attention_mask"], "labels": labels,
                                          "source_text": ["unused"] * 8})
    before = {name: p.detach().clone() for name, p in dept_model.named_parameters() if p.requires_grad}
    trainer = _trainer(dept_model, tmp_path, dataset, max_steps=2, per_device_train_batch_size=4,
                       learning_rate=0.05)
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    for name, value in before.items():
        assert not torch.equal(dict(dept_model.named_parameters())[name], value), name


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_the_trainer_loss_is_the_models_loss_on_the_kept_labels(kind, request, tokenizer, tmp_path):
    model = request.getfixturevalue(f"{kind}_model")
    dept_model = attach(kind, model, tokenizer).eval()
    batch = tokenizer(["the movie was great", "red circle"], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100) if kind == "llama" else \
        tokenizer(["1", "0"], return_tensors="pt")["input_ids"]
    trainer = _trainer(dept_model, tmp_path)
    with torch.no_grad():
        expected = dept_model(**batch, labels=labels).loss
        loss, _, _ = trainer.prediction_step(dept_model, {**batch, "labels": labels}, prediction_loss_only=True)
    torch.testing.assert_close(loss, expected, atol=1e-6 * float(expected.abs()), rtol=1e-5)
