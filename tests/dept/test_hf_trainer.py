"""DePT trains in transformers' `Trainer`/`Seq2SeqTrainer` (`dept.hf_trainer`) as a PEFT model does: the saved
folder and every checkpoint hold the adapter files only, the adapter reloads to the outputs the trained model gives,
for every optimizer transformers offers on this machine, with gradient checkpointing and bf16, and 5 steps of
transformers' Trainer equal 5 steps of our own trainer."""

from __future__ import annotations

import warnings

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import (
    BertForSequenceClassification,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    LlamaForCausalLM,
    Seq2SeqTrainingArguments,
    T5ForConditionalGeneration,
    TrainingArguments,
)
from transformers.training_args import OptimizerNames

from dept import DePTConfig, DePTModel, get_dept_model
from dept.hf_trainer import DePTSeq2SeqTrainer, DePTTrainer
from dept.trainer import Trainer as OurTrainer
from dept.training_args import TrainingArguments as OurTrainingArguments
from tests.conftest import TASK_TYPES, tiny_bert_config, tiny_llama_config, tiny_t5_config

KINDS = ("t5", "llama", "bert")
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
# Every weights file transformers could write; of these only the adapter's may appear.
WEIGHT_FILES = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "adapter_model.bin",
                "adapter_model.safetensors"}
# Optimizers that need no package beyond torch and transformers: the test fails if one of them is no longer found.
OPTIMIZERS_WITHOUT_EXTRAS = {"adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop"}
SENTENCES = [("the movie was great and the actors were wonderful", "1"),
             ("a dull and boring film with terrible acting", "0"),
             ("the actors were great", "1"), ("a boring film", "0")]


def build_base(kind: str, tokenizer):
    # A random BERT at its usual init range (0.02) pools every input to nearly the same vector (spread ~3e-4),
    # so no head could learn from it; at 0.2 the inputs are told apart.
    builders = {"t5": lambda: T5ForConditionalGeneration(tiny_t5_config(len(tokenizer))),
                "llama": lambda: LlamaForCausalLM(tiny_llama_config(len(tokenizer))),
                "bert": lambda: BertForSequenceClassification(tiny_bert_config(len(tokenizer),
                                                                                initializer_range=0.2))}
    torch.manual_seed(0)
    return builders[kind]().eval()


def build_dept_model(kind: str, tokenizer) -> DePTModel:
    """The same freshly initialised DePT model on every call (seeded base, seeded P, A, B)."""
    config = DePTConfig(num_virtual_tokens=4, r=2, max_length=16, prompt_init="vocab", task_type=TASK_TYPES[kind])
    return get_dept_model(build_base(kind, tokenizer), config, tokenizer=tokenizer)


def dataset(kind: str, tokenizer, repeat: int = 2) -> Dataset:
    """Rows in each kind's training format: T5 text-to-text, LLaMA the source then the target (loss on the target),
    BERT a label index."""
    rows = []
    for text, label in SENTENCES * repeat:
        source = tokenizer(text)["input_ids"]
        if kind == "t5":
            rows.append({"input_ids": source, "attention_mask": [1] * len(source),
                         "labels": tokenizer(label)["input_ids"]})
        elif kind == "llama":
            target = tokenizer(label)["input_ids"]
            rows.append({"input_ids": source + target, "attention_mask": [1] * (len(source) + len(target)),
                         "labels": [-100] * len(source) + target})
        else:
            rows.append({"input_ids": source, "attention_mask": [1] * len(source), "labels": int(label)})
    return Dataset.from_list(rows)


def collator(kind: str, tokenizer):
    return DataCollatorWithPadding(tokenizer) if kind == "bert" else DataCollatorForSeq2Seq(tokenizer)


def eval_batch(kind: str, tokenizer) -> dict[str, torch.Tensor]:
    batch = collator(kind, tokenizer)(list(dataset(kind, tokenizer, repeat=1)))
    return dict(batch)


@torch.no_grad()
def outputs(kind: str, model: DePTModel, batch: dict) -> torch.Tensor:
    """What the model answers in eval mode: logits (LLaMA through the prompt KV cache) and, for T5, greedy tokens."""
    model.eval()
    logits = model(**batch).logits.float()
    if kind != "t5":
        return logits
    generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               max_new_tokens=3)
    return torch.cat([logits.flatten(), generated.flatten().float()])


def trainer_for(kind: str, model, tokenizer, output_dir, **args):
    """transformers' defaults, but for where the output goes, a few steps, rates for DePT and no report."""
    settings = dict(output_dir=str(output_dir), max_steps=6, learning_rate=0.3, per_device_train_batch_size=4,
                    per_device_eval_batch_size=8, report_to="none", logging_steps=1)
    settings.update(args)
    cls, arguments = ((DePTSeq2SeqTrainer, Seq2SeqTrainingArguments) if kind == "t5"
                      else (DePTTrainer, TrainingArguments))
    return cls(model=model, args=arguments(**settings), train_dataset=dataset(kind, tokenizer),
               eval_dataset=dataset(kind, tokenizer, repeat=1), data_collator=collator(kind, tokenizer),
               processing_class=tokenizer, lora_embedding_lr=0.05)


def adapter_tensors(model: DePTModel) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.adapter_state_dict().items()}


def assert_reloads_to_the_same_outputs(kind, trained, tokenizer, directory):
    fresh = DePTModel.from_pretrained(build_base(kind, tokenizer), directory)
    batch = eval_batch(kind, tokenizer)
    torch.testing.assert_close(outputs(kind, fresh, batch), outputs(kind, trained, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_default_arguments_train_save_the_adapter_only_and_reload_to_the_same_outputs(kind, tokenizer, tmp_path):
    model = build_dept_model(kind, tokenizer)
    start = adapter_tensors(model)
    trainer = trainer_for(kind, model, tokenizer, tmp_path / "out", save_steps=3)
    assert trainer.args.optim == OptimizerNames.ADAMW_TORCH_FUSED  # transformers' default optimizer
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    trainer.save_model()
    assert trainer.evaluate()["eval_loss"] < loss_before
    assert not torch.equal(adapter_tensors(model)["prompt_embeddings"], start["prompt_embeddings"])
    for directory in (tmp_path / "out", tmp_path / "out" / "checkpoint-3", tmp_path / "out" / "checkpoint-6"):
        names = {path.name for path in directory.iterdir()}
        assert names & WEIGHT_FILES == {"adapter_model.safetensors"}
        assert ADAPTER_FILES <= names
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert set(saved) == set(model.adapter_state_dict())  # P, A, B (and BERT's head), nothing of the frozen base
    assert_reloads_to_the_same_outputs(kind, model, tokenizer, tmp_path / "out")


@pytest.mark.parametrize("kind", KINDS)
def test_the_two_learning_rates_are_the_optimizers_groups(kind, tokenizer, tmp_path):
    model = build_dept_model(kind, tokenizer)
    trainer = trainer_for(kind, model, tokenizer, tmp_path / "out")
    optimizer = trainer.create_optimizer()
    rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
    expected = {"prompt": 0.3, "lora_embedding": 0.05}
    if kind == "bert":
        expected["modules_to_save"] = 0.05  # the classifier head, at A and B's rate
    assert rates == expected
    grouped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}


def runnable_optimizers() -> list[str]:
    """The `OptimizerNames` transformers can build here: those whose packages are installed."""
    names = []
    for name in OptimizerNames:
        try:
            args = TrainingArguments("unused", optim=name.value, report_to="none")
            DePTTrainer.get_optimizer_cls_and_kwargs(args, torch.nn.Linear(1, 1))
        except (ImportError, ValueError):
            continue
        names.append(name.value)
    return names


def test_every_optimizer_without_extra_packages_is_found():
    assert OPTIMIZERS_WITHOUT_EXTRAS <= set(runnable_optimizers())


@pytest.mark.parametrize("optim", runnable_optimizers())
def test_every_optimizer_trains_and_the_eval_outputs_equal_the_reloaded_adapters(optim, tokenizer, tmp_path):
    # LLaMA: its eval outputs go through the prompt KV cache, which a step that bumps no version could leave stale.
    model = build_dept_model("llama", tokenizer)
    start = adapter_tensors(model)
    batch = eval_batch("llama", tokenizer)
    before = outputs("llama", model, batch)  # fill the eval caches before training
    trainer = trainer_for("llama", model, tokenizer, tmp_path / "out", optim=optim, max_steps=2,
                          save_strategy="no")
    trainer.train()
    trainer.save_model()
    after = adapter_tensors(model)
    assert all(not torch.equal(after[key], start[key]) for key in ("prompt_embeddings", "lora_embedding_B"))
    assert not torch.allclose(outputs("llama", model, batch), before)
    assert_reloads_to_the_same_outputs("llama", model, tokenizer, tmp_path / "out")


def test_an_optimizer_that_builds_its_own_groups_is_refused_with_the_reason(tokenizer, tmp_path):
    model = build_dept_model("t5", tokenizer)
    trainer = trainer_for("t5", model, tokenizer, tmp_path / "out")
    trainer.optimizer_cls_and_kwargs = (torch.optim.AdamW, {"lr": 0.1, "params": list(model.parameters())})
    with pytest.raises(ValueError, match="two learning rates"):
        trainer.create_optimizer()


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_gives_the_same_adapter(kind, tokenizer, tmp_path):
    trained = {}
    for checkpointing in (False, True):
        model = build_dept_model(kind, tokenizer)
        trainer = trainer_for(kind, model, tokenizer, tmp_path / f"gc{checkpointing}", max_steps=3,
                              save_strategy="no", gradient_checkpointing=checkpointing)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers renames the flag
            trainer.train()
        assert model.base_model.is_gradient_checkpointing == checkpointing
        trained[checkpointing] = adapter_tensors(model)
    for key, value in trained[False].items():
        torch.testing.assert_close(trained[True][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_on_the_cpu_trains_and_reloads_to_the_same_outputs(kind, tokenizer, tmp_path):
    model = build_dept_model(kind, tokenizer)
    trainer = trainer_for(kind, model, tokenizer, tmp_path / "out", bf16=True, use_cpu=True, save_strategy="no")
    batch = {key: value for key, value in eval_batch(kind, tokenizer).items()}
    model.train()
    assert trainer.accelerator.mixed_precision == "bf16"
    with torch.no_grad(), trainer.accelerator.autocast():  # the autocast the Trainer trains under
        loss_bf16 = model(**batch).loss
    with torch.no_grad():
        loss_fp32 = model(**batch).loss
    assert loss_bf16.dtype == torch.float32 and not torch.equal(loss_bf16, loss_fp32)  # computed in bf16 ...
    torch.testing.assert_close(loss_bf16, loss_fp32, rtol=2e-2, atol=0)  # ... to bf16's precision
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    trainer.save_model()
    assert trainer.evaluate()["eval_loss"] < loss_before
    assert all(p.dtype == torch.float32 for p in model.prompt_encoder.parameters())  # bf16 autocast, fp32 weights
    # accelerate leaves the trained model's forward under bf16 autocast (as for any model it prepared): the
    # reloaded adapter answers the same under the same autocast.
    with trainer.accelerator.autocast():
        assert_reloads_to_the_same_outputs(kind, model, tokenizer, tmp_path / "out")


def test_predict_with_generate_equals_the_reloaded_adapters_generate(tokenizer, tmp_path):
    model = build_dept_model("t5", tokenizer)
    trainer = trainer_for("t5", model, tokenizer, tmp_path / "out", save_strategy="no", predict_with_generate=True,
                          generation_max_length=4)
    trainer.train()
    trainer.save_model()
    predicted = trainer.predict(dataset("t5", tokenizer, repeat=1)).predictions
    fresh = DePTModel.from_pretrained(build_base("t5", tokenizer), tmp_path / "out")
    batch = eval_batch("t5", tokenizer)
    expected = fresh.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_length=4)
    pad = tokenizer.pad_token_id
    torch.testing.assert_close(torch.as_tensor(predicted)[:, :expected.shape[1]].masked_fill(
        torch.as_tensor(predicted)[:, :expected.shape[1]] == -100, pad), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_load_best_model_at_end_reads_the_best_checkpoints_adapter(kind, tokenizer, tmp_path):
    model = build_dept_model(kind, tokenizer)
    trainer = trainer_for(kind, model, tokenizer, tmp_path / "out", max_steps=4, eval_strategy="steps",
                          eval_steps=1, save_steps=1, load_best_model_at_end=True, metric_for_best_model="loss",
                          greater_is_better=True)  # the worst loss is "best": not the last step's weights
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-4")
    saved = load_file(f"{best}/adapter_model.safetensors")
    for key, value in model.adapter_state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)


def test_resuming_from_a_checkpoint_reads_its_adapter(tokenizer, tmp_path):
    straight = build_dept_model("t5", tokenizer)
    trainer_for("t5", straight, tokenizer, tmp_path / "out", max_steps=4, save_steps=2).train()
    resumed = build_dept_model("t5", tokenizer)  # fresh weights: the first two steps come from the files alone
    trainer_for("t5", resumed, tokenizer, tmp_path / "resumed", max_steps=4, save_steps=2).train(
        resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    for key, value in adapter_tensors(straight).items():
        torch.testing.assert_close(adapter_tensors(resumed)[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_transformers_trainer_and_ours_give_the_same_adapter_after_five_steps(kind, tokenizer, tmp_path):
    """Aligned: one batch holds the whole set (8 rows), so neither side's shuffling can change a batch; both run
    unfused AdamW (betas 0.9/0.999, eps 1e-8) over `dept.trainer.parameter_groups`, the same linear schedule with
    2 warmup steps, weight decay 0.01 on every group, gradients clipped to norm 1, no mixed precision, 5 steps."""
    rates = dict(learning_rate=0.3, weight_decay=0.01, warmup_steps=2, max_steps=5, max_grad_norm=1.0,
                 per_device_train_batch_size=8, seed=0, logging_steps=1)
    ours = build_dept_model(kind, tokenizer)
    OurTrainer(ours, OurTrainingArguments(output_dir=str(tmp_path / "ours"), lora_embedding_lr=0.05,
                                          lr_scheduler_type="linear", eval_strategy="no", save_strategy="no",
                                          load_best_model_at_end=False, report_to="none", **rates),
               collate_fn=collator(kind, tokenizer), train_dataset=dataset(kind, tokenizer)).train()
    theirs = build_dept_model(kind, tokenizer)
    trainer = trainer_for(kind, theirs, tokenizer, tmp_path / "theirs", optim="adamw_torch", save_strategy="no",
                          lr_scheduler_type="linear", **rates)
    trainer.train()
    assert trainer.state.global_step == 5
    start = build_dept_model(kind, tokenizer).adapter_state_dict()
    for key, value in adapter_tensors(ours).items():
        assert not torch.equal(value, start[key])  # both moved ...
        torch.testing.assert_close(adapter_tensors(theirs)[key], value, rtol=1e-5, atol=1e-5)  # ... the same way
