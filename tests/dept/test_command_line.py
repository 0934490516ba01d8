"""Flags that set a `DePTConfig` field take their help from the config's field metadata (one source), and every
spelling in `FLAG_ALIASES` parses to exactly what the flag it stands for parses to."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import HfArgumentParser

from dept.command_line import CONFIG_FLAGS, FLAG_ALIASES, MethodArguments, canonical_flag, parse_arguments
from dept.config import DePTConfig
from dept.training_args import TrainingArguments
from dept_eval.cli import MODALITIES, build_parser
from dept_nlp.arguments import DataArguments, ModelArguments
from dept_vl.cli import ARGUMENT_TYPES as VL_ARGUMENT_TYPES
from dept_vl.image_classification import ImageDataArguments, ImageModelArguments, VisionMethodArguments

CLIS = {
    "dept-train": ((ModelArguments, DataArguments, MethodArguments, TrainingArguments),
                   ["--model_name_or_path", "t5-base", "--task_name", "sst2", "--do_train", "--output_dir", "out"]),
    "dept-train-vl": (VL_ARGUMENT_TYPES,
                      ["--model_name_or_path", "t5-base", "--tasks", "vqa", "--do_train", "--output_dir", "out"]),
    "dept-train-vision": ((ImageModelArguments, ImageDataArguments, VisionMethodArguments, TrainingArguments),
                          ["--model_name_or_path", "vit_tiny_patch16_224", "--data_dir", "images", "--do_train",
                           "--output_dir", "out"]),
}
MIRRORED = {  # the DePTConfig flags each command line has
    "dept-train": set(CONFIG_FLAGS),
    "dept-train-vl": set(CONFIG_FLAGS) - {"task_type"},  # VL-T5 is always seq2seq
    "dept-train-vision": set(CONFIG_FLAGS) - {"task_type", "max_seq_length"},  # s is the ViT's grid
}
ALIAS_VALUES = {"--num_virtual_tokens": "7", "--max_length": "33", "--model_family": "causal",
                "--evaluation_strategy": "epoch", "--k_shot_example": "4", "--task_name": "gqa"}
ALIAS_CONTEXT = {"--evaluation_strategy": ["--load_best_model_at_end", "false"]}  # else saves must follow evals


def _config_flag_actions(parser) -> dict:
    return {action.dest: action for action in parser._actions if action.dest in CONFIG_FLAGS}


def _assert_help_is_the_config_fields(action) -> None:
    """The config field's help, verbatim; a flag whose default is None may add what unset means."""
    own = DePTConfig.field_help(CONFIG_FLAGS[action.dest])
    assert action.help.startswith(own), (action.dest, action.help)
    rest = action.help[len(own):]
    assert rest == "" or (action.default is None and rest.startswith(" Unset: ")), (action.dest, rest)


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_each_config_flag_takes_the_config_fields_help(cli):
    parser = HfArgumentParser(CLIS[cli][0])
    actions = _config_flag_actions(parser)
    assert set(actions) == MIRRORED[cli]
    for action in actions.values():
        _assert_help_is_the_config_fields(action)
        field = DePTConfig.__dataclass_fields__[CONFIG_FLAGS[action.dest]]
        assert action.choices == field.metadata.get("choices")
    text = " ".join(parser.format_help().split())  # --help shows it in full
    for name in {CONFIG_FLAGS[dest] for dest in actions}:
        assert DePTConfig.field_help(name) in text


def test_config_flags_default_to_the_config_unless_the_command_line_needs_its_own():
    method = HfArgumentParser(MethodArguments)
    defaults = {action.dest: action.default for action in _config_flag_actions(method).values()}
    assert defaults == {"prefix_length": None, "r": None, "lora_alpha": DePTConfig.lora_alpha,
                        "prompt_init": DePTConfig.prompt_init, "prompt_init_text": DePTConfig.prompt_init_text}
    parsed = MethodArguments()  # None: the config's m and r (or the --peft_model_id adapter's)
    assert (parsed.prefix_length, parsed.r) == (DePTConfig.num_virtual_tokens, DePTConfig.r)


def test_dept_eval_flags_share_the_training_clis_help():
    parser = build_parser()
    for modality in MODALITIES.values():
        modality.add_arguments(parser)
    _assert_help_is_the_config_fields(parser._option_string_actions["--task_type"])
    train = HfArgumentParser(CLIS["dept-train"][0])._option_string_actions
    for flag in ("--num_beams", "--max_target_length", "--max_eval_samples", "--data_seed", "--tokenizer_name"):
        assert parser._option_string_actions[flag].help == train[flag].help


def _parsed(cli: str, *flags: str) -> list[dict]:
    types, required = CLIS[cli]
    return [dataclasses.asdict(parsed) for parsed in parse_arguments(types, [*required, *flags])]


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_every_alias_parses_to_the_same_values_as_its_flag(cli):
    parser = HfArgumentParser(CLIS[cli][0])
    applicable = {alias: target for alias, target in FLAG_ALIASES.items() if canonical_flag(alias, parser) == target}
    expected = {"dept-train": {"--num_virtual_tokens", "--max_length", "--model_family", "--evaluation_strategy",
                               "--k_shot_example"},
                "dept-train-vl": {"--num_virtual_tokens", "--max_length", "--evaluation_strategy", "--task_name"},
                "dept-train-vision": {"--num_virtual_tokens", "--evaluation_strategy"}}[cli]
    assert set(applicable) == expected
    for alias, target in applicable.items():
        value, context = ALIAS_VALUES[alias], ALIAS_CONTEXT.get(alias, [])
        by_alias, by_flag = _parsed(cli, *context, alias, value), _parsed(cli, *context, target, value)
        assert by_alias == by_flag != _parsed(cli, *context), alias
        assert _parsed(cli, *context, f"{alias}={value}") == by_flag


def test_an_alias_that_is_the_command_lines_own_flag_stays_itself():
    parser = HfArgumentParser(CLIS["dept-train"][0])
    assert canonical_flag("--task_name", parser) == "--task_name"  # the text CLI's own flag, not VL's --tasks
    assert canonical_flag("--prefix_length=3", parser) == "--prefix_length=3"
    assert canonical_flag("--num_virtual_tokens=3", parser) == "--prefix_length=3"
    assert canonical_flag("value", parser) == "value"


def test_aliases_reach_the_config_the_run_builds():
    _, _, method_args, _ = parse_arguments(CLIS["dept-train"][0], [*CLIS["dept-train"][1], "--num_virtual_tokens", "7"])
    assert method_args.dept_config(max_length=64, task_type="seq2seq").num_virtual_tokens == 7


def test_the_vision_backbone_flags_take_the_config_fields_help_after_naming_the_vit():
    from dept_vl.vision_backbone import VISION_FLAG_SUBJECT, VisionBackboneArguments

    actions = {action.dest: action for action in HfArgumentParser(VisionBackboneArguments)._actions}
    for flag, name in {"vision_prefix_length": "num_virtual_tokens", "vision_r": "r",
                       "vision_lora_alpha": "lora_alpha"}.items():
        prefix = f"{VISION_FLAG_SUBJECT}: {DePTConfig.field_help(name)}"
        assert actions[flag].help.startswith(prefix), (flag, actions[flag].help)
        rest = actions[flag].help[len(prefix):]
        assert rest == "" or (actions[flag].default is None and rest.startswith(" Unset: ")), (flag, rest)
    assert actions["vision_lora_alpha"].default == DePTConfig.lora_alpha
