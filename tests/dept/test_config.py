import json

import pytest

from dept import ConfigError, DePTConfig


def test_config_json_round_trip(tmp_path):
    config = DePTConfig(num_virtual_tokens=40, r=45, max_length=256, lora_alpha=16.0, prompt_init="vocab",
                        task_type="causal", base_model_name_or_path="some/model", token_dim=768)
    config.save_pretrained(tmp_path)
    assert DePTConfig.from_pretrained(tmp_path) == config
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "DEPT"


@pytest.mark.parametrize(("m", "r", "s"), [(60, 30, 256), (40, 45, 256), (100, 0, 256)])
def test_budget_matches_vanilla_prompt_tuning_at_t5_base_width(m, r, s):
    config = DePTConfig(num_virtual_tokens=m, r=r, max_length=s)
    assert config.num_parameters(768) == m * 768 + s * r + r * 768 == 76_800


def test_scaling_is_alpha_over_sqrt_r():
    assert DePTConfig(r=16, lora_alpha=8.0).scaling == pytest.approx(2.0)
    assert DePTConfig(num_virtual_tokens=10, r=0).scaling == 0.0


def test_unknown_config_keys_are_named(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "DEPT", "num_virtual_tokens": 4,
                                                              "rank": 8}))
    with pytest.raises(ConfigError, match=r"Unknown DePTConfig keys \['rank'\]"):
        DePTConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_virtual_tokens": -1}, "must be >= 0"),
        ({"r": -2}, "must be >= 0"),
        ({"max_length": 0}, "max_length must be positive"),
        ({"num_virtual_tokens": 0, "r": 0}, "trains nothing"),
        ({"r": 300, "max_length": 256}, "larger than max_length"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"prompt_init": "zeros"}, "prompt_init"),
        ({"task_type": "SEQ_2_SEQ_LM"}, "task_type"),
        ({"r": 2.5}, "must be an integer"),
    ],
)
def test_invalid_sizes_are_refused_at_construction(overrides, message):
    with pytest.raises(ConfigError, match=message):
        DePTConfig(**overrides)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No adapter_config.json"):
        DePTConfig.from_pretrained(tmp_path)
