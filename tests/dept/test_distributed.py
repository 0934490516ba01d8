"""Sharded parameters (DeepSpeed ZeRO-3, FSDP) as DePT meets them: prompt init from a ZeRO-3 shard of the
embedding table, `synced_gpus` in generate, whole adapter tensors from gathered parameters, FSDP wrapping."""

from __future__ import annotations

import contextlib
import copy
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.utils.dataclasses import get_module_class_from_name
from safetensors.torch import load_file

from dept import DePTConfig, get_dept_model

REPO_ROOT = Path(__file__).resolve().parents[2]
ACCELERATE_CONFIGS = REPO_ROOT / "configs" / "accelerate"


def shard_like_zero3(parameter: torch.nn.Parameter) -> torch.Tensor:
    """Make `parameter` look as ZeRO-3 leaves it on a rank: size 0, full shape in `ds_shape`. Returns the whole."""
    whole = parameter.data.clone()
    parameter.data = torch.empty(0, dtype=whole.dtype)
    parameter.ds_shape = whole.shape
    parameter.ds_whole = whole
    return whole


@contextlib.contextmanager
def fake_gathered_parameters(parameters, modifier_rank=None):
    """deepspeed.zero.GatheredParameters as it behaves: the shards are whole inside the block, size 0 after."""
    assert modifier_rank is None  # a read-only gather: no rank may write back
    for p in parameters:
        p.data = p.ds_whole
    try:
        yield
    finally:
        for p in parameters:
            p.data = torch.empty(0, dtype=p.ds_whole.dtype)


@pytest.fixture
def fake_deepspeed(monkeypatch):
    calls = []

    def gathered(parameters, modifier_rank=None):
        calls.append(len(parameters))
        return fake_gathered_parameters(parameters, modifier_rank)

    module = types.SimpleNamespace(zero=types.SimpleNamespace(GatheredParameters=gathered))
    monkeypatch.setitem(sys.modules, "deepspeed", module)
    return calls


@pytest.mark.parametrize("prompt_init", ["text", "vocab", "random"])
def test_prompt_init_from_a_zero3_shard_equals_the_init_from_the_whole_table(
    t5_model, tokenizer, fake_deepspeed, prompt_init
):
    config = DePTConfig(num_virtual_tokens=7, r=2, max_length=16, prompt_init=prompt_init)
    whole_model = get_dept_model(copy.deepcopy(t5_model), copy.deepcopy(config), tokenizer=tokenizer)

    table = t5_model.get_input_embeddings().weight
    whole = shard_like_zero3(table)
    sharded_model = get_dept_model(t5_model, config, tokenizer=tokenizer)

    assert fake_deepspeed == [1]  # the table was gathered once, for the init
    assert table.numel() == 0  # and is a shard again afterwards
    assert sharded_model.config.token_dim == whole.shape[1]
    expected = whole_model.prompt_encoder.prompt_embeddings
    torch.testing.assert_close(sharded_model.prompt_encoder.prompt_embeddings, expected, rtol=0, atol=0)
    if prompt_init == "text":  # the rows of the init text, tiled to 7 tokens
        ids = tokenizer(config.prompt_init_text)["input_ids"]  # with special tokens, as the official code
        torch.testing.assert_close(expected, whole[torch.tensor((ids * 7)[:7])], rtol=0, atol=0)


def test_without_the_gather_a_zero3_shard_gives_no_rows(t5_model, tokenizer):
    # What HF PEFT did before its PR 1591: reading rows of the size-0 shard directly.
    shard_like_zero3(t5_model.get_input_embeddings().weight)
    with pytest.raises(IndexError):
        t5_model.get_input_embeddings().weight[torch.tensor([1, 2])]


def pretend_two_ranks(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_generate_runs_synced_gpus_when_parameters_are_sharded_over_ranks(
    kind, t5_model, llama_model, tokenizer, monkeypatch
):
    from tests.conftest import attach

    model = attach(kind, t5_model if kind == "t5" else llama_model, tokenizer)
    seen = []

    def recording_generate(**kwargs):
        seen.append(kwargs.get("synced_gpus"))
        return torch.zeros(1, 1, dtype=torch.long)

    monkeypatch.setattr(model.base_model, "generate", recording_generate)
    batch = tokenizer(["the movie was great"], return_tensors="pt")
    model.generate(**batch, max_new_tokens=2)
    pretend_two_ranks(monkeypatch)
    model.generate(**batch, max_new_tokens=2)  # two ranks, nothing sharded: DDP needs no sync
    model.base_model.get_input_embeddings().weight.ds_shape = (len(tokenizer), 32)  # now a ZeRO-3 model
    model.generate(**batch, max_new_tokens=2)
    model.generate(**batch, max_new_tokens=2, synced_gpus=False)  # the caller's choice wins
    assert seen == [None, None, True, False]


def test_adapter_saved_from_gathered_tensors_equals_the_single_process_adapter(t5_model, tokenizer, tmp_path):
    from tests.conftest import attach

    model = attach("t5", t5_model, tokenizer)
    model.save_pretrained(tmp_path / "single")
    whole = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    for p in model.prompt_encoder.parameters():  # what a rank holds under ZeRO-3 or FULL_SHARD
        p.data = torch.empty(0)
    model.save_pretrained(tmp_path / "gathered", state_dict=whole)

    single, gathered = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("single", "gathered"))
    assert single.keys() == gathered.keys() == {"prompt_embeddings", "lora_embedding_A", "lora_embedding_B"}
    for key in single:
        assert torch.equal(single[key], gathered[key]), key


# ----------------------------------------------------------------------------------------------- FSDP configs


FSDP_CONFIGS = {  # config file -> (backbones it is for, the block class it wraps)
    "fsdp.yaml": ("t5", "T5Block"),
    "fsdp2.yaml": ("t5", "T5Block"),
    "fsdp_llama.yaml": ("llama", "LlamaDecoderLayer"),
    "fsdp2_llama.yaml": ("llama", "LlamaDecoderLayer"),
}


@pytest.mark.parametrize("name", sorted(FSDP_CONFIGS))
def test_fsdp_configs_wrap_the_blocks_and_leave_dept_in_the_root_unit(name, t5_model, llama_model, tokenizer):
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    family, block = FSDP_CONFIGS[name]
    fsdp = yaml.safe_load((ACCELERATE_CONFIGS / name).read_text())["fsdp_config"]
    assert fsdp["fsdp_version"] == (2 if name.startswith("fsdp2") else 1)
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == block
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # whole tensors when saving
    if fsdp["fsdp_version"] == 1:
        assert fsdp["fsdp_use_orig_params"] is True  # frozen and trainable parameters in one unit

    from tests.conftest import attach

    model = attach(family, t5_model if family == "t5" else llama_model, tokenizer)
    layer_class = get_module_class_from_name(model, block)  # how accelerate resolves the name
    assert layer_class is not None

    def wrapped(module):
        return transformer_auto_wrap_policy(module, recurse=False, nonwrapped_numel=0,
                                            transformer_layer_cls={layer_class})  # fmt: skip

    blocks = [m for m in model.modules() if isinstance(m, layer_class)]
    assert blocks and all(wrapped(m) for m in blocks)
    # P, A and B are in no wrapped block, so they sit in the root unit with the embeddings.
    assert not wrapped(model.prompt_encoder)
    owners = [m for m in model.modules() if isinstance(m, layer_class) and any(p is model.prompt_encoder.prompt_embeddings
                                                                               for p in m.parameters())]  # fmt: skip
    assert owners == []
