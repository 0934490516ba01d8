"""The memory benchmark: its two counters are exact on hand-computed cases, its limit is DePT without A·B on the same
model, and its smoke run reports every figure and ratio."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.memory import (
    FIGURES,
    TARGET,
    AllocatorPeak,
    SavedActivations,
    Settings,
    build,
    measure_model,
    run_benchmark,
    to_markdown,
    write_results,
)
from tests.conftest import import_script

pytestmark = pytest.mark.xdist_group("bench_memory")  # shares module-scoped runs: one worker (--dist loadgroup)

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = Settings(batch_size=2, max_length=32, isolation="inline")


def test_saved_activations_count_each_storage_once_and_leave_out_parameters():
    weight = torch.nn.Parameter(torch.randn(4, 3))
    x = torch.randn(4, 8, requires_grad=True)
    with SavedActivations(exclude=[weight]) as saved:
        a = x.exp()  # saves its result a: 4 * 8 * 4 = 128 bytes
        b = a.sin()  # saves its input a again: the same storage, counted once
        c = b[:, :4]  # a view: saves nothing
        d = c * c  # saves c twice: a view of b's 128-byte storage, counted once as that storage
        e = d @ weight  # saves weight (a parameter: left out) and d: 4 * 4 * 4 = 64 bytes
    assert saved.bytes() == 128 + 128 + 64
    assert len(saved.held()) == 3
    naive = sum(t.numel() * t.element_size() for t in (a, a, c, c, d))
    assert naive == 128 + 128 + 64 + 64 + 64  # what counting tensors instead of storages would give
    del e
    e = (d @ weight).sum()
    e.backward()
    assert x.grad.shape == x.shape


def test_saved_activations_forget_a_branch_whose_graph_was_dropped():
    x = torch.randn(16, requires_grad=True)
    with SavedActivations() as saved:
        kept = x.exp()  # 64 bytes, held by the graph of `kept`
        x.sin().sum()  # sin saves x (64 bytes, a leaf this test still holds), but its graph is dropped at once
    assert saved.bytes() == 64
    assert kept.requires_grad


def test_allocator_peak_on_cpu_is_exact_for_known_allocations():
    x = torch.randn(4, 8)
    with AllocatorPeak("cpu") as memory:
        first = torch.empty(1000)  # 4,000 bytes
        second = torch.empty(2000)  # 8,000
        del first
        third = torch.empty(500)  # 2,000: the peak stays at 12,000
        a = x.exp()  # 128
        b = a.sin()  # 128
        del a
    assert memory.peak == 12_000
    assert memory.end == 8_000 + 2_000 + 128
    assert (second.numel(), third.numel(), b.numel()) == (2000, 500, 32)


@pytest.mark.parametrize("model", ["t5-tiny", "llama-tiny", "vit-tiny"])
def test_the_limit_is_dept_without_a_b_on_the_same_frozen_model(model):
    torch.manual_seed(0)
    base, methods, batch = build(model, TINY)
    dept, pt, limit = methods["dept"], methods["pt"], methods["limit"]
    assert dept.base_model is base and pt.base_model is base and limit.base_model is base
    assert (limit.config.num_virtual_tokens, limit.config.r) == (60, 0)
    assert dept.config.num_virtual_tokens == 60 and dept.config.r > 0
    assert (pt.config.num_virtual_tokens, pt.config.r) == (100, 0)
    assert limit.prompt_encoder.lora_embedding_A.numel() == 0 == limit.prompt_encoder.lora_embedding_B.numel()

    dept.eval()
    limit.eval()
    with torch.no_grad():
        limit.prompt_encoder.prompt_embeddings.copy_(dept.prompt_encoder.prompt_embeddings)
        batch = {key: value[:1] for key, value in batch.items()}
        dept.prompt_encoder.lora_embedding_B.normal_()
        dept.invalidate_caches()
        with_update = dept(**batch).logits
        dept.prompt_encoder.lora_embedding_B.zero_()
        dept.invalidate_caches()
        without_update = dept(**batch).logits
        reference = limit(**batch).logits
    scale = reference.abs().max()
    torch.testing.assert_close(without_update, reference, rtol=1e-5, atol=1e-5 * scale)
    assert (with_update - reference).abs().max() > 1e-3 * scale  # A·B does change DePT's output


@pytest.fixture(scope="module")
def results():
    return run_benchmark(["t5-tiny", "llama-tiny", "vit-tiny"], TINY, command="test", log=lambda line: None)


def test_smoke_run_measures_every_method_and_figure(results):
    assert [record["model"] for record in results["records"]] == ["t5-tiny", "llama-tiny", "vit-tiny"]
    for record in results["records"]:
        methods = record["methods"]
        assert set(methods) == {"dept", "pt", "limit"}
        for row in methods.values():
            for figure in (*FIGURES, "weights_bytes", "optimizer_state_bytes"):
                assert row[figure] > 0, (record["model"], figure)
            assert row["train_end_bytes"] < row["train_peak_bytes"]  # activations were freed by backward
        s = record["input_tokens"]
        assert [methods[name]["tokens"] for name in ("dept", "pt", "limit")] == [60 + s, 100 + s, 60 + s]
        assert methods["dept"]["weights_bytes"] == methods["limit"]["weights_bytes"] + 4 * (
            methods["dept"]["trainable_parameters"] - methods["limit"]["trainable_parameters"])  # A and B, fp32
        # DePT does all the limit does, plus A·B; PT runs 40 more tokens through every block
        assert methods["dept"]["saved_activation_bytes"] >= methods["limit"]["saved_activation_bytes"]
        assert methods["pt"]["saved_activation_bytes"] > methods["dept"]["saved_activation_bytes"]
        for reference in ("limit", "pt"):
            for figure, ratio in record["dept_over"][reference].items():
                assert ratio == pytest.approx(methods["dept"][figure] / methods[reference][figure], rel=1e-12)
    targets = results["targets"]
    assert len(targets) == 3 * len(FIGURES)
    assert all(row["met"] == (row["value"] <= TARGET) for row in targets)


def test_memory_figures_do_not_depend_on_the_run():
    first, second = (measure_model("llama-tiny", TINY)["methods"]["dept"] for _ in range(2))
    for figure in (*FIGURES, "saved_storages", "weights_bytes", "optimizer_state_bytes"):
        assert first[figure] == second[figure], figure


def test_results_are_written_once_unless_overwritten(results, tmp_path):
    paths = write_results(results, tmp_path)
    assert json.loads(paths["json"].read_text())["records"][0]["model"] == "t5-tiny"
    markdown = paths["markdown"].read_text()
    assert markdown == to_markdown(results)
    assert "## Target: DePT within 1.02× of the limit" in markdown and "Command: `test`" in markdown
    assert "| llama-tiny | dept | 60 | 30 |" in markdown
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_results(results, tmp_path)
    write_results(results, tmp_path, overwrite=True)


def test_cli_refuses_unknown_models_and_existing_results(results, tmp_path, capsys):
    cli = import_script("benchmark_memory")
    assert cli.main(["--models", "gpt-5", "--output_dir", str(tmp_path)]) == 2
    assert "unknown models" in capsys.readouterr().err
    write_results(results, tmp_path)
    assert cli.main(["--models", "llama-tiny", "--output_dir", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_gpu_check_dry_run_lists_the_memory_benchmark_on_cuda(tmp_path):
    completed = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out",
                                str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
                               env={**os.environ, "PY": sys.executable})
    assert completed.returncode == 0, completed.stderr[-2000:]
    memory = [line for line in completed.stderr.splitlines() if "scripts/benchmark_memory.py" in line]
    assert len(memory) == 1
    assert "--models t5-base,llama-small,vit-b16 --device cuda --batch_size 8 --max_length 256" in memory[0]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
