"""The prompt-cache benchmark: its smoke run reports every method, sweep and target, and its parts do what they say."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from benchmarks.prompt_cache import (
    METHODS,
    TARGETS,
    PrefixCachedModel,
    PromptCacheSettings,
    Timings,
    build_base,
    build_methods,
    left_padded,
    md1_latency,
    run,
    write_results,
)
from dept.config import DePTConfig
from dept.model import get_dept_model
from tests.conftest import import_script

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results():
    settings = PromptCacheSettings(model="llama-tiny", batch_size=2, new_tokens=2, warmup=0, steps=1, runs=2,
                                   isolation="inline", prompt_lengths=(4, 8), rate_batch_sizes=(1, 2))
    return run(settings, log=lambda line: None)


def test_smoke_run_times_every_method_on_every_workload(results):
    assert set(results["workloads"]) == {"short", "fixed"}
    for record in results["workloads"].values():
        assert set(record["methods"]) == set(METHODS)
        assert record["prompt_states_s"] > 0
        for name, row in record["methods"].items():
            assert row["prefill_s"] > 0 and row["generate_s"] > 0 and row["forward_s"] > 0, name
            assert len(row["prefill_rounds_s"]) == 2  # one round in each of the two runs, pooled
        limit = record["methods"]["limit"]
        assert limit["prefill_vs_limit"] == 1.0 and limit["forward_vs_limit"] == 1.0
        cached = record["methods"]["dept_cached"]
        for figure, reference in (("prefill", "limit"), ("prefill", "prefix_limit"), ("forward", "limit")):
            rounds = record["methods"][reference][f"{figure}_rounds_s"]
            per_round = [a / b for a, b in zip(cached[f"{figure}_rounds_s"], rounds)]
            assert cached[f"{figure}_vs_{reference}"] == pytest.approx(statistics.median(per_round))
            spread = cached["spread"][f"{figure}_vs_{reference}"]
            assert spread["min"] == min(per_round) and spread["max"] == max(per_round)
            assert spread["median"] == pytest.approx(statistics.median(per_round))
            assert spread["q1"] <= spread["median"] <= spread["q3"]
            assert spread["run_medians"] == pytest.approx(per_round)  # a run's median of its one round
    old_target = [row for row in results["targets"] if row["target"] == "prefill with the prompt cache vs the limit"]
    assert [row["workload"] for row in old_target] == ["short", "fixed"]
    assert all(row["met"] == (row["value"] <= 1.10) for row in old_target)
    assert [row["value"] for row in old_target] == [
        results["workloads"][w]["methods"]["dept_cached"]["prefill_vs_limit"] for w in ("short", "fixed")]


def test_targets_compare_dept_cached_with_the_prefix_limit_and_the_frozen_forward(results):
    rows = {(row["figure"], row["reference"], row["workload"]): row for row in results["targets"]}
    assert len(rows) == len(TARGETS) * 2
    for figure, reference, threshold in (("prefill", "prefix_limit", 1.02), ("forward", "limit", 1.15)):
        for workload in ("short", "fixed"):
            row = rows[(figure, reference, workload)]
            method = results["workloads"][workload]["methods"]["dept_cached"]
            assert row["value"] == method[f"{figure}_vs_{reference}"]
            assert row["spread"] == method["spread"][f"{figure}_vs_{reference}"]
            assert row["threshold"] == threshold and row["met"] == (row["value"] <= threshold)


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


def test_the_spread_pools_the_rounds_of_every_run_and_keeps_each_runs_median():
    timings = Timings.pooled([{"a": [2.0, 6.0], "b": [1.0, 2.0]}, {"a": [3.0], "b": [6.0]}])  # ratios 2, 3 | 0.5
    assert timings.rounds == {"a": [2.0, 6.0, 3.0], "b": [1.0, 2.0, 6.0]}
    spread = timings.ratio_spread("a", "b")
    assert spread == {"median": 2.0, "q1": 1.25, "q3": 2.5, "min": 0.5, "max": 3.0, "rounds": 3,
                      "run_medians": [2.5, 0.5]}


def _prefix_and_requests():
    base = build_base(PromptCacheSettings(model="llama-tiny"))
    batch = left_padded({"input_ids": torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]]),
                         "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])})
    return base, PrefixCachedModel(base, prefix_length=6, seed=0), batch


def test_the_prefix_cached_limit_computes_what_running_prefix_and_input_together_does():
    base, prefixed, batch = _prefix_and_requests()
    with torch.no_grad():
        cached = prefixed.forward(batch).logits
        input_ids, attention_mask = prefixed.full_inputs(batch)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        together = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits[:, 6:]
    assert cached.shape == together.shape == (2, 6, base.config.vocab_size)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(cached[real], together[real], rtol=1e-5, atol=1e-5 * together.abs().max())
    generated = prefixed.generate(batch, 3)
    plain = base.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=3, min_new_tokens=3,
                          do_sample=False)
    assert torch.equal(generated[:, -3:], plain[:, -3:])


def test_the_prefix_limit_is_dept_with_the_prefix_as_its_prompt_and_no_a_b():
    base, prefixed, batch = _prefix_and_requests()
    config = DePTConfig(num_virtual_tokens=6, r=2, max_length=8, prompt_init="random", task_type="causal")
    dept_model = get_dept_model(base, config).eval()
    with torch.no_grad():  # P = the prefix's embeddings, A·B = 0 (B starts at zero)
        dept_model.prompt_encoder.prompt_embeddings.copy_(base.get_input_embeddings()(prefixed.prefix_ids[0]))
    assert not dept_model.prompt_encoder.lora_embedding_B.any()
    dept_model.invalidate_caches()
    tokens = dept_model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False, new_tokens_only=True)
    assert torch.equal(tokens, prefixed.generate(batch, 3)[:, -3:])


def test_every_method_runs_on_the_one_frozen_base():
    base = build_base(PromptCacheSettings(model="llama-tiny"))
    methods = build_methods(base, max_length=32, prompt_length=4)
    assert list(methods) == list(METHODS)
    assert methods["limit"].model is base and methods["prefix_limit"].model is base
    assert methods["dept_cached"].model is methods["dept_uncached"].model
    assert methods["dept_cached"].model.base_model is base and methods["dept_cached"].model.config.r == 30
    assert methods["pt_peft"].model.get_base_model().config == base.config  # PEFT wraps its own copy
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    with torch.no_grad():
        assert torch.equal(methods["limit"].forward(batch).logits, base(**batch).logits)
        uncached = methods["dept_uncached"].forward(batch).logits
        torch.testing.assert_close(methods["dept_cached"].forward(batch).logits, uncached, rtol=1e-5,
                                   atol=1e-5 * uncached.abs().max())


def test_md1_latency_is_service_plus_queueing_and_none_past_saturation():
    assert md1_latency(0.1, 0.0) == pytest.approx(0.1)
    assert md1_latency(0.1, 5.0) == pytest.approx(0.1 + 0.5 * 0.1 / (2 * 0.5))  # load 0.5: W = s + ρs / 2(1-ρ)
    assert md1_latency(0.1, 10.0) is None


def test_cli_refuses_a_model_without_a_decoder_only_shape(tmp_path, capsys):
    cli = import_script("benchmark_prompt_cache")  # the script's main, in this process
    assert cli.main(["--model", "t5-small", "--output_dir", str(tmp_path)]) == 2
    assert "decoder-only" in capsys.readouterr().err
