"""m + s beyond the base model's position limit is refused before anything is built (issue 21: a prefix of 10000
tokens was accepted and one step went past 8 GB)."""

import pytest
import torch
from transformers import BertForSequenceClassification, GPT2LMHeadModel, LlamaForCausalLM

from dept import ConfigError, DePTConfig, MultiAdapterModel, get_dept_model
from tests.conftest import TASK_TYPES, attach, tiny_bert_config, tiny_gpt2_config, tiny_llama_config

LIMIT = 64
BUILDERS = {
    "llama": lambda vocab: LlamaForCausalLM(tiny_llama_config(vocab, max_position_embeddings=LIMIT)),
    "gpt2": lambda vocab: GPT2LMHeadModel(tiny_gpt2_config(vocab, n_positions=LIMIT)),
    "bert": lambda vocab: BertForSequenceClassification(tiny_bert_config(vocab, max_position_embeddings=LIMIT)),
}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_a_prompt_and_input_beyond_the_position_limit_are_refused_naming_the_limit_and_the_flags(kind, tokenizer):
    model = BUILDERS[kind](len(tokenizer))
    config = DePTConfig(num_virtual_tokens=10000, r=2, max_length=32, prompt_init="random", task_type=TASK_TYPES[kind])
    with pytest.raises(ConfigError, match=r"10000 \+ 32 = 10032 exceeds the 64 positions.*--prefix_length.*"
                                          r"--max_seq_length.*at most 64"):
        get_dept_model(model, config)
    assert all(p.requires_grad for p in model.parameters())  # refused before the base was frozen


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_a_prompt_and_input_that_fill_the_positions_exactly_are_accepted(kind, tokenizer):
    model = BUILDERS[kind](len(tokenizer))
    config = DePTConfig(num_virtual_tokens=LIMIT - 40, r=2, max_length=40, prompt_init="random",
                        task_type=TASK_TYPES[kind])
    dept_model = get_dept_model(model, config)
    batch = {"input_ids": torch.full((1, 40), 5), "attention_mask": torch.ones(1, 40, dtype=torch.long)}
    with torch.no_grad():
        assert dept_model(**batch).logits.shape[0] == 1  # every position has its embedding


def test_relative_positions_have_no_limit(t5_model):
    config = DePTConfig(num_virtual_tokens=10000, r=2, max_length=256, prompt_init="random")
    assert get_dept_model(t5_model, config).prompt_encoder.prompt_embeddings.shape == (10000, 32)


def test_a_served_adapter_beyond_the_limit_is_refused_on_load(tokenizer, tmp_path, llama_model):
    attach("llama", llama_model, tokenizer, num_virtual_tokens=30, max_length=40).save_pretrained(tmp_path / "a")
    multi = MultiAdapterModel(BUILDERS["llama"](len(tokenizer)))
    with pytest.raises(ConfigError, match="30 \\+ 40 = 70 exceeds the 64 positions"):
        multi.add_adapter("a", tmp_path / "a")
    assert multi.list_adapters() == []
