"""Visual DePT against VPT-shallow with l = 100, at the same parameter budget: train step time and memory.

For each ViT shape (random weights; ViT-B/16 and ViT-L/16 at 224 px, so s = 196 patches):

- VPT: l = 100 prompt tokens, so every block sees 1 + 100 + 196 tokens;
- visual DePT: m = 60 and the largest r with m*d + s*r + r*d <= 100*d, so blocks see 1 + 60 + 196 tokens;
- the limit: the same ViT fed the same 1 + 60 + 196 tokens with no A @ B (P alone, m = 60, r = 0; something must
  train for a backward pass through the blocks): what DePT would cost if A @ B were free.

The target is DePT's step time within 1.03x of the limit's, measured (as the text benchmark measures the frozen
model fed m + s tokens); the token ratio (1 + m + s) / (1 + l + s) is reported beside it, as what DePT's time
over VPT's would be if cost were linear in tokens.

Time is the median train step (forward, backward, AdamW step) after warm-up. The three methods wrap the same
frozen ViT in one process and take turns step by step on the same batch (the order rotating each step), so a
load change on a shared machine affects all alike. On CPU the ratio is taken on the process's CPU time (one thread by default), which waiting for a
busy core does not inflate; wall time is reported beside it. Peak memory is measured apart, each method in a
fresh process over one train step (`benchmarks.throughput.PeakMemory`: the CUDA allocator's peak on GPU, the peak RSS
on CPU), for VPT and DePT.

    python scripts/benchmark_vit.py --models vit-b16,vit-l16 --output_dir bench_results/vit
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import multiprocessing
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch

from benchmarks.throughput import PeakMemory, check_output_dir
from dept_vl.vit import DePTModelForImageClassification, num_patches, vit_dept_config

VPT_LENGTH = 100
DEPT_NUM_VIRTUAL_TOKENS = 60
MODELS = {"vit-b16": "vit_base_patch16_224", "vit-l16": "vit_large_patch16_224", "vit-tiny": "vit_tiny_patch16_224"}
METHODS = ("vpt", "dept", "limit")
MEMORY_METHODS = ("vpt", "dept")
TARGET = 1.03
NUM_CLASSES = 100


@dataclass
class Settings:
    device: str = "cpu"
    batch_size: int = 1
    steps: int = 3
    warmup: int = 1
    threads: int | None = 1
    seed: int = 0

    @property
    def timer(self) -> str:
        """The figure the time ratio uses: CPU time on CPU (robust to a shared machine), wall time on GPU."""
        return "train_step_cpu_s" if self.device == "cpu" else "train_step_s"


def budget_matched_rank(token_dim: int, s: int, prompt_length: int = VPT_LENGTH,
                        m: int = DEPT_NUM_VIRTUAL_TOKENS) -> int:
    """The largest r with m*d + s*r + r*d <= l*d (l = prompt_length): DePT at (at most) VPT's budget."""
    return (prompt_length - m) * token_dim // (s + token_dim)


def build(model: str, method: str, vit=None):
    """`method` on the ViT `vit` (a random-weight `model` if None): VPT l = 100, DePT, or the limit (P alone,
    m = 60)."""
    vit = vit if vit is not None else timm.create_model(MODELS[model], pretrained=False, num_classes=NUM_CLASSES)
    d, s = vit.embed_dim, num_patches(vit)
    m, r = {"vpt": (VPT_LENGTH, 0), "dept": (DEPT_NUM_VIRTUAL_TOKENS, budget_matched_rank(d, s)),
            "limit": (DEPT_NUM_VIRTUAL_TOKENS, 0)}[method]
    return vit, DePTModelForImageClassification(vit, vit_dept_config(vit, num_virtual_tokens=m, r=r))


def _batch(settings: Settings, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(settings.seed)
    pixel_values = torch.randn(settings.batch_size, 3, 224, 224, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (settings.batch_size,), generator=generator)
    return {"pixel_values": pixel_values.to(device), "labels": labels.to(device)}


def _train_step(model, optimizer, batch, device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one forward, backward and AdamW step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def _optimizer(model):
    return torch.optim.AdamW(model.optimizer_param_groups(learning_rate=1e-3, lora_embedding_lr=1e-4))


def time_methods(model: str, settings: Settings) -> dict:
    """Every method on one frozen ViT, taking turns step by step; {method: {step times, parameters, tokens}}."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    device = torch.device(settings.device)
    vit = None
    runs = {}
    for method in METHODS:
        vit, wrapped = build(model, method, vit)
        wrapped.to(device).train()
        runs[method] = (wrapped, _optimizer(wrapped))
    batch = _batch(settings, device)
    times = {method: [] for method in METHODS}
    for step in range(settings.warmup + settings.steps):
        turn = step % len(METHODS)
        for method in METHODS[turn:] + METHODS[:turn]:
            wall_and_cpu = _train_step(*runs[method], batch, device)
            if step >= settings.warmup:
                times[method].append(wall_and_cpu)
    result = {}
    for method, (wrapped, _) in runs.items():
        counts = wrapped.num_trainable_parameters()
        result[method] = {
            "num_virtual_tokens": wrapped.config.num_virtual_tokens, "r": wrapped.config.r,
            "dept_parameters": counts["dept"], "head_parameters": counts["head"],
            "tokens_per_image": vit.num_prefix_tokens + wrapped.config.num_virtual_tokens + num_patches(vit),
            "train_step_s": statistics.median(wall for wall, _ in times[method]),
            "train_step_cpu_s": statistics.median(cpu for _, cpu in times[method]),
            "train_step_times_s": [wall for wall, _ in times[method]],
            "train_step_cpu_times_s": [cpu for _, cpu in times[method]],
        }
    return result


def measure_memory(model: str, method: str, settings: Settings) -> dict:
    """Peak memory of the training steps of one method, in this (fresh) process."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    device = torch.device(settings.device)
    _, wrapped = build(model, method)
    wrapped.to(device).train()
    optimizer, batch = _optimizer(wrapped), _batch(settings, device)
    memory = PeakMemory(device)
    memory.start()
    _train_step(wrapped, optimizer, batch, device)
    peak, added = memory.stop()
    return {"train_peak_memory_mb": peak, "train_added_memory_mb": added, "memory_source": memory.source}


def _in_fresh_process(function, *args) -> dict:
    context = multiprocessing.get_context("spawn")
    with context.Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(function, args)


def summarize(model: str, timing: dict, settings: Settings) -> dict:
    """One model's record: the methods' figures and the ratios, DePT's time over the measured limit's first."""
    vpt, dept, limit = timing["vpt"], timing["dept"], timing["limit"]
    over_limit = dept[settings.timer] / limit[settings.timer]
    return {
        "model": model, "timm_name": MODELS[model], "methods": timing, "time_figure": settings.timer,
        "time_ratio": dept[settings.timer] / vpt[settings.timer],
        "limit_time_ratio": limit[settings.timer] / vpt[settings.timer],
        "time_ratio_over_limit": over_limit, "meets_target": over_limit <= TARGET,
        "token_ratio": dept["tokens_per_image"] / vpt["tokens_per_image"],
        "wall_time_ratio": dept["train_step_s"] / vpt["train_step_s"],
        "memory_ratio": dept["train_peak_memory_mb"] / vpt["train_peak_memory_mb"],
        "added_memory_ratio": dept["train_added_memory_mb"] / vpt["train_added_memory_mb"],
    }


def run_benchmark(models: list[str], settings: Settings, log=lambda line: print(line, file=sys.stderr, flush=True)):
    started = time.perf_counter()
    records = []
    for model in models:
        if model not in MODELS:
            raise ValueError(f"Unknown model {model!r}: choose from {sorted(MODELS)}.")
        log(f"{model}: timing {', '.join(METHODS)} (taking turns step by step)")
        timing = _in_fresh_process(time_methods, model, settings)
        for method in MEMORY_METHODS:
            log(f"{model}: peak memory of {method}")
            timing[method].update(_in_fresh_process(measure_memory, model, method, settings))
        record = summarize(model, timing, settings)
        records.append(record)
        log(f"{model}: DePT / VPT {record['time_ratio']:.3f}, limit / VPT {record['limit_time_ratio']:.3f} (token "
            f"ratio {record['token_ratio']:.3f}), DePT / limit {record['time_ratio_over_limit']:.3f}")
    environment = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": settings.device, "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "timm": timm.__version__, "threads": settings.threads or torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return {"settings": dataclasses.asdict(settings), "environment": environment, "records": records}


def to_markdown(results: dict) -> str:
    settings, env = results["settings"], results["environment"]
    lines = [
        "# Visual DePT vs VPT-shallow (l = 100), same budget",
        "",
        f"{env['date']}, {env['device']}, {env['threads']} threads, torch {env['torch']}, timm {env['timm']}; "
        f"random weights, 224 px, batch {settings['batch_size']}, median of {settings['steps']} train steps after "
        f"{settings['warmup']} warm-up; {env['seconds']} s in all.",
        "",
        "| model | method | m | r | P + A·B params | head | tokens | train step CPU (s) | train step wall (s) | "
        "peak memory (MiB) | memory above the model (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for record in results["records"]:
        for method, row in record["methods"].items():
            memory = (f"{row['train_peak_memory_mb']:.0f} | {row['train_added_memory_mb']:.0f}"
                      if "train_peak_memory_mb" in row else "- | -")
            lines.append(
                f"| {record['model']} | {method} | {row['num_virtual_tokens']} | {row['r']} | "
                f"{row['dept_parameters']:,} | {row['head_parameters']:,} | {row['tokens_per_image']} | "
                f"{row['train_step_cpu_s']:.3f} | {row['train_step_s']:.3f} | {memory} |"
            )
    figure = "CPU" if settings["device"] == "cpu" else "wall"
    lines += ["", f"| model | time DePT / VPT ({figure}) | time limit / VPT (measured) | token ratio | "
                  f"time DePT / limit (target <= {TARGET}) | wall time DePT / VPT | peak memory DePT / VPT | "
                  "memory above the model DePT / VPT |",
              "|---|---|---|---|---|---|---|---|"]
    for record in results["records"]:
        verdict = "met" if record["meets_target"] else "missed"
        lines.append(
            f"| {record['model']} | {record['time_ratio']:.3f} | {record['limit_time_ratio']:.3f} | "
            f"{record['token_ratio']:.3f} | {record['time_ratio_over_limit']:.3f} ({verdict}) | "
            f"{record['wall_time_ratio']:.3f} | {record['memory_ratio']:.3f} | {record['added_memory_ratio']:.3f} |"
        )
    lines += ["", "The limit is the same ViT fed DePT's 1 + m + s tokens with no A @ B (P alone), timed in turn with "
                  "the other two."]
    return "\n".join(lines) + "\n"


def write_results(results: dict, output_dir: str | Path, overwrite: bool = False) -> dict[str, Path]:
    path = check_output_dir(output_dir, overwrite)
    path.mkdir(parents=True, exist_ok=True)
    files = {"json": path / "results.json", "md": path / "results.md"}
    files["json"].write_text(json.dumps(results, indent=2) + "\n")
    files["md"].write_text(to_markdown(results))
    return files
