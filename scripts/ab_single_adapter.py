"""Interleaved A/B timing of the single-adapter training step (forward + backward) of this tree against a git ref.

    python scripts/ab_single_adapter.py --ref da77dd4                      # t5-small and llama-small dims, 1 thread
    python scripts/ab_single_adapter.py --ref HEAD~1 --models t5-tiny --rounds 3   # seconds

The ref's `dept/` is extracted (`git archive`) as a package `dept_ref`; both versions wrap one frozen base model
(random weights, `benchmarks.throughput.MODELS` dims) with the paper's adapter (m = 60, r = 30, s = 256) and take
turns, in alternating order, on the same batches. Prints each version's median seconds, the ratio of the medians
new / ref and the median of the per-batch ratios (below 1: this tree is faster). Timings on a shared machine are
noisy: `--ref HEAD` (the same code twice) shows the noise floor.
"""

from __future__ import annotations

import argparse
import importlib
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.throughput import MODELS  # noqa: E402


def import_ref(ref: str, directory: Path):
    """The `dept` package of git `ref`, importable as `dept_ref` (its modules import each other relatively)."""
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", ref, "dept"], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(directory, filter="data")
    (directory / "dept").rename(directory / "dept_ref")
    sys.path.insert(0, str(directory))
    return importlib.import_module("dept_ref")


def attach(package, base, family: str):
    config = package.DePTConfig(num_virtual_tokens=60, r=30, max_length=256, prompt_init="random",
                                task_type="seq2seq" if family == "t5" else "causal")
    model = package.get_dept_model(base, config)
    with torch.no_grad():
        model.prompt_encoder.lora_embedding_B.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    return model.train()


def batches(family: str, vocab_size: int, count: int, batch_size: int, length: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(3, vocab_size, (batch_size, length), generator=generator)
        lengths = torch.randint(length // 2, length + 1, (batch_size,), generator=generator)
        mask = (torch.arange(length)[None] < lengths[:, None]).long()
        ids = ids * mask
        batch = {"input_ids": ids, "attention_mask": mask}
        if family == "t5":
            batch["labels"] = torch.randint(3, vocab_size, (batch_size, 8), generator=generator)
        else:
            batch["labels"] = ids.masked_fill(mask == 0, -100)
        out.append(batch)
    return out


def step_seconds(model, batch) -> float:
    start = time.perf_counter()
    model(**batch).loss.backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", required=True, help="the git ref to compare this tree with")
    parser.add_argument("--models", nargs="+", default=["t5-small", "llama-small"], choices=sorted(MODELS))
    parser.add_argument("--rounds", type=int, default=20, help="timed steps per version (after 2 warm-up steps)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--length", type=int, default=128, help="the longest input; rows are 1/2 to 1 of it")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import dept

    with tempfile.TemporaryDirectory() as tmp:
        versions = {"new": dept, "ref": import_ref(args.ref, Path(tmp))}
        for name in args.models:
            spec = MODELS[name]
            torch.manual_seed(0)
            base = spec.build()
            models = {version: attach(package, base, spec.family) for version, package in versions.items()}
            data = batches(spec.family, base.config.vocab_size, args.rounds + 2, args.batch_size, args.length)
            times: dict[str, list[float]] = {version: [] for version in models}
            for index, batch in enumerate(data):
                order = list(models) if index % 2 == 0 else list(reversed(models))
                for version in order:
                    seconds = step_seconds(models[version], batch)
                    if index >= 2:
                        times[version].append(seconds)
            new, ref = statistics.median(times["new"]), statistics.median(times["ref"])
            paired = statistics.median(a / b for a, b in zip(times["new"], times["ref"]))  # robust to load drift
            print(f"{name}: new {new:.4f} s, ref {args.ref} {ref:.4f} s, ratio of medians new/ref {new / ref:.3f}, "
                  f"median of paired ratios {paired:.3f} ({args.rounds} interleaved rounds, batch {args.batch_size} "
                  f"x <= {args.length}, {args.threads} thread(s))")


if __name__ == "__main__":
    main()
