"""`--peft_model_id`, `dept-eval --adapter` and `dept-serve --adapter` take a Hub repository id, resolved through
the one resolver (`dept.hub.resolve_adapter_dir`) from huggingface_hub's cache, offline, and give exactly what the
same adapter gives from its local directory."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file

from dept_eval.cli import evaluate as dept_eval
from dept_eval.cli import main as dept_eval_main
from dept_nlp.cli import train as dept_train
from dept_nlp.tasks import get_task
from dept_serve.cli import build_app
from dept_serve.cli import parse_args as serve_args
from tests.conftest import hub_row, put_in_hub_cache, save_tiny_model, text_train_argv, write_task_fixture

pytestmark = pytest.mark.xdist_group("hub_cli")  # shares module-scoped runs: one worker (--dist loadgroup)

REPO_ID = "user/dept-sst2"
HUB_FILES = ("adapter_config.json", "adapter_model.safetensors", "training_task.json", "README.md")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny T5, an sst2 adapter trained by dept-train, and that adapter in a Hub cache as user/dept-sst2."""
    root = tmp_path_factory.mktemp("hub_cli")
    files = write_task_fixture("sst2", root / "data", n_train=8, n_val=4, n_test=4)
    texts = [get_task("sst2").format_example(hub_row("sst2", i))[0] for i in range(20)]
    model_dir = save_tiny_model("seq2seq", root / "t5", texts)
    dept_train(text_train_argv(str(model_dir), root / "run", "sst2", files, steps=4))
    put_in_hub_cache(root / "hub", REPO_ID, {name: (root / "run" / name).read_bytes() for name in HUB_FILES},
                     "9" * 40)
    return {"root": root, "files": files, "model": str(model_dir), "run": root / "run", "cache": root / "hub"}


@pytest.fixture
def hub_cache(run, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(run["cache"]))  # where HF_HUB_CACHE points the CLIs


def test_peft_model_id_starts_from_the_hub_adapter(run, hub_cache, tmp_path):
    adapters = {}
    for name, source in (("local", str(run["run"])), ("hub", REPO_ID)):
        dept_train(text_train_argv(run["model"], tmp_path / name, "sst2", run["files"], steps=2, peft_model_id=source,
                          prefix_length=4, r=2))
        adapters[name] = load_file(tmp_path / name / "adapter_model.safetensors")
    start = load_file(run["run"] / "adapter_model.safetensors")
    for key, value in adapters["local"].items():
        assert torch.equal(adapters["hub"][key], value), key
        assert not torch.equal(value, start[key])  # both trained on from the same adapter


def test_dept_eval_evaluates_a_hub_adapter_as_its_local_directory(run, hub_cache, tmp_path):
    reports = {}
    for name, source in (("local", str(run["run"])), ("hub", REPO_ID)):
        reports[name] = dept_eval(["--model_name_or_path", run["model"], "--adapter", f"{source}:sst2",
                                   "--split", "validation", "--validation_file", str(run["files"]["validation_file"]),
                                   "--generation_max_length", "3", "--output_dir", str(tmp_path / name)])
    (local,), (hub,) = reports["local"]["results"], reports["hub"]["results"]
    assert hub["metrics"] == local["metrics"] and hub["num_examples"] == local["num_examples"] == 4
    predictions = {name: (tmp_path / name / "dept_eval_validation_predictions.jsonl").read_text()
                   for name in reports}
    assert [json.loads(line)["prediction"] for line in predictions["hub"].splitlines()] == [
        json.loads(line)["prediction"] for line in predictions["local"].splitlines()]


def test_dept_serve_serves_a_hub_adapter_as_its_local_directory(run, hub_cache):
    app = build_app(serve_args(["--model_name_or_path", run["model"], "--adapter", f"hub={REPO_ID}",
                                "--adapter", f"local={run['run']}", "--device", "cpu"]))
    engine = app.state.service.engine
    assert engine.adapters["hub"].tasks == engine.adapters["local"].tasks == ["sst2"]  # its training_task.json
    served = engine.multi.model
    hub, local = served.adapter_state_dict(name="hub"), served.adapter_state_dict(name="local")
    assert hub.keys() == local.keys() and all(torch.equal(hub[key], local[key]) for key in hub)


def test_an_adapter_neither_local_nor_cached_is_one_line_and_exit_2(run, hub_cache, capsys):
    status = dept_eval_main(["--model_name_or_path", run["model"], "--adapter", "user/not-cached:sst2",
                             "--split", "validation", "--validation_file", str(run["files"]["validation_file"])])
    err = capsys.readouterr().err
    assert status == 2
    assert "user/not-cached is not a local directory" in err and "HF_HUB_OFFLINE" in err and "Traceback" not in err
