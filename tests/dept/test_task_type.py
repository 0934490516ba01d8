"""One detector of the model kind, `task_type`: a model and its config, before any weights load, give the same
answer, and nothing about the name is used."""

from __future__ import annotations

import pytest
import torch
from transformers import BertForMaskedLM, GPT2LMHeadModel, GPT2Model, T5EncoderModel

from dept.config import ConfigError, infer_task_type
from dept.model import infer_task_type as model_infer_task_type
from tests.conftest import TASK_TYPES, tiny_bert_config, tiny_gpt2_config, tiny_llama_config, tiny_t5_config

CONFIGS = {"t5": tiny_t5_config, "llama": tiny_llama_config, "gpt2": tiny_gpt2_config, "bert": tiny_bert_config}


def test_a_model_and_its_config_have_the_same_task_type(any_model):
    kind, model = any_model
    assert infer_task_type(model) == infer_task_type(model.config) == TASK_TYPES[kind]
    assert model_infer_task_type is infer_task_type  # dept.model re-exports the one detector


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_a_config_alone_tells_the_task_type_by_its_architecture(kind):
    config = CONFIGS[kind](64)
    config.name_or_path = "some-t5-like-name"  # a misleading name changes nothing
    assert infer_task_type(config) == TASK_TYPES[kind]


def test_a_model_is_judged_by_its_head_not_only_by_its_config():
    torch.manual_seed(0)
    assert infer_task_type(GPT2LMHeadModel(tiny_gpt2_config(64))) == "causal"
    for headless in (GPT2Model(tiny_gpt2_config(64)), BertForMaskedLM(tiny_bert_config(64)),
                     T5EncoderModel(tiny_t5_config(64))):  # no head DePT knows where to put the prompt for
        with pytest.raises(ConfigError, match=rf"{type(headless).__name__}: DePT supports encoder-decoders"):
            infer_task_type(headless)


def test_a_config_of_no_supported_kind_is_refused_with_the_kinds_named():
    from transformers import ViTConfig

    with pytest.raises(ConfigError, match=r"model type 'vit'.*encoder-decoders.*decoder-only.*encoder classifiers"):
        infer_task_type(ViTConfig())
