"""The shared training loop on a toy DePT-shaped model: learning, outputs, evaluation, best model, data order."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import HfArgumentParser

from dept.checkpoint import (
    EpochSampler,
    complete_checkpoints,
    example_lengths,
    read_checkpoint,
    rotate_checkpoints,
    write_checkpoint,
)
from dept.trainer import Trainer
from dept.training_args import TrainingArguments
from tests.conftest import float32_paths  # FLOAT32_PATHS there
from tests.dept._toy import (
    EVAL_SIZE,
    LossRecordingModel,
    ToyAdapterModel,
    ToyEvaluator,
    collate,
    expected_log_losses,
    make_dataset,
    toy_args,
    toy_trainer,
    trainable_tensors,
)


def test_loss_falls_and_frozen_base_stays_bit_identical(tmp_path):
    model = ToyAdapterModel()
    base_before = {name: p.clone() for name, p in model.base.named_parameters()}
    adapter_before = trainable_tensors(model)
    initial = toy_trainer(toy_args(tmp_path / "before"), model).evaluate()

    trainer = toy_trainer(toy_args(tmp_path / "run", max_steps=30, eval_strategy="no", save_strategy="no",
                                   load_best_model_at_end=False), model)  # fmt: skip
    trainer.train()
    final = trainer.evaluate()

    assert final["eval_loss"] < 0.6 * initial["eval_loss"]
    assert final["eval_accuracy"] > initial["eval_accuracy"]
    for name, tensor in model.base.named_parameters():
        assert torch.equal(tensor, base_before[name]), name
    for name, tensor in trainable_tensors(model).items():
        assert not torch.equal(tensor, adapter_before[name]), f"{name} did not train"


def test_log_history_records_each_group_learning_rate(tmp_path):
    args = toy_args(tmp_path, learning_rate=0.2, lora_embedding_lr=0.01, warmup_steps=0, max_steps=8,
                    eval_strategy="no", save_strategy="no", load_best_model_at_end=False)  # fmt: skip
    toy_trainer(args).train()
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    train_logs = [entry for entry in history if "loss" in entry]
    assert [entry["step"] for entry in train_logs] == [2, 4, 6, 8]
    for entry in train_logs:  # linear decay from step 0 over 8 steps, the same factor for both groups
        factor = (8 - entry["step"]) / 8
        assert entry["learning_rate_prompt"] == pytest.approx(0.2 * factor)
        assert entry["learning_rate_lora_embedding"] == pytest.approx(0.01 * factor)


def test_outputs_use_the_official_file_names_and_keys(tmp_path):
    trainer = toy_trainer(toy_args(tmp_path), test_dataset=make_dataset(9, seed=3))
    train_metrics = trainer.train()
    test_metrics = trainer.evaluate(split="test")

    for name in ("all_results.json", "train_results.json", "trainer_state.json", "test_results.json",
                 "adapter_model.safetensors", "adapter_config.json", "predictions_test.jsonl"):  # fmt: skip
        assert (tmp_path / name).is_file(), name
    train_results = json.loads((tmp_path / "train_results.json").read_text())
    assert train_results == train_metrics
    assert {"train_loss", "train_runtime", "train_samples_per_second", "epoch"} <= set(train_results)
    assert {"test_accuracy", "test_loss", "test_runtime", "test_samples_per_second"} <= set(test_metrics)
    all_results = json.loads((tmp_path / "all_results.json").read_text())
    assert all_results["test_accuracy"] == test_metrics["test_accuracy"]
    assert all_results["train_loss"] == train_metrics["train_loss"]
    assert train_metrics["epoch"] == pytest.approx(16 * 4 / 40)  # 16 steps of 4 examples over 40 examples


def test_predictions_file_has_one_line_per_example_next_to_its_reference(tmp_path):
    test_set = make_dataset(9, seed=3)
    trainer = toy_trainer(toy_args(tmp_path), test_dataset=test_set)
    predictions, metrics = trainer.predict(test_set)
    lines = [json.loads(line) for line in (tmp_path / "predictions_test.jsonl").read_text().splitlines()]
    assert [line["prediction"] for line in lines] == predictions
    assert [line["reference"] for line in lines] == [str(ex["label"]) for ex in test_set]
    correct = sum(line["prediction"] == line["reference"] for line in lines)
    assert metrics["test_accuracy"] == pytest.approx(100 * correct / 9)


def test_eval_metrics_match_a_hand_computed_pass_over_the_data(tmp_path):
    model = ToyAdapterModel()
    with torch.no_grad():
        model.lora_embedding_B.normal_(generator=torch.Generator().manual_seed(3))
    eval_set = make_dataset(EVAL_SIZE, seed=2)  # 21 examples in batches of 4: the last batch has 1
    metrics = toy_trainer(toy_args(tmp_path), model).evaluate(eval_set)

    model.eval()
    features = torch.stack([ex["features"] for ex in eval_set])
    labels = torch.tensor([ex["label"] for ex in eval_set])
    with torch.no_grad():
        logits = model(features=features).logits
    accuracy = 100 * (logits.argmax(-1) == labels).sum().item() / 21
    # eval_loss averages the per-batch mean loss over examples: batches of 4, 4, 4, 4, 4, 1
    batch_losses = [torch.nn.functional.cross_entropy(logits[i : i + 4], labels[i : i + 4]) for i in range(0, 21, 4)]
    loss = sum(batch_loss * len(labels[i : i + 4]) for i, batch_loss in zip(range(0, 21, 4), batch_losses)) / 21
    assert metrics["eval_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert metrics["eval_loss"] == pytest.approx(loss.item(), rel=1e-5)  # batched against whole: FLOAT32_PATHS
    assert metrics["eval_samples"] == 21


def test_evaluation_without_evaluator_reports_eval_loss_only(tmp_path):
    trainer = toy_trainer(toy_args(tmp_path), evaluator=None)
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and "eval_accuracy" not in metrics
    assert not (tmp_path / "predictions_eval.jsonl").exists()


def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path):
    args = toy_args(tmp_path, max_steps=24, save_total_limit=1, metric_for_best_model="loss")
    trainer = toy_trainer(args)
    trainer.train()
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    evals = {entry["step"]: entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry}
    best_step = min(evals, key=evals.get)
    assert state["best_model_checkpoint"] == str(tmp_path / f"checkpoint-{best_step}")
    assert state["best_metric"] == evals[best_step]

    best = read_checkpoint(state["best_model_checkpoint"]).trainable_parameters
    final = trainable_tensors(trainer.model)
    adapter = load_file(str(tmp_path / "adapter_model.safetensors"))
    for name, tensor in best.items():
        assert torch.equal(final[name], tensor), name
        assert torch.equal(adapter[name], tensor), name
    assert trainer.evaluate()["eval_loss"] == pytest.approx(state["best_metric"], abs=1e-6)
    # save_total_limit=1 keeps the newest checkpoint (to resume) and the best one
    kept = {path.name for path in complete_checkpoints(tmp_path)}
    assert kept == {"checkpoint-24", f"checkpoint-{best_step}"}


def test_rotation_deletes_oldest_checkpoints_but_never_the_best_or_newest(tmp_path):
    for step in (2, 4, 6, 8):
        write_checkpoint(tmp_path, step, trainable_parameters={"w": torch.zeros(1)}, scheduler={},
                         trainer_state={"global_step": step})  # fmt: skip
    deleted = rotate_checkpoints(tmp_path, save_total_limit=2, best=tmp_path / "checkpoint-2")
    assert sorted(path.name for path in deleted) == ["checkpoint-4", "checkpoint-6"]
    assert [path.name for path in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-8"]
    assert rotate_checkpoints(tmp_path, save_total_limit=1, best=tmp_path / "checkpoint-2") == []


def test_sampler_order_is_a_function_of_seed_and_epoch(tmp_path):
    sampler = EpochSampler(50, seed=3)
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.set_epoch(2)
    second = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) == first  # the order of an epoch can be rebuilt after a restart
    assert second != first
    assert sorted(first) == list(range(50))
    assert list(EpochSampler(50, seed=4)) != list(EpochSampler(50, seed=3))


def test_group_by_length_batches_similar_lengths_and_covers_every_example():
    lengths = [(37 * i) % 101 for i in range(400)]
    grouped = EpochSampler(400, seed=0, lengths=lengths, batch_size=8)
    shuffled = EpochSampler(400, seed=0)

    def spread(order):  # total (longest - shortest) over the batches of 8
        batches = [order[i : i + 8] for i in range(0, len(order), 8)]
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)

    order = list(grouped)
    assert sorted(order) == list(range(400))
    assert spread(order) < 0.25 * spread(list(shuffled))
    assert max(lengths[i] for i in order[:8]) == max(lengths)  # the longest batch first: OOM shows at once
    assert list(grouped) == order


def test_example_lengths_reads_length_or_input_ids():
    assert example_lengths([{"length": 3}, {"length": 5}]) == [3, 5]
    assert example_lengths([{"input_ids": [1, 2]}, {"input_ids": [1]}]) == [2, 1]
    with pytest.raises(ValueError, match="group_by_length"):
        example_lengths([{"features": torch.zeros(2)}])


def test_group_by_length_training_runs_and_learns(tmp_path):
    trainer = toy_trainer(toy_args(tmp_path, group_by_length=True, max_steps=20))
    assert trainer.train()["train_loss"] < 2.0


def test_references_and_other_non_tensor_entries_never_reach_forward(tmp_path):
    def collate_with_ids(examples):
        return {**collate(examples), "example_ids": [f"ex{i}" for i in range(len(examples))]}

    # ToyAdapterModel.forward takes only tensors: any extra keyword would raise a TypeError.
    trainer = toy_trainer(toy_args(tmp_path, max_steps=2, eval_steps=2, save_steps=2), collate_fn=collate_with_ids)
    assert trainer.train()["total_steps"] == 2


def test_tensorboard_receives_loss_learning_rates_and_eval_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    toy_trainer(toy_args(tmp_path, report_to="tensorboard", max_steps=4)).train()
    event_dirs = {path.parent for path in (tmp_path / "runs").rglob("events.out.tfevents.*")}
    tags = set()
    for directory in event_dirs:
        accumulator = EventAccumulator(str(directory))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate/prompt", "train/learning_rate/lora_embedding"} <= tags
    assert {"eval/accuracy", "eval/loss"} <= tags


def test_training_arguments_build_a_command_line_with_help():
    parser = HfArgumentParser(TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "out", "--learning_rate", "0.4", "--lora_embedding_lr", "5e-3", "--group_by_length"]
    )
    assert (args.learning_rate, args.lora_embedding_lr, args.group_by_length) == (0.4, 5e-3, True)
    help_text = parser.format_help()
    assert "Learning rate of A and B" in help_text and "resume" in help_text


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"eval_strategy": "often"}, "eval_strategy"),
        ({"load_best_model_at_end": True, "eval_strategy": "no"}, "load_best_model_at_end"),
        ({"load_best_model_at_end": True, "save_steps": 6, "eval_steps": 4}, "multiple of eval_steps"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
        ({"max_steps": -1, "num_train_epochs": 0}, "train nothing"),
    ],
)
def test_inconsistent_training_arguments_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        toy_args(tmp_path, **overrides)


def test_best_model_by_default_follows_the_data(tmp_path):
    # Unset, load_best_model_at_end is on when the run has something to evaluate: then its checkpoints must follow
    # its evaluations, checked when training starts, before anything is written.
    misaligned = toy_args(tmp_path / "misaligned", save_steps=6, eval_steps=4)
    assert misaligned.load_best_model_at_end is None
    with pytest.raises(ValueError, match="multiple of eval_steps"):
        toy_trainer(misaligned).train()
    assert not (tmp_path / "misaligned").exists()
    # With nothing to evaluate it is off: the run trains and keeps the adapter of its last step.
    trainer = toy_trainer(toy_args(tmp_path / "no_eval", save_steps=6, eval_steps=4), eval_dataset=None)
    trainer.train()
    last = read_checkpoint(tmp_path / "no_eval" / "checkpoint-12").trainable_parameters
    adapter = load_file(str(tmp_path / "no_eval" / "adapter_model.safetensors"))
    assert trainer.state.best_model_checkpoint is None and trainer.state.global_step == 16
    assert adapter.keys() == last.keys()
    assert all(not torch.equal(adapter[name], last[name]) for name in last)  # 4 more steps after checkpoint-12
    for name, tensor in trainable_tensors(trainer.model).items():
        assert torch.equal(adapter[name], tensor), name
    # Asked for explicitly with nothing to evaluate, it is refused.
    with pytest.raises(ValueError, match="no evaluation data"):
        toy_trainer(toy_args(tmp_path / "explicit", load_best_model_at_end=True), eval_dataset=None).train()


def test_mismatched_accelerator_accumulation_is_refused(tmp_path):
    from accelerate import Accelerator

    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        Trainer(ToyAdapterModel(), toy_args(tmp_path, gradient_accumulation_steps=2), collate_fn=collate,
                evaluator=ToyEvaluator(), accelerator=Accelerator(cpu=True, gradient_accumulation_steps=1))  # fmt: skip


def test_gradient_accumulation_of_two_half_batches_equals_one_full_batch(tmp_path):
    # The sampler's order depends only on (seed, epoch), so 2 micro-batches of 2 hold the same 4 examples as 1 of 4.
    common = dict(max_steps=6, eval_strategy="no", save_strategy="no", load_best_model_at_end=False)
    full = ToyAdapterModel(dropout=0.0)
    toy_trainer(toy_args(tmp_path / "full", per_device_train_batch_size=4, **common), full).train()
    accumulated = ToyAdapterModel(dropout=0.0)
    toy_trainer(toy_args(tmp_path / "accumulated", per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         **common), accumulated).train()  # fmt: skip
    for name, tensor in trainable_tensors(full).items():  # float32 along two summation orders: FLOAT32_PATHS
        torch.testing.assert_close(trainable_tensors(accumulated)[name], tensor, **float32_paths(tensor))


def test_gradient_accumulation_matches_a_plain_adamw_loop_so_no_gradient_leaks_across_steps(tmp_path):
    # Every example is the same, so every batch is too, whatever the order: the reference below is a plain
    # PyTorch loop (forward, backward, AdamW step, zero_grad) on that batch. Were the trainer to keep the last
    # step's gradients (no zero_grad), its steps would differ from these.
    example = make_dataset(1, seed=3)[0]
    args = toy_args(tmp_path / "accumulated", per_device_train_batch_size=2, gradient_accumulation_steps=2,
                    max_steps=6, warmup_steps=0, lr_scheduler_type="constant", max_grad_norm=0.0,
                    eval_strategy="no", save_strategy="no", load_best_model_at_end=False)  # fmt: skip
    trained = ToyAdapterModel(dropout=0.0)
    toy_trainer(args, trained, train_dataset=[example] * 8, eval_dataset=None).train()

    reference = ToyAdapterModel(dropout=0.0)
    optimizer = torch.optim.AdamW(reference.optimizer_param_groups(args.learning_rate, args.lora_embedding_lr),
                                  weight_decay=0.0)
    batch = collate([example] * 4)
    for _ in range(args.max_steps):
        reference(features=batch["features"], labels=batch["labels"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, tensor in trainable_tensors(reference).items():  # two micro-batches against one batch: FLOAT32_PATHS
        torch.testing.assert_close(trainable_tensors(trained)[name], tensor, **float32_paths(tensor))


def test_dept_t5_trains_through_the_loop_and_checkpoints_only_its_adapter(tmp_path, tokenizer, t5_model):
    from dept import DePTConfig, get_dept_model

    model = get_dept_model(t5_model, DePTConfig(num_virtual_tokens=4, r=2, max_length=16, prompt_init="vocab"),
                           tokenizer=tokenizer)  # fmt: skip
    base_before = {name: p.clone() for name, p in model.base_model.named_parameters()}
    texts = ["the movie was great", "a dull and boring film", "the actors were wonderful", "terrible acting"]
    examples = [{"text": text, "target": str(i % 2)} for i, text in enumerate(texts * 4)]

    def collate_text(batch):
        inputs = tokenizer([ex["text"] for ex in batch], padding=True, return_tensors="pt")
        labels = tokenizer([ex["target"] for ex in batch], padding=True, return_tensors="pt").input_ids
        labels[labels == tokenizer.pad_token_id] = -100
        return {**inputs, "labels": labels, "references": [ex["target"] for ex in batch]}

    args = toy_args(tmp_path, learning_rate=0.3, lora_embedding_lr=0.01, max_steps=12, save_steps=6, eval_steps=6,
                    metric_for_best_model="loss")  # fmt: skip
    trainer = Trainer(model, args, collate_fn=collate_text, train_dataset=examples, eval_dataset=examples[:5])
    metrics = trainer.train()

    assert metrics["train_loss"] < json.loads((tmp_path / "trainer_state.json").read_text())["log_history"][0]["loss"]
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    saved = read_checkpoint(tmp_path / "checkpoint-12").trainable_parameters
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert saved.keys() == trainable.keys()
    assert sum(t.numel() for t in saved.values()) == model.num_trainable_parameters()["total"] == 4 * 32 + 16 * 2 + 2 * 32
    # accelerate's save_state wrote the optimizer and RNG states, and no copy of the frozen base.
    files = {path.name for path in (tmp_path / "checkpoint-12").iterdir()}
    assert files == {"trainable_parameters.safetensors", "optimizer.bin", "scheduler.pt",
                     "random_states_0.pkl", "trainer_state.json"}  # fmt: skip
    optimizer_state = read_checkpoint(tmp_path / "checkpoint-12").optimizer["state"]
    assert sorted(state["exp_avg"].numel() for state in optimizer_state.values()) == sorted(
        t.numel() for t in saved.values()
    )
    for name, tensor in model.base_model.named_parameters():
        assert torch.equal(tensor, base_before[name]), name


def test_gradient_checkpointing_gives_the_same_gradients(t5_model, tokenizer):
    from dept.trainer import enable_gradient_checkpointing
    from tests.conftest import attach

    dept_model = attach("t5", t5_model, tokenizer)
    dept_model.train()
    batch = tokenizer(["the movie was great", "a dull film"], return_tensors="pt", padding=True)
    labels = tokenizer(["1", "0"], return_tensors="pt").input_ids

    def gradients():
        dept_model.zero_grad()
        dept_model(**batch, labels=labels).loss.backward()
        return [p.grad.clone() for p in dept_model.prompt_encoder.parameters()]

    plain = gradients()
    enable_gradient_checkpointing(dept_model)
    assert t5_model.is_gradient_checkpointing
    for with_checkpointing, without in zip(gradients(), plain):  # a recomputed forward: FLOAT32_PATHS
        torch.testing.assert_close(with_checkpointing, without, **float32_paths(without))


def test_on_evaluate_sees_every_evaluation_and_can_stop_the_run(tmp_path):
    class Stop(Exception):
        pass

    seen = []

    def on_evaluate(step, metrics):
        seen.append((step, metrics["eval_loss"]))
        if step == 8:
            raise Stop

    trainer = toy_trainer(toy_args(tmp_path, save_total_limit=None), on_evaluate=on_evaluate)
    with pytest.raises(Stop):
        trainer.train()
    logged = [(entry["step"], entry["eval_loss"]) for entry in trainer.state.log_history if "eval_loss" in entry]
    assert seen == logged and [step for step, _ in seen] == [4, 8]
    # Stopped before anything else happened at step 8: the run resumes from its last checkpoint.
    assert [path.name for path in complete_checkpoints(tmp_path)] == ["checkpoint-4"]
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_logged_loss_is_the_mean_over_the_micro_batches_of_the_steps_since_the_last_log(tmp_path):
    model = LossRecordingModel()
    args = toy_args(tmp_path, max_steps=12, gradient_accumulation_steps=2, logging_steps=3, eval_strategy="no",
                    save_strategy="no", load_best_model_at_end=False)  # fmt: skip
    metrics = toy_trainer(args, model).train()

    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history] == [3, 6, 9, 12]
    assert len(model.losses) == 24
    expected = expected_log_losses([model.losses], accumulation=2, logging_steps=3)
    assert [entry["loss"] for entry in history] == pytest.approx(expected, rel=1e-12)
    assert metrics["train_loss"] == pytest.approx(sum(expected) / len(expected), rel=1e-12)


HOST_SYNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
              torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu}  # fmt: skip


class SyncRecordingTensor(torch.Tensor):
    """A loss that notes, by the trainer's global step, every read of itself or of a tensor computed from it that
    needs the host (on a GPU each is a device sync)."""

    reads: list[tuple[str, int]] = []
    clock = staticmethod(lambda: -1)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in HOST_SYNCS:
            cls.reads.append((func.__name__, cls.clock()))
        return super().__torch_function__(func, types, args, kwargs or {})


class SyncRecordingModel(ToyAdapterModel):
    def forward(self, features, labels=None):
        output = super().forward(features, labels)
        if self.training:
            output.loss = output.loss.as_subclass(SyncRecordingTensor)
        return output


@pytest.mark.parametrize("skip_nan_steps", [False, True])
def test_the_loss_reaches_the_host_only_when_logged(tmp_path, skip_nan_steps):
    args = toy_args(tmp_path, max_steps=12, gradient_accumulation_steps=2, logging_steps=4, eval_strategy="no",
                    save_strategy="no", load_best_model_at_end=False, skip_nan_steps=skip_nan_steps)  # fmt: skip
    trainer = toy_trainer(args, SyncRecordingModel())
    collectives = []
    for name in ("gather", "reduce"):
        original = getattr(trainer.accelerator, name)
        setattr(trainer.accelerator, name, lambda *a, _name=name, _original=original, **k: (
            collectives.append((_name, trainer.state.global_step)), _original(*a, **k))[1])  # fmt: skip
    SyncRecordingTensor.reads, SyncRecordingTensor.clock = [], lambda: trainer.state.global_step
    trainer.train()

    if not skip_nan_steps:  # one gather and one host read per log entry, none in the 24 micro-batches between
        assert collectives == [("gather", 4), ("gather", 8), ("gather", 12)]
        assert SyncRecordingTensor.reads == [("tolist", 4), ("tolist", 8), ("tolist", 12)]
    else:  # deciding on each step before it is taken: one reduce and one read per optimizer step, not per batch
        steps = list(range(1, 13))
        assert [step for name, step in collectives if name == "reduce"] == steps
        assert [step for name, step in SyncRecordingTensor.reads if name == "item"] == steps
        assert [step for name, step in collectives if name == "gather"] == [4, 8, 12]


@pytest.mark.parametrize(("left_behind", "asked", "launcher", "expected"), [
    ("bf16", None, None, "no"),  # transformers' Trainer with bf16=True ran earlier in this process
    ("bf16", None, "bf16", "bf16"),  # `accelerate launch --mixed_precision bf16`
    ("no", "bf16", None, "bf16"),
])
def test_the_precision_is_the_one_asked_for_not_one_left_by_an_earlier_run(tmp_path, monkeypatch, left_behind, asked,
                                                                            launcher, expected):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    Accelerator(cpu=True, mixed_precision=left_behind)
    if launcher is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    trainer = toy_trainer(toy_args(tmp_path, mixed_precision=asked))
    assert trainer.accelerator.mixed_precision == expected
    trainer.train()  # and the loop runs in it
    assert trainer.accelerator.mixed_precision == expected
