"""Bad adapter configs, adapters for another base model, and conflicting command-line flags: each is refused with
a clear error before any compute, and the base model is left as it was.

Already covered elsewhere: invalid sizes at construction and unknown config keys (tests/dept/test_config.py);
adapters for another width, another max_length and another model kind (tests/dept/test_checkpoint.py); k larger
than the data (tests/nlp/test_sampling.py); malicious pickles (test_untrusted_checkpoints.py).
"""

from __future__ import annotations

import json

import pytest
import torch

from dept import AdapterMismatchError, ConfigError, DePTConfig, DePTModel
from dept.command_line import MethodArguments, parse_arguments
from dept.errors import FlagError
from dept.methods import check_max_length, prepare_model
from dept.training_args import TrainingArguments
from dept_nlp.arguments import DataArguments, ModelArguments
from tests.conftest import attach


def _saved_adapter(t5_model, tokenizer, directory, **config_edits):
    attach("t5", t5_model, tokenizer).save_pretrained(directory)
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(config_edits)
    path.write_text(json.dumps(config))
    return directory


class _ForwardCounter:
    """Counts calls of a model's forward, to show a refusal happened before any compute."""

    def __init__(self, model):
        self.calls = 0
        original = model.forward

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        model.forward = counted


def _assert_untouched(model, trainable_before: int):
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable_before
    assert not any("prompt_encoder" in name for name, _ in model.named_modules())


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        ({"num_virtual_tokens": -4}, "must be >= 0"),
        ({"r": -1}, "must be >= 0"),
        ({"max_length": 0}, "max_length must be positive"),
        ({"max_length": -24}, "max_length must be positive"),
        ({"r": 30, "max_length": 24}, "r=30 is larger than max_length=24"),
        ({"num_virtual_tokens": 0, "r": 0}, "trains nothing"),
        ({"r": "3"}, "must be an integer"),
        ({"peft_type": "LORA"}, "not a DePT adapter config"),
        ({"peft_type": "PREFIX_TUNING"}, "not a DePT adapter config"),
        ({"task_type": "causal"}, "task_type"),
        ({"lora_alpha": float("nan")}, "lora_alpha"),
    ],
)
def test_a_bad_adapter_config_is_refused_at_load_and_the_base_is_untouched(t5_model, tokenizer, tmp_path, edits,
                                                                          message):
    adapter = _saved_adapter(t5_model, tokenizer, tmp_path / "adapter", **edits)
    for param in t5_model.parameters():
        param.requires_grad_(True)  # attach() froze them; a refused load must not freeze them again
    trainable = sum(p.numel() for p in t5_model.parameters())
    counter = _ForwardCounter(t5_model)
    with pytest.raises(ConfigError, match=message):
        DePTModel.from_pretrained(t5_model, adapter)
    assert counter.calls == 0
    _assert_untouched(t5_model, trainable)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '"DEPT"'])
def test_an_unreadable_adapter_config_says_which_file(t5_model, tmp_path, content):
    (tmp_path / "adapter_config.json").write_text(content)
    with pytest.raises(ConfigError, match="adapter_config.json"):
        DePTModel.from_pretrained(t5_model, tmp_path)


def test_an_official_config_with_no_prompt_and_no_rank_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "PROMPT_TUNING_LORA", "num_virtual_tokens": 0, "r": 0, "max_length": 256}))
    with pytest.raises(ConfigError, match="trains nothing"):
        DePTConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("edits", "named"),
    [({"vocab_size": 999}, "vocab_size=999"), ({"base_model_type": "bart"}, "base_model_type='bart'"),
     ({"token_dim": 768}, "token_dim=768")],
)
def test_an_adapter_for_another_base_is_refused_before_any_compute(t5_model, tokenizer, tmp_path, edits, named):
    adapter = _saved_adapter(t5_model, tokenizer, tmp_path / "adapter", **edits)
    for param in t5_model.parameters():
        param.requires_grad_(True)
    trainable = sum(p.numel() for p in t5_model.parameters())
    counter = _ForwardCounter(t5_model)
    with pytest.raises(AdapterMismatchError, match=named):
        DePTModel.from_pretrained(t5_model, adapter)
    assert counter.calls == 0
    _assert_untouched(t5_model, trainable)


def test_unknown_method_is_refused(t5_model):
    with pytest.raises(ConfigError, match="Unknown peft_type 'P_TUNING'"):
        prepare_model(t5_model, "P_TUNING", dept_config=DePTConfig(prompt_init="random"))


# ---------------------------------------------------------------------------------------------------------------
# max_length: the adapter's A must cover every position the tokenizer lets through


def test_check_max_length_accepts_an_adapter_at_least_as_long_as_the_inputs():
    config = DePTConfig(num_virtual_tokens=4, r=2, max_length=64, prompt_init="random")
    check_max_length(config, 64)
    check_max_length(config, 16)
    with pytest.raises(ConfigError, match=r"max_length=64.*truncated at 65 tokens.*--max_seq_length 64 or lower"):
        check_max_length(config, 65)


def test_loading_an_adapter_shorter_than_max_seq_length_is_refused_before_loading(t5_model, tokenizer, tmp_path):
    adapter = _saved_adapter(t5_model, tokenizer, tmp_path / "adapter")  # max_length 24
    for param in t5_model.parameters():
        param.requires_grad_(True)
    trainable = sum(p.numel() for p in t5_model.parameters())
    asked = DePTConfig(num_virtual_tokens=5, r=3, max_length=64, prompt_init="random")
    with pytest.raises(ConfigError, match=f"{adapter} has max_length=24"):
        prepare_model(t5_model, "PROMPT_TUNING_LORA", dept_config=asked, peft_model_id=str(adapter))
    _assert_untouched(t5_model, trainable)


def test_an_adapter_longer_than_max_seq_length_loads_and_runs(t5_model, tokenizer, tmp_path):
    adapter = _saved_adapter(t5_model, tokenizer, tmp_path / "adapter")  # max_length 24
    asked = DePTConfig(num_virtual_tokens=5, r=3, max_length=8, prompt_init="random")
    model = prepare_model(t5_model, "PROMPT_TUNING_LORA", dept_config=asked, peft_model_id=str(adapter))
    batch = tokenizer(["the movie was great and the actors were wonderful"], return_tensors="pt",
                      truncation=True, max_length=8)
    with torch.no_grad():
        logits = model(**batch, decoder_input_ids=torch.zeros(1, 2, dtype=torch.long)).logits
    assert model.config.max_length == 24 and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------------------------
# Conflicting flags are parse-time errors


def _parse(*flags: str):
    argv = ["--model_name_or_path", "t5-base", "--task_name", "sst2", "--output_dir", "unused", *flags]
    return parse_arguments((ModelArguments, DataArguments, MethodArguments, TrainingArguments), argv)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ((), "Nothing to do: pass --do_train, --do_eval and/or --do_predict"),
        (("--do_predict", "--train_file", "t.jsonl"), "--do_predict with local data needs --test_file"),
        (("--do_predict", "--validation_file", "v.jsonl"), "--do_predict with local data needs --test_file"),
        (("--do_train", "--do_predict", "--train_file", "t.jsonl", "--validation_file", "v.jsonl"),
         "needs --test_file"),
        (("--do_train", "--test_file", "x.jsonl"), "--do_train with local data needs --train_file"),
        (("--do_train", "--k_shot_examples", "0"), "--k_shot_examples must be >= 1"),
        (("--do_train", "--k_shot_example", "-3"), "--k_shot_examples must be >= 1"),  # the official spelling
        (("--do_train", "--max_seq_length", "0"), "--max_seq_length must be >= 1"),
    ],
)
def test_conflicting_or_empty_flags_fail_at_parse_time(flags, message):
    with pytest.raises(ValueError, match=message):
        _parse(*flags)


def test_an_unknown_method_flag_value_fails_at_parse_time():
    with pytest.raises(FlagError, match="invalid choice: 'P_TUNING'"):  # one line at the console, no usage dump
        _parse("--do_train", "--peft_type", "P_TUNING")


def test_consistent_local_flags_parse():
    _, data_args, _, _ = _parse("--do_train", "--do_predict", "--train_file", "t.jsonl", "--test_file", "x.jsonl",
                                "--k_shot_example", "16")
    assert data_args.k_shot_examples == 16 and data_args.test_file == "x.jsonl"
