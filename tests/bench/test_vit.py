"""The visual DePT benchmark: budget-matched sizes, what a run records, the written tables."""

from __future__ import annotations

import json

import pytest

from benchmarks.vit import TARGET, Settings, budget_matched_rank, summarize, time_methods, to_markdown, write_results


@pytest.mark.parametrize(("d", "r"), [(768, 31), (1024, 33)])
def test_dept_rank_is_the_largest_within_vpt_l100_budget_at_196_patches(d, r):
    assert budget_matched_rank(d, 196) == r
    budget = 100 * d
    assert 60 * d + 196 * r + r * d <= budget < 60 * d + 196 * (r + 1) + (r + 1) * d


def test_a_timing_run_measures_vpt_dept_and_the_limit_on_one_frozen_vit(tmp_path):
    timing = time_methods("vit-tiny", Settings(steps=1, warmup=0))
    vpt, dept, limit = timing["vpt"], timing["dept"], timing["limit"]
    assert (vpt["num_virtual_tokens"], vpt["r"], vpt["tokens_per_image"]) == (100, 0, 297)
    assert (dept["num_virtual_tokens"], dept["r"], dept["tokens_per_image"]) == (60, 19, 257)
    # the limit: DePT's tokens, no A·B
    assert (limit["num_virtual_tokens"], limit["r"], limit["tokens_per_image"]) == (60, 0, 257)
    assert vpt["dept_parameters"] == 100 * 192 and dept["dept_parameters"] == 60 * 192 + 196 * 19 + 19 * 192
    assert limit["dept_parameters"] == 60 * 192
    assert all(len(row["train_step_cpu_times_s"]) == 1 and row["train_step_cpu_s"] > 0 for row in timing.values())

    for method in ("vpt", "dept"):
        timing[method].update(train_peak_memory_mb=100.0, train_added_memory_mb=10.0, memory_source="test")
    settings = Settings(steps=1, warmup=0)
    record = summarize("vit-tiny", timing, settings)
    # the limit is a measured time, not the token ratio
    assert record["time_ratio_over_limit"] == dept["train_step_cpu_s"] / limit["train_step_cpu_s"]
    assert record["limit_time_ratio"] == limit["train_step_cpu_s"] / vpt["train_step_cpu_s"]
    assert record["meets_target"] == (record["time_ratio_over_limit"] <= TARGET)
    assert record["token_ratio"] == pytest.approx(257 / 297)

    results = {"settings": {"device": "cpu", "batch_size": 1, "steps": 1, "warmup": 0},
               "environment": {"date": "now", "device": "cpu", "threads": 1, "torch": "x", "timm": "y", "seconds": 1},
               "records": [record]}
    paths = write_results(results, tmp_path)
    assert json.loads(paths["json"].read_text())["records"][0]["token_ratio"] == pytest.approx(0.8653, abs=1e-4)
    markdown = to_markdown(results)
    assert "| vit-tiny | limit | 60 | 0 | 11,520 |" in markdown and "| - | - |" in markdown
    verdict = "met" if record["meets_target"] else "missed"
    assert (f"| {record['limit_time_ratio']:.3f} | 0.865 | {record['time_ratio_over_limit']:.3f} ({verdict}) |"
            in markdown)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_results(results, tmp_path)
