"""DeepSpeed ZeRO-2 and ZeRO-3 for real, on the CPU (DS_ACCELERATOR=cpu, one process): the trainer's checkpoints
go through the engine's own save_state/load_state, a resumed run ends bit-identical to the uninterrupted one,
and the adapter equals the one a run without DeepSpeed writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import float32_paths
from tests.dept._toy import toy_args
from tests.dept.deepspeed_runs import build_run

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install '.[deepspeed]')")

REPO_ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = REPO_ROOT / "tests" / "dept" / "launch_deepspeed_training.py"
SETTINGS = {"max_steps": 6, "save_steps": 3, "eval_steps": 3, "metric_for_best_model": "loss"}


def adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("stage, model", [(2, "toy"), (3, "t5")])
def test_deepspeed_zero_resumes_bit_identically_and_saves_the_single_process_adapter(tmp_path, stage, model):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(LAUNCHER),
               str(tmp_path / "ds"), "--stage", str(stage), "--model", model, "--args", json.dumps(SETTINGS)]  # fmt: skip
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert finished.returncode == 0, finished.stderr[-3000:]
    report = json.loads((tmp_path / "ds" / "report.json").read_text())
    assert report["full"]["distributed_type"] == report["resumed"]["distributed_type"] == "DistributedType.DEEPSPEED"

    full, resumed = tmp_path / "ds" / "full", tmp_path / "ds" / "resumed"
    checkpoint = full / "checkpoint-6"
    assert (checkpoint / "pytorch_model").is_dir()  # the engine's own shards, written by save_state
    assert not (checkpoint / "model.safetensors").exists()
    trainable = load_file(str(checkpoint / "trainable_parameters.safetensors"))
    # Resumed from checkpoint-3 through load_state: the same adapter bit for bit, the same metrics.
    for name, tensor in adapter(full).items():
        assert torch.equal(adapter(resumed)[name], tensor), name
    for key in ("train_loss", "eval_loss", "total_steps"):
        assert report["resumed"][key] == report["full"][key], key

    torch.manual_seed(0)
    plain = build_run(model, toy_args(tmp_path / "plain", **SETTINGS))
    plain.train()
    expected = adapter(tmp_path / "plain")
    assert adapter(full).keys() == expected.keys()
    for name, tensor in expected.items():  # whole fp32 tensors, as without DeepSpeed (up to summation order)
        assert adapter(full)[name].dtype == torch.float32
        torch.testing.assert_close(adapter(full)[name], tensor, **float32_paths(tensor))
    plain_trainable = {name: p for name, p in plain.model.named_parameters() if p.requires_grad}
    assert trainable.keys() == plain_trainable.keys()
