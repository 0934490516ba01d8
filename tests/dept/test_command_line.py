"""The command line every CLI shares. Flags that set a `DePTConfig` field take their help from the config's field
metadata (one source), and every spelling in `FLAG_ALIASES` parses to exactly what the flag it stands for parses
to. The console contract (`run_console`): results once on stdout from the main process, everything else on stderr,
our loggers at `--log_level` and the others at warning, a user error in one line with exit status 2. A flag the
method does not read, a YAML key or a flag that does not exist, an unknown task: refused, naming the fix."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import pytest
from transformers import HfArgumentParser

from dept.command_line import (
    CONFIG_FLAGS,
    FLAG_ALIASES,
    IGNORED_FLAGS,
    MethodArguments,
    canonical_flag,
    launcher_watchdog,
    parse_arguments,
    run_console,
)
from dept.command_line.flags import pop_console_flags
from dept.config import DePTConfig
from dept.errors import FlagError
from dept.methods import PEFT_TYPES
from dept.training_args import TrainingArguments
from dept_eval.cli import MODALITIES, build_parser
from dept_eval.cli import main as dept_eval_main
from dept_nlp.arguments import DataArguments, ModelArguments
from dept_nlp.cli import main as dept_train_main
from dept_serve.cli import main as dept_serve_main
from dept_tune.cli import main as dept_tune_main
from dept_vl.arguments import ARGUMENT_TYPES as VL_ARGUMENT_TYPES
from dept_vl.cli import main as dept_train_vl_main
from dept_vl.image_classification import ImageDataArguments, ImageModelArguments, VisionMethodArguments
from dept_vl.image_classification import main as dept_train_vision_main

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


# ----------------------------------------------------------------------------------------- the console contract


def _say_everywhere(argv: list[str]) -> dict:
    """A command that writes to stdout in every way a library does, then returns its results."""
    print("a library's print")
    os.write(1, b"C code writing to file descriptor 1\n")
    logging.getLogger("some_library").warning("a warning of another library")
    return {"accuracy": 1.5, "argv": argv}


def test_run_console_prints_the_results_once_to_stdout_and_everything_else_to_stderr(capfd):
    assert run_console("prog", _say_everywhere, ["--flag", "x"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out) == {"accuracy": 1.5, "argv": ["--flag", "x"]}
    assert "a library's print" in err and "C code writing to file descriptor 1" in err
    print("stdout is restored")
    assert capfd.readouterr().out == "stdout is restored\n"


def test_only_the_main_process_prints_the_results(capfd, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert run_console("prog", lambda argv: {"accuracy": 1.0}, []) == 0
    assert capfd.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert run_console("prog", lambda argv: "| a table |", []) == 0
    assert capfd.readouterr().out == "| a table |\n"


def _refuse(argv: list[str]) -> None:
    raise FlagError("--x 3 is wrong:\nuse --x 2.")


def test_a_user_error_is_one_line_with_exit_status_2_and_debug_shows_the_traceback(capfd):
    assert run_console("prog", _refuse, ["--x", "3"]) == 2
    out, err = capfd.readouterr()
    assert out == ""
    assert err == "prog: error: --x 3 is wrong: use --x 2. (--help lists the flags; --debug shows the traceback)\n"
    with pytest.raises(FlagError, match="--x 3 is wrong"):
        run_console("prog", _refuse, ["--x", "3", "--debug"])


def _interrupted(argv: list[str]) -> None:
    raise KeyboardInterrupt


def test_ctrl_c_stops_with_one_line_and_status_130(capfd):
    assert run_console("prog", _interrupted, []) == 130
    assert capfd.readouterr() == ("", "prog: stopped by Ctrl-C (SIGINT).\n")
    with pytest.raises(KeyboardInterrupt):
        run_console("prog", _interrupted, ["--debug"])


def _log_everywhere(argv: list[str]) -> None:
    for name in ("accelerate.checkpointing", "transformers_like", "dept.trainer", "tests.dept"):
        logger = logging.getLogger(name)
        logger.debug("debug from %s", name)
        logger.info("info from %s", name)
        logger.warning("warning from %s", name)


@pytest.mark.parametrize(("argv", "shown"), [
    ([], {"INFO dept.trainer", "INFO tests.dept", "WARNING accelerate.checkpointing", "WARNING transformers_like",
          "WARNING dept.trainer", "WARNING tests.dept"}),
    (["--log_level", "warning"], {"WARNING accelerate.checkpointing", "WARNING transformers_like",
                                  "WARNING dept.trainer", "WARNING tests.dept"}),
    (["--log_level=debug"], {"DEBUG dept.trainer", "DEBUG tests.dept", "INFO dept.trainer", "INFO tests.dept",
                             "WARNING accelerate.checkpointing", "WARNING transformers_like", "WARNING dept.trainer",
                             "WARNING tests.dept"}),
])
def test_our_loggers_log_at_log_level_and_other_libraries_at_warning(caplog, argv, shown):
    before = {name: logging.getLogger(name).level for name in ("", "dept", "tests")}
    assert run_console("prog", _log_everywhere, argv) == 0  # the command's package (tests) counts as ours
    assert {f"{record.levelname} {record.name}" for record in caplog.records} == shown
    assert {name: logging.getLogger(name).level for name in before} == before  # restored for the next caller


def test_an_unknown_log_level_is_refused_in_one_line(capfd):
    assert run_console("prog", _say_everywhere, ["--log_level", "loud"]) == 2
    assert capfd.readouterr().err.startswith("prog: error: --log_level loud: choose one of debug, info, warning")


def test_a_backend_error_after_the_launcher_died_is_one_line_not_a_traceback(capfd, monkeypatch):
    def die_with_the_other_rank(argv):
        monkeypatch.setattr(launcher_watchdog, "_launcher", os.getppid() + 1)  # as if reparented: the launcher died
        raise RuntimeError("[gloo] Connection closed by peer")

    monkeypatch.setattr(launcher_watchdog, "_launcher", None)
    assert run_console("prog", die_with_the_other_rank, []) == launcher_watchdog.STOPPED_STATUS
    err = capfd.readouterr().err
    assert "Traceback" not in err and "gloo" not in err
    assert [line for line in err.splitlines() if line] == [
        f"prog: error: rank {os.environ.get('RANK', '?')} stopped: its launcher (pid {os.getppid() + 1}) is gone. "
        "Continue with --resume_from_checkpoint auto."]
    monkeypatch.setattr(launcher_watchdog, "_launcher", None)
    with pytest.raises(RuntimeError, match="gloo"):  # with its launcher alive, the same error is a bug: traceback
        run_console("prog", lambda argv: (_ for _ in ()).throw(RuntimeError("[gloo] Connection closed")), [])


CONSOLE_MAINS = {"dept-train": dept_train_main, "dept-train-vl": dept_train_vl_main,
                 "dept-train-vision": dept_train_vision_main, "dept-eval": dept_eval_main,
                 "dept-serve": dept_serve_main, "dept-tune": dept_tune_main}


@pytest.mark.parametrize("cli", sorted(CONSOLE_MAINS))
def test_help_lists_the_console_flags_the_readme_uses(cli, capsys):
    with pytest.raises(SystemExit) as exited:
        CONSOLE_MAINS[cli](["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "--debug" in out and "--log_level" in out
    if cli.startswith("dept-train"):
        assert "--config FILE.yaml" in out  # dept-tune hands --config to the training CLI (its epilog says so)


# ----------------------------------------------------------------------------------------- flags, files, methods


@pytest.mark.parametrize(("cli", "peft_type", "flag", "value"), [
    ("dept-train", "PROMPT_TUNING", "--r", "4"),
    ("dept-train", "PROMPT_TUNING", "--lora_alpha", "16"),
    ("dept-train", "LORA", "--lora_embedding_lr", "0.1"),
    ("dept-train", "FULL", "--prefix_length", "10"),
    ("dept-train", "PROMPT_TUNING_LORA", "--lora_r", "8"),
    ("dept-train-vl", "PROMPT_TUNING", "--r", "4"),
    ("dept-train-vision", "PROMPT_TUNING", "--r", "4"),
    ("dept-train-vision", "LORA", "--prompt_init", "vocab"),
])
def test_a_flag_the_method_does_not_read_is_refused(cli, peft_type, flag, value):
    types, required = CLIS[cli]
    parse_arguments(types, [*required, "--peft_type", peft_type])  # fine without it
    with pytest.raises(FlagError, match=f"--peft_type {peft_type} does not use {flag} "):
        parse_arguments(types, [*required, "--peft_type", peft_type, flag, value])


@pytest.mark.parametrize("cli", ["dept-train", "dept-train-vl", "dept-train-vision", "dept-tune"])
def test_every_cli_refuses_r_with_prompt_tuning_in_one_line(cli, capfd, tmp_path):
    required = CLIS["dept-train" if cli == "dept-tune" else cli][1]
    required = [str(tmp_path) if word == "out" else word for word in required]
    assert CONSOLE_MAINS[cli]([*required, "--peft_type", "PROMPT_TUNING", "--r", "4"]) == 2
    out, err = capfd.readouterr()
    assert out == "" and f"{cli}: error: --peft_type PROMPT_TUNING does not use --r (PROMPT_TUNING is DePT with " \
                         "r = 0" in err, err
    assert len([line for line in err.splitlines() if ": error: " in line]) == 1


def test_a_config_file_may_set_what_the_method_ignores_with_a_warning(tmp_path, caplog):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("peft_type: PROMPT_TUNING_LORA\nprefix_length: 6\nr: 30\nlora_alpha: 8\n")
    types, required = CLIS["dept-train"]
    _, _, method_args, _ = parse_arguments(types, ["--config", str(recipe), *required, "--peft_type", "PROMPT_TUNING"])
    assert method_args.dept_config(max_length=64, task_type="seq2seq").r == 0  # the baseline of the recipe
    warned = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert any(f"--config {recipe} sets r, which --peft_type PROMPT_TUNING ignores" in m for m in warned), warned
    assert any("sets lora_alpha" in message for message in warned)


def test_every_ignored_flag_is_a_flag_of_the_training_clis():
    flags = {action.dest for action in HfArgumentParser(CLIS["dept-train"][0])._actions}
    assert set().union(*map(set, IGNORED_FLAGS.values())) <= flags
    assert set(IGNORED_FLAGS) == set(PEFT_TYPES)


def test_a_yaml_key_typo_names_the_file_and_the_nearest_key(tmp_path):
    recipe = tmp_path / "sst2.yaml"
    recipe.write_text("task_name: sst2\nlerning_rate: 0.3\n")
    types, required = CLIS["dept-train"]
    with pytest.raises(FlagError, match=rf"--config {recipe}: unknown key 'lerning_rate'\. Did you mean "
                                        r"'learning_rate'\?"):
        parse_arguments(types, ["--config", str(recipe), *required])
    recipe.write_text("evaluation_strategy: epoch\nload_best_model_at_end: false\n")  # an alias is a valid key
    assert parse_arguments(types, ["--config", str(recipe), *required])[3].eval_strategy == "epoch"
    recipe.write_text("debug: true\n")
    with pytest.raises(FlagError, match="'debug' is a flag of the command line only"):
        parse_arguments(types, ["--config", str(recipe), *required])


def test_an_unknown_flag_names_the_nearest_flag():
    types, required = CLIS["dept-train"]
    with pytest.raises(FlagError, match=r"Unknown argument\(s\): --lerning_rate 3\. Did you mean --learning_rate\?"):
        parse_arguments(types, [*required, "--lerning_rate", "3"])


def test_an_unknown_task_name_is_refused_while_parsing():
    types, required = CLIS["dept-train"]
    with pytest.raises(FlagError, match="Unknown task 'sst3'. Did you mean 'sst2'?"):
        parse_arguments(types, [*required, "--task_name", "sst3"])


def test_console_flags_are_taken_out_of_the_command_line():
    argv = ["--a", "1", "--debug", "--log_level", "WARNING", "--b"]
    assert pop_console_flags(argv) == (["--a", "1", "--b"], True, "warning")
    assert pop_console_flags(["--log_level=error"]) == ([], False, "error")
    with pytest.raises(FlagError, match="--log_level needs a level"):
        pop_console_flags(["--log_level"])
