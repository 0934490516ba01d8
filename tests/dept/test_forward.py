"""The forward pass is exactly the formula, for each model kind, and does not depend on padding."""

import pytest
import torch

from dept import DePTConfig, DePTEmbedding, InputTooLongError, get_dept_model
from tests.conftest import (
    T5_TOKENIZER_DIR,
    TASK_TYPES,
    attach,
    base_forward,
    dept_forward,
    float32_paths,
    tiny_t5_config,
)
from tests.dept.conftest import hand_computed_logits, paper_scaling

TEXTS = ["the movie was great", "a dull and boring film with terrible acting and actors", "red circle"]


def test_forward_matches_the_formula(any_model, tokenizer):
    kind, model = any_model
    dept_model = attach(kind, model, tokenizer)
    batch = tokenizer(TEXTS[1:2], return_tensors="pt")
    with torch.no_grad():
        expected = hand_computed_logits(kind, dept_model, batch["input_ids"])
        actual = dept_forward(kind, dept_model, batch)
    torch.testing.assert_close(actual, expected, **float32_paths(expected))


def test_at_initialisation_dept_equals_prompt_tuning(any_model, tokenizer):
    kind, model = any_model
    dept_model = get_dept_model(model, DePTConfig(num_virtual_tokens=5, r=3, max_length=24,
                                                  task_type=TASK_TYPES[kind]), tokenizer=tokenizer)
    assert torch.count_nonzero(dept_model.prompt_encoder.lora_embedding_B) == 0
    batch = tokenizer(TEXTS[:1], return_tensors="pt")
    P = dept_model.prompt_encoder.prompt_embeddings
    E = model.get_input_embeddings().weight[batch["input_ids"][0]]
    with torch.no_grad():
        prompt_tuning = base_forward(kind, model, torch.cat([P, E])[None], torch.ones(1, 5 + E.shape[0]).long(),
                                     torch.arange(5 + E.shape[0])[None])
        torch.testing.assert_close(dept_forward(kind, dept_model, batch), prompt_tuning, **float32_paths(prompt_tuning))


def test_lora_A_starts_kaiming_uniform_and_B_at_zero():
    layer = DePTEmbedding(DePTConfig(num_virtual_tokens=2, r=16, max_length=512, prompt_init="random"), 8)
    A = layer.lora_embedding_A
    assert A.abs().max() <= 1 / 16**0.5 and A.abs().max() > 0.9 / 16**0.5  # U(-1/sqrt(r), 1/sqrt(r)) fills it
    assert torch.count_nonzero(layer.lora_embedding_B) == 0


def test_text_init_tiles_the_init_text_with_its_special_tokens(t5_model, tokenizer):
    dept_model = get_dept_model(t5_model, DePTConfig(num_virtual_tokens=12, r=2, max_length=24), tokenizer=tokenizer)
    ids = tokenizer(dept_model.config.prompt_init_text)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id  # the official code keeps the closing </s>
    expected = t5_model.get_input_embeddings().weight[(ids * 3)[:12]]
    torch.testing.assert_close(dept_model.prompt_encoder.prompt_embeddings, expected, atol=0, rtol=0)


# The official init (peft/tuners/prompt_tuning_lora.py) embeds tokenizer(init_text)["input_ids"] of the real t5-base
# tokenizer, "Classify this text is postive or not:" -> these 11 ids, ending in </s> (1), tiled to m.
OFFICIAL_T5_INIT_IDS = [4501, 4921, 48, 1499, 19, 442, 757, 42, 59, 10, 1]


@pytest.mark.skipif(not T5_TOKENIZER_DIR.is_dir(), reason="../shared/reference is absent")
def test_text_init_of_t5_is_the_official_tiled_ids():
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    real = AutoTokenizer.from_pretrained(T5_TOKENIZER_DIR)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(tiny_t5_config(len(real), d_model=8))
    dept_model = get_dept_model(model, DePTConfig(num_virtual_tokens=25, r=2, max_length=16), tokenizer=real)
    expected = model.get_input_embeddings().weight[(OFFICIAL_T5_INIT_IDS * 3)[:25]]
    torch.testing.assert_close(dept_model.prompt_encoder.prompt_embeddings, expected, atol=0, rtol=0)


def _logits_per_row(kind, dept_model, tokenizer, texts, side):
    tokenizer.padding_side = side
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
    logits = dept_forward(kind, dept_model, batch)
    if kind == "llama":  # keep the positions of real tokens only
        keep = dept_model.insert_prompt(batch["attention_mask"], batch["attention_mask"], 1).bool()
        return [row[mask] for row, mask in zip(logits, keep)]
    return list(logits)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_does_not_change_logits(any_model, tokenizer, side):
    kind, model = any_model
    dept_model = attach(kind, model, tokenizer)
    with torch.no_grad():
        alone = _logits_per_row(kind, dept_model, tokenizer, TEXTS[:1], side)[0]
        padded = _logits_per_row(kind, dept_model, tokenizer, TEXTS, side)[0]
    torch.testing.assert_close(padded, alone, **float32_paths(alone))


def test_input_longer_than_max_length_names_max_length(t5_model, tokenizer):
    dept_model = attach("t5", t5_model, tokenizer, max_length=4)
    batch = tokenizer(TEXTS[1:2], return_tensors="pt")
    with pytest.raises(InputTooLongError, match="max_length is 4"):
        dept_forward("t5", dept_model, batch)


def test_eval_cache_is_computed_once_and_never_stale(t5_model, tokenizer):
    dept_model = attach("t5", t5_model, tokenizer)
    dept_model.requires_grad_(False)
    dept_model.eval()
    encoder = dept_model.prompt_encoder
    with torch.no_grad():
        first = encoder.embedding_update()
        assert encoder.embedding_update().data_ptr() == first.data_ptr()  # cached, not recomputed
        encoder.lora_embedding_B.add_(1.0)  # an update in place in eval mode, outside any forward ...
        dept_model.invalidate_caches()  # ... is announced, as the caching rule says
        after_update = encoder.embedding_update()
        expected = paper_scaling(dept_model.config) * encoder.lora_embedding_A @ encoder.lora_embedding_B
        torch.testing.assert_close(after_update, expected, **float32_paths(expected))
        dept_model.load_adapter_state_dict({"lora_embedding_B": torch.zeros_like(encoder.lora_embedding_B)})
        assert torch.count_nonzero(encoder.embedding_update()) == 0


def test_a_classifier_without_a_prompt_does_not_depend_on_left_padding(bert_model, tokenizer):
    """With m = 0 the pooler's position 0 must hold the first real token, not a pad, whatever the padding side."""
    dept_model = attach("bert", bert_model, tokenizer, num_virtual_tokens=0)
    with torch.no_grad():
        alone = _logits_per_row("bert", dept_model, tokenizer, TEXTS[:1], "left")[0]
        padded = _logits_per_row("bert", dept_model, tokenizer, TEXTS, "left")[0]
    torch.testing.assert_close(padded, alone, **float32_paths(alone))
