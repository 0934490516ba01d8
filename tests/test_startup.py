"""Start-up: `import dept` and each command line's `--help` load none of the optional packages (the extras, and
transformers' Trainer stack, which imports peft) and none of the slow ones (datasets, timm, transformers' model
code): those are imported where they are used (`dept.extras`). VL-T5 (`dept_vl.model`) subclasses transformers' T5,
so the CLIs that run it import it once a checkpoint is read; its import registers the "vlt5" model type that a saved
VL-T5's config names, and the tests at the bottom load a saved VL-T5 through each of those CLIs in a fresh process,
where nothing else has imported it before. The CPU times are in bench_results/startup (benchmarks/startup.py).

One fresh interpreter imports dept, then runs each CLI's `--help` in turn, then imports `dept_vl.model` itself;
after each step it records which watched modules that step loaded first. A module loaded by a step is charged to
that step, so a step with nothing charged loaded none of them, whatever ran before it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from dept_serve.client import DePTServeClient, wait_until_healthy
from dept_vl.data import feature_dim, open_feature_files, task_file_paths
from dept_vl.model import VLT5ForConditionalGeneration
from tests.conftest import REPO_ROOT, free_port
from tests.reliability.conftest import ENV, TABLE_HEADER, printed_results, run, script

OPTIONAL = ("deepspeed", "optuna", "matplotlib", "peft", "trl", "evaluate", "h5py", "sqlalchemy", "uvicorn",
            "transformers.trainer_utils")
SLOW = ("datasets", "timm", "sklearn", "scipy", "transformers.modeling_utils")
CLIS = ("dept-train", "dept-train-vision", "dept-train-vl", "dept-eval", "dept-serve", "dept-tune")
VL_T5_MODULE = "dept_vl.model"  # imported by the probe after the CLIs: what it loads is charged to it

PROBE = """
import importlib, json, sys
from importlib.metadata import entry_points

watched, charged = sys.argv[2].split(","), {}

def charge(step):
    charged[step] = [name for name in watched if name in sys.modules and all(name not in v for v in charged.values())]

import dept
charge("import dept")
for script in sys.argv[3].split(","):
    (entry,) = entry_points(group="console_scripts", name=script)
    try:
        entry.load()(["--help"])
    except SystemExit as exit:
        assert exit.code in (0, None), (script, exit.code)
    charge(script)
importlib.import_module(sys.argv[4])
charge("import " + sys.argv[4])
with open(sys.argv[1], "w") as file:
    json.dump(charged, file)
"""


@pytest.fixture(scope="module")
def charged(tmp_path_factory) -> dict[str, list[str]]:
    """step -> the watched modules that step loaded first."""
    output = tmp_path_factory.mktemp("startup") / "charged.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", PROBE, str(output), ",".join(OPTIONAL + SLOW), ",".join(CLIS),
                    VL_T5_MODULE], cwd=REPO_ROOT, env=env, check=True, capture_output=True)
    return json.loads(output.read_text())


@pytest.mark.parametrize("step", ["import dept", *CLIS])
def test_import_dept_and_every_clis_help_load_no_optional_or_slow_package(charged, step):
    assert charged[step] == []


def test_the_probe_charges_a_module_to_the_step_that_loaded_it(charged):
    """VL-T5's module, imported after every CLI's `--help`, loads transformers' model code, and is charged with it."""
    assert "transformers.modeling_utils" in charged[f"import {VL_T5_MODULE}"]


# ------------------------------------------------------------------------------- a saved VL-T5, in a fresh process


@pytest.fixture(scope="module")
def saved_vl_t5(vl_fixture, tmp_path_factory):
    """A saved VL-T5 with its tokenizer (what `dept-train-vl --peft_type FULL` writes), for the fixture's features:
    its config.json names the model type "vlt5", which transformers knows only once `dept_vl.model` is imported."""
    directory = tmp_path_factory.mktemp("saved_vl_t5") / "vl_t5"
    feat_dim = feature_dim(open_feature_files(str(vl_fixture.feature_file)))
    VLT5ForConditionalGeneration.from_pretrained(vl_fixture.model_dir, feat_dim=feat_dim).save_pretrained(directory)
    AutoTokenizer.from_pretrained(vl_fixture.model_dir).save_pretrained(directory)
    assert json.loads((directory / "config.json").read_text())["model_type"] == "vlt5"
    return directory


def _short_run(vl_fixture, saved_vl_t5, output_dir) -> list[str]:
    return vl_fixture.argv("vqa", output_dir, "--model_name_or_path", str(saved_vl_t5), "--max_steps", "1",
                           "--eval_steps", "1", "--save_steps", "1", "--do_predict", "false")


@pytest.fixture(scope="module")
def trained_on_saved_vl_t5(vl_fixture, saved_vl_t5, tmp_path_factory):
    """`dept-train-vl` in a fresh process: one step of DePT on the saved VL-T5, evaluated on vqa."""
    output_dir = tmp_path_factory.mktemp("on_saved_vl_t5") / "vqa"
    return output_dir, run("dept-train-vl", *_short_run(vl_fixture, saved_vl_t5, output_dir))


@pytest.mark.slow
def test_dept_train_vl_trains_on_a_saved_vl_t5_in_a_fresh_process(trained_on_saved_vl_t5):
    output_dir, finished = trained_on_saved_vl_t5
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert printed_results(finished.stdout)["total_steps"] == 1
    assert (output_dir / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_dept_eval_scores_an_adapter_of_a_saved_vl_t5_in_a_fresh_process(vl_fixture, saved_vl_t5,
                                                                         trained_on_saved_vl_t5, tmp_path):
    adapter = trained_on_saved_vl_t5[0]
    data = [word for flag, path in task_file_paths(vl_fixture.root).items() for word in (f"--{flag}", path)]
    finished = run("dept-eval", "--model_name_or_path", saved_vl_t5, "--adapter", f"{adapter}:vqa", "--split",
                   "validation", "--feature_file", vl_fixture.feature_file, "--max_target_length", "24",
                   "--generation_max_length", "12", "--output_dir", tmp_path / "eval", *data)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count(TABLE_HEADER) == 1
    (result,) = json.loads((tmp_path / "eval" / "dept_eval_validation.json").read_text())["results"]
    expected = json.loads((adapter / "eval_results.json").read_text())  # the training run's own evaluation
    assert result["metrics"]["vqa_accuracy"] == expected["eval_vqa_accuracy"]
    assert result["num_examples"] == expected["eval_samples"] > 0


@pytest.mark.slow
def test_dept_serve_serves_an_adapter_of_a_saved_vl_t5_in_a_fresh_process(saved_vl_t5, trained_on_saved_vl_t5):
    port = free_port()
    server = subprocess.Popen([script("dept-serve"), "--model_name_or_path", str(saved_vl_t5), "--adapter",
                               f"vqa={trained_on_saved_vl_t5[0]}", "--port", str(port), "--device", "cpu"], env=ENV,
                              cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", timeout_s=120, process=server)
        adapters = DePTServeClient(f"http://127.0.0.1:{port}").adapters()
    finally:
        server.terminate()
        stderr = server.communicate(timeout=60)[1]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert [(row["name"], row["modality"]) for row in adapters["adapters"]] == [("vqa", "vl")]


@pytest.mark.slow
def test_dept_tune_reads_the_hidden_size_of_a_saved_vl_t5_in_a_fresh_process(vl_fixture, saved_vl_t5, tmp_path):
    root = tmp_path / "study"
    # The (m, r) pairs at the budget of m = 4, r = 4, s = 24 and d = 32 (read from the saved VL-T5's config before
    # anything trains): 4·32 + 4·(24 + 32) = 352, also spent by m = 11, r = 0.
    finished = run("dept-tune", *_short_run(vl_fixture, saved_vl_t5, root), "--sampler", "grid", "--search",
                   "r=0,4", "--search", "learning_rate=3e-1", "--pruner", "none")
    assert finished.returncode == 0, finished.stderr[-3000:]
    report = printed_results(finished.stdout)
    assert report["counts"] == {"COMPLETE": 2}
    for row in report["trials"]:
        trainable = json.loads((root / row["output_dir"] / "training_task.json").read_text())["trainable_parameters"]
        assert trainable["prompt"] + trainable["lora_embedding"] == 352
