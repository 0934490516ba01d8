"""DePT with no prompt (num_virtual_tokens = 0, r > 0): A·B alone, a valid method on every model kind."""

import torch

from dept import DePTModel, MultiAdapterModel
from dept.optim import build_optimizer
from dept.training_args import TrainingArguments
from tests.conftest import attach, dept_forward, float32_paths
from tests.dept.conftest import hand_computed_logits

TEXTS = ["the movie was great", "a dull and boring film with terrible acting and actors", "red circle"]


def test_no_prompt_forward_is_the_frozen_model_on_the_updated_embeddings(any_model, tokenizer):
    kind, model = any_model
    dept_model = attach(kind, model, tokenizer, num_virtual_tokens=0)
    assert dept_model.prompt_encoder.prompt_embeddings.shape[0] == 0
    batch = tokenizer(TEXTS[1:2], return_tensors="pt")
    with torch.no_grad():
        expected = hand_computed_logits(kind, dept_model, batch["input_ids"])  # X = E + scaling * (A @ B)[:s]
        actual = dept_forward(kind, dept_model, batch)
    torch.testing.assert_close(actual, expected, **float32_paths(expected))


def test_no_prompt_trains_A_and_B_and_round_trips(any_model, tokenizer, tmp_path):
    kind, model = any_model
    dept_model = attach(kind, model, tokenizer, num_virtual_tokens=0)
    dept_model.train()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), learning_rate=0.3, lora_embedding_lr=0.1,
                             load_best_model_at_end=False)
    optimizer = build_optimizer(dept_model, args)
    assert [group["name"] for group in optimizer.param_groups][:1] == ["lora_embedding"]
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    before = dept_model.prompt_encoder.lora_embedding_A.detach().clone()
    dept_forward(kind, dept_model, batch).float().pow(2).mean().backward()
    optimizer.step()
    assert not torch.equal(dept_model.prompt_encoder.lora_embedding_A, before)

    dept_model.eval()
    dept_model.save_pretrained(tmp_path / "adapter")
    reloaded = DePTModel.from_pretrained(model, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(dept_forward(kind, reloaded, batch), dept_forward(kind, dept_model, batch),
                                   atol=1e-6, rtol=0)


def test_no_prompt_adapter_mixes_with_a_prompted_one_in_one_batch(any_model, tokenizer, tmp_path):
    kind, model = any_model
    attach(kind, model, tokenizer, num_virtual_tokens=0).save_pretrained(tmp_path / "none")
    attach(kind, model, tokenizer, num_virtual_tokens=5).save_pretrained(tmp_path / "five")
    batch = tokenizer(TEXTS[:2], return_tensors="pt", padding=True)
    extra = {"decoder_input_ids": torch.zeros(2, 3, dtype=torch.long)} if kind == "t5" else {}
    singles = {name: DePTModel.from_pretrained(model, tmp_path / name) for name in ("none", "five")}
    multi = MultiAdapterModel(model, {name: tmp_path / name for name in ("none", "five")})
    with torch.no_grad():
        mixed = multi(**batch, **extra, adapter_names=["none", "five"]).logits
        for row, name in enumerate(["none", "five"]):
            alone = singles[name](**batch, **extra).logits[row]
            if kind == "llama":  # the prompt is in front of the row's tokens: compare the token positions
                mixed_row, alone = mixed[row][-batch["input_ids"].shape[1]:], alone[-batch["input_ids"].shape[1]:]
            else:
                mixed_row = mixed[row]
            torch.testing.assert_close(mixed_row, alone, **float32_paths(alone))


def test_no_prompt_decoder_generates_the_same_with_and_without_the_prompt_cache(llama_model, tokenizer):
    dept_model = attach("llama", llama_model, tokenizer, num_virtual_tokens=0).eval()
    batch = tokenizer(TEXTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        cached = dept_model.generate(**batch, max_new_tokens=4, do_sample=False)
        dept_model.use_prompt_cache = False
        uncached = dept_model.generate(**batch, max_new_tokens=4, do_sample=False)
        logits = dept_model(**batch).logits
        dept_model.use_prompt_cache = True
        torch.testing.assert_close(dept_model(**batch).logits, logits, **float32_paths(logits))
    assert torch.equal(cached, uncached)
