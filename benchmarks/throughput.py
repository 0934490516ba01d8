"""Efficiency benchmark: DePT against prompt tuning, LoRA and full fine-tuning, measured in one run.

What is measured, for each model size, input-length workload and method:

- train step time: forward, backward and optimizer step, synchronised on GPU;
- inference time: the eval forward (no grad), plus `generate` for encoder-decoders;
- peak memory: `torch.cuda.max_memory_allocated` on GPU; on CPU the peak RSS (VmHWM) of a fresh process;
- every figure also as a ratio to prompt tuning with l = 100, ours (`pt`) and HF PEFT's (`pt_peft`);
- the trainer's overhead (phase "loop", DePT only): `dept.trainer.Trainer` against a bare accelerate loop (forward,
  backward, optimizer step, zero_grad) on the same model and batches, as `trainer_throughput_ratio` (bare loop time
  over trainer time; the bare loop is the limit, the target is >= 0.97).

Every method is built by `dept.methods.prepare_model`, the one code path of the training CLIs (PT is DePT with
r = 0; LoRA goes through it to HF PEFT). HF PEFT's own prompt tuning (`pt_peft`) is the external reference, and the
frozen model fed m + s tokens is the inference bound; those two are built here.

Each figure is the median over `steps` steps after `warmup` steps. Models have random weights at the real
architectures' dims. Every method sees the same seeded batches. On CPU each (method, phase) runs in a fresh
process, forked from a server that has already imported torch, so peak RSS belongs to that method alone.

    from benchmarks.throughput import Settings, run_benchmark, write_results

    if __name__ == "__main__":  # fresh processes re-import the main module
        results = run_benchmark(Settings(device="cpu", steps=2), ["t5-tiny"], ["short"])
        write_results(results, "bench_output")  # results.json, results.md, results.png
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from dept.checkpoint import EpochSampler
from dept.config import DePTConfig
from dept.methods import LoraSettings
from dept.methods import prepare_model as prepare_method
from dept.optim import build_optimizer
from dept.trainer import Trainer
from dept.training_args import TrainingArguments

# The budgets compared: PT with l = 100 against DePT with m = 60, r = 30 (equal at d = 768, s = 256).
PT_LENGTH = 100
DEPT_NUM_VIRTUAL_TOKENS = 60
DEPT_R = 30
LORA_R = 8
LEARNING_RATE = 1e-4  # a small rate for every group keeps random-weight losses finite; it does not change cost
RESULT_FILES = ("results.json", "results.md", "results.png")
LOOP_ROUNDS = 3  # alternating bare-loop and trainer runs per figure of the "loop" phase


# ----------------------------------------------------------------------------------------------------------------
# Models: the real architectures' dims with random weights


@dataclass(frozen=True)
class ModelSpec:
    """A model shape: `family` is "t5" (encoder-decoder) or "llama" (decoder-only); `dims` go to its config."""

    name: str
    family: str
    dims: dict

    @property
    def task_type(self) -> str:
        return "seq2seq" if self.family == "t5" else "causal"

    def build(self) -> nn.Module:
        if self.family == "t5":
            config = T5Config(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **self.dims)
            return T5ForConditionalGeneration(config)
        config = LlamaConfig(pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=2048,
                             tie_word_embeddings=False, **self.dims)
        return LlamaForCausalLM(config)


def _t5(d_model, d_ff, num_layers, num_heads, vocab_size=32128, d_kv=64):
    return dict(vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers,
                num_decoder_layers=num_layers, num_heads=num_heads)


def _llama(hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
           vocab_size=32000):
    return dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                num_key_value_heads=num_key_value_heads)


MODELS = {
    spec.name: spec
    for spec in [
        ModelSpec("t5-tiny", "t5", _t5(32, 64, 2, 4, vocab_size=1000, d_kv=8)),
        ModelSpec("t5-small", "t5", _t5(512, 2048, 6, 8)),
        ModelSpec("t5-base", "t5", _t5(768, 3072, 12, 12)),
        ModelSpec("t5-large", "t5", _t5(1024, 4096, 24, 16)),
        ModelSpec("llama-tiny", "llama", _llama(32, 64, 2, 4, 2, vocab_size=1000)),
        ModelSpec("llama-small", "llama", _llama(512, 1408, 4, 8, 4)),
        ModelSpec("llama-1b", "llama", _llama(2048, 5632, 22, 32, 4)),  # TinyLlama-1.1B's shape
        ModelSpec("llama-7b-4l", "llama", _llama(4096, 11008, 4, 32, 32)),  # LLaMA-7B's layer shape, 4 of its 32
    ]
}
SIZES = {
    "tiny": ["t5-tiny", "llama-tiny"],
    "small": ["t5-small", "llama-small"],
    "base": ["t5-base"],
    "large": ["t5-large", "llama-1b"],
    "all": ["t5-small", "t5-base", "t5-large", "llama-small", "llama-1b"],
    "gpu": ["t5-base", "t5-large", "llama-7b-4l"],  # scripts/gpu_check.sh
}


def models_for_sizes(sizes: Iterable[str]) -> list[str]:
    """Model names for size groups, e.g. ["small", "base"] -> ["t5-small", "llama-small", "t5-base"]."""
    names: list[str] = []
    for size in sizes:
        if size not in SIZES:
            raise ValueError(f"Unknown size {size!r}: choose from {sorted(SIZES)}.")
        names += [name for name in SIZES[size] if name not in names]
    return names


# ----------------------------------------------------------------------------------------------------------------
# Workloads: input lengths


@dataclass(frozen=True)
class Workload:
    """Input lengths drawn from a seeded log-normal (median `length_median`, spread `length_sigma`), clipped to
    [4, max_length]; `length_median=None` makes every input exactly max_length tokens."""

    name: str
    description: str
    max_length: int
    target_length: int
    length_median: float | None = None
    length_sigma: float = 0.0

    def sample_lengths(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """(count,) int64 lengths in real tokens."""
        if self.length_median is None:
            return torch.full((count,), self.max_length, dtype=torch.long)
        noise = torch.randn(count, generator=generator, dtype=torch.float64)
        lengths = torch.exp(math.log(self.length_median) + self.length_sigma * noise).round()
        return lengths.clamp(4, self.max_length).long()


WORKLOADS = {
    workload.name: workload
    for workload in [
        Workload("fixed", "every input is s = 256 tokens", max_length=256, target_length=2),
        Workload("short", "SST-2-like short text, s = 256 (median 20 tokens, 95% under 64)", max_length=256,
                 target_length=2, length_median=20.0, length_sigma=0.6),
        Workload("long", "MRQA-like long context, s = 512 (median 420 tokens, a third cut at 512)", max_length=512,
                 target_length=8, length_median=420.0, length_sigma=0.45),
    ]
}


def make_batches(
    workload: Workload,
    vocab_size: int,
    batch_size: int,
    count: int,
    seed: int,
    task_type: str,
    pad_to_max_length: bool = False,
    extra_leading_tokens: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """`count` batches of random token ids, right-padded with id 0.

    The draws do not depend on the padding, so every method sees the same real tokens. Each batch has
    `input_ids` and `attention_mask` (batch, seq) and `labels`: the targets (batch, target_length) for
    seq2seq, or the inputs with -100 over pads for causal LMs. `pad_to_max_length` pads every batch to
    `workload.max_length` (the official DePT code's way) instead of to its longest row.
    `extra_leading_tokens` puts that many more real tokens in front of each row (the frozen model fed m + s).
    """
    generator = torch.Generator().manual_seed(seed)
    extra_generator = torch.Generator().manual_seed(seed + 1)
    batches = []
    for _ in range(count):
        lengths = workload.sample_lengths(batch_size, generator)
        tokens = torch.randint(3, vocab_size, (batch_size, workload.max_length), generator=generator)
        targets = torch.randint(3, vocab_size, (batch_size, workload.target_length), generator=generator)
        width = workload.max_length if pad_to_max_length else int(lengths.max())
        attention_mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
        input_ids = tokens[:, :width] * attention_mask
        if extra_leading_tokens:
            extra = torch.randint(3, vocab_size, (batch_size, extra_leading_tokens), generator=extra_generator)
            input_ids = torch.cat([extra, input_ids], dim=1)
            attention_mask = torch.cat([torch.ones_like(extra), attention_mask], dim=1)
        if task_type == "seq2seq":
            labels = targets
        else:
            labels = input_ids.masked_fill(attention_mask == 0, -100)
            labels[:, :extra_leading_tokens] = -100
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches


# ----------------------------------------------------------------------------------------------------------------
# Methods


@dataclass(frozen=True)
class Method:
    """A way to adapt the model. `padding` is "longest" (each batch padded to its longest row) or
    "max_length" (every input padded to s, as the official DePT code does)."""

    name: str
    label: str
    padding: str = "longest"
    phases: tuple[str, ...] = ("train", "inference")
    peft_type: str | None = None  # for dept.methods.prepare_model; None: a reference built here


METHODS = {
    method.name: method
    for method in [
        Method("full", "Full fine-tuning", peft_type="FULL"),
        Method("lora", f"LoRA r={LORA_R} on q, v (HF PEFT's, through dept.methods)", peft_type="LORA"),
        Method("pt", f"PT l={PT_LENGTH} (ours, r=0)", peft_type="PROMPT_TUNING"),
        Method("pt_peft", f"PT l={PT_LENGTH} (HF PEFT, external reference)"),
        Method("dept_padded", f"DePT m={DEPT_NUM_VIRTUAL_TOKENS} r={DEPT_R}, padded to s", padding="max_length",
               peft_type="PROMPT_TUNING_LORA"),
        Method("dept", f"DePT m={DEPT_NUM_VIRTUAL_TOKENS} r={DEPT_R}, dynamic padding",
               phases=("train", "inference", "loop"), peft_type="PROMPT_TUNING_LORA"),
        Method("dept_uncached", "DePT, A·B recomputed every forward", phases=("inference",),
               peft_type="PROMPT_TUNING_LORA"),
        Method("frozen", f"Frozen model fed m+s tokens (m={DEPT_NUM_VIRTUAL_TOKENS})", phases=("inference",)),
    ]
}
REFERENCES = ("pt", "pt_peft")


def prepare_model(method: Method, base: nn.Module, spec: ModelSpec, workload: Workload) -> nn.Module:
    """Freeze `base` and attach the method's trainable parameters (FULL trains every weight)."""
    if method.peft_type is not None:
        m = PT_LENGTH if method.peft_type == "PROMPT_TUNING" else DEPT_NUM_VIRTUAL_TOKENS
        config = DePTConfig(num_virtual_tokens=m, r=DEPT_R, max_length=workload.max_length, prompt_init="random",
                            task_type=spec.task_type)  # r is 0 for PROMPT_TUNING
        return prepare_method(base, method.peft_type, dept_config=config, lora=LoraSettings(r=LORA_R,
                              lora_alpha=2 * LORA_R, lora_dropout=0.0))  # fmt: skip
    if method.name == "frozen":
        return base.requires_grad_(False)
    if method.name == "pt_peft":
        import peft

        peft_task_type = {"seq2seq": "SEQ_2_SEQ_LM", "causal": "CAUSAL_LM"}[spec.task_type]
        config = peft.PromptTuningConfig(task_type=peft_task_type, num_virtual_tokens=PT_LENGTH,
                                         num_transformer_submodules=1)
        return peft.get_peft_model(base, config)
    raise ValueError(f"No way to build method {method.name!r}.")


def _training_args(output_dir: str | Path, **overrides) -> TrainingArguments:
    """One small rate for every group (random-weight losses stay finite; it does not change the cost), no
    clipping, evaluation, checkpoints or TensorBoard: the trainer does what the bare loop does."""
    options = dict(output_dir=str(output_dir), learning_rate=LEARNING_RATE, lora_embedding_lr=LEARNING_RATE,
                   weight_decay=0.0, max_grad_norm=0.0, eval_strategy="no", save_strategy="no",
                   load_best_model_at_end=False, report_to="none")  # fmt: skip
    return TrainingArguments(**{**options, **overrides})


def _optimizer(model: nn.Module) -> torch.optim.AdamW:
    """AdamW over the model's parameter groups, exactly as `dept.trainer.Trainer` builds it."""
    return build_optimizer(model, _training_args(tempfile.gettempdir()))


def _invalidate_update_cache(model: nn.Module) -> Callable[[], None]:
    """A hook that bumps A's version counter, as an optimizer step would, so DePT recomputes A @ B."""
    lora_embedding_A = model.prompt_encoder.lora_embedding_A

    @torch.no_grad()
    def invalidate():
        lora_embedding_A.add_(0.0)

    return invalidate


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# ----------------------------------------------------------------------------------------------------------------
# Measuring


@dataclass(frozen=True)
class Settings:
    """How to run: device ("cpu" or "cuda"), bf16 autocast, torch.compile, gradient checkpointing, batch size,
    warm-up and measured steps, seed, CPU threads (None: torch's default) and isolation ("process": a fresh
    process per method and phase; "inline": one process, only exact for GPU memory)."""

    device: str = "cpu"
    bf16: bool = False
    compile: bool = False
    gradient_checkpointing: bool = False
    batch_size: int = 2
    warmup: int = 1
    steps: int = 5
    seed: int = 0
    threads: int | None = None
    isolation: str = "process"

    def __post_init__(self):
        if self.steps < 1 or self.warmup < 0 or self.batch_size < 1:
            raise ValueError(f"Need steps >= 1, warmup >= 0 and batch_size >= 1; got {self}.")
        if self.isolation not in ("process", "inline"):
            raise ValueError(f"isolation must be 'process' or 'inline', got {self.isolation!r}.")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but torch sees no CUDA device: use --device cpu.")


@dataclass(frozen=True)
class Job:
    model: str
    workload: str
    method: str
    phase: str  # "train" or "inference"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory over one phase: the CUDA allocator's peak on GPU; on CPU the process's peak RSS, after
    resetting the kernel's high-water mark (Linux `clear_refs`) so model building does not count."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = 0
        self.source = ""

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.source = "torch.cuda.max_memory_allocated"
            return
        rss = _proc_status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # 5: reset the peak RSS to the current RSS
            self.source = "VmHWM of a fresh process, reset before the phase"
        except OSError:
            self.source = "ru_maxrss of the whole process (no per-phase reset on this OS)"
        self.baseline = (rss or 0) * 1024

    def stop(self) -> tuple[float, float]:
        """(peak MiB, peak minus the memory held before the phase, MiB)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = _proc_status_kib("VmHWM")
            if hwm is not None:
                peak = hwm * 1024
            else:
                max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                peak = max_rss if sys.platform == "darwin" else max_rss * 1024  # bytes on macOS, KiB on Linux
        return peak / 2**20, (peak - self.baseline) / 2**20


def _timed(device: torch.device, call: Callable[[], object]) -> tuple[float, object]:
    _synchronize(device)
    start = time.perf_counter()
    output = call()
    _synchronize(device)
    return time.perf_counter() - start, output


def time_train_steps(model, optimizer, batches, device, autocast, warmup: int) -> tuple[list[float], list[float]]:
    """Run one train step (forward, backward, AdamW step) per batch; (times after warm-up, every loss)."""
    model.train()
    times, losses = [], []

    def step(batch):
        with autocast():
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for index, batch in enumerate(batches):
        seconds, loss = _timed(device, lambda batch=batch: step(batch))
        losses.append(float(loss))
        if index >= warmup:
            times.append(seconds)
    return times, losses


@torch.no_grad()
def time_inference(model, batches, device, autocast, warmup: int, generate_tokens: int | None,
                   before_forward: Callable[[], None] | None = None) -> tuple[list[float], list[float]]:
    """Eval forwards (and greedy `generate` of exactly `generate_tokens` tokens, if given); times after warm-up."""
    model.eval()
    forward_times, generate_times = [], []

    def forward(batch):
        if before_forward is not None:
            before_forward()
        with autocast():
            return model(**batch)

    def generate(batch):
        with autocast():
            return model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  max_new_tokens=generate_tokens, min_new_tokens=generate_tokens, do_sample=False,
                                  num_beams=1)

    for index, batch in enumerate(batches):
        seconds, _ = _timed(device, lambda batch=batch: forward(batch))
        if index >= warmup:
            forward_times.append(seconds)
        if generate_tokens:
            seconds, _ = _timed(device, lambda batch=batch: generate(batch))
            if index >= warmup:
                generate_times.append(seconds)
    return forward_times, generate_times


def _single_batch(examples: list[dict]) -> dict:
    return examples[0]  # the trainer's "dataset" is the list of ready batches, one per draw


def _accelerator(settings: Settings) -> Accelerator:
    return Accelerator(cpu=not settings.device.startswith("cuda"), mixed_precision="bf16" if settings.bf16 else "no")


class StepClock:
    """Times each step of a loop by when the model's forward starts: step i lasts from forward i to forward
    i + 1, so whatever the loop does between two forwards (optimizer step, bookkeeping, fetching the next batch)
    is in it.

    On CPU the clock is this process's CPU time, which other processes' load on a shared machine does not
    inflate (the benchmark runs torch on a fixed number of threads); on GPU it is wall time, whose steps the
    device's queue paces.
    """

    def __init__(self, model: nn.Module, device: torch.device):
        self.clock = time.perf_counter if device.type == "cuda" else time.process_time
        self.starts: list[float] = []
        self._handle = model.register_forward_pre_hook(lambda *_: self.starts.append(self.clock()))

    def step_times(self) -> list[float]:
        self._handle.remove()
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


def time_bare_loop(model: nn.Module, batches: list[dict], settings: Settings) -> list[float]:
    """Per-step seconds of a bare accelerate loop over `batches`: forward, backward, optimizer step, zero_grad."""
    accelerator = _accelerator(settings)
    model, optimizer = accelerator.prepare(model, _optimizer(model))
    model.train()
    clock = StepClock(model, accelerator.device)
    for batch in batches:
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    return clock.step_times()


def time_trainer(model: nn.Module, batches: list[dict], settings: Settings) -> list[float]:
    """Per-step seconds of `dept.trainer.Trainer` over the same `batches`, each once, one optimizer step each."""
    with tempfile.TemporaryDirectory() as output_dir:
        args = _training_args(output_dir, max_steps=len(batches), per_device_train_batch_size=1,
                              mixed_precision="bf16" if settings.bf16 else "no", seed=settings.seed)  # fmt: skip
        accelerator = _accelerator(settings)
        trainer = Trainer(model, args, collate_fn=_single_batch, train_dataset=batches, accelerator=accelerator)
        clock = StepClock(model, accelerator.device)
        trainer.train()
        return clock.step_times()


def time_trainer_against_bare_loop(model: nn.Module, batches: list[dict], settings: Settings) -> dict:
    """The trainer's and the bare loop's step times over the measured batches, alternating for `LOOP_ROUNDS`
    rounds after a warm-up bare loop. The bare loop takes the batches in the trainer's (seeded) order, so step i
    of both is the same batch; `trainer_throughput_ratio` is the median over rounds and steps of bare step time
    over trainer step time."""
    warmup, measured = batches[: settings.warmup], batches[settings.warmup :]
    in_trainer_order = [measured[i] for i in EpochSampler(len(measured), settings.seed)]
    if warmup:
        time_bare_loop(model, warmup, settings)
    bare, trainer = [], []
    for _ in range(LOOP_ROUNDS):
        bare.append(time_bare_loop(model, in_trainer_order, settings))
        trainer.append(time_trainer(model, measured, settings))
    ratios = [b / t for bare_run, trainer_run in zip(bare, trainer) for b, t in zip(bare_run, trainer_run)]
    return {
        "trainer_throughput_ratio": statistics.median(ratios),
        "bare_loop_step_s": statistics.median(t for run in bare for t in run),
        "trainer_step_s": statistics.median(t for run in trainer for t in run),
        "loop_clock": "wall time" if settings.device.startswith("cuda") else "process CPU time",
    }


def run_job(job: Job, settings: Settings) -> dict:
    """Build the model, attach the method, and measure one phase. Returns the phase's figures."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    device = torch.device(settings.device)
    spec, workload, method = MODELS[job.model], WORKLOADS[job.workload], METHODS[job.method]
    with torch.device(device):
        base = spec.build()
        if settings.gradient_checkpointing and job.phase == "train":
            _enable_gradient_checkpointing(base)
        base_parameters = sum(p.numel() for p in base.parameters())
        model = prepare_model(method, base, spec, workload).to(device)
    batches = make_batches(
        workload, base.config.vocab_size, settings.batch_size, settings.warmup + settings.steps, settings.seed,
        spec.task_type, pad_to_max_length=method.padding == "max_length",
        extra_leading_tokens=DEPT_NUM_VIRTUAL_TOKENS if method.name == "frozen" else 0,
    )
    batches = [{key: value.to(device) for key, value in batch.items()} for batch in batches]
    # dynamic=True: one graph for every padded length, rather than a recompile inside the timed steps
    runnable = torch.compile(model, dynamic=True) if settings.compile else model
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if settings.bf16 else nullcontext
    measured = batches[settings.warmup:]
    result = {
        "base_parameters": base_parameters,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "padded_length": statistics.mean(batch["input_ids"].shape[1] for batch in measured),
        "real_length": statistics.mean(float(batch["attention_mask"].sum(1).float().mean()) for batch in measured),
    }
    if job.phase == "loop":  # uncompiled: the trainer has no compile option
        return {**result, **time_trainer_against_bare_loop(model, batches, settings)}
    memory = PeakMemory(device)
    if job.phase == "train":
        optimizer = _optimizer(model)
        memory.start()
        times, losses = time_train_steps(runnable, optimizer, batches, device, autocast, settings.warmup)
        peak, added = memory.stop()
        if not all(math.isfinite(loss) for loss in losses):
            raise FloatingPointError(f"{job}: a training loss is not finite: {losses}")
        result.update(train_step_s=statistics.median(times), train_step_times_s=times, train_peak_memory_mb=peak,
                      train_added_memory_mb=added, losses=losses)
    else:
        before = _invalidate_update_cache(model) if method.name == "dept_uncached" else None
        generate_tokens = workload.target_length if spec.task_type == "seq2seq" else None
        memory.start()
        forward_times, generate_times = time_inference(runnable, batches, device, autocast, settings.warmup,
                                                       generate_tokens, before)
        peak, added = memory.stop()
        result.update(eval_forward_s=statistics.median(forward_times), eval_forward_times_s=forward_times,
                      eval_peak_memory_mb=peak, eval_added_memory_mb=added)
        if generate_times:
            result.update(generate_s=statistics.median(generate_times), generate_times_s=generate_times)
    result["memory_source"] = memory.source
    return result


# ----------------------------------------------------------------------------------------------------------------
# Running every job


def _job_in_child(job: Job, settings: Settings, connection) -> None:
    gc.freeze()  # leave the inherited heap alone: no collection walks it, so its pages are not copied
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renamed-API notices, once per job
    try:
        connection.send(run_job(job, settings))
    except BaseException as error:  # noqa: B036 - the parent must hear about every failure, then we re-raise
        traceback.print_exc()
        connection.send({"error": f"{type(error).__name__}: {error}"})
        raise
    finally:
        connection.close()


class FreshProcessRunner:
    """Runs each job in a new process forked from a server that has already imported torch and this module,
    so a job starts in well under a second and its peak RSS is its own."""

    def __init__(self):
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        self.context = multiprocessing.get_context(method)
        if method == "forkserver":
            preload = ["benchmarks.throughput"] + (["peft"] if importlib.util.find_spec("peft") else [])
            self.context.set_forkserver_preload(preload)

    def __call__(self, job: Job, settings: Settings) -> dict:
        receiver, sender = self.context.Pipe(duplex=False)
        process = self.context.Process(target=_job_in_child, args=(job, settings, sender), daemon=True)
        process.start()
        sender.close()
        try:
            result = receiver.recv()
        except EOFError:
            result = None
        process.join()
        if result is None:
            result = {"error": f"the worker process died with exit code {process.exitcode} (out of memory?)"}
        return result


def run_inline(job: Job, settings: Settings) -> dict:
    """Runs a job in this process; GPU memory stays exact (allocator peaks), CPU RSS does not."""
    try:
        return run_job(job, settings)
    except torch.cuda.OutOfMemoryError as error:
        return {"error": f"OutOfMemoryError: {str(error).splitlines()[0]}"}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


FIGURES = ("train_step_s", "train_peak_memory_mb", "train_added_memory_mb", "eval_forward_s", "generate_s",
           "eval_peak_memory_mb", "eval_added_memory_mb")
LOOP_FIGURES = ("bare_loop_step_s", "trainer_step_s", "trainer_throughput_ratio")  # not divided by PT's


def run_benchmark(
    settings: Settings,
    models: Iterable[str],
    workloads: Iterable[str] = tuple(WORKLOADS),
    methods: Iterable[str] = tuple(METHODS),
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> dict:
    """Measure every (model, workload, method, phase); return the results with ratios and targets."""
    models, workloads, methods = list(models), list(workloads), list(methods)
    for names, known, flag in [(models, MODELS, "model"), (workloads, WORKLOADS, "workload"),
                               (methods, METHODS, "method")]:
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(f"Unknown {flag}(s) {unknown}: choose from {list(known)}.")
    jobs = [Job(model, workload, method, phase) for model in models for workload in workloads
            for method in methods for phase in METHODS[method].phases]
    runner = FreshProcessRunner() if settings.isolation == "process" else run_inline
    records: dict[tuple[str, str, str], dict] = {}
    started = time.perf_counter()
    for index, job in enumerate(jobs, start=1):
        outcome = runner(job, settings)
        record = records.setdefault((job.model, job.workload, job.method),
                                    {"model": job.model, "workload": job.workload, "method": job.method})
        if "error" in outcome:
            record.setdefault("errors", {})[job.phase] = outcome["error"]
            log(f"[{index}/{len(jobs)}] {job.model} {job.workload} {job.method} {job.phase}: {outcome['error']}")
            continue
        record.update(outcome)
        figures = ", ".join(f"{key} {outcome[key]:.4g}" for key in FIGURES + LOOP_FIGURES if key in outcome)
        log(f"[{index}/{len(jobs)}] {job.model} {job.workload} {job.method} {job.phase}: {figures}")
    results = {
        "meta": _environment(settings, time.perf_counter() - started),
        "settings": dataclasses.asdict(settings),
        "models": {name: {"family": MODELS[name].family, **MODELS[name].dims} for name in models},
        "workloads": {name: dataclasses.asdict(WORKLOADS[name]) for name in workloads},
        "methods": {name: dataclasses.asdict(METHODS[name]) for name in methods},
        "results": add_ratios(list(records.values())),
    }
    results["targets"] = evaluate_targets(results["results"], models)
    return results


def add_ratios(records: list[dict]) -> list[dict]:
    """Add `ratio_to_pt` and `ratio_to_pt_peft`: each figure over the reference's, same model and workload."""
    by_key = {(r["model"], r["workload"], r["method"]): r for r in records}
    for record in records:
        for reference in REFERENCES:
            ref = by_key.get((record["model"], record["workload"], reference), {})
            record[f"ratio_to_{reference}"] = {
                figure: record[figure] / ref[figure]
                for figure in FIGURES
                if figure in record and ref.get(figure) and ref[figure] > 0
            }
    return records


# The targets: (name, workload, method, figure, reference method or None for the figure itself,
# comparison, threshold).
TARGETS = [
    ("train time vs HF PEFT PT, inputs of s=256", "fixed", "dept_padded", "train_step_s", "pt_peft", "<=", 0.85),
    ("train peak memory vs HF PEFT PT, inputs of s=256", "fixed", "dept_padded", "train_peak_memory_mb", "pt_peft",
     "<=", 0.85),
    ("train memory above weights + data vs HF PEFT PT, inputs of s=256", "fixed", "dept_padded",
     "train_added_memory_mb", "pt_peft", "<=", 0.85),
    ("train time vs PT, short text, dynamic padding for both", "short", "dept", "train_step_s", "pt", "<=", 0.75),
    ("train time vs HF PEFT PT, short text, dynamic padding for both", "short", "dept", "train_step_s", "pt_peft",
     "<=", 0.75),
    ("speed-up of dynamic padding over padding to s, short text", "short", "dept_padded", "train_step_s", "dept",
     ">=", 3.0),
    ("eval forward with A·B cached vs frozen model fed m+s tokens", None, "dept", "eval_forward_s", "frozen", "<=",
     1.03),
    ("trainer throughput vs a bare accelerate loop, same model and batches", None, "dept",
     "trainer_throughput_ratio", None, ">=", 0.97),
]


def evaluate_targets(records: list[dict], models: list[str]) -> list[dict]:
    """Each target, per model (and workload), from the measured figures; plus whether DePT's saving over HF
    PEFT PT grows with T5 size."""
    by_key = {(r["model"], r["workload"], r["method"]): r for r in records}
    workloads = list(dict.fromkeys(r["workload"] for r in records))
    rows = []
    for name, workload, method, figure, reference, comparison, threshold in TARGETS:
        for model in models:
            for workload_name in [workload] if workload else workloads:
                mine = by_key.get((model, workload_name, method), {}).get(figure)
                theirs = by_key.get((model, workload_name, reference), {}).get(figure) if reference else 1.0
                if not (mine and theirs):
                    continue
                value = mine / theirs
                met = value <= threshold if comparison == "<=" else value >= threshold
                rows.append({"target": name, "model": model, "workload": workload_name, "figure": figure,
                             "method": method, "reference": reference, "value": value, "comparison": comparison,
                             "threshold": threshold, "met": met})
    t5_models = [m for m in models if MODELS[m].family == "t5" and m != "t5-tiny"]
    for workload_name in workloads:
        ratios = [by_key.get((m, workload_name, "dept"), {}).get("ratio_to_pt_peft", {}).get("train_step_s")
                  for m in t5_models]
        if len(t5_models) >= 2 and all(ratios):
            rows.append({"target": "saving over HF PEFT PT grows with T5 size (train time ratio falls)",
                         "model": " < ".join(t5_models), "workload": workload_name, "figure": "train_step_s",
                         "method": "dept", "reference": "pt_peft", "value": ratios, "comparison": "falls",
                         "threshold": None, "met": all(b <= a for a, b in zip(ratios, ratios[1:]))})
    return rows


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _environment(settings: Settings, seconds: float) -> dict:
    versions = {}
    for package in ("torch", "transformers", "peft"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(settings.device) if settings.device.startswith("cuda") else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": settings.threads or torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": commit,
        "wall_time_s": seconds,
    }


# ----------------------------------------------------------------------------------------------------------------
# Writing the results


def check_output_dir(output_dir: str | Path, overwrite: bool) -> Path:
    """Refuse a directory that already holds results, unless `overwrite`."""
    path = Path(output_dir)
    existing = [name for name in RESULT_FILES if (path / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{path} already holds benchmark results ({', '.join(existing)}). Pass --overwrite to replace them, "
            "or choose another --output_dir."
        )
    return path


def write_results(results: dict, output_dir: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """Write results.json, results.md and results.png into `output_dir`; return their paths."""
    path = check_output_dir(output_dir, overwrite)
    path.mkdir(parents=True, exist_ok=True)
    paths = {"json": path / "results.json", "markdown": path / "results.md", "plot": path / "results.png"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["markdown"].write_text(to_markdown(results))
    plot(results, paths["plot"])
    return paths


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _ratio(record: dict, reference: str, figure: str) -> str:
    value = record.get(f"ratio_to_{reference}", {}).get(figure)
    return "–" if value is None else f"{value:.2f}×"


def to_markdown(results: dict) -> str:
    """A targets table, then one table per workload: figures and their ratios to both PT baselines."""
    meta, settings = results["meta"], results["settings"]
    lines = [
        "# DePT efficiency benchmark",
        "",
        f"{meta['date']} · {meta['device']} ({meta['cpu_count']} CPUs, {meta['torch_threads']} torch threads) · "
        f"torch {meta['versions']['torch']}, transformers {meta['versions']['transformers']}, "
        f"peft {meta['versions']['peft']} · commit {meta['git_commit']} · {meta['wall_time_s']:.0f} s",
        "",
        f"Batch size {settings['batch_size']}, median of {settings['steps']} steps after {settings['warmup']} "
        f"warm-up, bf16 {settings['bf16']}, compile {settings['compile']}, gradient checkpointing "
        f"{settings['gradient_checkpointing']}. Random weights at each architecture's dims. Memory: "
        + ("CUDA allocator peak." if settings["device"].startswith("cuda") else "peak RSS of a fresh process."
           if settings["isolation"] == "process" else "peak RSS of one shared process (approximate).")
        + " ×PT / ×PEFT: the figure over PT l=100 (ours) / HF PEFT PT l=100, same model and workload.",
        "",
        *targets_table(results),
        "",
        *trainer_loop_table(results),
    ]
    labels = {name: method["label"] for name, method in results["methods"].items()}
    for workload, spec in results["workloads"].items():
        lines += [
            "",
            f"## Workload `{workload}`: {spec['description']}",
            "",
            "| model | method | trainable | tokens in / padded | train step (s) | ×PT | ×PEFT | train peak (MiB) "
            "| ×PT | ×PEFT | added (MiB) | ×PEFT | eval fwd (s) | ×PEFT | generate (s) | ×PEFT |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for record in (r for r in results["results"] if r["workload"] == workload):
            if "errors" in record:
                lines.append(f"| {record['model']} | {labels[record['method']]} | error: "
                             f"{'; '.join(record['errors'].values())} |" + " |" * 13)
                continue
            lines.append(
                f"| {record['model']} | {labels[record['method']]} | {_fmt(record.get('trainable_parameters'))} | "
                f"{_fmt(record.get('real_length'))} / {_fmt(record.get('padded_length'))} | "
                f"{_fmt(record.get('train_step_s'))} | {_ratio(record, 'pt', 'train_step_s')} | "
                f"{_ratio(record, 'pt_peft', 'train_step_s')} | {_fmt(record.get('train_peak_memory_mb'), 4)} | "
                f"{_ratio(record, 'pt', 'train_peak_memory_mb')} | {_ratio(record, 'pt_peft', 'train_peak_memory_mb')} | "
                f"{_fmt(record.get('train_added_memory_mb'), 4)} | "
                f"{_ratio(record, 'pt_peft', 'train_added_memory_mb')} | {_fmt(record.get('eval_forward_s'))} | "
                f"{_ratio(record, 'pt_peft', 'eval_forward_s')} | {_fmt(record.get('generate_s'))} | "
                f"{_ratio(record, 'pt_peft', 'generate_s')} |"
            )
    return "\n".join(lines) + "\n"


def targets_table(results: dict) -> list[str]:
    """The "Targets" section of results.md, as lines."""
    lines = ["## Targets", "", "| target | model | workload | measured | target | met |", "|---|---|---|---|---|---|"]
    for row in results["targets"]:
        value = (" → ".join(f"{v:.2f}" for v in row["value"]) if isinstance(row["value"], list)
                 else f"{row['value']:.2f}")
        goal = row["comparison"] if row["threshold"] is None else f"{row['comparison']} {row['threshold']}"
        lines.append(f"| {row['target']} | {row['model']} | {row['workload']} | {value} | {goal} | "
                     f"{'yes' if row['met'] else 'no'} |")
    return lines


def trainer_loop_table(results: dict) -> list[str]:
    """The trainer-vs-bare-loop section of results.md, as lines (none when the "loop" phase did not run)."""
    rows = [r for r in results["results"] if "trainer_throughput_ratio" in r]
    if not rows:
        return []
    lines = [
        "## The trainer against a bare accelerate loop",
        "",
        f"`dept.trainer.Trainer` and a bare loop (forward, backward, optimizer step, zero_grad) on the same model "
        f"and batches, {LOOP_ROUNDS} alternating runs each; a step's time runs from one forward's start to the "
        "next (process CPU time on CPU, wall time on GPU), and step i is the same batch in both. Ratio: the median "
        "of bare step time / trainer step time (the trainer's share of the bare loop's throughput; 1 is the "
        "limit).",
        "",
        "| model | workload | method | bare loop step (s) | trainer step (s) | ratio |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['workload']} | {r['method']} | {_fmt(r['bare_loop_step_s'])} | "
                     f"{_fmt(r['trainer_step_s'])} | {r['trainer_throughput_ratio']:.3f} |")
    return lines


def plot(results: dict, path: str | Path) -> None:
    """Train step time, train peak and added memory, and eval forward time against model size; one line per
    method (solid: T5, dashed: LLaMA); one row per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    figures = [("train_step_s", "train step (s)"), ("train_peak_memory_mb", "train peak memory (MiB)"),
               ("train_added_memory_mb", "train memory above weights + data (MiB)"),
               ("eval_forward_s", "eval forward (s)")]
    workloads = list(results["workloads"])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {method: colors[index % len(colors)] for index, method in enumerate(results["methods"])}
    fig, axes = plt.subplots(len(workloads), len(figures), figsize=(4.6 * len(figures), 3.4 * len(workloads)),
                             squeeze=False)
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    for row, workload in enumerate(workloads):
        for col, (figure, title) in enumerate(figures):
            axis = axes[row][col]
            for method in results["methods"]:
                for family, style in (("t5", "-o"), ("llama", "--s")):
                    points = sorted(
                        (r["base_parameters"] / 1e6, r[figure]) for r in results["results"]
                        if r["workload"] == workload and r["method"] == method and r.get(figure, 0) > 0
                        and results["models"][r["model"]]["family"] == family
                    )
                    if points:
                        axis.plot(*zip(*points), style, color=color[method], markersize=5)
            axis.set_xscale("log")
            axis.set_yscale("log")
            for scale in (axis.xaxis, axis.yaxis):
                scale.set_major_formatter(plain)
                scale.set_minor_formatter(plain)
            axis.tick_params(which="minor", labelsize=6)
            axis.set_xlabel("model parameters (millions)", fontsize=8)
            axis.set_title(f"{workload}: {title}", fontsize=9)
            axis.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], color=color[m], marker="o", label=spec["label"]) for m, spec in results["methods"].items()]
    handles += [Line2D([], [], color="gray", linestyle=style, marker=marker, label=family)
                for family, style, marker in (("T5", "-", "o"), ("LLaMA", "--", "s"))]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = [
    "METHODS", "MODELS", "SIZES", "WORKLOADS", "FreshProcessRunner", "Job", "Method", "ModelSpec", "PeakMemory",
    "Settings", "Workload", "add_ratios", "check_output_dir", "evaluate_targets", "make_batches", "models_for_sizes",
    "plot", "prepare_model", "run_benchmark", "run_inline", "run_job", "targets_table", "time_trainer_against_bare_loop",
    "to_markdown", "trainer_loop_table", "write_results",
]
