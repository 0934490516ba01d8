"""The efficiency benchmark: its smoke run reports every method and figure, and its parts do what they say."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import throughput
from benchmarks.throughput import (
    LOOP_ROUNDS,
    METHODS,
    MODELS,
    WORKLOADS,
    Settings,
    check_output_dir,
    evaluate_targets,
    make_batches,
    time_trainer_against_bare_loop,
)
from tests.conftest import import_script

pytestmark = pytest.mark.xdist_group("bench_throughput")  # shares module-scoped runs: one worker (--dist loadgroup)

TINY_MODELS = ("t5-tiny", "llama-tiny")
TRAIN_FIGURES = ("train_step_s", "train_peak_memory_mb", "train_added_memory_mb")
EVAL_FIGURES = ("eval_forward_s", "eval_peak_memory_mb", "eval_added_memory_mb")


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    """One CLI run at tiny dims on the short-text workload (both paddings), two measured steps: the script's main,
    called in this process (each measurement still runs in a fresh process of its own, as on the command line)."""
    output_dir = tmp_path_factory.mktemp("bench")
    argv = ["--sizes", "tiny", "--workloads", "short", "--device", "cpu", "--batch_size", "2", "--warmup", "1",
            "--steps", "2", "--threads", "1", "--output_dir", str(output_dir)]
    assert import_script("benchmark").main(argv) == 0
    return output_dir


@pytest.fixture(scope="module")
def records(smoke_dir):
    results = json.loads((smoke_dir / "results.json").read_text())
    return {(r["model"], r["method"]): r for r in results["results"]}


def test_smoke_run_has_every_method_and_figure_with_positive_timings(records):
    for model in TINY_MODELS:
        for name, method in METHODS.items():
            record = records[(model, name)]
            assert "errors" not in record, record.get("errors")
            figures = EVAL_FIGURES + (TRAIN_FIGURES if "train" in method.phases else ())
            figures += ("generate_s",) if model.startswith("t5") else ()
            for figure in figures:
                assert record[figure] > 0, (model, name, figure)
            for series in ("train_step_times_s", "eval_forward_times_s"):
                if series in record:
                    assert len(record[series]) == 2 and min(record[series]) > 0
            if "train" in method.phases:
                assert all(torch.isfinite(torch.tensor(record["losses"])))
        assert "generate_s" not in records[("llama-tiny", "dept")]  # generate is timed for seq2seq only
        loop = records[(model, "dept")]  # the "loop" phase: the trainer against a bare accelerate loop
        for figure in ("bare_loop_step_s", "trainer_step_s", "trainer_throughput_ratio"):
            assert loop[figure] > 0, (model, figure)
        assert loop["trainer_throughput_ratio"] == pytest.approx(loop["bare_loop_step_s"] / loop["trainer_step_s"],
                                                                 rel=0.5)  # a median of per-step ratios  # fmt: skip


def test_ratios_divide_by_the_references_measured_in_the_same_run(records):
    for (model, _), record in records.items():
        for reference in ("pt", "pt_peft"):
            ref = records[(model, reference)]
            ratios = record[f"ratio_to_{reference}"]
            expected = [f for f in TRAIN_FIGURES + EVAL_FIGURES + ("generate_s",) if f in record and f in ref]
            assert sorted(ratios) == sorted(expected)
            for figure, ratio in ratios.items():
                assert ratio == pytest.approx(record[figure] / ref[figure], rel=1e-12)


def test_trainable_parameters_follow_each_methods_budget(records):
    d, s = 32, WORKLOADS["short"].max_length
    for model in TINY_MODELS:
        assert records[(model, "pt")]["trainable_parameters"] == 100 * d
        assert records[(model, "pt_peft")]["trainable_parameters"] == 100 * d
        for name in ("dept", "dept_padded", "dept_uncached"):
            assert records[(model, name)]["trainable_parameters"] == 60 * d + s * 30 + 30 * d
        assert records[(model, "frozen")]["trainable_parameters"] == 0
        assert records[(model, "full")]["trainable_parameters"] == records[(model, "full")]["base_parameters"]
    # LoRA r=8 adds 8 * (d_in + d_out) per adapted projection.
    # t5-tiny: q and v (32 -> 32) in 2 encoder self-attentions and 2 x 2 decoder attentions.
    assert records[("t5-tiny", "lora")]["trainable_parameters"] == 6 * 2 * 8 * (32 + 32)
    # llama-tiny: q_proj 32 -> 32 and v_proj 32 -> 16 (2 key-value heads of 8) in 2 layers.
    assert records[("llama-tiny", "lora")]["trainable_parameters"] == 2 * (8 * (32 + 32) + 8 * (32 + 16))


def test_dynamic_padding_feeds_the_same_tokens_with_less_padding(records):
    for model in TINY_MODELS:
        padded, dynamic = records[(model, "dept_padded")], records[(model, "dept")]
        assert padded["padded_length"] == WORKLOADS["short"].max_length
        assert padded["real_length"] == dynamic["real_length"]
        assert dynamic["real_length"] <= dynamic["padded_length"] < 100


def test_results_are_written_as_json_markdown_and_png(smoke_dir):
    markdown = (smoke_dir / "results.md").read_text()
    assert "## Targets" in markdown
    for method in METHODS.values():
        assert method.label in markdown
    assert "## The trainer against a bare accelerate loop" in markdown
    assert "| trainer throughput vs a bare accelerate loop, same model and batches | t5-tiny |" in markdown
    assert (smoke_dir / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_existing_results_are_refused_unless_overwrite(smoke_dir, capsys):
    with pytest.raises(FileExistsError, match="--overwrite"):
        check_output_dir(smoke_dir, overwrite=False)
    assert check_output_dir(smoke_dir, overwrite=True) == smoke_dir
    cli = import_script("benchmark")
    before = (smoke_dir / "results.json").read_bytes()
    assert cli.main(["--sizes", "tiny", "--device", "cpu", "--output_dir", str(smoke_dir)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (smoke_dir / "results.json").read_bytes() == before


def test_short_and_long_workloads_have_the_intended_length_distributions():
    generator = torch.Generator().manual_seed(0)
    short = WORKLOADS["short"].sample_lengths(20_000, generator).float()
    assert (short < 64).float().mean() > 0.9
    assert 15 <= short.median() <= 25
    assert short.min() >= 4 and short.max() <= 256
    long = WORKLOADS["long"].sample_lengths(20_000, generator).float()
    assert long.max() == 512 and 0.2 < (long == 512).float().mean() < 0.5
    assert torch.equal(WORKLOADS["fixed"].sample_lengths(5, generator), torch.full((5,), 256))


def test_batches_hold_the_same_real_tokens_whatever_the_padding():
    workload = WORKLOADS["short"]
    dynamic = make_batches(workload, 100, 3, 2, seed=7, task_type="causal")
    padded = make_batches(workload, 100, 3, 2, seed=7, task_type="causal", pad_to_max_length=True)
    extra = make_batches(workload, 100, 3, 2, seed=7, task_type="causal", extra_leading_tokens=5)
    for short, full, longer in zip(dynamic, padded, extra):
        width = short["input_ids"].shape[1]
        assert width == int(short["attention_mask"].sum(1).max())
        assert full["input_ids"].shape[1] == workload.max_length
        assert torch.equal(full["input_ids"][:, :width], short["input_ids"])
        assert not full["attention_mask"][:, width:].any()
        assert torch.equal(longer["input_ids"][:, 5:], short["input_ids"])
        assert longer["attention_mask"][:, :5].all()
        assert (longer["labels"][:, :5] == -100).all()
        assert torch.equal(short["labels"] == -100, short["attention_mask"] == 0)
    seq2seq = make_batches(WORKLOADS["long"], 100, 3, 1, seed=7, task_type="seq2seq")[0]
    assert seq2seq["labels"].shape == (3, WORKLOADS["long"].target_length)


def _record(model, workload, method, **figures):
    return {"model": model, "workload": workload, "method": method, **figures}


def test_targets_are_judged_from_the_measured_ratios():
    records = [
        _record("t5-small", "fixed", "dept_padded", train_step_s=0.8, train_peak_memory_mb=900.0),
        _record("t5-small", "fixed", "pt_peft", train_step_s=1.0, train_peak_memory_mb=1000.0),
        _record("t5-small", "short", "dept", train_step_s=0.2, eval_forward_s=0.104,
                ratio_to_pt_peft={"train_step_s": 0.5}),
        _record("t5-small", "short", "dept_padded", train_step_s=0.5),
        _record("t5-small", "short", "pt", train_step_s=0.25),
        _record("t5-small", "short", "pt_peft", train_step_s=0.4),
        _record("t5-small", "short", "frozen", eval_forward_s=0.1),
        _record("t5-base", "short", "dept", ratio_to_pt_peft={"train_step_s": 0.6}, trainer_throughput_ratio=0.98),
    ]
    rows = {(row["target"], row["model"], row["workload"]): row for row in evaluate_targets(records, ["t5-small",
                                                                                                      "t5-base"])}
    assert len(rows) == 8

    def row(start, model="t5-small"):
        return next(r for (target, m, _), r in rows.items() if target.startswith(start) and m == model)

    inputs_256 = row("train time vs HF PEFT PT, inputs")
    assert inputs_256["value"] == pytest.approx(0.8) and inputs_256["met"]
    assert row("train peak memory")["value"] == pytest.approx(0.9) and not row("train peak memory")["met"]
    assert row("train time vs PT, short")["value"] == pytest.approx(0.8)
    assert not row("train time vs PT, short")["met"]
    assert row("train time vs HF PEFT PT, short")["value"] == pytest.approx(0.5)
    assert row("speed-up")["value"] == pytest.approx(2.5) and not row("speed-up")["met"]
    assert row("eval forward")["value"] == pytest.approx(1.04) and not row("eval forward")["met"]
    trainer = row("trainer throughput vs a bare accelerate loop", "t5-base")  # a figure of its own, no reference
    assert trainer["value"] == pytest.approx(0.98) and trainer["met"] and trainer["reference"] is None
    grows = row("saving over HF PEFT PT grows", "t5-small < t5-base")
    assert grows["value"] == [0.5, 0.6] and not grows["met"]


def test_every_baseline_but_the_external_references_is_built_by_dept_methods(monkeypatch):
    built = []

    def recording(model, peft_type, **kwargs):
        built.append(peft_type)
        return prepare_method(model, peft_type, **kwargs)

    prepare_method = throughput.prepare_method
    monkeypatch.setattr(throughput, "prepare_method", recording)
    spec, workload = MODELS["t5-tiny"], WORKLOADS["short"]
    for name, method in METHODS.items():
        built.clear()
        model = throughput.prepare_model(method, spec.build(), spec, workload)
        if name in ("pt_peft", "frozen"):  # HF PEFT's own prompt tuning and the frozen inference bound
            assert built == [], name
        else:
            assert built == [method.peft_type], name
        if name == "pt":
            assert model.config.r == 0 and model.config.num_virtual_tokens == 100


def test_trainer_and_bare_loop_see_the_same_batches_in_the_same_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    spec, workload = MODELS["t5-tiny"], WORKLOADS["short"]
    model = throughput.prepare_model(METHODS["dept"], spec.build(), spec, workload)
    settings = Settings(device="cpu", warmup=1, steps=3, threads=1)
    batches = make_batches(workload, spec.dims["vocab_size"], 2, 4, seed=0, task_type="seq2seq")
    seen = []
    model.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["input_ids"].sum().item()),
                                    with_kwargs=True)  # fmt: skip
    result = time_trainer_against_bare_loop(model, batches, settings)

    assert seen[0] == batches[0]["input_ids"].sum().item()  # the warm-up batch, bare loop only
    rounds = [seen[1 + 6 * i : 7 + 6 * i] for i in range(LOOP_ROUNDS)]
    assert len(seen) == 1 + 6 * LOOP_ROUNDS
    measured = sorted(batch["input_ids"].sum().item() for batch in batches[1:])
    for run in rounds:
        bare, trainer = run[:3], run[3:]
        assert bare == trainer and sorted(bare) == measured
    assert result["trainer_throughput_ratio"] > 0 and result["loop_clock"] == "process CPU time"
