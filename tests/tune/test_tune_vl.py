"""dept-tune drives the vision-language pipeline through the same trainer: a VQA study on a tiny VL-T5."""

from __future__ import annotations

import json

import pytest

from dept_tune.cli import tune
from dept_tune.pipelines import detect_pipeline
from tests.conftest import REPO_ROOT, build_vl_fixture


def test_vl_recipes_select_the_vl_pipeline_and_its_metric():
    pipeline = detect_pipeline(["--config", str(REPO_ROOT / "configs" / "vl" / "vqa.yaml")])
    assert pipeline.modality == "vl"
    assert detect_pipeline(["--config", str(REPO_ROOT / "configs" / "nlp" / "rte.yaml")]).modality == "text"


@pytest.mark.slow
def test_vqa_study_reports_vqa_accuracy_and_searches_r_at_a_fixed_budget(tmp_path):
    fixture = build_vl_fixture(tmp_path, n_images=10)
    root = tmp_path / "study"
    # m = 4, r = 4, s = 24, d = 32: the budget 4·32 + 4·(24 + 32) = 352 is also spent by PT with m = 11 (r = 0).
    report = tune(fixture.argv("vqa", root, "--max_steps", "2", "--keep_all") + [
        "--sampler", "grid", "--search", "r=0,4", "--search", "learning_rate=3e-1", "--pruner", "none"])
    assert report["metric"] == "eval_vqa_accuracy" and report["counts"] == {"COMPLETE": 2}
    dirs = sorted(row["output_dir"] for row in report["trials"])
    assert dirs == ["vqa_lr3e-1_loralr1e-2_pl11_r0_st2", "vqa_lr3e-1_loralr1e-2_pl4_r4_st2"]
    for name in dirs:
        trainable = json.loads((root / name / "training_task.json").read_text())["trainable_parameters"]
        assert trainable["prompt"] + trainable["lora_embedding"] == 352
    assert "test_vqa_accuracy" in report["best"]["test"]
