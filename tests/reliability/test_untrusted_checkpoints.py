"""Checkpoints from strangers: a pickle that would run code is refused, and the code never runs."""

import json
import pickle

import pytest
import torch

from dept import DePTModel, UnsafeCheckpointError


class _CreatesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _official_looking_dir(directory, payload, save=pickle.dump):
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "PROMPT_TUNING_LORA", "task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": 4, "r": 2,
        "max_length": 8, "lora_alpha": 8, "token_dim": 32,
    }))
    with open(directory / "adapter_model.bin", "wb") as handle:
        save(payload, handle)


def test_malicious_pickle_is_refused_and_runs_nothing(t5_model, tmp_path):
    marker = tmp_path / "pwned.txt"
    _official_looking_dir(tmp_path / "adapter", {"prompt_embeddings": _CreatesAFile(marker)})
    with pytest.raises(UnsafeCheckpointError, match="Refusing to load"):
        DePTModel.from_pretrained(t5_model, tmp_path / "adapter")
    assert not marker.exists()


def test_official_pickle_with_unexpected_keys_is_refused(t5_model, tmp_path):
    payload = {"prompt_embeddings": torch.zeros(4, 32), "extra": torch.ones(1)}
    _official_looking_dir(tmp_path / "adapter", payload, save=torch.save)
    with pytest.raises(ValueError, match="not an official DePT checkpoint"):
        DePTModel.from_pretrained(t5_model, tmp_path / "adapter")


def test_our_format_is_safetensors(t5_model, tokenizer, tmp_path):
    from tests.dept.helpers import attach

    attach("t5", t5_model, tokenizer).save_pretrained(tmp_path)
    header = (tmp_path / "adapter_model.safetensors").read_bytes()[:8]
    assert int.from_bytes(header, "little") > 0  # safetensors starts with its JSON header length, not a pickle
    assert not list(tmp_path.glob("*.bin"))
