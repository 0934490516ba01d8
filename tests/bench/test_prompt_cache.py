"""The prompt-cache benchmark: its smoke run reports every method, sweep and target, and its parts do what they say."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.prompt_cache import (
    METHODS,
    PromptCacheSettings,
    Timings,
    left_padded,
    md1_latency,
    run,
    write_results,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results():
    settings = PromptCacheSettings(model="llama-tiny", batch_size=2, new_tokens=2, warmup=0, steps=1,
                                   prompt_lengths=(4, 8), rate_batch_sizes=(1, 2))
    return run(settings, log=lambda line: None)


def test_smoke_run_times_every_method_on_every_workload(results):
    assert set(results["workloads"]) == {"short", "fixed"}
    for record in results["workloads"].values():
        assert set(record["methods"]) == set(METHODS)
        assert record["prompt_states_s"] > 0
        for name, row in record["methods"].items():
            assert row["prefill_s"] > 0 and row["generate_s"] > 0, name
        limit = record["methods"]["limit"]
        assert limit["prefill_vs_limit"] == 1.0
        cached = record["methods"]["dept_cached"]
        per_round = [a / b for a, b in zip(cached["prefill_rounds_s"], limit["prefill_rounds_s"])]
        assert cached["prefill_vs_limit"] == pytest.approx(statistics.median(per_round))
    assert [row["workload"] for row in results["targets"]] == ["short", "fixed"]
    assert all(row["met"] == (row["value"] <= 1.10) for row in results["targets"])
    assert [row["value"] for row in results["targets"]] == [
        results["workloads"][w]["methods"]["dept_cached"]["prefill_vs_limit"] for w in ("short", "fixed")]


def test_sweeps_cover_each_prompt_length_and_batch_size(results):
    assert set(results["prompt_length_sweep"]) == {4, 8}
    for row in results["prompt_length_sweep"].values():
        assert row["pt_peft_over_dept_cached"] == pytest.approx(row["pt_peft_prefill_s"] / row["dept_cached_prefill_s"])
    assert set(results["rate_sweep"]) == {1, 2}
    loads = [row["load_of_pt_peft"] for row in results["rate_model"]]
    assert loads == sorted(loads)


def test_results_are_written_once_unless_overwritten(results, tmp_path):
    paths = write_results(results, tmp_path)
    assert json.loads(paths["json"].read_text())["targets"] == json.loads(json.dumps(results["targets"]))
    assert "## The gap to PEFT with the prompt length" in paths["markdown"].read_text()
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_results(results, tmp_path)
    write_results(results, tmp_path, overwrite=True)


def test_left_padding_moves_the_pads_in_front_and_keeps_the_token_order():
    batch = {"input_ids": torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]),
             "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    padded = left_padded(batch)
    assert padded["input_ids"].tolist() == [[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]]
    assert padded["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_ratios_are_medians_of_side_by_side_rounds_not_ratios_of_medians():
    timings = Timings({"a": [2.0, 6.0, 3.0], "b": [1.0, 2.0, 6.0]})  # per-round ratios 2, 3, 0.5
    assert timings.median("a") / timings.median("b") == 1.5
    assert timings.ratio("a", "b") == 2.0


def test_md1_latency_is_service_plus_queueing_and_none_past_saturation():
    assert md1_latency(0.1, 0.0) == pytest.approx(0.1)
    assert md1_latency(0.1, 5.0) == pytest.approx(0.1 + 0.5 * 0.1 / (2 * 0.5))  # load 0.5: W = s + ρs / 2(1-ρ)
    assert md1_latency(0.1, 10.0) is None


def test_cli_refuses_a_model_without_a_decoder_only_shape(tmp_path):
    completed = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "benchmark_prompt_cache.py"), "--model",
                                "t5-small", "--output_dir", str(tmp_path)], capture_output=True, text=True,
                               cwd=REPO_ROOT, timeout=120)
    assert completed.returncode == 2
    assert "decoder-only" in completed.stderr
