"""AdamW parameter groups and the shared warmup/decay schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dept.optim import build_optimizer, build_scheduler, learning_rates, parameter_groups
from tests.dept._toy import ToyAdapterModel, make_dataset, toy_args


def test_each_group_gets_its_own_learning_rate(tmp_path):
    model = ToyAdapterModel()
    optimizer = build_optimizer(model, toy_args(tmp_path, learning_rate=0.3, lora_embedding_lr=1e-4))
    assert learning_rates(optimizer) == {"prompt": 0.3, "lora_embedding": 1e-4}
    by_name = {group["name"]: {id(p) for p in group["params"]} for group in optimizer.param_groups}
    assert by_name["prompt"] == {id(model.prompt)}
    assert by_name["lora_embedding"] == {id(model.lora_embedding_A), id(model.lora_embedding_B)}


def test_first_adamw_step_moves_each_group_by_its_own_learning_rate(tmp_path):
    # Adam's first update is lr * g / (|g| + eps): each weight with a gradient moves by almost exactly lr.
    model = ToyAdapterModel(dropout=0.0)
    with torch.no_grad():
        model.lora_embedding_B.normal_(generator=torch.Generator().manual_seed(0))  # so A gets a gradient too
    optimizer = build_optimizer(model, toy_args(tmp_path, learning_rate=0.3, lora_embedding_lr=1e-3))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    examples = make_dataset(8)
    features = torch.stack([ex["features"] for ex in examples])
    labels = torch.tensor([ex["label"] for ex in examples])
    model(features=features, labels=labels).loss.backward()
    optimizer.step()

    expected = {"prompt": 0.3, "lora_embedding_A": 1e-3, "lora_embedding_B": 1e-3}
    for name, lr in expected.items():
        step = (getattr(model, name).detach() - before[name]).abs()
        torch.testing.assert_close(step, torch.full_like(step, lr), rtol=1e-4, atol=0)
    assert torch.equal(model.base.weight, before["base.weight"])


def test_model_without_groups_trains_every_trainable_parameter_at_learning_rate(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    groups = parameter_groups(model, toy_args(tmp_path, learning_rate=0.01))
    assert len(groups) == 1
    assert groups[0]["lr"] == 0.01
    assert {id(p) for p in groups[0]["params"]} == {id(model[1].weight), id(model[1].bias)}


def test_model_with_nothing_trainable_is_refused(tmp_path):
    model = nn.Linear(4, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        build_optimizer(model, toy_args(tmp_path))


def test_groups_that_leave_a_trainable_parameter_out_are_refused(tmp_path):
    class Forgetful(ToyAdapterModel):
        def optimizer_param_groups(self, learning_rate, lora_embedding_lr, weight_decay=0.0):
            return [{"name": "prompt", "params": [self.prompt], "lr": learning_rate}]

    with pytest.raises(ValueError, match="lora_embedding_A"):
        build_optimizer(Forgetful(), toy_args(tmp_path))


def test_linear_schedule_warms_up_then_decays_to_zero_in_every_group(tmp_path):
    args = toy_args(tmp_path, learning_rate=0.3, lora_embedding_lr=1e-3, warmup_steps=2)
    optimizer = build_optimizer(ToyAdapterModel(), args)
    scheduler = build_scheduler(optimizer, args, num_training_steps=10)
    factors = []
    for _ in range(11):
        rates = learning_rates(optimizer)
        factors.append(rates["prompt"] / 0.3)
        assert rates["lora_embedding"] == pytest.approx(factors[-1] * 1e-3, rel=1e-12, abs=1e-15)
        optimizer.step()
        scheduler.step()
    # warmup 0 -> 1 over 2 steps, then (10 - step) / 8 down to 0
    expected = [0.0, 0.5, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0.0]
    assert factors == pytest.approx(expected, abs=1e-12)
