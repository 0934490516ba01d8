"""Measure DePT's train and inference cost against prompt tuning (ours and HF PEFT), LoRA and full fine-tuning,
and the shared trainer's throughput against a bare accelerate loop.

    python scripts/benchmark.py --sizes small --output_dir bench_output                  # CPU: ~6 min on 2 cores
    python scripts/benchmark.py --sizes all --device cuda --bf16 --output_dir bench_gpu  # one GPU
    python scripts/benchmark.py --sizes tiny --steps 2 --output_dir /tmp/smoke           # seconds

Writes results.json, results.md (tables and the targets) and results.png (time and memory against model size)
to --output_dir, and refuses a directory that already holds results unless --overwrite. See benchmarks/throughput.py
for what each method, workload and figure is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is a folder of the repo, not installed

from benchmarks.throughput import (
    METHODS,
    SIZES,
    WORKLOADS,
    Settings,
    check_output_dir,
    models_for_sizes,
    run_benchmark,
    targets_table,
    trainer_loop_table,
)
from benchmarks.throughput import write_results as write


def _names(choices):
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {unknown or text!r}; choose a comma list from {list(choices)}")
        return names

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    size_help = "; ".join(f"{size}: {', '.join(models)}" for size, models in SIZES.items())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=_names(SIZES), default=["small"],
                        help=f"comma list of model size groups ({size_help})")
    parser.add_argument("--workloads", type=_names(WORKLOADS), default=list(WORKLOADS),
                        help=f"comma list from {list(WORKLOADS)} (default: all)")
    parser.add_argument("--methods", type=_names(METHODS), default=list(METHODS),
                        help=f"comma list from {list(METHODS)} (default: all)")
    parser.add_argument("--output_dir", required=True, help="where results.json, results.md and results.png go")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --output_dir")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (mixed precision) for every method")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model before measuring")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--batch_size", type=int, default=None, help="default: 16 on CUDA, 2 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per figure; default: 10 CUDA, 5 CPU")
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured steps first; default: 3 CUDA, 1 CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: torch's)")
    parser.add_argument("--isolation", choices=("process", "inline"), default=None,
                        help="a fresh process per method and phase (default on CPU, where peak RSS needs it) or "
                             "one process (default on CUDA, whose allocator peak is exact in-process)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    try:
        check_output_dir(args.output_dir, args.overwrite)
        settings = Settings(
            device=args.device, bf16=args.bf16, compile=args.compile, gradient_checkpointing=args.gradient_checkpointing,
            batch_size=args.batch_size or (16 if on_gpu else 2), steps=args.steps or (10 if on_gpu else 5),
            warmup=args.warmup if args.warmup is not None else (3 if on_gpu else 1), seed=args.seed,
            threads=args.threads, isolation=args.isolation or ("inline" if on_gpu else "process"),
        )
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results = run_benchmark(settings, models_for_sizes(args.sizes), args.workloads, args.methods)
    paths = write(results, args.output_dir, overwrite=args.overwrite)
    print("\n".join([*targets_table(results), "", *trainer_loop_table(results)]))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    failed = [r for r in results["results"] if "errors" in r]
    if failed:
        print(f"{len(failed)} measurement(s) failed; see 'errors' in {paths['json']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
