"""Only the adapter trains, the base stays bit-identical, and each parameter group has its own learning rate."""

import torch

from tests.conftest import attach, dept_forward

TEXTS = ["the movie was great", "a dull and boring film"]


def _loss(kind, dept_model, tokenizer):
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    if kind == "t5":
        return dept_model(**batch, labels=tokenizer(["1", "0"], return_tensors="pt").input_ids).loss
    if kind == "llama":
        return dept_model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
    return dept_model(**batch, labels=torch.tensor([1, 0])).loss


def test_only_prompt_lora_and_head_get_gradients(any_model, tokenizer):
    kind, model = any_model
    dept_model = attach(kind, model, tokenizer)
    dept_model.train()
    _loss(kind, dept_model, tokenizer).backward()
    with_grad = {name for name, p in dept_model.named_parameters() if p.grad is not None}
    expected = {"prompt_encoder.prompt_embeddings", "prompt_encoder.lora_embedding_A",
                "prompt_encoder.lora_embedding_B"}
    if kind == "bert":
        expected |= {"base_model.classifier.weight", "base_model.classifier.bias"}
    assert with_grad == expected


def test_base_weights_are_bit_identical_after_a_step(any_model, tokenizer):
    kind, model = any_model
    dept_model = attach(kind, model, tokenizer)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(dept_model.optimizer_param_groups(0.3, 1e-2))
    dept_model.train()
    _loss(kind, dept_model, tokenizer).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert len(frozen) == len([p for p in model.parameters() if not p.requires_grad]) > 10


def test_each_group_moves_at_its_own_learning_rate(t5_model, tokenizer):
    """AdamW's first step moves every parameter with a clear gradient by lr (m / sqrt(v) = sign(g))."""
    dept_model = attach("t5", t5_model, tokenizer)
    groups = dept_model.optimizer_param_groups(learning_rate=0.3, lora_embedding_lr=2e-3)
    assert [g["name"] for g in groups] == ["prompt", "lora_embedding"]
    optimizer = torch.optim.AdamW(groups, eps=1e-12, weight_decay=0.0)
    encoder = dept_model.prompt_encoder
    before = {name: p.detach().clone() for name, p in encoder.named_parameters()}
    dept_model.train()
    _loss("t5", dept_model, tokenizer).backward()
    optimizer.step()
    for name, lr in [("prompt_embeddings", 0.3), ("lora_embedding_A", 2e-3), ("lora_embedding_B", 2e-3)]:
        param = getattr(encoder, name)
        moved = (param.detach() - before[name]).abs()[param.grad.abs() > 1e-6]
        assert moved.numel() > 0
        torch.testing.assert_close(moved, torch.full_like(moved, lr), rtol=1e-3, atol=0)


def test_trainable_parameter_breakdown(bert_model, tokenizer):
    dept_model = attach("bert", bert_model, tokenizer, num_virtual_tokens=6, r=4, max_length=20)
    counts = dept_model.num_trainable_parameters()
    d = 32
    assert counts["prompt"] == 6 * d
    assert counts["lora_embedding"] == 20 * 4 + 4 * d
    assert counts["classifier"] == d * 2 + 2
    assert counts["total"] == counts["prompt"] + counts["lora_embedding"] + counts["classifier"]


def test_causal_labels_are_ignored_over_the_prompt(llama_model, tokenizer):
    dept_model = attach("llama", llama_model, tokenizer)
    batch = tokenizer(TEXTS[:1], return_tensors="pt")
    labels = batch["input_ids"]
    out = dept_model(**batch, labels=labels)
    logits = out.logits[0, dept_model.config.num_virtual_tokens - 1:-1]  # predictions of the real tokens
    expected = torch.nn.functional.cross_entropy(logits, labels[0])
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=0)  # float32 along two paths, a loss of ~4
    assert dept_forward("llama", dept_model, batch).shape[1] == dept_model.config.num_virtual_tokens + labels.shape[1]
