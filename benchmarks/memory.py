"""Memory, the paper's other claim: DePT against prompt tuning (l = 100) and against the limit.

Models (random weights at the real architectures' dims): t5-base and llama-small with every input s = 256 tokens,
and ViT-B/16 at 224 px (s = 196 patches); t5-tiny, llama-tiny and vit-tiny for smoke runs. Methods, all on one
frozen base per model:

- `dept`: DePT, m = 60, r = 30 (on a ViT the largest r within VPT l = 100's budget, as `benchmarks.vit` uses:
  r = 31 at d = 768);
- `pt`: prompt tuning with l = 100 (ours, DePT with r = 0; VPT-shallow on a ViT);
- `limit`: the same model on the same m + s tokens with no A·B: P alone (m = 60, r = 0), through the same code
  path. Something must train for a backward pass through the blocks; P is the cheapest such thing, and it is
  what DePT trains besides A and B. DePT can at best cost what the limit costs.

Figures, per method (bytes):

- `saved_activation_bytes`: what autograd saves for backward in the training forward, taken by
  `torch.autograd.graph.saved_tensors_hooks`: every saved tensor that is not a parameter or buffer of the model,
  counted once per storage (a view counts as the whole storage it views, once however many views or ops save
  it), among those still held when the forward returns (what backward will read);
- `train_peak_bytes`: the allocator's peak over one training step (forward, backward, AdamW step, zero_grad),
  above what was allocated when the step began (the optimizer's state exists by then: created by a step on zero
  gradients, which changes nothing at weight decay 0);
- `inference_peak_bytes`: the same over one eval forward without gradients (after a warm-up forward, so the
  eval caches, the A·B table and a decoder's prompt KV cache, are built and held, as in serving);
- `weights_bytes`, `optimizer_state_bytes`: the parameters and buffers, and AdamW's state (unique storages).

How the allocator's peak is taken:

- CUDA: `torch.cuda.max_memory_allocated` after `torch.cuda.reset_peak_memory_stats`, minus
  `torch.cuda.memory_allocated` at the start; `*_peak_allocated_bytes` keep the absolute peak too.
- CPU: torch has no allocator statistics, so `torch.profiler` with `profile_memory=True` records every allocation
  and free that goes through c10's CPU allocator (every tensor torch creates), each with its size, in order; the
  peak is the maximum of their running sum. It is exact to the byte for those; it does not see memory that
  libraries allocate on their own (BLAS and oneDNN scratch buffers, Python objects), nor the free of a block
  allocated before the step began (grads are None at the start and the caches are kept, so none should be; torch
  logs "Memory block of unknown size was allocated before the profiling started" when one is). The allocation
  sizes do not depend on the machine's load, so one run suffices.

    from benchmarks.memory import Settings, run_benchmark, write_results

    write_results(run_benchmark(["llama-tiny"], Settings(isolation="inline")), "bench_output")
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import platform
import sys
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dept.config import DePTConfig
from dept.methods import prepare_model

from . import throughput, vit

DEFAULT_MODELS = ("t5-base", "llama-small", "vit-b16")
TEXT_MODELS = ("t5-tiny", "t5-small", "t5-base", "t5-large", "llama-tiny", "llama-small", "llama-1b")
VIT_MODELS = tuple(vit.MODELS)
MODELS = TEXT_MODELS + VIT_MODELS
METHODS = {
    "dept": "DePT m=60, r=30 (ViT: the largest r within VPT l=100's budget)",
    "pt": "PT l=100 (ours, r=0; VPT-shallow on a ViT)",
    "limit": "the limit: the same model on m+s tokens, no A·B (P alone, m=60, r=0)",
}
FIGURES = ("saved_activation_bytes", "train_peak_bytes", "inference_peak_bytes")
TARGET = 1.02  # DePT over the limit, each figure
RESULT_FILES = ("results.json", "results.md")
LEARNING_RATE = 1e-4  # small rates keep random-weight losses finite; they do not change what is allocated


@dataclass(frozen=True)
class Settings:
    """device ("cpu" or "cuda"), batch size, s for text models (a ViT's s is its patch count), seed, CPU threads
    (None: torch's default), and isolation: "process" runs each model in a fresh process (its memory is freed
    in full before the next), "inline" in this one."""

    device: str = "cpu"
    batch_size: int = 8
    max_length: int = 256
    seed: int = 0
    threads: int | None = 1
    isolation: str = "process"

    def __post_init__(self):
        if self.batch_size < 1 or self.max_length < 1:
            raise ValueError(f"Need batch_size >= 1 and max_length >= 1; got {self}.")
        if self.isolation not in ("process", "inline"):
            raise ValueError(f"isolation must be 'process' or 'inline', got {self.isolation!r}.")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but torch sees no CUDA device: use --device cpu.")


# ----------------------------------------------------------------------------------------------------------------
# The two counters


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    return str(tensor.device), tensor.untyped_storage().data_ptr()


def unique_storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the storages under `tensors`, each storage once."""
    return sum({_storage_key(t): t.untyped_storage().nbytes() for t in tensors}.values())


class _Saved:
    """What autograd holds in place of a saved tensor while the hooks are on: it lives exactly as long as the
    graph that saved it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class SavedActivations:
    """Bytes that autograd saves for backward inside the `with` block, counted once per storage.

    Leaves out the storages of `exclude` (the model's parameters and buffers: they are held anyway). Counts only
    what a graph still holds when `bytes()` is called: a branch whose graph was dropped does not count, and a
    freed storage whose address was reused is not confused with the new one.

        with SavedActivations(exclude=model.parameters()) as saved:
            loss = model(**batch).loss
        saved.bytes()  # before loss.backward() frees them
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {_storage_key(t) for t in exclude}
        self._saved: list[tuple[weakref.ref, tuple[str, int], int]] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        saved = _Saved(tensor)  # the graph holds the same tensor as without hooks, through this
        key = _storage_key(tensor)
        if key not in self._excluded:
            self._saved.append((weakref.ref(saved), key, tensor.untyped_storage().nbytes()))
        return saved

    @staticmethod
    def _unpack(saved: _Saved) -> torch.Tensor:
        return saved.tensor

    def __enter__(self) -> SavedActivations:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def held(self) -> dict[tuple[str, int], int]:
        """{storage: bytes} of the saved tensors a graph still holds."""
        return {key: nbytes for ref, key, nbytes in self._saved if ref() is not None}

    def bytes(self) -> int:
        return sum(self.held().values())


class AllocatorPeak:
    """The allocator's peak inside the `with` block, above what was allocated when it began (`peak`), and what
    the block left allocated (`end`), in bytes. See the module docstring for how each device counts."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.peak = self.end = 0
        self.absolute_peak: int | None = None  # CUDA only: everything allocated on the device at the peak
        self.source = ("torch.cuda.max_memory_allocated" if self.device.type == "cuda"
                       else "torch.profiler(profile_memory=True): c10 CPU allocator events")
        self._profiler = None
        self._start = 0

    def __enter__(self) -> AllocatorPeak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                    profile_memory=True)
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.absolute_peak = torch.cuda.max_memory_allocated(self.device)
            self.peak = self.absolute_peak - self._start
            self.end = torch.cuda.memory_allocated(self.device) - self._start
            return
        self._profiler.__exit__(*exc)
        sizes = allocation_sizes(self._profiler, self.device)
        running = peak = 0
        for size in sizes:
            running += size
            peak = max(peak, running)
        self.peak, self.end = peak, running


def allocation_sizes(profiler: torch.profiler.profile, device: torch.device) -> list[int]:
    """The profiled allocations (+bytes) and frees (-bytes) on `device`'s type, in the order they happened."""
    events, stack = [], list(profiler.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == torch._C._profiler._EventType.Allocation and event.extra_fields.device.type == device.type:
            events.append((event.start_time_ns, event.extra_fields.total_allocated, event.extra_fields.alloc_size))
    # total_allocated is the reporter's running total, taken under its lock: it orders events in one nanosecond
    events.sort(key=lambda event: event[:2])
    return [size for _, _, size in events]


# ----------------------------------------------------------------------------------------------------------------
# Models, methods, batches


def _text_config(spec: throughput.ModelSpec, m: int, r: int, max_length: int) -> DePTConfig:
    return DePTConfig(num_virtual_tokens=m, r=r, max_length=max_length, prompt_init="random",
                      task_type=spec.task_type)


def build(model: str, settings: Settings) -> tuple[nn.Module, dict[str, nn.Module], dict]:
    """The frozen base, each method wrapped around that same base, and one training batch."""
    device = torch.device(settings.device)
    generator = torch.Generator().manual_seed(settings.seed)
    if model in VIT_MODELS:
        base, methods = None, {}
        for method in METHODS:
            base, methods[method] = vit.build(model, {"pt": "vpt"}.get(method, method), base)
        pixel_values = torch.randn(settings.batch_size, 3, 224, 224, generator=generator)
        labels = torch.randint(0, vit.NUM_CLASSES, (settings.batch_size,), generator=generator)
        batch = {"pixel_values": pixel_values, "labels": labels}
    else:
        spec = throughput.MODELS[model]
        base = spec.build()
        m, r = throughput.DEPT_NUM_VIRTUAL_TOKENS, throughput.DEPT_R
        methods = {  # PROMPT_TUNING is DePT with r = 0: the same code path without A·B
            "dept": prepare_model(base, "PROMPT_TUNING_LORA", dept_config=_text_config(spec, m, r, settings.max_length)),
            "pt": prepare_model(base, "PROMPT_TUNING",
                                dept_config=_text_config(spec, throughput.PT_LENGTH, 0, settings.max_length)),
            "limit": prepare_model(base, "PROMPT_TUNING", dept_config=_text_config(spec, m, 0, settings.max_length)),
        }
        workload = throughput.Workload("memory", f"every input s = {settings.max_length} tokens",
                                       max_length=settings.max_length, target_length=2)
        batch = throughput.make_batches(workload, base.config.vocab_size, settings.batch_size, 1, settings.seed,
                                        spec.task_type)[0]
    return base.to(device), {name: wrapped.to(device) for name, wrapped in methods.items()}, \
        {key: value.to(device) for key, value in batch.items()}


def _optimizer(model: nn.Module) -> torch.optim.AdamW:
    groups = model.optimizer_param_groups(learning_rate=LEARNING_RATE, lora_embedding_lr=LEARNING_RATE,
                                          weight_decay=0.0)
    optimizer = torch.optim.AdamW(groups)
    for group in optimizer.param_groups:  # create the state with a step that changes nothing (zero grads, no decay)
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def measure_method(model: nn.Module, batch: dict, device: torch.device) -> dict:
    """One method's figures: a training step, then an eval forward (see the module docstring)."""
    held = [*model.parameters(), *model.buffers()]
    model.train()
    optimizer = _optimizer(model)
    with AllocatorPeak(device) as train:
        with SavedActivations(exclude=held) as saved:
            loss = model(**batch).loss
        saved_bytes, saved_storages = saved.bytes(), len(saved.held())
        loss.backward()
        del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    state = [value for param_state in optimizer.state.values() for value in param_state.values()
             if isinstance(value, torch.Tensor)]
    optimizer_state_bytes = unique_storage_bytes(state)
    del optimizer, state
    model.eval()
    with torch.no_grad():
        model(**batch)  # warm-up: the eval caches are built once and kept, as a server keeps them
        with AllocatorPeak(device) as inference:
            output = model(**batch)
            del output
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = {
        "trainable_parameters": trainable,
        "num_virtual_tokens": model.config.num_virtual_tokens, "r": model.config.r,
        "saved_activation_bytes": saved_bytes, "saved_storages": saved_storages,
        "train_peak_bytes": train.peak, "train_end_bytes": train.end,
        "inference_peak_bytes": inference.peak,
        "weights_bytes": unique_storage_bytes(held), "optimizer_state_bytes": optimizer_state_bytes,
        "memory_source": train.source,
    }
    if train.absolute_peak is not None:
        result.update(train_peak_allocated_bytes=train.absolute_peak,
                      inference_peak_allocated_bytes=inference.absolute_peak)
    return result


def measure_model(model: str, settings: Settings) -> dict:
    """Every method on one frozen base: {"tokens": per example per method, "methods": {method: figures}}."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    base, methods, batch = build(model, settings)
    device = torch.device(settings.device)
    records = {}
    for name, wrapped in methods.items():
        records[name] = measure_method(wrapped, batch, device)
        records[name]["tokens"] = records[name]["num_virtual_tokens"] + _input_tokens(base, batch)
    return {"model": model, "methods": records, "base_parameters": sum(p.numel() for p in base.parameters()),
            "batch_size": settings.batch_size, "input_tokens": _input_tokens(base, batch)}


def _input_tokens(base: nn.Module, batch: dict) -> int:
    """Tokens each example puts through the blocks before the prompt is added."""
    if "pixel_values" in batch:
        return base.num_prefix_tokens + vit.num_patches(base)
    return batch["input_ids"].shape[1]


# ----------------------------------------------------------------------------------------------------------------
# Running, ratios, targets


def _in_fresh_process(function: Callable, *args) -> dict:
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(function, args)


def add_ratios(record: dict) -> dict:
    """DePT over the limit and over PT, each figure, plus the training peak with the weights and optimizer."""
    methods = record["methods"]
    for row in methods.values():
        row["train_total_bytes"] = row["weights_bytes"] + row["optimizer_state_bytes"] + row["train_peak_bytes"]
    ratios = {}
    for reference in ("limit", "pt"):
        ratios[reference] = {figure: methods["dept"][figure] / methods[reference][figure]
                             for figure in (*FIGURES, "train_total_bytes") if methods[reference][figure] > 0}
    record["dept_over"] = ratios
    return record


def evaluate_targets(records: list[dict]) -> list[dict]:
    """DePT within TARGET of the limit, per model and figure."""
    rows = []
    for record in records:
        for figure in FIGURES:
            value = record["dept_over"]["limit"].get(figure)
            if value is not None:
                rows.append({"model": record["model"], "figure": figure, "value": value, "threshold": TARGET,
                             "met": value <= TARGET})
    return rows


def run_benchmark(models: Iterable[str], settings: Settings, command: str | None = None,
                  log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> dict:
    models = list(models)
    unknown = [name for name in models if name not in MODELS]
    if unknown or not models:
        raise ValueError(f"Unknown model(s) {unknown or models}: choose from {list(MODELS)}.")
    started = time.perf_counter()
    records = []
    for model in models:
        log(f"{model}: {', '.join(METHODS)} (training step, then eval forward)")
        record = (_in_fresh_process(measure_model, model, settings) if settings.isolation == "process"
                  else measure_model(model, settings))
        records.append(add_ratios(record))
        over = record["dept_over"]
        log(f"{model}: DePT / limit " + ", ".join(f"{f} {over['limit'][f]:.4f}" for f in FIGURES if f in over["limit"])
            + "; DePT / PT " + ", ".join(f"{f} {over['pt'][f]:.3f}" for f in FIGURES if f in over["pt"]))
    meta = throughput._environment(throughput.Settings(device=settings.device, threads=settings.threads,
                                                       isolation="inline"), time.perf_counter() - started)
    meta["versions"]["timm"] = vit.timm.__version__
    meta["platform"] = platform.platform()
    return {"meta": meta, "command": command, "settings": dataclasses.asdict(settings), "methods": METHODS,
            "records": records, "targets": evaluate_targets(records)}


# ----------------------------------------------------------------------------------------------------------------
# Writing


def write_results(results: dict, output_dir: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """results.json and results.md in `output_dir` (refused where results are, unless `overwrite`)."""
    path = Path(output_dir)
    existing = [name for name in RESULT_FILES if (path / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{path} already holds memory results ({', '.join(existing)}). Pass --overwrite to "
                              "replace them, or choose another --output_dir.")
    path.mkdir(parents=True, exist_ok=True)
    files = {"json": path / RESULT_FILES[0], "markdown": path / RESULT_FILES[1]}
    files["json"].write_text(json.dumps(results, indent=2) + "\n")
    files["markdown"].write_text(to_markdown(results))
    return files


def _mib(value: int) -> str:
    return f"{value / 2**20:,.1f}"


def to_markdown(results: dict) -> str:
    meta, settings = results["meta"], results["settings"]
    on_cuda = settings["device"].startswith("cuda")
    lines = [
        "# Memory: DePT against PT (l = 100) and the limit (the same model on m + s tokens, no A·B)",
        "",
        f"{meta['date']} · {meta['device']} ({meta['cpu_count']} CPUs, {meta['torch_threads']} torch threads; "
        f"{meta['platform']}) · torch {meta['versions']['torch']}, transformers "
        f"{meta['versions']['transformers']}, timm {meta['versions']['timm']} · commit {meta['git_commit']} · "
        f"{meta['wall_time_s']:.0f} s",
        "",
        f"Command: `{results['command'] or 'benchmarks.memory.run_benchmark'}`",
        "",
        f"Random weights, fp32, batch {settings['batch_size']}, text inputs of s = {settings['max_length']} tokens "
        "(a ViT's s is its 196 patches). Saved activations: the storages autograd saves for backward (not the "
        "parameters or buffers), each storage once. Peaks: the allocator's peak over a training step (forward, "
        "backward, AdamW step) and over an eval forward, above what was allocated when each began; "
        + ("`torch.cuda.max_memory_allocated`." if on_cuda else
           "on CPU from `torch.profiler(profile_memory=True)`, every allocation and free through torch's CPU "
           "allocator, summed in order (exact for torch's tensors; library scratch buffers are not seen).")
        + " Train total: the train peak plus the weights and AdamW's state. MiB = 2^20 bytes.",
        "",
        "## Target: DePT within 1.02× of the limit",
        "",
        "| model | saved activations | train step peak | inference peak | train total (with weights) | "
        "DePT − limit: saved, train peak (KiB) | met |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for record in results["records"]:
        over, methods = record["dept_over"]["limit"], record["methods"]
        met = all(row["met"] for row in results["targets"] if row["model"] == record["model"])
        extra = [(methods["dept"][f] - methods["limit"][f]) / 2**10 for f in FIGURES[:2]]
        lines.append(f"| {record['model']} | " + " | ".join(
            f"{over[f]:.4f}×" if f in over else "–" for f in (*FIGURES, "train_total_bytes"))
            + f" | {extra[0]:+,.1f}, {extra[1]:+,.1f} | {'yes' if met else 'no'} |")
    lines += ["", "## DePT against PT (l = 100), same parameter budget", "",
              "| model | saved activations | train step peak | inference peak | train total (with weights) |",
              "|---|---:|---:|---:|---:|"]
    for record in results["records"]:
        over = record["dept_over"]["pt"]
        lines.append(f"| {record['model']} | " + " | ".join(
            f"{over[f]:.3f}×" if f in over else "–" for f in (*FIGURES, "train_total_bytes")) + " |")
    lines += ["", "## Figures (MiB)", "",
              "| model | method | m | r | trainable | tokens | saved activations (storages) | train step peak | "
              "inference peak | weights | AdamW state | train total |"
              + (" train peak allocated | inference peak allocated |" if on_cuda else ""),
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if on_cuda else "")]
    for record in results["records"]:
        for method, row in record["methods"].items():
            line = (f"| {record['model']} | {method} | {row['num_virtual_tokens']} | {row['r']} | "
                    f"{row['trainable_parameters']:,} | {row['tokens']} | {_mib(row['saved_activation_bytes'])} "
                    f"({row['saved_storages']}) | {_mib(row['train_peak_bytes'])} | "
                    f"{_mib(row['inference_peak_bytes'])} | {_mib(row['weights_bytes'])} | "
                    f"{_mib(row['optimizer_state_bytes'])} | {_mib(row['train_total_bytes'])} |")
            if on_cuda:
                line += (f" {_mib(row['train_peak_allocated_bytes'])} | "
                         f"{_mib(row['inference_peak_allocated_bytes'])} |")
            lines.append(line)
    lines += ["", "Methods: " + "; ".join(f"`{name}`: {label}" for name, label in results["methods"].items()) + "."]
    return "\n".join(lines) + "\n"
