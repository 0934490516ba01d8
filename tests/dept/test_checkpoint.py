"""Saving and loading adapters: ours bit-exact, the official release, and clear errors for bad files."""

import hashlib
import json
import os
import warnings

import pytest
import torch

from dept import AdapterMismatchError, ConfigError, DePTConfig, DePTModel, get_dept_model
from tests.conftest import OFFICIAL_CHECKPOINTS, attach

OFFICIAL_TASKS = ["cola", "sst2", "superglue-wic", "nq", "hotpotqa"]
needs_official = pytest.mark.skipif(not OFFICIAL_CHECKPOINTS.is_dir(), reason="../shared/reference is absent")


def test_save_load_round_trip_is_bit_exact(any_model, tokenizer, tmp_path):
    kind, model = any_model
    dept_model = attach(kind, model, tokenizer)
    with torch.no_grad():
        dept_model.prompt_encoder.lora_embedding_A.add_(0.25)
        if kind == "bert":
            dept_model.base_model.classifier.weight.add_(1.0)
    dept_model.save_pretrained(tmp_path)
    # the adapter and its model card (issue 23), nothing of the frozen base
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    reloaded = DePTModel.from_pretrained(model, tmp_path)
    saved, loaded = dept_model.adapter_state_dict(), reloaded.adapter_state_dict()
    assert saved.keys() == loaded.keys()
    assert {"prompt_embeddings", "lora_embedding_A", "lora_embedding_B"} <= saved.keys()
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key
    assert not any(p.requires_grad for p in reloaded.parameters())


def test_is_trainable_keeps_the_adapter_trainable(t5_model, tokenizer, tmp_path):
    attach("t5", t5_model, tokenizer).save_pretrained(tmp_path)
    reloaded = DePTModel.from_pretrained(t5_model, tmp_path, is_trainable=True)
    assert reloaded.num_trainable_parameters()["total"] == reloaded.config.num_parameters()


def test_adapter_for_another_width_is_refused_before_compute(t5_model, tokenizer, tmp_path):
    attach("t5", t5_model, tokenizer).save_pretrained(tmp_path)
    from transformers import T5ForConditionalGeneration

    from tests.conftest import tiny_t5_config

    wider = T5ForConditionalGeneration(tiny_t5_config(len(tokenizer), d_model=64))
    with pytest.raises(AdapterMismatchError, match="token_dim=32"):
        DePTModel.from_pretrained(wider, tmp_path)


def test_adapter_for_another_max_length_names_the_shape(t5_model, tokenizer, tmp_path):
    attach("t5", t5_model, tokenizer).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["max_length"] = 30
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterMismatchError, match=r"lora_embedding_A has shape \(24, 3\).*\(30, 3\)"):
        DePTModel.from_pretrained(t5_model, tmp_path)


def test_adapter_for_another_model_kind_is_refused(llama_model, t5_model, tokenizer, tmp_path):
    attach("t5", t5_model, tokenizer).save_pretrained(tmp_path)
    with pytest.raises((AdapterMismatchError, ConfigError)):
        DePTModel.from_pretrained(llama_model, tmp_path)


def test_missing_files_are_named(t5_model, tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DePTModel.from_pretrained(t5_model, tmp_path / "nowhere")
    DePTConfig(num_virtual_tokens=4, r=2, max_length=8).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights"):
        DePTModel.from_pretrained(t5_model, tmp_path)


def test_task_type_must_match_the_model(t5_model):
    with pytest.raises(ConfigError, match="set task_type='seq2seq'"):
        get_dept_model(t5_model, DePTConfig(num_virtual_tokens=4, r=2, max_length=8, task_type="causal"))


@needs_official
@pytest.mark.parametrize("task", OFFICIAL_TASKS)
def test_official_checkpoints_load_at_t5_base_dims(task, t5_base_dims_model):
    directory = OFFICIAL_CHECKPOINTS / task
    official = json.loads((directory / "adapter_config.json").read_text())
    raw = torch.load(directory / "adapter_model.bin", map_location="cpu", weights_only=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = DePTModel.from_pretrained(t5_base_dims_model, directory)
    encoder = model.prompt_encoder
    assert model.config.num_virtual_tokens == official["num_virtual_tokens"]
    assert model.config.max_length == official["max_length"]
    assert torch.equal(encoder.prompt_embeddings, raw["prompt_embeddings"].float())
    if "prompt_encoder.lora_embedding_B" in raw:
        assert torch.equal(encoder.lora_embedding_A, raw["prompt_encoder.lora_embedding_A"].float())
        assert torch.equal(encoder.lora_embedding_B, raw["prompt_encoder.lora_embedding_B"].float())
    else:
        assert torch.count_nonzero(encoder.lora_embedding_B) == 0
        assert any("holds only the prompt" in str(w.message) for w in caught)


@needs_official
def test_official_cola_checkpoint_matches_formula(t5_base_dims_model):
    directory = OFFICIAL_CHECKPOINTS / "cola"
    raw = torch.load(directory / "adapter_model.bin", map_location="cpu", weights_only=True)
    model = DePTModel.from_pretrained(t5_base_dims_model, directory)
    input_ids = torch.tensor([[100, 200, 300, 400, 1]])
    E = t5_base_dims_model.get_input_embeddings().weight[input_ids[0]]
    A, B = raw["prompt_encoder.lora_embedding_A"].float(), raw["prompt_encoder.lora_embedding_B"].float()
    expected = torch.cat([raw["prompt_embeddings"].float(), E + 8 / 15**0.5 * (A @ B)[:5]])
    with torch.no_grad():
        embeds, mask = model.embed(input_ids)
    # float32 along two paths (the cached A @ B table, sliced, against A @ B[:5] here), at values up to ~150:
    # rtol 1e-5 (~80 ulps) and an atol of 1e-5 of the largest value for the elements near zero.
    torch.testing.assert_close(embeds[0], expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert mask.shape == (1, 80 + 5)


def test_saving_the_same_adapter_again_writes_the_same_bytes(t5_model, tokenizer, tmp_path):
    # safetensors orders the metadata by a per-save random hash; the adapter file sorts it.
    dept_model = attach("t5", t5_model, tokenizer)
    digests = set()
    for i in range(16):
        dept_model.save_pretrained(tmp_path / str(i))
        digests.add(hashlib.sha256((tmp_path / str(i) / "adapter_model.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    header = (tmp_path / "0" / "adapter_model.safetensors").read_bytes()[8:80]
    assert header.startswith(b'{"__metadata__":{"format":"pt","peft_type":"DEPT"}')
