"""generate: the KV cache carries the prompt; padding and caching do not change the tokens."""

import pytest
import torch

from tests.conftest import attach

TEXTS = ["the movie was great", "a dull and boring film with terrible acting and actors", "red"]


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_generate_with_kv_cache_equals_without(kind, request, tokenizer):
    model = request.getfixturevalue(f"{kind}_model")
    dept_model = attach(kind, model, tokenizer)
    tokenizer.padding_side = "left" if kind == "llama" else "right"
    try:
        batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
    options = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8)
    cached = dept_model.generate(**batch, use_cache=True, **options)
    uncached = dept_model.generate(**batch, use_cache=False, **options)
    assert cached.shape[1] >= 8
    assert torch.equal(cached, uncached)


def test_decoder_only_generation_does_not_depend_on_padding(llama_model, tokenizer):
    dept_model = attach("llama", llama_model, tokenizer)
    tokenizer.padding_side = "left"
    try:
        alone = dept_model.generate(**tokenizer(TEXTS[2:], return_tensors="pt"), max_new_tokens=6,
                                    min_new_tokens=6, do_sample=False, new_tokens_only=True)
        batched = dept_model.generate(**tokenizer(TEXTS, return_tensors="pt", padding=True), max_new_tokens=6,
                                      min_new_tokens=6, do_sample=False, new_tokens_only=True)
    finally:
        tokenizer.padding_side = "right"
    assert torch.equal(batched[2], alone[0])


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("side", ["left", "right"])
def test_decoder_only_generate_returns_the_input_then_the_new_tokens(causal_model, tokenizer, side, use_cache):
    """transformers' convention: `out[:, input_ids.shape[1]:]` is the answer; embeddings alone give the new tokens."""
    kind = "gpt2" if causal_model.config.model_type == "gpt2" else "llama"
    dept_model = attach(kind, causal_model, tokenizer).eval()
    tokenizer.padding_side = side
    try:
        batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
    options = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=use_cache)
    output = dept_model.generate(**batch, **options)
    new_tokens = dept_model.generate(**batch, new_tokens_only=True, **options)
    from_embeddings = dept_model.generate(inputs_embeds=dept_model.word_embeddings(batch["input_ids"]),
                                          attention_mask=batch["attention_mask"], **options)
    length = batch["input_ids"].shape[1]
    assert output.shape == (len(TEXTS), length + 5)
    assert torch.equal(output[:, :length], batch["input_ids"])
    assert torch.equal(output[:, length:], new_tokens)
    assert torch.equal(from_embeddings, new_tokens)


def test_beams_and_returned_sequences_each_start_with_their_input(llama_model, tokenizer):
    dept_model = attach("llama", llama_model, tokenizer).eval()
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(TEXTS[:2], return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
    options = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, num_beams=3, num_return_sequences=2)
    output = dept_model.generate(**batch, return_dict_in_generate=True, **options)
    new_tokens = dept_model.generate(**batch, new_tokens_only=True, **options)
    length = batch["input_ids"].shape[1]
    assert torch.equal(output.sequences[:, :length], batch["input_ids"].repeat_interleave(2, dim=0))
    assert torch.equal(output.sequences[:, length:], new_tokens)


def test_uncached_generation_refuses_sampling(llama_model, tokenizer):
    dept_model = attach("llama", llama_model, tokenizer)
    with pytest.raises(ValueError, match="greedy decoding only"):
        dept_model.generate(**tokenizer(TEXTS[:1], return_tensors="pt"), use_cache=False, do_sample=True)
