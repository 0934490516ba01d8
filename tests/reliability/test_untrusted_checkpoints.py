"""Checkpoints from strangers: a pickle that would run code is refused, and the code never runs; a damaged one is
named as damaged, one user error, in the Python API and in dept-eval."""

import io
import json
import pickle

import pytest
import torch

from dept import DePTModel, UnsafeCheckpointError
from dept.adapter_files import DamagedAdapterError
from dept.errors import UserError
from tests.conftest import CORPUS, attach, save_tiny_model, write_task_fixture


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
    attach("t5", t5_model, tokenizer).save_pretrained(tmp_path)
    header = (tmp_path / "adapter_model.safetensors").read_bytes()[:8]
    assert int.from_bytes(header, "little") > 0  # safetensors starts with its JSON header length, not a pickle
    assert not list(tmp_path.glob("*.bin"))


def _official_tensors() -> dict:
    return {"prompt_embeddings": torch.zeros(4, 32), "prompt_encoder.lora_embedding_A": torch.zeros(8, 2),
            "prompt_encoder.lora_embedding_B": torch.zeros(2, 32)}


def _truncated(handle_payload, handle):
    buffer = io.BytesIO()
    torch.save(handle_payload, buffer)
    handle.write(buffer.getvalue()[: buffer.tell() // 2])


DAMAGED = {  # name: (payload, how it is written, what the error says)
    "truncated": (_official_tensors(), _truncated, "is damaged (RuntimeError: PytorchStreamReader failed"),
    "empty": (None, lambda payload, handle: None, "is damaged (it is empty (0 bytes))"),
    "a_list": ([torch.zeros(4, 32)], torch.save, "is damaged (it holds a list, not a dict of tensors)"),
    "not_tensors": ({"prompt_embeddings": [0.0, 1.0]}, torch.save, "these entries are not tensors: prompt_embeddings"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_a_damaged_official_checkpoint_is_one_user_error_naming_the_file(t5_model, tmp_path, case):
    payload, save, message = DAMAGED[case]
    _official_looking_dir(tmp_path / "adapter", payload, save=save)
    with pytest.raises(DamagedAdapterError) as refused:
        DePTModel.from_pretrained(t5_model, tmp_path / "adapter")
    assert isinstance(refused.value, UserError)
    assert str(tmp_path / "adapter" / "adapter_model.bin") in str(refused.value) and message in str(refused.value)


@pytest.mark.parametrize("case", ["truncated", "a_list"])
def test_dept_eval_exits_2_with_one_line_on_a_damaged_official_checkpoint(tmp_path, capsys, case):
    from dept_eval.cli import main

    base = save_tiny_model("seq2seq", tmp_path / "t5", CORPUS)  # d_model 32, as the adapter's token_dim
    payload, save, message = DAMAGED[case]
    _official_looking_dir(tmp_path / "adapter", payload, save=save)
    files = write_task_fixture("sst2", tmp_path / "data", n_train=2, n_val=2, n_test=2)
    status = main(["--model_name_or_path", str(base), "--adapter", f"{tmp_path / 'adapter'}:sst2",
                   "--validation_file", str(files["validation_file"]), "--max_eval_samples", "2"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("dept-eval: error: ")]
    assert str(tmp_path / "adapter" / "adapter_model.bin") in line and message in line
