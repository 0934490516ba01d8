"""The eval caches (the scaling * A @ B table and the prompt's KV cache) never serve stale values: after fused and
foreach optimizer steps, loads, and adapters removed and added again under one name, outputs equal those of a
model built afresh from the same weights."""

import copy

import pytest
import torch

from dept import DePTConfig, DePTModel, MultiAdapterModel
from tests.conftest import attach, dept_forward, float32_paths
from tests.dept.conftest import tokenize

TEXTS = ["the movie was great", "a dull and boring film with terrible acting and actors", "red circle"]
OPTIMIZERS = {"fused": dict(fused=True), "foreach": dict(foreach=True)}


def fresh_copy(dept_model: DePTModel) -> DePTModel:
    """The same base and adapter weights in a new model, which has computed nothing yet."""
    config = DePTConfig.from_dict(dept_model.config.to_dict())
    twin = type(dept_model)(copy.deepcopy(dept_model.base_model), config, initialize=False)
    twin.load_adapter_state_dict(dept_model.adapter_state_dict())
    return twin.eval()


def eval_outputs(kind, dept_model, batch, **kwargs):
    """Eval-mode logits (under no_grad) at the prompt and the real tokens (a decoder's pads hold no meaning),
    through the prompt cache unless `use_prompt_cache=False` is passed."""
    with torch.no_grad():
        if kind == "t5":
            return dept_forward(kind, dept_model, batch)
        return dept_model(**batch, **kwargs).logits[dept_model.embed(**batch)[1].bool()]


def train_step(kind, dept_model, batch, optimizer):
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    extra = {"decoder_input_ids": torch.zeros(len(labels), 2, dtype=torch.long)} if kind == "t5" else {}
    dept_model(**batch, **extra, labels=labels[:, :2].contiguous() if kind == "t5" else labels).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def adamw(dept_model, options):
    return torch.optim.AdamW(dept_model.optimizer_param_groups(learning_rate=0.3, lora_embedding_lr=0.05),
                             **options)


PATHS = [("t5", {}), ("llama", {}), ("llama", {"use_prompt_cache": False})]


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("kind,path", PATHS, ids=["t5", "llama-cached", "llama-uncached"])
def test_eval_after_an_optimizer_step_sees_the_new_weights(kind, path, optimizer, request, tokenizer):
    """A fused or foreach AdamW step does not bump the tensors' version counters."""
    dept_model = attach(kind, request.getfixturevalue(f"{kind}_model"), tokenizer)
    batch = tokenize(tokenizer, TEXTS, "left" if kind == "llama" else "right")
    before = eval_outputs(kind, dept_model.eval(), batch, **path)  # fills the caches
    dept_model.train()
    train_step(kind, dept_model, batch, adamw(dept_model, OPTIMIZERS[optimizer]))
    after = eval_outputs(kind, dept_model.eval(), batch, **path)
    assert not torch.allclose(after, before, atol=1e-3)
    expected = eval_outputs(kind, fresh_copy(dept_model), batch, **path)
    torch.testing.assert_close(after, expected, **float32_paths(expected))


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("kind,path", PATHS, ids=["t5", "llama-cached", "llama-uncached"])
def test_training_in_eval_mode_is_seen_by_the_next_no_grad_call(kind, path, optimizer, request, tokenizer):
    """Dropout-free training in eval mode: a forward that builds a graph through P, A and B drops the caches."""
    dept_model = attach(kind, request.getfixturevalue(f"{kind}_model"), tokenizer).eval()
    batch = tokenize(tokenizer, TEXTS, "left" if kind == "llama" else "right")
    before = eval_outputs(kind, dept_model, batch, **path)
    train_step(kind, dept_model, batch, adamw(dept_model, OPTIMIZERS[optimizer]))
    after = eval_outputs(kind, dept_model, batch, **path)
    assert not torch.allclose(after, before, atol=1e-3)
    expected = eval_outputs(kind, fresh_copy(dept_model), batch, **path)
    torch.testing.assert_close(after, expected, **float32_paths(expected))


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("kind,path", PATHS, ids=["t5", "llama-cached", "llama-uncached"])
def test_load_state_dict_of_other_weights_is_seen(kind, path, assign, request, tokenizer):
    model = request.getfixturevalue(f"{kind}_model")
    other = attach(kind, copy.deepcopy(model), tokenizer, prompt_init="vocab", init_seed=7)
    with torch.no_grad():
        other.prompt_encoder.lora_embedding_A.normal_(generator=torch.Generator().manual_seed(3))
    dept_model = attach(kind, model, tokenizer).eval()
    batch = tokenize(tokenizer, TEXTS, "left" if kind == "llama" else "right")
    before = eval_outputs(kind, dept_model, batch, **path)
    dept_model.load_state_dict({key: value.clone() for key, value in other.state_dict().items()}, assign=assign)
    after = eval_outputs(kind, dept_model, batch, **path)
    assert not torch.allclose(after, before, atol=1e-3)
    expected = eval_outputs(kind, fresh_copy(other), batch, **path)
    torch.testing.assert_close(after, expected, **float32_paths(expected))


@pytest.mark.parametrize("beside", [False, True], ids=["alone", "beside-another"])
def test_thirty_remove_and_readd_cycles_under_one_name_serve_the_new_adapter(llama_model, tokenizer, tmp_path, beside):
    """Adapters of one shape, so that each new bank can land where the removed one was."""
    paths = {}
    for seed in range(3):
        adapter = attach("llama", copy.deepcopy(llama_model), tokenizer, prompt_init="vocab", init_seed=seed)
        with torch.no_grad():
            adapter.prompt_encoder.lora_embedding_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
        paths[seed] = adapter.save_pretrained(tmp_path / f"adapter{seed}")
    batch = tokenize(tokenizer, TEXTS, "left")
    expected = {seed: eval_outputs("llama", DePTModel.from_pretrained(copy.deepcopy(llama_model), path), batch,
                                   use_prompt_cache=False) for seed, path in paths.items()}
    multi = MultiAdapterModel(llama_model, {"other": paths[2]} if beside else {})
    stale = []
    for cycle in range(30):
        seed = cycle % 2
        multi.add_adapter("task", paths[seed])
        with torch.no_grad():
            logits = multi(**batch, adapter_names="task").logits
        real = logits[multi.embed("task", **batch)[1].bool()]
        if not torch.allclose(real, expected[seed], **float32_paths(expected[seed])):
            stale.append(cycle)
        multi.remove_adapter("task")
    assert stale == []


def test_an_in_place_edit_in_eval_mode_is_seen_after_invalidate_caches(llama_model, tokenizer):
    """The documented rule: outside train/eval switches, loads, casts, adapter changes and forwards that need
    gradients, an in-place edit of P, A or B is followed by `invalidate_caches()`."""
    dept_model = attach("llama", llama_model, tokenizer).eval()
    batch = tokenize(tokenizer, TEXTS, "left")
    before = eval_outputs("llama", dept_model, batch)
    with torch.no_grad():
        dept_model.prompt_encoder.prompt_embeddings.mul_(-1.0)
        dept_model.prompt_encoder.lora_embedding_B.mul_(2.0)
    dept_model.invalidate_caches()
    after = eval_outputs("llama", dept_model, batch)
    assert not torch.allclose(after, before, atol=1e-3)
    expected = eval_outputs("llama", fresh_copy(dept_model), batch)
    torch.testing.assert_close(after, expected, **float32_paths(expected))


def test_no_grad_calls_in_train_mode_never_use_a_cache(t5_model, tokenizer):
    """Evaluation under torch.no_grad() without .eval(): every call computes A @ B from the current weights."""
    dept_model = attach("t5", t5_model, tokenizer).train()
    batch = tokenize(tokenizer, TEXTS)
    with torch.no_grad():
        before = dept_forward("t5", dept_model, batch)
        dept_model.prompt_encoder.lora_embedding_B.mul_(-1.0)
        after = dept_forward("t5", dept_model, batch)
    assert not torch.allclose(after, before, atol=1e-3)
    expected = eval_outputs("t5", fresh_copy(dept_model), batch)
    torch.testing.assert_close(after, expected, **float32_paths(expected))
