"""The visual DePT benchmark: budget-matched sizes, what a run records, the written tables."""

from __future__ import annotations

import json

import pytest

from benchmarks.vit import Settings, budget_matched_rank, time_methods, to_markdown, write_results


@pytest.mark.parametrize(("d", "r"), [(768, 31), (1024, 33)])
def test_dept_rank_is_the_largest_within_vpt_l100_budget_at_196_patches(d, r):
    assert budget_matched_rank(d, 196) == r
    budget = 100 * d
    assert 60 * d + 196 * r + r * d <= budget < 60 * d + 196 * (r + 1) + (r + 1) * d


def test_a_timing_run_records_both_methods_on_one_frozen_vit(tmp_path):
    timing = time_methods("vit-tiny", Settings(steps=1, warmup=0))
    vpt, dept = timing["vpt"], timing["dept"]
    assert (vpt["num_virtual_tokens"], vpt["r"], vpt["tokens_per_image"]) == (100, 0, 297)
    assert (dept["num_virtual_tokens"], dept["r"], dept["tokens_per_image"]) == (60, 19, 257)
    assert vpt["dept_parameters"] == 100 * 192 and dept["dept_parameters"] == 60 * 192 + 196 * 19 + 19 * 192
    assert all(len(row["train_step_cpu_times_s"]) == 1 and row["train_step_cpu_s"] > 0 for row in timing.values())

    for row in timing.values():
        row.update(train_peak_memory_mb=100.0, train_added_memory_mb=10.0, memory_source="test")
    record = {"model": "vit-tiny", "timm_name": "vit_tiny_patch16_224", "methods": timing, "token_limit": 257 / 297,
              "time_ratio": 0.8, "time_ratio_over_limit": 0.8 / (257 / 297), "wall_time_ratio": 0.8,
              "memory_ratio": 1.0, "added_memory_ratio": 1.0, "meets_target": True, "time_figure": "train_step_cpu_s"}
    results = {"settings": {"device": "cpu", "batch_size": 1, "steps": 1, "warmup": 0},
               "environment": {"date": "now", "device": "cpu", "threads": 1, "torch": "x", "timm": "y", "seconds": 1},
               "records": [record]}
    paths = write_results(results, tmp_path)
    assert json.loads(paths["json"].read_text())["records"][0]["token_limit"] == pytest.approx(0.8653, abs=1e-4)
    assert "| vit-tiny | 0.865 | 0.800 | 0.925 (met) |" in to_markdown(results)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_results(results, tmp_path)
