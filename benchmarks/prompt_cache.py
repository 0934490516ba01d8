"""Decoder-only inference with the prompt KV cache, against what it can at best reach and what it replaces.

Methods, on one frozen LLaMA-shaped model with random weights (every method sees the same seeded requests,
left-padded as decoder-only generation needs):

- `limit`: the frozen model fed the same s input tokens alone, no prompt;
- `prefix_limit`: plain transformers with an m-token prefix already in its KV cache (a `DynamicCache` prefilled
  with m = 60 tokens once, then the s input tokens run against it at positions m, m + 1, ...). Any method whose
  input attends to m prompt keys pays for those keys, so this is the true limit for DePT's cached prefill;
- `dept_cached`: DePT (m = 60, r = 30) with the prompt KV cache: P's states come from the cache;
- `dept_uncached`: the same adapter with `use_prompt_cache=False`: P is run again for every request;
- `pt_peft`: HF PEFT prompt tuning with l = 100, which runs its prompt for every request.

Figures, each the median over `steps` rounds after `warmup`, in each of `runs` processes; the methods take turns
inside a round, and each ratio is the median of the per-round ratios pooled over the runs, so a shared machine's
drifting load slows both sides alike. Each ratio also carries its spread: quartiles, min and max of the per-round
ratios, and each run's median. On CPU with one thread the clock is the process's CPU time (which waiting for a
busy core does not inflate), else wall time.

- prefill: `generate(max_new_tokens=1)`, the time to the first token;
- generate: `generate` of exactly `new_tokens` greedy tokens;
- forward: the eval `forward` (no gradients), DePT's with the prompt cache, returning every position's logits;
- the one-time cost of computing an adapter's prompt states.

Two sweeps report how the gap to PEFT grows: with the prompt length (PEFT PT l = L against DePT with m = L and the
cache) and with the request rate (the measured per-request prefill time in an M/D/1 queue: one server, Poisson
arrivals, requests served one at a time; plus the per-request time when a busy server batches).

    from benchmarks.prompt_cache import PromptCacheSettings, run, write_results

    write_results(run(PromptCacheSettings(model="llama-tiny", steps=1)), "bench_output")
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import multiprocessing
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from dept.config import DePTConfig
from dept.model import get_dept_model

from .throughput import DEPT_NUM_VIRTUAL_TOKENS, DEPT_R, MODELS, PT_LENGTH, WORKLOADS, _environment, make_batches

RESULT_FILES = ("prompt_cache.json", "prompt_cache.md")
METHODS = {
    "limit": "Frozen model fed the s input tokens alone",
    "prefix_limit": f"Frozen model, {DEPT_NUM_VIRTUAL_TOKENS}-token prefix already in its KV cache (the limit)",
    "dept_cached": f"DePT m={DEPT_NUM_VIRTUAL_TOKENS} r={DEPT_R}, prompt KV cache",
    "dept_uncached": f"DePT m={DEPT_NUM_VIRTUAL_TOKENS} r={DEPT_R}, no prompt cache",
    "pt_peft": f"PT l={PT_LENGTH} (HF PEFT)",
}
SWEEP_METHODS = ("limit", "dept_cached", "dept_uncached", "pt_peft")
FIGURES = ("prefill", "generate", "forward")
REFERENCES = ("limit", "prefix_limit", "pt_peft")
# (target, figure, method, reference, threshold): the median per-round ratio must be at most the threshold
TARGETS = [
    ("prefill with the prompt cache vs the prefix-cached limit", "prefill", "dept_cached", "prefix_limit", 1.02),
    ("eval forward with the prompt cache vs the frozen model on the same s tokens", "forward", "dept_cached", "limit",
     1.15),
    ("prefill with the prompt cache vs the limit", "prefill", "dept_cached", "limit", 1.10),
]


@dataclass(frozen=True)
class PromptCacheSettings:
    """What to run: a model from `benchmarks.throughput.MODELS`, workloads, batch size, generated tokens, rounds per
    run, runs (each in a fresh process unless `isolation` is "inline"), CPU threads (None: torch's default),
    prompt lengths for the length sweep, batch sizes for the rate sweep, and whether to run the two sweeps."""

    model: str = "llama-small"
    workloads: tuple[str, ...] = ("short", "fixed")
    device: str = "cpu"
    batch_size: int = 4
    new_tokens: int = 8
    warmup: int = 1
    steps: int = 10
    runs: int = 3
    isolation: str = "process"
    seed: int = 0
    threads: int | None = 1
    prompt_lengths: tuple[int, ...] = (20, 60, 100, 200)
    rate_batch_sizes: tuple[int, ...] = (1, 8)
    sweeps: bool = True

    def __post_init__(self):
        if MODELS.get(self.model) is None or MODELS[self.model].family != "llama":
            decoders = [name for name, spec in MODELS.items() if spec.family == "llama"]
            raise ValueError(f"The prompt cache is for decoder-only models: choose --model from {decoders}.")
        unknown = [name for name in self.workloads if name not in WORKLOADS]
        if unknown:
            raise ValueError(f"Unknown workload(s) {unknown}: choose from {list(WORKLOADS)}.")
        if self.steps < 1 or self.warmup < 0 or self.batch_size < 1 or self.new_tokens < 1 or self.runs < 1:
            raise ValueError(f"Need steps, runs, batch_size, new_tokens >= 1 and warmup >= 0; got {self}.")
        if self.isolation not in ("process", "inline"):
            raise ValueError(f"isolation must be 'process' or 'inline', got {self.isolation!r}.")

    @property
    def clock(self) -> str:
        """"cpu" (process CPU time: one thread on CPU, robust to other processes' load) or "wall"."""
        return "cpu" if self.device == "cpu" and self.threads == 1 else "wall"


def left_padded(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same rows with their pads moved in front (decoder-only generation continues after the last token)."""
    order = torch.argsort(batch["attention_mask"], dim=1, stable=True)  # pads (0) first, real tokens in order
    return {key: batch[key].gather(1, order) for key in ("input_ids", "attention_mask")}


def requests(workload: str, vocab_size: int, batch_size: int, settings: PromptCacheSettings) -> list[dict]:
    count = settings.warmup + settings.steps
    batches = make_batches(WORKLOADS[workload], vocab_size, batch_size, count, settings.seed, "causal")
    return [{key: value.to(settings.device) for key, value in left_padded(batch).items()} for batch in batches]


@dataclass
class Method:
    """A method as two calls on a left-padded batch, `generate(batch, new_tokens)` and the eval `forward(batch)`,
    and the module they run (the frozen base itself for the two limits)."""

    generate: Callable[[dict, int], object]
    forward: Callable[[dict], object]
    model: nn.Module


def _cache_keyword(model: nn.Module) -> str:
    """The keyword under which this transformers version passes a KV cache (`cache`, `past_key_values` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class PrefixCachedModel:
    """Plain transformers with a fixed prefix in its KV cache: the prefix (m random tokens) runs once, at positions
    0..m-1; every call copies its keys and values into a fresh `DynamicCache` for the batch (generation appends to
    the cache) and runs only the input, at positions m, m + 1, ... over its real tokens."""

    def __init__(self, base: nn.Module, prefix_length: int, seed: int = 0):
        self.base, self.cache_keyword = base, _cache_keyword(base)
        generator = torch.Generator().manual_seed(seed + 2)
        device = base.get_input_embeddings().weight.device
        self.prefix_ids = torch.randint(3, base.config.vocab_size, (1, prefix_length), generator=generator).to(device)
        with torch.no_grad():
            output = base(input_ids=self.prefix_ids, use_cache=True)
        cache = getattr(output, self.cache_keyword)
        self.keys = tuple(layer.keys for layer in cache.layers)
        self.values = tuple(layer.values for layer in cache.layers)

    def cache(self, batch_size: int) -> DynamicCache:
        cache = DynamicCache()
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            cache.update(keys.expand(batch_size, *keys.shape[1:]), values.expand(batch_size, *values.shape[1:]), layer)
        return cache

    def full_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix followed by the batch: (input_ids, attention_mask), each (batch, m + s)."""
        rows = batch["input_ids"].shape[0]
        input_ids = torch.cat([self.prefix_ids.expand(rows, -1), batch["input_ids"]], dim=1)
        attention_mask = torch.cat([torch.ones_like(self.prefix_ids).expand(rows, -1), batch["attention_mask"]], dim=1)
        return input_ids, attention_mask

    def forward(self, batch: dict):
        """Logits (batch, s, vocab) of the input tokens, which attend to the cached prefix."""
        input_ids, attention_mask = self.full_inputs(batch)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, self.prefix_ids.shape[1]:]
        return self.base(input_ids=batch["input_ids"], attention_mask=attention_mask, position_ids=positions,
                         **{self.cache_keyword: self.cache(input_ids.shape[0])})

    def generate(self, batch: dict, tokens: int):
        """transformers' `generate` over prefix + input, which skips the cached prefix."""
        input_ids, attention_mask = self.full_inputs(batch)
        return self.base.generate(input_ids=input_ids, attention_mask=attention_mask,
                                  **{self.cache_keyword: self.cache(input_ids.shape[0])}, **_greedy(tokens))


def build_methods(base: nn.Module, max_length: int, prompt_length: int = DEPT_NUM_VIRTUAL_TOKENS,
                  names: tuple[str, ...] = tuple(METHODS), seed: int = 0) -> dict[str, Method]:
    """Each method on the one frozen `base`; DePT and the prefix get `prompt_length` tokens (PEFT's l is
    PT_LENGTH unless a sweep sets it)."""
    methods = {}
    if "limit" in names:
        methods["limit"] = Method(lambda batch, tokens: base.generate(**batch, **_greedy(tokens)),
                                  lambda batch: base(**batch), base)
    if "prefix_limit" in names:
        prefixed = PrefixCachedModel(base, prompt_length, seed)
        methods["prefix_limit"] = Method(prefixed.generate, prefixed.forward, prefixed.base)
    if {"dept_cached", "dept_uncached"} & set(names):
        config = DePTConfig(num_virtual_tokens=prompt_length, r=DEPT_R, max_length=max_length, prompt_init="random",
                            task_type="causal")
        dept_model = get_dept_model(base, config).eval()
        dept_model.prompt_states()  # computed once per adapter, before any request
        for name, cached in (("dept_cached", True), ("dept_uncached", False)):
            if name in names:
                methods[name] = Method(
                    lambda batch, tokens, cached=cached: dept_model.generate(**batch, use_prompt_cache=cached,
                                                                             **_greedy(tokens)),
                    lambda batch, cached=cached: dept_model(**batch, use_prompt_cache=cached), dept_model)
    if "pt_peft" in names:
        import peft

        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prompt_length,
                                         num_transformer_submodules=1)
        peft_model = peft.get_peft_model(copy.deepcopy(base), config).eval()
        methods["pt_peft"] = Method(lambda batch, tokens: peft_model.generate(**batch, **_greedy(tokens)),
                                    lambda batch: peft_model(**batch), peft_model)
    return {name: methods[name] for name in names if name in methods}


def _greedy(tokens: int) -> dict:
    return dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, num_beams=1)


def spread(values: list[float]) -> dict:
    """Median, quartiles, min and max of `values`."""
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": median, "q1": q1, "q3": q3, "min": min(values), "max": max(values), "rounds": len(values)}


@dataclass
class Timings:
    """Seconds per round for each method; in a round the methods ran one after another on the same batch.
    `runs` holds each process run's rounds (pooled in `rounds`)."""

    rounds: dict[str, list[float]]
    runs: list[dict[str, list[float]]] = dataclasses.field(default_factory=list)

    @classmethod
    def pooled(cls, runs: list[dict[str, list[float]]]) -> Timings:
        return cls({name: [s for run in runs for s in run[name]] for name in runs[0]}, runs)

    def median(self, name: str) -> float:
        return statistics.median(self.rounds[name])

    def ratios(self, name: str, reference: str) -> list[float]:
        return [a / b for a, b in zip(self.rounds[name], self.rounds[reference])]

    def ratio(self, name: str, reference: str) -> float:
        """The median over rounds of the per-round ratio: methods timed side by side share the machine's load, so
        a shared machine's drifting load cancels out."""
        return statistics.median(self.ratios(name, reference))

    def ratio_spread(self, name: str, reference: str) -> dict:
        """`spread` of the per-round ratios, plus each run's median ratio."""
        per_run = [statistics.median(a / b for a, b in zip(run[name], run[reference])) for run in self.runs or
                   [self.rounds]]
        return {**spread(self.ratios(name, reference)), "run_medians": per_run}


@torch.no_grad()
def measure(methods: dict[str, Method], batches: list[dict], figure: str, settings: PromptCacheSettings,
            new_tokens: int | None = None) -> Timings:
    """Each method's seconds for one call per batch (`figure`: "prefill", "generate" or "forward"); the methods
    take turns on each batch."""
    clock = time.process_time if settings.clock == "cpu" else time.perf_counter
    tokens = {"prefill": 1, "generate": new_tokens or settings.new_tokens}.get(figure)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for index, batch in enumerate(batches):
        for name, method in methods.items():
            start = clock()
            method.forward(batch) if figure == "forward" else method.generate(batch, tokens)
            if batch["input_ids"].is_cuda:
                torch.cuda.synchronize()
            if index >= settings.warmup:
                times[name].append(clock() - start)
    return Timings(times)


def prompt_states_seconds(base: nn.Module, max_length: int, repeats: int = 3) -> float:
    """The one-time cost of an adapter's prompt states (m = 60), median of `repeats` recomputations."""
    config = DePTConfig(num_virtual_tokens=DEPT_NUM_VIRTUAL_TOKENS, r=DEPT_R, max_length=max_length,
                        prompt_init="random", task_type="causal")
    dept_model = get_dept_model(base, config).eval()
    seconds = []
    for _ in range(repeats + 1):
        dept_model.invalidate_caches()  # the next call recomputes the states
        start = time.perf_counter()
        dept_model.prompt_states()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[1:])


def md1_latency(service_s: float, rate: float) -> float | None:
    """Mean time in an M/D/1 queue (Poisson arrivals at `rate`, fixed service time): None past saturation."""
    load = rate * service_s
    return None if load >= 1 else service_s + load * service_s / (2 * (1 - load))


def build_base(settings: PromptCacheSettings) -> nn.Module:
    """The frozen model, seeded: every run and process gets the same weights."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    with torch.device(settings.device):
        return MODELS[settings.model].build().eval().requires_grad_(False)


def measure_run(settings: PromptCacheSettings) -> dict:
    """One run: for each workload, every figure's seconds per round per method, and the prompt states' cost."""
    base = build_base(settings)
    measured = {}
    for workload in settings.workloads:
        max_length = WORKLOADS[workload].max_length
        methods = build_methods(base, max_length, seed=settings.seed)
        batches = requests(workload, base.config.vocab_size, settings.batch_size, settings)
        measured[workload] = {
            "rounds": {figure: measure(methods, batches, figure, settings).rounds for figure in FIGURES},
            "prompt_states_s": prompt_states_seconds(base, max_length),
            "real_length": statistics.mean(float(b["attention_mask"].sum(1).float().mean())
                                           for b in batches[settings.warmup:]),
        }
    return measured


def _in_fresh_process(function: Callable, *args):
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(function, args)


def summarize_workload(runs: list[dict]) -> dict:
    """One workload's rows from its runs: per method and figure the median seconds, the median per-round ratio to
    each reference, the rounds, and each ratio's spread."""
    timings = {figure: Timings.pooled([run["rounds"][figure] for run in runs]) for figure in FIGURES}
    rows = {}
    for name in runs[0]["rounds"][FIGURES[0]]:
        row, row_spread = {}, {}
        for figure, timing in timings.items():
            row[f"{figure}_s"] = timing.median(name)
            for reference in REFERENCES:
                if reference in timing.rounds:
                    row[f"{figure}_vs_{reference}"] = timing.ratio(name, reference)
                    if reference != name:
                        row_spread[f"{figure}_vs_{reference}"] = timing.ratio_spread(name, reference)
            row[f"{figure}_rounds_s"] = timing.rounds[name]
        rows[name] = {**row, "spread": row_spread}
    return {"real_length": runs[0]["real_length"], "methods": rows,
            "prompt_states_s": statistics.median(run["prompt_states_s"] for run in runs)}


def run_sweeps(settings: PromptCacheSettings, log: Callable[[str], None]) -> dict:
    """The prompt-length and request-rate sweeps (prefill, short text), in this process."""
    base = build_base(settings)
    vocab_size = base.config.vocab_size
    results: dict = {"prompt_length_sweep": {}, "rate_sweep": {}}
    short = "short" if "short" in settings.workloads else settings.workloads[0]
    max_length = WORKLOADS[short].max_length
    batches = requests(short, vocab_size, settings.batch_size, settings)
    for length in settings.prompt_lengths:  # the limit again in each, so each row shares its machine load
        prefill = measure(build_methods(base, max_length, length, SWEEP_METHODS), batches, "prefill", settings)
        gap = prefill.ratio("pt_peft", "dept_cached")
        results["prompt_length_sweep"][length] = {**{f"{name}_prefill_s": prefill.median(name) for name in prefill.rounds},
                                                  "pt_peft_over_dept_cached": gap,
                                                  "dept_cached_over_limit": prefill.ratio("dept_cached", "limit")}
        log(f"prompt length {length}: PEFT PT / DePT cached prefill {gap:.2f}x")

    methods = build_methods(base, max_length, names=SWEEP_METHODS)
    for batch_size in settings.rate_batch_sizes:
        prefill = measure(methods, requests(short, vocab_size, batch_size, settings), "prefill", settings)
        results["rate_sweep"][batch_size] = {name: prefill.median(name) / batch_size for name in prefill.rounds}
    single = results["rate_sweep"][settings.rate_batch_sizes[0]]
    peft_capacity = 1 / single["pt_peft"]
    results["rate_model"] = [
        {"rate": load * peft_capacity, "load_of_pt_peft": load,
         **{f"{name}_latency_s": md1_latency(service, load * peft_capacity) for name, service in single.items()}}
        for load in (0.25, 0.5, 0.75, 0.9, 0.95)
    ]
    return results


def evaluate_targets(workloads: dict) -> list[dict]:
    """Each target per workload: the median per-round ratio against its threshold, with its spread."""
    rows = []
    for name, figure, method, reference, threshold in TARGETS:
        for workload, record in workloads.items():
            key = f"{figure}_vs_{reference}"
            value = record["methods"][method][key]
            rows.append({"target": name, "workload": workload, "figure": figure, "method": method,
                         "reference": reference, "value": value, "spread": record["methods"][method]["spread"][key],
                         "threshold": threshold, "met": value <= threshold})
    return rows


def run(settings: PromptCacheSettings, log: Callable[[str], None] = print) -> dict:
    started = time.perf_counter()
    runs = []
    for index in range(settings.runs):
        runs.append(_in_fresh_process(measure_run, settings) if settings.isolation == "process"
                    else measure_run(settings))
        log(f"run {index + 1}/{settings.runs}: " + "; ".join(
            f"{workload} prefill DePT cached / prefix limit "
            f"{statistics.median(Timings(measured['rounds']['prefill']).ratios('dept_cached', 'prefix_limit')):.3f}"
            for workload, measured in runs[-1].items()))
    results: dict = {"workloads": {workload: summarize_workload([run[workload] for run in runs])
                                   for workload in settings.workloads}}
    for workload, record in results["workloads"].items():
        log(f"{workload}: " + ", ".join(f"{name} prefill {row['prefill_s']:.4f}s ({row['prefill_vs_limit']:.2f}x "
                                        f"limit)" for name, row in record["methods"].items()))
    if settings.sweeps:
        results.update(run_sweeps(settings, log))
    results["targets"] = evaluate_targets(results["workloads"])
    results["settings"] = dataclasses.asdict(settings)
    results["methods"] = METHODS
    results["model"] = {"name": settings.model, **MODELS[settings.model].dims}
    results["meta"] = _environment(_as_benchmark_settings(settings), time.perf_counter() - started)
    results["meta"]["clock"] = {"cpu": "process CPU time", "wall": "wall time"}[settings.clock]
    return results


def _as_benchmark_settings(settings: PromptCacheSettings):
    from .throughput import Settings

    return Settings(device=settings.device, threads=settings.threads, isolation="inline")


def check_output_dir(output_dir: str | Path, overwrite: bool) -> Path:
    """Refuse a directory that already holds these results, unless `overwrite`."""
    path = Path(output_dir)
    existing = [name for name in RESULT_FILES if (path / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{path} already holds prompt-cache results ({', '.join(existing)}). Pass --overwrite "
                              "to replace them, or choose another --output_dir.")
    return path


def write_results(results: dict, output_dir: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """Write prompt_cache.json and prompt_cache.md into `output_dir`; return their paths."""
    path = check_output_dir(output_dir, overwrite)
    path.mkdir(parents=True, exist_ok=True)
    paths = {"json": path / RESULT_FILES[0], "markdown": path / RESULT_FILES[1]}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["markdown"].write_text(to_markdown(results))
    return paths


def _ms(seconds: float | None) -> str:
    return "saturated" if seconds is None else f"{1000 * seconds:.1f}"


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.2f}×" if key in row else "–"


def _spread_text(spread: dict) -> tuple[str, str, str]:
    """(IQR, min–max, run medians) of a ratio's spread, as table cells."""
    runs = ", ".join(f"{value:.3f}" for value in spread["run_medians"])
    return (f"{spread['q1']:.3f}–{spread['q3']:.3f}", f"{spread['min']:.3f}–{spread['max']:.3f}", runs)


def to_markdown(results: dict) -> str:
    meta, settings = results["meta"], results["settings"]
    lines = [
        "# Decoder-only inference with the prompt KV cache",
        "",
        f"{meta['date']} · {meta['device']} ({meta['torch_threads']} torch threads) · torch "
        f"{meta['versions']['torch']}, transformers {meta['versions']['transformers']}, peft "
        f"{meta['versions']['peft']} · commit {meta['git_commit']} · {meta['wall_time_s']:.0f} s",
        "",
        f"Model `{results['model']['name']}` (random weights), batch {settings['batch_size']} left-padded requests; "
        f"{settings['runs']} run(s) ({settings['isolation']}), each {settings['steps']} rounds after "
        f"{settings['warmup']} warm-up, the methods taking turns in each round; clock: {meta['clock']}. Times are "
        "medians over all rounds; each ratio is the median of the per-round ratios, with their quartiles (IQR), "
        f"min–max and each run's median. Prefill: `generate` of 1 token (time to first token); generate: "
        f"{settings['new_tokens']} greedy tokens; forward: the eval `forward` over the same requests.",
        "",
        "## Targets",
        "",
        "| target | workload | median | IQR | min–max | run medians | target | met |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in results["targets"]:
        iqr, extremes, runs = _spread_text(row["spread"])
        lines.append(f"| {row['target']} | {row['workload']} | {row['value']:.3f} | {iqr} | {extremes} | {runs} | "
                     f"≤ {row['threshold']} | {'yes' if row['met'] else 'no'} |")
    for workload, record in results["workloads"].items():
        lines += ["", f"## Workload `{workload}` ({record['real_length']:.0f} real tokens per request on average; "
                  f"an adapter's prompt states take {_ms(record['prompt_states_s'])} ms, once)", "",
                  "| method | prefill (ms) | × limit | × prefix limit | × PEFT | generate (ms) | × limit | × PEFT | "
                  "forward (ms) | × limit | × prefix limit | × PEFT |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, row in record["methods"].items():
            lines.append(
                f"| {results['methods'][name]} | {_ms(row['prefill_s'])} | {_ratio(row, 'prefill_vs_limit')} | "
                f"{_ratio(row, 'prefill_vs_prefix_limit')} | {_ratio(row, 'prefill_vs_pt_peft')} | "
                f"{_ms(row['generate_s'])} | {_ratio(row, 'generate_vs_limit')} | {_ratio(row, 'generate_vs_pt_peft')} | "
                f"{_ms(row['forward_s'])} | {_ratio(row, 'forward_vs_limit')} | "
                f"{_ratio(row, 'forward_vs_prefix_limit')} | {_ratio(row, 'forward_vs_pt_peft')} |")
    if results.get("prompt_length_sweep"):
        lines += ["", "## The gap to PEFT with the prompt length (short text, prefill)", "",
                  "PEFT PT with l = L against DePT with m = L: PEFT runs its L prompt tokens for every request.", "",
                  "| L = m | limit (ms) | DePT cached (ms) | DePT uncached (ms) | PEFT PT (ms) | DePT cached / limit "
                  "| PEFT / DePT cached |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for length, row in results["prompt_length_sweep"].items():
            lines.append(f"| {length} | {_ms(row['limit_prefill_s'])} | {_ms(row['dept_cached_prefill_s'])} | "
                         f"{_ms(row['dept_uncached_prefill_s'])} | {_ms(row['pt_peft_prefill_s'])} | "
                         f"{row['dept_cached_over_limit']:.2f}× | {row['pt_peft_over_dept_cached']:.2f}× |")
    if results.get("rate_sweep"):
        names = list(next(iter(results["rate_sweep"].values())))
        lines += ["", "## The gap to PEFT with the request rate (short text, prefill)", "",
                  "Measured prefill time per request when the server batches `b` requests:", "",
                  "| b | " + " | ".join(results["methods"][n] for n in names) + " |",
                  "|---:|" + "---:|" * len(names)]
        for batch_size, row in results["rate_sweep"].items():
            lines.append(f"| {batch_size} | " + " | ".join(_ms(row[n]) for n in names) + " |")
        lines += ["", "Mean time to first token (ms) in an M/D/1 queue (Poisson arrivals, one request at a time) with "
                  "the b = 1 service times above, at rates given as a share of PEFT PT's capacity:", "",
                  "| requests/s | load of PEFT | " + " | ".join(results["methods"][n] for n in names) + " |",
                  "|---:|---:|" + "---:|" * len(names)]
        for row in results["rate_model"]:
            lines.append(f"| {row['rate']:.1f} | {row['load_of_pt_peft']:.2f} | "
                         + " | ".join(_ms(row[f"{n}_latency_s"]) for n in names) + " |")
    return "\n".join(lines) + "\n"
