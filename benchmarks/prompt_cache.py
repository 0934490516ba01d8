"""Decoder-only inference with the prompt KV cache, against what it can at best reach and what it replaces.

Methods, on one frozen LLaMA-shaped model with random weights (every method sees the same seeded requests,
left-padded as decoder-only generation needs):

- `limit`: the frozen model fed the same s input tokens alone, no prompt: what any prompt method can at best cost;
- `dept_cached`: DePT (m = 60, r = 30) with the prompt KV cache: P's states come from the cache;
- `dept_uncached`: the same adapter with `use_prompt_cache=False`: P is run again for every request;
- `pt_peft`: HF PEFT prompt tuning with l = 100, which runs its prompt for every request.

Figures, each the median over `steps` rounds after `warmup`; the methods take turns inside a round, and each
ratio is the median of the per-round ratios, so a shared machine's drifting load slows both sides alike:

- prefill: `generate(max_new_tokens=1)`, the time to the first token;
- generate: `generate` of exactly `new_tokens` greedy tokens;
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
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dept.config import DePTConfig
from dept.model import get_dept_model

from .throughput import DEPT_NUM_VIRTUAL_TOKENS, DEPT_R, MODELS, PT_LENGTH, WORKLOADS, _environment, make_batches

RESULT_FILES = ("prompt_cache.json", "prompt_cache.md")
METHODS = {
    "limit": "Frozen model fed the s input tokens alone (the limit)",
    "dept_cached": f"DePT m={DEPT_NUM_VIRTUAL_TOKENS} r={DEPT_R}, prompt KV cache",
    "dept_uncached": f"DePT m={DEPT_NUM_VIRTUAL_TOKENS} r={DEPT_R}, no prompt cache",
    "pt_peft": f"PT l={PT_LENGTH} (HF PEFT)",
}
TARGET = ("prefill with the prompt cache vs the limit", "dept_cached", "prefill_vs_limit", 1.10)


@dataclass(frozen=True)
class PromptCacheSettings:
    """What to run: a model from `benchmarks.throughput.MODELS`, workloads, batch size, generated tokens, rounds, CPU
    threads (None: torch's default), prompt lengths for the length sweep, batch sizes for the rate sweep."""

    model: str = "llama-small"
    workloads: tuple[str, ...] = ("short", "fixed")
    device: str = "cpu"
    batch_size: int = 4
    new_tokens: int = 8
    warmup: int = 1
    steps: int = 10
    seed: int = 0
    threads: int | None = 1
    prompt_lengths: tuple[int, ...] = (20, 60, 100, 200)
    rate_batch_sizes: tuple[int, ...] = (1, 8)

    def __post_init__(self):
        if MODELS.get(self.model) is None or MODELS[self.model].family != "llama":
            decoders = [name for name, spec in MODELS.items() if spec.family == "llama"]
            raise ValueError(f"The prompt cache is for decoder-only models: choose --model from {decoders}.")
        unknown = [name for name in self.workloads if name not in WORKLOADS]
        if unknown:
            raise ValueError(f"Unknown workload(s) {unknown}: choose from {list(WORKLOADS)}.")
        if self.steps < 1 or self.warmup < 0 or self.batch_size < 1 or self.new_tokens < 1:
            raise ValueError(f"Need steps, batch_size, new_tokens >= 1 and warmup >= 0; got {self}.")


def left_padded(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same rows with their pads moved in front (decoder-only generation continues after the last token)."""
    order = torch.argsort(batch["attention_mask"], dim=1, stable=True)  # pads (0) first, real tokens in order
    return {key: batch[key].gather(1, order) for key in ("input_ids", "attention_mask")}


def requests(workload: str, vocab_size: int, batch_size: int, settings: PromptCacheSettings) -> list[dict]:
    count = settings.warmup + settings.steps
    batches = make_batches(WORKLOADS[workload], vocab_size, batch_size, count, settings.seed, "causal")
    return [{key: value.to(settings.device) for key, value in left_padded(batch).items()} for batch in batches]


def build_methods(base: nn.Module, max_length: int, prompt_length: int = DEPT_NUM_VIRTUAL_TOKENS,
                  names: tuple[str, ...] = tuple(METHODS)) -> dict[str, Callable]:
    """Each method as `generate(batch, new_tokens)`; DePT and PEFT get prompts of `prompt_length` (PEFT's l is
    PT_LENGTH unless a sweep sets it)."""
    methods = {}
    if "limit" in names:
        methods["limit"] = lambda batch, tokens, base=base: base.generate(**batch, **_greedy(tokens))
    if {"dept_cached", "dept_uncached"} & set(names):
        config = DePTConfig(num_virtual_tokens=prompt_length, r=DEPT_R, max_length=max_length, prompt_init="random",
                            task_type="causal")
        dept_model = get_dept_model(base, config).eval()
        dept_model.prompt_states()  # computed once per adapter, before any request
        for name, cached in (("dept_cached", True), ("dept_uncached", False)):
            if name in names:
                methods[name] = lambda batch, tokens, cached=cached, model=dept_model: model.generate(
                    **batch, use_prompt_cache=cached, **_greedy(tokens))
    if "pt_peft" in names:
        import peft

        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prompt_length,
                                         num_transformer_submodules=1)
        peft_model = peft.get_peft_model(copy.deepcopy(base), config).eval()
        methods["pt_peft"] = lambda batch, tokens, model=peft_model: model.generate(**batch, **_greedy(tokens))
    return methods


def _greedy(tokens: int) -> dict:
    return dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, num_beams=1)


@dataclass
class Timings:
    """Seconds per round for each method; in a round the methods ran one after another on the same batch."""

    rounds: dict[str, list[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.rounds[name])

    def ratio(self, name: str, reference: str) -> float:
        """The median over rounds of the per-round ratio: methods timed side by side share the machine's load, so
        a shared machine's drifting load cancels out."""
        return statistics.median(a / b for a, b in zip(self.rounds[name], self.rounds[reference]))


@torch.no_grad()
def measure(methods: dict[str, Callable], batches: list[dict], new_tokens: int | None, warmup: int) -> Timings:
    """Each method's seconds for a call per batch; the methods take turns on each batch."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for index, batch in enumerate(batches):
        for name, call in methods.items():
            start = time.perf_counter()
            call(batch, new_tokens)
            if batch["input_ids"].is_cuda:
                torch.cuda.synchronize()
            if index >= warmup:
                times[name].append(time.perf_counter() - start)
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


def run(settings: PromptCacheSettings, log: Callable[[str], None] = print) -> dict:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    spec = MODELS[settings.model]
    with torch.device(settings.device):
        base = spec.build().eval().requires_grad_(False)
    vocab_size = base.config.vocab_size
    results: dict = {"workloads": {}, "prompt_length_sweep": {}, "rate_sweep": {}}

    for workload in settings.workloads:
        max_length = WORKLOADS[workload].max_length
        methods = build_methods(base, max_length)
        batches = requests(workload, vocab_size, settings.batch_size, settings)
        prefill = measure(methods, batches, 1, settings.warmup)
        generate = measure(methods, batches, settings.new_tokens, settings.warmup)
        rows = {name: {"prefill_s": prefill.median(name), "generate_s": generate.median(name),
                       "prefill_vs_limit": prefill.ratio(name, "limit"),
                       "generate_vs_limit": generate.ratio(name, "limit"),
                       "prefill_vs_pt_peft": prefill.ratio(name, "pt_peft"),
                       "generate_vs_pt_peft": generate.ratio(name, "pt_peft"),
                       "prefill_rounds_s": prefill.rounds[name], "generate_rounds_s": generate.rounds[name]}
                for name in methods}
        real = statistics.mean(float(b["attention_mask"].sum(1).float().mean()) for b in batches[settings.warmup:])
        results["workloads"][workload] = {"real_length": real, "methods": rows,
                                          "prompt_states_s": prompt_states_seconds(base, max_length)}
        log(f"{workload}: " + ", ".join(f"{name} prefill {row['prefill_s']:.4f}s ({row['prefill_vs_limit']:.2f}x "
                                        f"limit)" for name, row in rows.items()))

    short = "short" if "short" in settings.workloads else settings.workloads[0]
    max_length = WORKLOADS[short].max_length
    batches = requests(short, vocab_size, settings.batch_size, settings)
    for length in settings.prompt_lengths:  # the limit again in each, so each row shares its machine load
        prefill = measure(build_methods(base, max_length, length), batches, 1, settings.warmup)
        gap = prefill.ratio("pt_peft", "dept_cached")
        results["prompt_length_sweep"][length] = {**{f"{name}_prefill_s": prefill.median(name) for name in prefill.rounds},
                                                  "pt_peft_over_dept_cached": gap,
                                                  "dept_cached_over_limit": prefill.ratio("dept_cached", "limit")}
        log(f"prompt length {length}: PEFT PT / DePT cached prefill {gap:.2f}x")

    methods = build_methods(base, max_length)
    for batch_size in settings.rate_batch_sizes:
        prefill = measure(methods, requests(short, vocab_size, batch_size, settings), 1, settings.warmup)
        results["rate_sweep"][batch_size] = {name: prefill.median(name) / batch_size for name in prefill.rounds}
    single = results["rate_sweep"][settings.rate_batch_sizes[0]]
    peft_capacity = 1 / single["pt_peft"]
    results["rate_model"] = [
        {"rate": load * peft_capacity, "load_of_pt_peft": load,
         **{f"{name}_latency_s": md1_latency(service, load * peft_capacity) for name, service in single.items()}}
        for load in (0.25, 0.5, 0.75, 0.9, 0.95)
    ]
    results["targets"] = [
        {"target": TARGET[0], "workload": workload,
         "value": results["workloads"][workload]["methods"][TARGET[1]][TARGET[2]], "threshold": TARGET[3]}
        for workload in settings.workloads
    ]
    for target in results["targets"]:
        target["met"] = target["value"] <= target["threshold"]
    results["settings"] = dataclasses.asdict(settings)
    results["methods"] = METHODS
    results["model"] = {"name": settings.model, **spec.dims}
    results["meta"] = _environment(_as_benchmark_settings(settings), time.perf_counter() - started)
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


def to_markdown(results: dict) -> str:
    meta, settings = results["meta"], results["settings"]
    lines = [
        "# Decoder-only inference with the prompt KV cache",
        "",
        f"{meta['date']} · {meta['device']} ({meta['torch_threads']} torch threads) · torch "
        f"{meta['versions']['torch']}, transformers {meta['versions']['transformers']}, peft "
        f"{meta['versions']['peft']} · commit {meta['git_commit']} · {meta['wall_time_s']:.0f} s",
        "",
        f"Model `{results['model']['name']}` (random weights), batch {settings['batch_size']} left-padded requests, "
        f"median of {settings['steps']} rounds after {settings['warmup']} warm-up. Prefill: `generate` of 1 token "
        f"(time to first token); generate: {settings['new_tokens']} greedy tokens.",
        "",
        "## Target",
        "",
        "| target | workload | measured | target | met |",
        "|---|---|---:|---:|---|",
    ]
    for row in results["targets"]:
        lines.append(f"| {row['target']} | {row['workload']} | {row['value']:.2f} | ≤ {row['threshold']} | "
                     f"{'yes' if row['met'] else 'no'} |")
    for workload, record in results["workloads"].items():
        lines += ["", f"## Workload `{workload}` ({record['real_length']:.0f} real tokens per request on average; "
                  f"an adapter's prompt states take {_ms(record['prompt_states_s'])} ms, once)", "",
                  "| method | prefill (ms) | × limit | × PEFT | generate (ms) | × limit | × PEFT |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, row in record["methods"].items():
            lines.append(f"| {results['methods'][name]} | {_ms(row['prefill_s'])} | {row['prefill_vs_limit']:.2f}× | "
                         f"{row['prefill_vs_pt_peft']:.2f}× | {_ms(row['generate_s'])} | "
                         f"{row['generate_vs_limit']:.2f}× | {row['generate_vs_pt_peft']:.2f}× |")
    lines += ["", "## The gap to PEFT with the prompt length (short text, prefill)", "",
              "PEFT PT with l = L against DePT with m = L: PEFT runs its L prompt tokens for every request.", "",
              "| L = m | limit (ms) | DePT cached (ms) | DePT uncached (ms) | PEFT PT (ms) | DePT cached / limit "
              "| PEFT / DePT cached |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for length, row in results["prompt_length_sweep"].items():
        lines.append(f"| {length} | {_ms(row['limit_prefill_s'])} | {_ms(row['dept_cached_prefill_s'])} | "
                     f"{_ms(row['dept_uncached_prefill_s'])} | {_ms(row['pt_peft_prefill_s'])} | "
                     f"{row['dept_cached_over_limit']:.2f}× | {row['pt_peft_over_dept_cached']:.2f}× |")
    names = list(results["methods"])
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
