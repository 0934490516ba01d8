"""generate: the KV cache carries the prompt; padding and caching do not change the tokens."""

import pytest
import torch

from tests.dept.helpers import attach

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
                                    min_new_tokens=6, do_sample=False)
        batched = dept_model.generate(**tokenizer(TEXTS, return_tensors="pt", padding=True), max_new_tokens=6,
                                      min_new_tokens=6, do_sample=False)
    finally:
        tokenizer.padding_side = "right"
    assert torch.equal(batched[2], alone[0])


def test_uncached_generation_refuses_sampling(llama_model, tokenizer):
    dept_model = attach("llama", llama_model, tokenizer)
    with pytest.raises(ValueError, match="greedy decoding only"):
        dept_model.generate(**tokenizer(TEXTS[:1], return_tensors="pt"), use_cache=False, do_sample=True)
