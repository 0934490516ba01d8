"""With r = 0, DePT is vanilla prompt tuning: it must agree with HF PEFT's PromptTuningConfig."""

import pytest
import torch

from dept import DePTConfig, get_dept_model
from tests.conftest import float32_paths

peft = pytest.importorskip("peft")

TEXTS = ["the movie was great", "a dull and boring film with terrible acting"]


def _pair(kind, model, tokenizer, m=6):
    dept_model = get_dept_model(model, DePTConfig(num_virtual_tokens=m, r=0, max_length=32, prompt_init="vocab",
                                                  task_type="seq2seq" if kind == "t5" else "causal"))
    peft_config = peft.PromptTuningConfig(
        task_type="SEQ_2_SEQ_LM" if kind == "t5" else "CAUSAL_LM", num_virtual_tokens=m,
        num_transformer_submodules=1,
    )
    peft_model = peft.get_peft_model(model, peft_config)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(dept_model.prompt_encoder.prompt_embeddings)
    peft_model.eval()
    return dept_model, peft_model


def test_t5_logits_and_greedy_generation_match_peft_prompt_tuning(t5_model, tokenizer):
    dept_model, peft_model = _pair("t5", t5_model, tokenizer)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    labels = tokenizer(["1", "0"], return_tensors="pt").input_ids
    with torch.no_grad():
        ours = dept_model(**batch, labels=labels)
        theirs = peft_model(**batch, labels=labels)
        torch.testing.assert_close(ours.logits, theirs.logits, **float32_paths(theirs.logits))
        torch.testing.assert_close(ours.loss, theirs.loss, **float32_paths(theirs.loss))
        ours_tokens = dept_model.generate(**batch, max_new_tokens=6, do_sample=False)
        theirs_tokens = peft_model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours_tokens, theirs_tokens)


def _kind(causal_model) -> str:
    return causal_model.config.model_type


def test_decoder_only_logits_and_greedy_generation_match_peft_prompt_tuning(causal_model, tokenizer):
    """LLaMA (RoPE) and GPT-2 (learned absolute positions)."""
    dept_model, peft_model = _pair(_kind(causal_model), causal_model, tokenizer)
    batch = tokenizer(TEXTS[1:], return_tensors="pt")  # PEFT does not handle padding positions; one row
    with torch.no_grad():
        ours = dept_model(**batch, labels=batch["input_ids"])
        theirs = peft_model(**batch, labels=batch["input_ids"])
        torch.testing.assert_close(ours.logits, theirs.logits, **float32_paths(theirs.logits))
        torch.testing.assert_close(ours.loss, theirs.loss, **float32_paths(theirs.loss))
        ours_tokens = dept_model.generate(**batch, max_new_tokens=6, do_sample=False)
        new_tokens = dept_model.generate(**batch, max_new_tokens=6, do_sample=False, new_tokens_only=True)
        # PEFT 0.21's cached prompt-tuning generation under transformers 5 disagrees with its own uncached
        # generation after a few tokens; the uncached one recomputes everything, so it is the reference.
        theirs_tokens = peft_model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=False)
    # Both return the input ids followed by the new tokens, as transformers does.
    assert torch.equal(ours_tokens, theirs_tokens)
    assert torch.equal(new_tokens, theirs_tokens[:, batch["input_ids"].shape[1]:])


def test_decoder_only_cached_eval_logits_match_peft_prompt_tuning(causal_model, tokenizer):
    """In eval mode under no_grad DePT's forward takes the prompt KV cache (P's logits cached, the tokens' computed
    after it): its (1, m + s, vocab) logits and loss are still PEFT's, position by position."""
    dept_model, peft_model = _pair(_kind(causal_model), causal_model, tokenizer)
    dept_model.eval()
    batch = tokenizer(TEXTS[1:], return_tensors="pt")  # PEFT does not handle padding positions; one row
    with torch.no_grad():
        dept_model.prompt_states()  # computed once; the forward below only reads it
        calls = []
        handle = dept_model.base_model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(
            kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
        try:
            ours = dept_model(**batch, labels=batch["input_ids"])
        finally:
            handle.remove()
        theirs = peft_model(**batch, labels=batch["input_ids"])
    assert calls == [batch["input_ids"].shape[1]]  # the input alone: P came from the cache
    assert ours.logits.shape == theirs.logits.shape
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=0)


def test_decoder_only_left_padded_generation_follows_peft_prompt_tuning_convention(causal_model, tokenizer):
    """PEFT does not count positions over real tokens, so its padded rows differ; the convention it shares with
    transformers must still hold: the left-padded input ids, then each row's new tokens (here: as PEFT gives
    them for the row alone)."""
    dept_model, peft_model = _pair(_kind(causal_model), causal_model, tokenizer)
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
    with torch.no_grad():
        ours = dept_model.generate(**batch, max_new_tokens=6, do_sample=False)
        for row, text in enumerate(TEXTS):
            alone = tokenizer([text], return_tensors="pt")
            theirs = peft_model.generate(**alone, max_new_tokens=6, do_sample=False, use_cache=False)
            assert torch.equal(ours[row, batch["input_ids"].shape[1]:], theirs[0, alone["input_ids"].shape[1]:])
    assert torch.equal(ours[:, :batch["input_ids"].shape[1]], batch["input_ids"])
