"""Start-up: `import dept` and each command line's `--help` load none of the optional packages (the extras, and
transformers' Trainer stack, which imports peft), and dept-train's and dept-train-vision's `--help` none of the
slow ones either: those are imported where they are used (`dept.extras`). The CPU times are in
bench_results/startup (benchmarks/startup.py).

One fresh interpreter imports dept, then runs each CLI's `--help` in turn (dept-train and dept-train-vision first);
after each step it records which watched modules that step loaded first. A module loaded by a step is charged to
that step, so a step with nothing charged loaded none of them, whatever ran before it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

OPTIONAL = ("deepspeed", "optuna", "matplotlib", "peft", "trl", "evaluate", "h5py", "sqlalchemy", "uvicorn",
            "transformers.trainer_utils")
SLOW = ("datasets", "timm", "sklearn", "scipy", "transformers.modeling_utils")
FAST_CLIS = ("dept-train", "dept-train-vision")  # neither can run VL-T5, which subclasses transformers' T5
VL_T5_CLIS = ("dept-train-vl", "dept-eval", "dept-serve", "dept-tune")

PROBE = """
import json, sys
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
with open(sys.argv[1], "w") as file:
    json.dump(charged, file)
"""


@pytest.fixture(scope="module")
def charged(tmp_path_factory) -> dict[str, list[str]]:
    """step -> the watched modules that step loaded first."""
    output = tmp_path_factory.mktemp("startup") / "charged.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", PROBE, str(output), ",".join(OPTIONAL + SLOW),
                    ",".join(FAST_CLIS + VL_T5_CLIS)], cwd=REPO_ROOT, env=env, check=True, capture_output=True)
    return json.loads(output.read_text())


@pytest.mark.parametrize("step", ["import dept", *FAST_CLIS])
def test_import_dept_and_the_text_and_vit_clis_help_load_no_optional_or_slow_package(charged, step):
    assert charged[step] == []


@pytest.mark.parametrize("step", VL_T5_CLIS)
def test_the_vl_t5_clis_help_loads_no_optional_package(charged, step):
    assert [name for name in charged[step] if name in OPTIONAL] == []
    assert "timm" not in charged[step] and "datasets" not in charged[step]


def test_the_probe_charges_a_module_to_the_step_that_loaded_it(charged):
    """What the VL-T5 CLIs load at their top (VL-T5 subclasses transformers' T5) is charged to the first of them."""
    assert "transformers.modeling_utils" in charged["dept-train-vl"]
    assert all("transformers.modeling_utils" not in charged[step] for step in VL_T5_CLIS[1:])
